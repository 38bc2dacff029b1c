"""Train, export and calibrate the reference chest X-ray networks.

    python -m mosmedai_training.train [--tool NAME|all] [--out model_repository]

For each tool: a small CNN is trained on synthetic phantoms (`mosmedai.phantoms.chest_xray`,
split TRAIN_SEED) turned into network input by `mosmedai.catalog.imaging.preprocess` - the serving
path's own function. It is exported to ONNX (opset 17, dynamic batch, input ``image``
[N, 1, 256, 256], outputs ``logit`` [N, 1] and ``heatmap`` [N, 1, 32, 32]) at
``<out>/<tool>_net/<version>/model.onnx``. Platt scaling is then fitted on the exported
model's outputs over a separate calibration split (CALIBRATION_SEED) and written to
``<out>/<tool>_post/<version>/calibration.json`` with the suggested operating threshold.

Versions (``--version N``, default 1): each is a recipe of `RECIPES` (network widths and
the initialisation seed; in ``mosmedai_training``) on the same training and calibration splits; the tool's catalog
entry lists the versions its repository holds (``ToolSpec.versions``).

The three tools train on the same phantoms (each with its own labels; the other findings
appear as distractors), generated once and kept in memory. Reference models on synthetic
data: not for clinical use.

Cost on a 2-core machine: the 3,600 phantoms take 2-3.5 minutes (two processes), then each
tool trains 8 epochs in about 3.5 minutes on two torch threads when the machine is otherwise
idle (longer when shared). Then run ``python -m mosmedai_training.evaluate --write-cards``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mosmedai_training import CALIBRATION_SEED, RECIPES, TRAIN_SEED, Recipe
from mosmedai_training.common import (
    block2d,
    count_macs,
    export_onnx as common_export_onnx,
    minibatches,
    one_cycle,
    optimise,
    platt_operating_point,
    threshold_rule,
    training_summary,
    write_calibration,
)
from mosmedai_training.evaluate import auc_score, onnx_outputs
from mosmedai.phantoms.chest_xray import HEATMAP_SIZE, TOOLS, network_arrays
from mosmedai.catalog.imaging import NETWORK_SIZE

N_TRAIN = 3000
N_CALIBRATION = 600
EPOCHS = 8
BATCH = 32
LEARNING_RATE = 3e-3
#: Weight of the heatmap loss against the image loss.
HEATMAP_LOSS_WEIGHT = 1.0
#: Operating point: the highest threshold (0.01 steps) keeping sensitivity >= this on the
#: calibration split, and never above 0.5 (the Bayes threshold at the split's ~50 % prevalence).
TARGET_SENSITIVITY = 0.9
OPSET = 17


def recipe(version: int) -> Recipe:
    if version not in RECIPES:
        raise ValueError(f"no training recipe for version {version}; known: {sorted(RECIPES)}")
    return RECIPES[version]


_block = block2d


class CxrNet(nn.Module):
    """256 x 256 radiograph -> finding logit and a 32 x 32 heatmap of logits.

    Three stride-2 stages to 1/8 resolution, then dilated convolutions (receptive field
    about 135 input pixels, ~20 cm of chest) for context such as a missing lung edge. The
    logit reads the mean and max of the features and the heatmap's max, so a small finding
    that lights one cell can decide the image.
    """

    def __init__(self, widths: tuple[int, int, int] = (12, 24, 48)):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _block(1, w1, stride=2),  # 128
            _block(w1, w2, stride=2),  # 64
            _block(w2, w2),
            _block(w2, w3, stride=2),  # 32
            _block(w3, w3),
            _block(w3, w3, dilation=2),
            _block(w3, w3, dilation=4),
        )
        self.heatmap = nn.Conv2d(w3, 1, 1)
        self.classifier = nn.Linear(2 * w3 + 1, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(image)
        heatmap = self.heatmap(features)
        pooled = torch.cat(
            [features.mean(dim=(2, 3)), features.amax(dim=(2, 3)), heatmap.amax(dim=(2, 3))], dim=1
        )
        return self.classifier(pooled), heatmap


def _augment(images: torch.Tensor, heatmaps: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips and a display gamma (0.8-1.25): cheap variety on top of the phantoms."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    heatmaps = torch.where(flip[:, None, None, None], heatmaps.flip(3), heatmaps)
    gamma = torch.exp((torch.rand(n, generator=generator) - 0.5) * 0.45)
    images = images.clamp_min(0.0) ** gamma[:, None, None, None]
    return images, heatmaps


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE over heatmap cells: the mean over the finding's cells plus the mean
    over the others. A nodule covers 1-4 of 1024 cells; unbalanced, an all-zero map wins."""
    per_cell = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = target > 0.5
    loss = per_cell[~positive].mean()
    if bool(positive.any()):
        loss = loss + per_cell[positive].mean()
    return loss


def train_tool(tool: str, data: dict[str, np.ndarray], epochs: int = EPOCHS, log=print,
               version: int = 1) -> tuple[CxrNet, dict]:
    """Train one version of a tool's network on `data` (from `network_arrays`); returns it and a summary."""
    index = TOOLS.index(tool)
    plan = recipe(version)
    seed = TRAIN_SEED + index + plan.seed_offset
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data["image"])[:, None]  # float16, converted per batch
    labels = torch.from_numpy(data["labels"][:, index].astype(np.float32))[:, None]
    heat = torch.from_numpy(data["heatmaps"][:, index])[:, None]
    n = len(labels)

    model = CxrNet(plan.widths)
    optimizer, schedule = one_cycle(model.parameters(), LEARNING_RATE, epochs * (n // BATCH))
    image_loss = nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        totals = [0.0, 0.0]
        for batch in minibatches(n, BATCH, generator):
            x, h = _augment(images[batch].float(), heat[batch].float(), generator)
            logit, heatmap = model(x)
            loss_image = image_loss(logit, labels[batch])
            loss_heat = heatmap_loss(heatmap, h)
            optimise(optimizer, schedule, loss_image + HEATMAP_LOSS_WEIGHT * loss_heat)
            totals[0] += float(loss_image.detach())
            totals[1] += float(loss_heat.detach())
        steps_done = n // BATCH
        log(
            f"{tool}: epoch {epoch + 1}/{epochs} image loss {totals[0] / steps_done:.4f} "
            f"heatmap loss {totals[1] / steps_done:.4f} ({time.perf_counter() - started:.0f} s)"
        )
    model.eval()
    return model, training_summary(model, epochs, BATCH, LEARNING_RATE, started, macs_per_image=count_macs(model))


def export_onnx(model: CxrNet, path: Path, metadata: dict[str, str]) -> None:
    """ONNX opset 17, dynamic batch axis, input ``image``, outputs ``logit`` and ``heatmap``."""
    common_export_onnx(model, path, metadata, (1, NETWORK_SIZE, NETWORK_SIZE), ("logit", "heatmap"), check_batch=3)


def calibrate(tool: str, onnx_path: Path, data: dict[str, np.ndarray], out: Path, version: int = 1) -> dict:
    """Fit Platt scaling on the exported model's calibration-split outputs; write calibration.json."""
    index = TOOLS.index(tool)
    labels = data["labels"][:, index]
    logits, _ = onnx_outputs(onnx_path, data["image"][:, None].astype(np.float32))
    logits = logits[:, 0]
    calibration, threshold, sensitivity, specificity = platt_operating_point(logits, labels, TARGET_SENSITIVITY)
    record = {
        "a": calibration.a,
        "b": calibration.b,
        "fitted_on": (
            f"calibration split: phantoms (seed {CALIBRATION_SEED}, i) for i in 0..{len(labels) - 1}, "
            f"outputs of {onnx_path.parent.parent.name}/{onnx_path.parent.name}/model.onnx under ONNX Runtime; "
            "Platt scaling, Newton's method on log-loss with Platt's smoothed targets"
        ),
        "seed": CALIBRATION_SEED,
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "auc": round(auc_score(logits, labels), 4),
        "suggested_threshold": threshold,
        "threshold_rule": threshold_rule(TARGET_SENSITIVITY),
        "sensitivity_at_suggested": round(sensitivity, 4),
        "specificity_at_suggested": round(specificity, 4),
        "model_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    return write_calibration(out, tool, record, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--out", type=Path, default=Path("model_repository"))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-calibration", type=int, default=N_CALIBRATION)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--version", type=int, default=1, choices=sorted(RECIPES),
                        help="the tool version to train (its recipe: RECIPES)")
    args = parser.parse_args(argv)
    tools = TOOLS if args.tool == "all" else (args.tool,)

    started = time.perf_counter()
    train = network_arrays(TRAIN_SEED, args.n_train, workers=args.workers)
    calibration_data = network_arrays(CALIBRATION_SEED, args.n_calibration, workers=args.workers)
    generated = time.perf_counter() - started
    print(f"phantoms: {args.n_train} training + {args.n_calibration} calibration in {generated:.0f} s", flush=True)

    torch.set_num_threads(args.threads)
    for tool in tools:
        model, summary = train_tool(tool, train, epochs=args.epochs, log=lambda m: print(m, flush=True),
                                    version=args.version)
        index = TOOLS.index(tool)
        plan = recipe(args.version)
        onnx_path = args.out / f"{tool}_net" / str(args.version) / "model.onnx"
        metadata = {
            "mosmedai.tool": tool,
            "mosmedai.version": args.version,
            "mosmedai.architecture": "CxrNet (mosmedai_training.train)",
            "mosmedai.widths": "/".join(map(str, plan.widths)),
            "mosmedai.train_seed": TRAIN_SEED,
            "mosmedai.init_seed": TRAIN_SEED + index + plan.seed_offset,
            "mosmedai.n_train": args.n_train,
            "mosmedai.n_train_positive": int(train["labels"][:, index].sum()),
            "mosmedai.heatmap_size": HEATMAP_SIZE,
            "mosmedai.generation_seconds_all_tools": round(generated, 1),
            "mosmedai.torch_version": torch.__version__,
            **{f"mosmedai.{key}": value for key, value in summary.items()},
        }
        export_onnx(model, onnx_path, metadata)
        record = calibrate(tool, onnx_path, calibration_data, args.out, args.version)
        print(
            f"{tool}: trained in {summary['train_seconds']} s, {summary['parameters']} parameters, "
            f"{summary['macs_per_image'] / 1e6:.0f} M MACs/image, ONNX {onnx_path.stat().st_size / 1024:.0f} KiB; "
            f"calibration AUC {record['auc']}, a={record['a']:.3f} b={record['b']:.3f}, "
            f"suggested threshold {record['suggested_threshold']} "
            f"(sens {record['sensitivity_at_suggested']}, spec {record['specificity_at_suggested']})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
