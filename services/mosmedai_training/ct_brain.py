"""Reference non-contrast head CT models: one shared network, export, evaluation, cards.

    python -m mosmedai_training.ct_brain train [--tool all] [--out model_repository]
    python -m mosmedai_training.ct_brain evaluate [--tool all] [--n 300] [--repository model_repository]

Tools (``mosmedai.catalog.families.ct_brain``): ``ctb_hemorrhage`` (hyperdense intracranial
haemorrhage), ``ctb_ischemia`` (early territorial ischaemia) and ``ctb_midline_shift``
(septum pellucidum displacement from the falx/skull midline, mm).

The phantoms (an axial head CT series in Hounsfield units with haemorrhage, early ischaemia
and mass effect at known places) are `mosmedai.phantoms.ct_brain`; their names are
importable from here too.

One small 3-D CNN (`CtBrainNet`) with four heads is trained once on the shared phantoms;
each tool's ONNX holds the shared trunk and only its own heads (multi-task training: one
CPU budget for three tools).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mosmedai.catalog.families import ToolOutput
from mosmedai.catalog.families import ct_brain as family
from mosmedai.catalog.volumes import VolumeGeometry, sample_indices, window
from mosmedai.phantoms.ct_brain import (  # noqa: F401 (the phantoms' names, re-exported)
    BLUR_MM,
    CASE_SIZE,
    P_HAEMORRHAGE_NO_MASS,
    P_ISCHAEMIA,
    P_MASS,
    P_MASS_HAEMORRHAGE,
    Anatomy,
    Seed,
    make_anatomy,
    render,
)
from mosmedai_training import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED, common
from mosmedai_training.common import (Case, minibatches, one_cycle, optimise, training_summary,
                                      with_admission_thresholds)

TOOLS = tuple(spec.name for spec in family.TOOLS)
GRID = family.GRID
WINDOW = family.WINDOW
HEAT = family.HEATMAP_SHAPE  # (24, 48, 48)

#: In-plane size of the training renders (the cases': CASE_SIZE).
TRAIN_SIZE = 144
SHIFT_POSITIVE_MM = family.SHIFT_POSITIVE_MM


# --------------------------------------------------------------------------------------
# network arrays


def _grid_indices(anatomy: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    return sample_indices(anatomy.n_slices, GRID[0]), sample_indices(size, GRID[1])


def geometry_of(anatomy: Anatomy, size: int) -> VolumeGeometry:
    px = anatomy.fov / size
    return VolumeGeometry(anatomy.n_slices, size, size, anatomy.dz, px, px, *GRID)


def grid_sample(anatomy: Anatomy, size: int, seed: Seed, with_masks: bool = True):
    """The int16 grid volume the gateway would send for this phantom rendered at ``size``
    pixels, its geometry and the masks on the grid - rendering only the slices the grid
    samples (identical to rendering the whole series and `volumes.to_grid`). The masks are
    those of the rendered source slices at full in-plane resolution."""
    zi, ri = _grid_indices(anatomy, size)
    hu, masks = render(anatomy, size, slices=zi, seed=seed)
    grid = np.clip(np.rint(hu[:, ri][:, :, ri]), -32768, 32767).astype(np.int16)
    return grid, geometry_of(anatomy, size), masks, hu, zi


def network_input(grid: np.ndarray) -> np.ndarray:
    """The preprocess step's output for one grid volume: float32 [1, D, H, W]."""
    return window(grid, *WINDOW)[None]


def pool_target(mask: np.ndarray) -> np.ndarray:
    """Source-resolution mask of the grid's slices [D, S, S] -> heatmap-cell target
    [D, H/2, W/2]: cells holding any of the mask (area resampling)."""
    out = np.zeros((mask.shape[0], *HEAT[1:]), bool)
    for k, plane in enumerate(mask):
        if plane.any():
            out[k] = cv2.resize(plane.astype(np.float32), (HEAT[2], HEAT[1]), interpolation=cv2.INTER_AREA) > 0.02
    return out


@dataclass
class Truth:
    haemorrhage: bool
    ischaemia: bool
    shift_mm: float
    side: str | None  # haemorrhage side (left/right/midline)
    haem_slices: tuple[int, int] | None  # first, last source slice holding the haemorrhage
    haem_centre_slice: float | None
    haem_box: tuple[float, float, float, float] | None  # source pixels, projection over slices
    haem_volume_ml: float
    isch_slices: tuple[int, int] | None
    isch_centre_slice: float | None
    isch_box: tuple[float, float, float, float] | None
    septum_slices: tuple[int, int] | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _extent(mask: np.ndarray, source_slices: np.ndarray, size: int) -> tuple:
    """(first, last) source slice, centre slice (mask-weighted), in-plane box in source pixels."""
    per_slice = mask.sum(axis=(1, 2))
    if per_slice.sum() == 0:
        return None, None, None
    held = np.flatnonzero(per_slice)
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    centre = float(np.average(source_slices, weights=per_slice))
    return ((int(source_slices[held[0]]), int(source_slices[held[-1]])), centre,
            (float(rows[0]), float(cols[0]), float(rows[-1] + 1), float(cols[-1] + 1)))


def truth_of(anatomy: Anatomy, masks: dict[str, np.ndarray], source_slices: np.ndarray, size: int) -> Truth:
    h_slices, h_centre, h_box = _extent(masks["haemorrhage"], source_slices, size)
    i_slices, i_centre, i_box = _extent(masks["ischaemia"], source_slices, size)
    s_slices, _, _ = _extent(masks["septum"], source_slices, size)
    px = anatomy.fov / size
    # volume: voxel share of the rendered slices times the whole series' slab
    volume = float(masks["haemorrhage"].sum() * px * px * anatomy.dz * anatomy.n_slices / len(source_slices) / 1000.0)
    has_h = anatomy.haemorrhage is not None and h_slices is not None
    return Truth(
        haemorrhage=has_h, ischaemia=anatomy.ischaemia is not None and i_slices is not None,
        shift_mm=anatomy.shift, side=anatomy.haemorrhage["side"] if has_h else None,
        haem_slices=h_slices if has_h else None, haem_centre_slice=h_centre if has_h else None,
        haem_box=h_box if has_h else None, haem_volume_ml=volume if has_h else 0.0,
        isch_slices=i_slices, isch_centre_slice=i_centre, isch_box=i_box, septum_slices=s_slices,
    )


def _phantom_arrays(args: tuple[int, int, int]) -> dict:
    seed, index, size = args
    anatomy = make_anatomy((seed, index))
    grid, geometry, masks, hu, zi = grid_sample(anatomy, size, (seed, index))
    truth = truth_of(anatomy, masks, zi, size)
    hu_u8 = (np.clip(grid, WINDOW[0], WINDOW[1]) - WINDOW[0]).astype(np.uint8)
    targets = np.stack([pool_target(masks[k]) for k in ("haemorrhage", "ischaemia", "septum", "midline")])
    return {
        "volume": hu_u8, "targets": targets,
        "labels": np.array([truth.haemorrhage, truth.ischaemia, abs(anatomy.shift) >= SHIFT_POSITIVE_MM]),
        "columns": np.array([septum_col(anatomy), midline_col(anatomy)], np.float32),
        "col_spacing_mm": np.float32(geometry.grid_spacing_mm[2]),
        "shift_mm": np.float32(anatomy.shift),
    }


def midline_col(anatomy: Anatomy) -> float:
    """Column of the falx plane in heatmap-cell units (cell edges)."""
    return (anatomy.midline + anatomy.fov / 2) / anatomy.fov * HEAT[2]


def septum_col(anatomy: Anatomy) -> float:
    return (anatomy.midline + anatomy.shift + anatomy.fov / 2) / anatomy.fov * HEAT[2]


def network_arrays(seed: int, n: int, size: int = TRAIN_SIZE, workers: int = 1) -> dict[str, np.ndarray]:
    """Training/calibration arrays: volume uint8 [n, D, H, W] (HU - window low, clipped to the
    window: window() == volume / (high - low)), targets bool [n, 4, D, H/2, W/2], labels [n, 3]."""
    jobs = [(seed, i, size) for i in range(n)]
    items = common.map_items(_phantom_arrays, jobs, workers, chunksize=8)
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


# --------------------------------------------------------------------------------------
# network (torch only inside these functions: evaluation and tests need no torch)

N_TRAIN = 1000
N_CALIBRATION = 300
EPOCHS = 7
BATCH = 8
LEARNING_RATE = 4e-3
OPSET = 17
TARGET_SENSITIVITY = 0.9
HEADS = ("haemorrhage", "ischaemia", "septum", "midline")


def _torch_net():
    import torch
    from torch import nn

    def block(cin, cout, kernel, stride=1, dilation=1):
        padding = tuple(d * (k // 2) for k, d in zip(kernel, (dilation,) * 3))
        return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding=padding, dilation=dilation, bias=False),
                             nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

    class CtBrainNet(nn.Module):
        """[N, 1, 24, 96, 96] -> logits of haemorrhage and ischaemia [N, 2] and four heatmaps of
        logits [N, 4, 24, 48, 48] (haemorrhage, ischaemia, septum, midline).

        A strided in-plane stem to 48 x 48 (the skip features), a stride-2 3-D
        convolution to 12 x 24 x 24, two 3-D convolutions (one dilated: receptive field about
        60 mm in-plane), a transposed convolution back to 24 x 48 x 48 added to the skip, 1x1 heads.
        The two logits read the deep features' mean and max and their own heatmap's max."""

        def __init__(self, w1: int = 8, w2: int = 16):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv3d(1, w1, (1, 4, 4), (1, 2, 2), padding=(0, 1, 1)), nn.ReLU(inplace=True))
            self.down = block(w1, w2, (3, 3, 3), stride=2)
            self.deep = nn.Sequential(block(w2, w2, (3, 3, 3)), block(w2, w2, (3, 3, 3), dilation=2))
            self.up = nn.ConvTranspose3d(w2, w1, 2, stride=2)
            self.heads = nn.Conv3d(w1, 4, 1)
            self.classifiers = nn.ModuleList([nn.Linear(2 * w2 + 1, 1) for _ in range(2)])

        def forward(self, image):
            skip = self.stem(image)
            deep = self.deep(self.down(skip))
            merged = torch.relu(skip + self.up(deep))
            heat = self.heads(merged)
            pooled = torch.cat([deep.mean(dim=(2, 3, 4)), deep.amax(dim=(2, 3, 4))], dim=1)
            logits = torch.cat([
                self.classifiers[i](torch.cat([pooled, heat[:, i].amax(dim=(1, 2, 3))[:, None]], dim=1))
                for i in range(2)], dim=1)
            return logits, heat

    class ToolNet(nn.Module):
        """One tool's view of the shared network (its exported graph)."""

        def __init__(self, net, tool):
            super().__init__()
            self.net, self.tool = net, tool

        def forward(self, image):
            logits, heat = self.net(image)
            if self.tool == "ctb_hemorrhage":
                return logits[:, 0:1], heat[:, 0:1]
            if self.tool == "ctb_ischemia":
                return logits[:, 1:2], heat[:, 1:2]
            return heat[:, 2:3], heat[:, 3:4]

    return CtBrainNet, ToolNet


def _soft_argmax_cols(heat):
    """Expected column (cell edges) under the softmax over all cells of [N, D, H, W] logits."""
    import torch

    n = heat.shape[0]
    weights = torch.softmax(heat.reshape(n, -1), dim=1).reshape(heat.shape)
    cols = torch.arange(heat.shape[-1], dtype=heat.dtype) + 0.5
    return (weights.sum(dim=(1, 2)) * cols).sum(dim=1)


def _balanced_bce(logits, target):
    import torch.nn.functional as F

    per_cell = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = target > 0.5
    loss = per_cell[~positive].mean()
    if bool(positive.any()):
        loss = loss + per_cell[positive].mean()
    return loss


def train_network(data: dict[str, np.ndarray], epochs: int = EPOCHS, log=print):
    import torch
    import torch.nn.functional as F

    CtBrainNet, _ = _torch_net()
    torch.manual_seed(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    volumes = torch.from_numpy(data["volume"])
    targets = torch.from_numpy(data["targets"])
    labels = torch.from_numpy(data["labels"][:, :2].astype(np.float32))
    columns = torch.from_numpy(data["columns"])
    n = len(labels)
    model = CtBrainNet()
    optimizer, schedule = one_cycle(model.parameters(), LEARNING_RATE, epochs * (n // BATCH))
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        totals = np.zeros(4)
        for batch in minibatches(n, BATCH, generator):
            x = volumes[batch].float()[:, None] / (WINDOW[1] - WINDOW[0])
            t = targets[batch].float()
            cols = columns[batch].clone()
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
            t = torch.where(flip[:, None, None, None, None], t.flip(-1), t)
            cols = torch.where(flip[:, None], HEAT[2] - cols, cols)
            logits, heat = model(x)
            loss_cls = F.binary_cross_entropy_with_logits(logits, labels[batch])
            loss_map = sum(_balanced_bce(heat[:, i], t[:, i]) for i in range(4))
            septum, midline = _soft_argmax_cols(heat[:, 2]), _soft_argmax_cols(heat[:, 3])
            loss_col = (F.smooth_l1_loss(septum, cols[:, 0]) + F.smooth_l1_loss(midline, cols[:, 1])
                        + F.smooth_l1_loss(septum - midline, cols[:, 0] - cols[:, 1]))
            # hard negatives: the 16 highest cells outside the finding must stay low (the mean over
            # ~55,000 negative cells barely notices a few false-positive peaks)
            loss_hard = 0.0
            for i in range(2):
                outside = (heat[:, i] - 1e4 * t[:, i]).reshape(len(batch), -1)
                hardest = outside.topk(16, dim=1).values
                loss_hard = loss_hard + F.binary_cross_entropy_with_logits(hardest, torch.zeros_like(hardest))
            optimise(optimizer, schedule, loss_cls + 0.5 * loss_map + 0.5 * loss_col + 0.5 * loss_hard)
            totals += [float(loss_cls.detach()), float(loss_map.detach()), float(loss_col.detach()), 1]
        log(f"ct_brain: epoch {epoch + 1}/{epochs} classification {totals[0] / totals[3]:.4f} "
            f"heatmaps {totals[1] / totals[3]:.4f} columns {totals[2] / totals[3]:.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return model, training_summary(model, epochs, BATCH, LEARNING_RATE, started)


def export_tool(model, tool: str, path: Path, metadata: dict) -> None:
    _, ToolNet = _torch_net()
    names = [o.name for o in family.TOOLS[TOOLS.index(tool)].network_outputs]
    common.export_onnx(ToolNet(model, tool), path, metadata, (1, *GRID), names, check_batch=2, atol=2e-3, run=run_onnx)


def run_onnx(path: Path, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """All outputs of an exported network for images [n, 1, D, H, W] (ONNX Runtime, one thread)."""
    return common.run_onnx(path, images, batch)


def _network_images(data: dict[str, np.ndarray]) -> np.ndarray:
    return data["volume"][:, None].astype(np.float32) / (WINDOW[1] - WINDOW[0])


def calibrate(tool: str, onnx_path: Path, data: dict[str, np.ndarray], out: Path) -> dict:
    """calibration.json: Platt a/b and the suggested threshold (detection tools), or the
    shift scale (midline shift), fitted on the calibration split's exported-model outputs."""
    from mosmedai_training.metrics import auc_score

    outputs = run_onnx(onnx_path, _network_images(data))
    shared = {
        "seed": CALIBRATION_SEED, "n": int(len(data["labels"])),
        "model_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    if tool == "ctb_midline_shift":
        spacing = data["col_spacing_mm"]
        raw = np.array([signed_shift(outputs["septum"][i], outputs["midline"][i], spacing[i]) for i in range(len(spacing))])
        truth = data["shift_mm"].astype(np.float64)
        scale = float(np.clip((raw * truth).sum() / max((raw * raw).sum(), 1e-9), 0.5, 2.0))
        record = {
            "scale": round(scale, 5),
            "fitted_on": (f"calibration split (seed {CALIBRATION_SEED}), least squares through the origin of the "
                          "true signed shift on the network's signed soft-argmax shift"),
            "shift_positive_mm": SHIFT_POSITIVE_MM,
            "mae_mm_before": round(float(np.abs(raw - truth).mean()), 3),
            "mae_mm_after": round(float(np.abs(scale * raw - truth).mean()), 3),
            **shared,
        }
    else:
        index = TOOLS.index(tool)
        labels = data["labels"][:, index].astype(bool)
        logits = outputs["logit"][:, 0]
        calibration, threshold, sensitivity, specificity = common.platt_operating_point(
            logits, labels, TARGET_SENSITIVITY, probability=lambda x, c: 1.0 / (1.0 + np.exp(-(c.a * x + c.b))))
        record = {
            "a": calibration.a, "b": calibration.b,
            "fitted_on": (f"calibration split: phantoms (seed {CALIBRATION_SEED}, i), outputs of "
                          f"{tool}_net/1/model.onnx under ONNX Runtime; Platt scaling (Newton, smoothed targets)"),
            "n_positive": int(labels.sum()), "auc": round(auc_score(logits, labels), 4),
            "suggested_threshold": threshold,
            "threshold_rule": common.threshold_rule(TARGET_SENSITIVITY, suffix=""),
            "sensitivity_at_suggested": round(sensitivity, 4), "specificity_at_suggested": round(specificity, 4),
            **shared,
        }
    return common.write_calibration(out, tool, record)


def signed_shift(septum: np.ndarray, midline: np.ndarray, col_spacing_mm: float, scale: float = 1.0) -> float:
    """The signed shift (mm, + = towards patient left) `postprocess` reports for these outputs."""
    out = family._midline_shift({"septum": septum, "midline": midline}, _dummy_geometry(col_spacing_mm),
                                {"scale": scale})
    return float(out.measurements[0]) * (1.0 if out.measurements[1] == 0 else -1.0)


def _dummy_geometry(col_spacing_mm: float) -> VolumeGeometry:
    """A geometry whose grid column spacing is ``col_spacing_mm`` (calibration needs only that)."""
    return VolumeGeometry(GRID[0], GRID[1], GRID[2], 1.0, float(col_spacing_mm), float(col_spacing_mm), *GRID)


def train(tools: list[str] | tuple[str, ...] = TOOLS, out: Path = Path("model_repository"), *,
          n_train: int = N_TRAIN, n_calibration: int = N_CALIBRATION, epochs: int = EPOCHS,
          workers: int = 1, log=print) -> None:
    """Train the shared network once, export each requested tool's ONNX, calibrate each."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    train_data = network_arrays(TRAIN_SEED, n_train, workers=workers)
    calibration_data = network_arrays(CALIBRATION_SEED, n_calibration, workers=workers)
    generated = time.perf_counter() - started
    log(f"ct_brain: {n_train} training + {n_calibration} calibration phantoms in {generated:.0f} s")
    model, summary = train_network(train_data, epochs=epochs, log=log)
    for tool in tools:
        index = TOOLS.index(tool)
        path = Path(out) / f"{tool}_net" / "1" / "model.onnx"
        metadata = {
            "mosmedai.tool": tool, "mosmedai.architecture": "CtBrainNet (mosmedai_training.ct_brain), shared trunk",
            "mosmedai.train_seed": TRAIN_SEED, "mosmedai.n_train": n_train,
            "mosmedai.n_train_positive": int(train_data["labels"][:, index].sum()),
            "mosmedai.generation_seconds": round(generated, 1), "mosmedai.torch_version": torch.__version__,
            "mosmedai.total_seconds": round(time.perf_counter() - started, 1),
            **{f"mosmedai.{key}": value for key, value in summary.items()},
        }
        export_tool(model, tool, path, metadata)
        record = calibrate(tool, path, calibration_data, Path(out))
        log(f"{tool}: exported {path.stat().st_size} bytes; calibration {json.dumps(record)}")
    log(f"ct_brain: all done in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ct_brain reference models")
    parser.add_argument("command", choices=("train", "evaluate"))
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--out", "--repository", dest="repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    tools = TOOLS if args.tool == "all" else (args.tool,)
    if args.command == "train":
        train(tools, args.repository, n_train=args.n_train, epochs=args.epochs, workers=args.workers,
              log=lambda m: print(m, flush=True))
    else:
        for tool in tools:
            result = evaluate(tool, args.repository, args.n, args.seed)
            print(json.dumps(result, indent=2), flush=True)
            write_card(tool, result, args.repository)
    return 0



# --------------------------------------------------------------------------------------
# held-out evaluation, cases, scoring

#: How far `score` on ~20 fresh cases (TEST_SEED) may differ from the card's value: with ~10
#: positives and ~10 negatives a proportion's 95 % interval is about +-0.3 and an AUC's
#: about +-0.15, a slice/side/box hit rate is over the few true positives, and a 20-case
#: MAE of shifts with a few-mm spread has a standard error of about 0.5 mm.
TOLERANCE: dict[str, float] = {
    "auc": 0.15, "sensitivity": 0.35, "specificity": 0.35,
    "slice_hit_rate": 0.35, "side_accuracy": 0.35, "box_hit_rate": 0.4,
    "mae_mm": 1.5,
}
HIT_ENLARGEMENT = 0.25


def _threshold(tool: str, repository: Path) -> tuple[float, str]:
    """The ToolSpec's default_threshold (what config.pbtxt is rendered from); a rendered
    config that disagrees is named in the source string."""
    from mosmedai.serving.model_repo import read_threshold

    spec = family.TOOLS[TOOLS.index(tool)]
    source = "ToolSpec.default_threshold (mosmedai.catalog.families.ct_brain; rendered into config.pbtxt)"
    rendered = read_threshold(repository, tool)
    if rendered is not None and abs(rendered - spec.default_threshold) > 1e-9:
        source += f"; `{tool}_post/config.pbtxt` still says {rendered} and needs re-rendering"
    return spec.default_threshold, source


_HELD_OUT: dict[tuple[int, int], dict] = {}


def held_out(seed: int, n: int) -> dict:
    """Grid volumes, geometry vectors and truths of phantoms (seed, 0..n-1) rendered at the
    cases' resolution (only the grid's slices: the same grid the gateway would send)."""
    if seed in (TRAIN_SEED, CALIBRATION_SEED):
        raise ValueError(f"seed {seed} is a training or calibration split, not held-out data")
    key = (seed, n)
    if key not in _HELD_OUT:
        grids, geometries, truths = [], [], []
        for i in range(n):
            anatomy = make_anatomy((seed, i))
            grid, geometry, masks, _, zi = grid_sample(anatomy, CASE_SIZE, (seed, i))
            grids.append(grid)
            geometries.append(geometry.as_vector())
            truths.append(_truth_record(anatomy, truth_of(anatomy, masks, zi, CASE_SIZE)))
        _HELD_OUT[key] = {"grid": np.stack(grids), "geometry": np.stack(geometries), "truth": truths}
    return _HELD_OUT[key]


def _truth_record(anatomy: Anatomy, truth: Truth) -> dict:
    record = truth.as_dict()
    record["slices_per_grid_slice"] = anatomy.n_slices / GRID[0]
    record["shift_positive"] = abs(anatomy.shift) >= SHIFT_POSITIVE_MM
    record["territory"] = anatomy.ischaemia["territory"] if anatomy.ischaemia else None
    record["haemorrhage_kind"] = anatomy.haemorrhage["kind"] if truth.haemorrhage else None
    return record


def serve(tool: str, repository: Path, grids: np.ndarray, geometries: np.ndarray,
          threshold: float) -> list[ToolOutput]:
    """The serving path without Triton: window -> ONNX -> family postprocess."""
    spec = family.TOOLS[TOOLS.index(tool)]
    calibration = json.loads((Path(repository) / f"{tool}_post" / "1" / "calibration.json").read_text())
    images = np.stack([network_input(g) for g in grids])
    outputs = run_onnx(Path(repository) / f"{tool}_net" / "1" / "model.onnx", images)
    return [family.postprocess(spec, {name: value[i] for name, value in outputs.items()}, geometries[i],
                               grids[i], calibration, threshold) for i in range(len(grids))]


def _slice_hit(predicted: float, truth: dict, prefix: str) -> bool:
    extent, centre = truth[f"{prefix}_slices"], truth[f"{prefix}_centre_slice"]
    if extent is None or not np.isfinite(predicted):
        return False
    return bool(extent[0] <= predicted <= extent[1]
                or abs(predicted - centre) <= truth["slices_per_grid_slice"] + 0.5)


def _box_hit(location: np.ndarray, box) -> bool:
    if box is None or location[0] < 0:
        return False
    r, c = (location[0] + location[2]) / 2, (location[1] + location[3]) / 2
    h, w = box[2] - box[0], box[3] - box[1]
    return bool(box[0] - HIT_ENLARGEMENT * h / 2 <= r <= box[2] + HIT_ENLARGEMENT * h / 2
                and box[1] - HIT_ENLARGEMENT * w / 2 <= c <= box[3] + HIT_ENLARGEMENT * w / 2)


def _rate(hits: list[bool]) -> float | None:
    return round(float(np.mean(hits)), 4) if hits else None


def metrics(tool: str, outputs: list[ToolOutput], truths: list[dict]) -> dict:
    """Headline metrics of one tool from its outputs and the truths (evaluate and score)."""
    from mosmedai_training.metrics import auc_score, auc_standard_error, sensitivity_specificity, wilson_interval

    positive = np.array([o.positive for o in outputs])
    if tool == "ctb_midline_shift":
        true = np.array([t["shift_mm"] for t in truths], np.float64)
        magnitude = np.array([o.measurements[0] for o in outputs], np.float64)
        signed = magnitude * np.where(np.array([o.measurements[1] for o in outputs]) == 0, 1.0, -1.0)
        labels = np.abs(true) >= SHIFT_POSITIVE_MM
        sensitivity, specificity, counts = sensitivity_specificity(positive, labels)
        errors = np.abs(magnitude - np.abs(true))
        shifted = np.abs(true) >= 2.0
        direction = [bool(np.sign(signed[i]) == np.sign(true[i])) for i in np.flatnonzero(shifted)]
        key_hits = [bool(t["septum_slices"] is not None and t["septum_slices"][0] - t["slices_per_grid_slice"]
                         <= o.measurements[2] <= t["septum_slices"][1] + t["slices_per_grid_slice"])
                    for o, t in zip(outputs, truths)]
        return {
            "n": len(truths), "n_positive": int(labels.sum()), "n_negative": int((~labels).sum()),
            "mae_mm": round(float(errors.mean()), 3),
            "mae_mm_ci95": [round(float(errors.mean() - 1.96 * errors.std(ddof=1) / math.sqrt(len(errors))), 3),
                            round(float(errors.mean() + 1.96 * errors.std(ddof=1) / math.sqrt(len(errors))), 3)]
            if len(errors) > 1 else None,
            "median_abs_error_mm": round(float(np.median(errors)), 3),
            "p90_abs_error_mm": round(float(np.percentile(errors, 90)), 3),
            "mae_mm_shifted": round(float(errors[shifted].mean()), 3) if shifted.any() else None,
            "mae_mm_unshifted": round(float(errors[~shifted].mean()), 3) if (~shifted).any() else None,
            "bias_mm": round(float((magnitude - np.abs(true)).mean()), 3),
            "sensitivity": round(sensitivity, 4),
            "sensitivity_ci95": [round(v, 4) for v in wilson_interval(counts["tp"], int(labels.sum()))],
            "specificity": round(specificity, 4),
            "specificity_ci95": [round(v, 4) for v in wilson_interval(counts["tn"], int((~labels).sum()))],
            "counts": counts,
            "direction_accuracy": _rate(direction), "direction_n": len(direction),
            "slice_hit_rate": _rate(key_hits),
            "positive_rule": f"reported shift >= {SHIFT_POSITIVE_MM:g} mm (truth: true shift >= {SHIFT_POSITIVE_MM:g} mm)",
        }
    prefix = "haem" if tool == "ctb_hemorrhage" else "isch"
    labels = np.array([t["haemorrhage" if prefix == "haem" else "ischaemia"] for t in truths], bool)
    probability = np.array([o.probability for o in outputs], np.float64)
    auc = auc_score(probability, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    sensitivity, specificity, counts = sensitivity_specificity(positive, labels)
    tp = np.flatnonzero(positive & labels)
    slice_hits = [_slice_hit(float(outputs[i].measurements[0]), truths[i], prefix) for i in tp]
    box_hits = [_box_hit(outputs[i].location, truths[i][f"{prefix}_box"]) for i in tp]
    se = auc_standard_error(auc, n_pos, n_neg) if n_pos and n_neg else float("nan")
    result = {
        "n": len(truths), "n_positive": n_pos, "n_negative": n_neg,
        "auc": round(auc, 4),
        "auc_ci95": [round(max(0.0, auc - 1.96 * se), 4), round(min(1.0, auc + 1.96 * se), 4)],
        "sensitivity": round(sensitivity, 4),
        "sensitivity_ci95": [round(v, 4) for v in wilson_interval(counts["tp"], n_pos)],
        "specificity": round(specificity, 4),
        "specificity_ci95": [round(v, 4) for v in wilson_interval(counts["tn"], n_neg)],
        "counts": counts,
        "slice_hit_rate": _rate(slice_hits), "slice_hit_n": len(slice_hits),
        "slice_hit_rule": "key source slice within the finding's slice extent or within one grid slice of its centre",
        "box_hit_rate": _rate(box_hits),
        "box_hit_rule": f"box centre inside the finding's in-plane box (projection over slices) enlarged by {HIT_ENLARGEMENT:.0%}",
        "brier": round(float(np.mean((probability - labels) ** 2)), 4),
    }
    if prefix == "haem":
        sides = [int(outputs[i].measurements[1]) == family.SIDES.index(truths[i]["side"]) for i in tp]
        volumes = [(float(outputs[i].measurements[2]), truths[i]["haem_volume_ml"]) for i in tp]
        result["side_accuracy"] = _rate(sides)
        result["side_n"] = len(sides)
        result["volume_median_abs_error_ml"] = (round(float(np.median([abs(a - b) for a, b in volumes])), 2)
                                                if volumes else None)
        result["volume_median_relative_error"] = (
            round(float(np.median([abs(a - b) / max(b, 0.1) for a, b in volumes])), 3) if volumes else None)
        kinds = {}
        for kind in ("iph", "sdh", "falx"):
            chosen = [i for i, t in enumerate(truths) if t["haemorrhage_kind"] == kind]
            kinds[kind] = {"n": len(chosen), "detected": int(sum(positive[i] for i in chosen))}
        result["sensitivity_by_kind"] = kinds
    else:
        drops = [float(outputs[i].measurements[1]) for i in tp if np.isfinite(outputs[i].measurements[1])]
        result["density_drop_median_hu"] = round(float(np.median(drops)), 2) if drops else None
        territories = {}
        for territory in ("MCA", "ACA", "PCA"):
            chosen = [i for i, t in enumerate(truths) if t["territory"] == territory and t["ischaemia"]]
            territories[territory] = {"n": len(chosen), "detected": int(sum(positive[i] for i in chosen))}
        result["sensitivity_by_territory"] = territories
    return result


def evaluate(tool: str, repository: Path = Path("model_repository"), n: int = 300, seed: int = HELD_OUT_SEED) -> dict:
    """Metrics of one tool on n held-out phantoms through ONNX Runtime and the family postprocess."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    repository = Path(repository)
    data = held_out(seed, n)
    threshold, source = _threshold(tool, repository)
    started = time.perf_counter()
    outputs = serve(tool, repository, data["grid"], data["geometry"], threshold)
    per_series_ms = (time.perf_counter() - started) * 1000.0 / n
    model_path = repository / f"{tool}_net" / "1" / "model.onnx"
    result = {"tool": tool, "split": "held-out", "seed": seed,
              "threshold": float(threshold) if tool != "ctb_midline_shift" else None,
              "threshold_source": source if tool != "ctb_midline_shift" else None,
              **metrics(tool, outputs, data["truth"]),
              "model": f"{tool}_net/1/model.onnx",
              "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
              "inference_ms_per_series": round(per_series_ms, 2)}
    return result


def cases(tool: str, seed: int = TEST_SEED, n: int = 20) -> list[Case]:
    """Whole head CT series (DICOM, <= 60 slices of 256 x 256) with their truth. The same
    phantoms serve every tool of the family (``tool`` only checks the name)."""
    from mosmedai.phantoms.dicom_build import ct_series

    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}")
    out = []
    headers = [("HEAD", "HEAD NON-CONTRAST"), ("BRAIN", "BRAIN"), ("", "КТ ГОЛОВНОГО МОЗГА"), ("HEAD", "ROUTINE HEAD")]
    for i in range(n):
        anatomy = make_anatomy((seed, i))
        hu, masks = render(anatomy, CASE_SIZE, seed=(seed, i))
        truth = _truth_record(anatomy, truth_of(anatomy, masks, np.arange(anatomy.n_slices), CASE_SIZE))
        body_part, description = headers[i % len(headers)]
        px = anatomy.fov / CASE_SIZE
        instances = ct_series(hu, (anatomy.dz, px, px), body_part=body_part, series_description=description,
                              SpecificCharacterSet="ISO_IR 192", PatientPosition="HFS")
        out.append(Case(instances=instances, truth=truth))
    return out


def score(tool: str, outputs: list[ToolOutput], cases: list[Case]) -> dict:
    """The headline metrics of `evaluate` from served outputs (one ToolOutput per case)."""
    return metrics(tool, outputs, [case.truth for case in cases])


# --------------------------------------------------------------------------------------
# model cards

_TASKS = {
    "ctb_hemorrhage": (
        "Non-contrast head CT series -> whether it shows acute intracranial haemorrhage (hyperdense "
        "60-80 HU blood: intraparenchymal haematoma, convexity subdural crescent or falcine subdural "
        "strip), with a Platt-calibrated probability and, when positive, the key slice (index in the "
        "ordered series), an in-plane box on it (source pixels), the patient side (left / right / "
        "midline: centroid within 7 mm of the skull's symmetry axis) and the volume (mL) of 50-100 HU "
        "voxels in the detected region."
    ),
    "ctb_ischemia": (
        "Non-contrast head CT series -> whether it shows early ischaemic change (a territorial "
        "hypodensity of 5-10 HU with loss of grey-white differentiation in part of an MCA, ACA or PCA "
        "territory), with a Platt-calibrated probability and, when positive, the key slice, an in-plane "
        "box and the density drop (HU) of the detected region against its mirror image across the midline."
    ),
    "ctb_midline_shift": (
        "Non-contrast head CT series -> the midline shift in mm: the distance between the septum "
        "pellucidum and the midline (falx) plane, measured along the image columns, with the side the "
        "septum is pushed to and the slice of the measurement. No probability: `probability` is NaN and "
        f"`positive` means a shift >= {SHIFT_POSITIVE_MM:g} mm (the rule of this tool; a common clinical "
        "cut-off). The location is a box spanning the midline and the septum on the key slice."
    ),
}


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} %" if pct else f"{value}"


def write_card(tool: str, result: dict, repository: Path) -> None:
    """<repository>/<tool>/MODEL_CARD.md and evaluation.json."""
    repository = Path(repository)
    folder = repository / tool
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    facts = common.model_facts(repository, tool)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    spec = family.TOOLS[TOOLS.index(tool)]
    outputs = ", ".join(f"`{o.name}` [N, {', '.join(map(str, o.dims))}]" for o in spec.network_outputs)
    measurements = "\n".join(
        f"| `{m.name}` | `{m.unit}` | {m.description}{' (' + ', '.join(f'{i} = {label}' for i, label in enumerate(m.labels)) + ')' if m.labels else ''} |"
        for m in spec.measurements)
    r = result
    c = r["counts"]
    if tool == "ctb_midline_shift":
        rows = f"""| series (shift >= {SHIFT_POSITIVE_MM:g} mm / below) | {r['n']} ({r['n_positive']} / {r['n_negative']}) | |
| mean absolute error | {r['mae_mm']} mm | {r['mae_mm_ci95'][0]}-{r['mae_mm_ci95'][1]} mm (normal approximation) |
| median / 90th percentile absolute error | {r['median_abs_error_mm']} / {r['p90_abs_error_mm']} mm | |
| MAE, true shift >= 2 mm / < 2 mm | {r['mae_mm_shifted']} / {r['mae_mm_unshifted']} mm | |
| bias (reported - true magnitude) | {r['bias_mm']} mm | |
| sensitivity of >= {SHIFT_POSITIVE_MM:g} mm | {_fmt(r['sensitivity'], True)} ({c['tp']}/{c['tp'] + c['fn']}) | {_fmt(r['sensitivity_ci95'][0], True)}-{_fmt(r['sensitivity_ci95'][1], True)} (Wilson) |
| specificity of >= {SHIFT_POSITIVE_MM:g} mm | {_fmt(r['specificity'], True)} ({c['tn']}/{c['tn'] + c['fp']}) | {_fmt(r['specificity_ci95'][0], True)}-{_fmt(r['specificity_ci95'][1], True)} (Wilson) |
| direction accuracy (true shift >= 2 mm) | {_fmt(r['direction_accuracy'], True)} of {r['direction_n']} | |
| key slice within the septum's slices (+-1 grid slice) | {_fmt(r['slice_hit_rate'], True)} | |"""
        threshold = (f"No probability and no threshold: `positive` = reported shift >= {SHIFT_POSITIVE_MM:g} mm. "
                     f"The shift is the soft-argmax column distance of the septum and midline heatmaps times the "
                     f"grid column spacing (mm), times the scale {calibration['scale']} fitted on the calibration "
                     f"split (MAE there {calibration['mae_mm_before']} mm before, {calibration['mae_mm_after']} mm after).")
    else:
        rows = f"""| series (positive / negative) | {r['n']} ({r['n_positive']} / {r['n_negative']}) | |
| AUC | {r['auc']:.4f} | {r['auc_ci95'][0]:.3f}-{r['auc_ci95'][1]:.3f} (Hanley-McNeil) |
| sensitivity at {r['threshold']} | {_fmt(r['sensitivity'], True)} ({c['tp']}/{c['tp'] + c['fn']}) | {_fmt(r['sensitivity_ci95'][0], True)}-{_fmt(r['sensitivity_ci95'][1], True)} (Wilson) |
| specificity at {r['threshold']} | {_fmt(r['specificity'], True)} ({c['tn']}/{c['tn'] + c['fp']}) | {_fmt(r['specificity_ci95'][0], True)}-{_fmt(r['specificity_ci95'][1], True)} (Wilson) |
| slice hit rate | {_fmt(r['slice_hit_rate'], True)} of {r['slice_hit_n']} true positives | |
| box hit rate | {_fmt(r['box_hit_rate'], True)} of {r['slice_hit_n']} true positives | |
| Brier score | {r['brier']} | |"""
        if tool == "ctb_hemorrhage":
            kinds = r["sensitivity_by_kind"]
            rows += f"""
| side accuracy (left / right / midline) | {_fmt(r['side_accuracy'], True)} of {r['side_n']} true positives | |
| volume: median absolute / relative error | {r['volume_median_abs_error_ml']} mL / {_fmt(r['volume_median_relative_error'], True)} | |
| detected by kind (intraparenchymal / subdural / falcine) | {kinds['iph']['detected']}/{kinds['iph']['n']}, {kinds['sdh']['detected']}/{kinds['sdh']['n']}, {kinds['falx']['detected']}/{kinds['falx']['n']} | |"""
        else:
            t = r["sensitivity_by_territory"]
            rows += f"""
| detected by territory (MCA / ACA / PCA) | {t['MCA']['detected']}/{t['MCA']['n']}, {t['ACA']['detected']}/{t['ACA']['n']}, {t['PCA']['detected']}/{t['PCA']['n']} | |
| median density drop of true positives | {r['density_drop_median_hu']} HU | |"""
        threshold = (f"The operating threshold is {r['threshold']}, from {r['threshold_source']}. It was chosen on the "
                     f"calibration split by the rule: {calibration['threshold_rule']}; that rule gave "
                     f"{calibration['suggested_threshold']} (calibration-split sensitivity "
                     f"{calibration['sensitivity_at_suggested']}, specificity {calibration['specificity_at_suggested']}). "
                     f"Platt scaling p = sigmoid(a * logit + b), a = {calibration['a']:.4f}, b = {calibration['b']:.4f}, "
                     f"fitted on {calibration['n']} calibration phantoms (about 50 % prevalence).")
        if abs(calibration["suggested_threshold"] - r["threshold"]) > 1e-9:
            threshold += " **The deployed threshold differs from the suggested one.**"
    limitation = {
        "ctb_hemorrhage": ("Blood is always 60-80 HU and sharply bounded; no subarachnoid, intraventricular or "
                           "epidural haemorrhage, no calcifications (pineal, choroid plexus, falx) or beam-hardening "
                           "streaks that mimic blood. The volume counts 50-100 HU voxels of the detected region on "
                           "the 24-slice grid and includes partial-volume skull rim next to subdural collections."),
        "ctb_ischemia": ("Ischaemia is a smooth-edged share of a schematic territory with a uniform drop; real "
                         "early ischaemia is subtler and patchier (ASPECTS regions, insular ribbon, lentiform "
                         "nucleus) and old infarcts, leukoaraiosis and artefacts mimic it."),
        "ctb_midline_shift": ("The midline is a straight plane along the image columns (no head rotation or tilt); "
                              "the shift is measured along the columns. Septum and falx are schematic; real "
                              "asymmetric ventricles, cavum septi and rotated heads are not modelled."),
    }[tool]
    card = f"""# Model card: `{tool}`

> **Reference model trained on synthetic data; not for clinical use.** It has never seen a
> real CT. Its numbers below describe synthetic phantoms only and say nothing about
> performance on patients.

## Task

{_TASKS[tool]}

Routing: Modality CT with Body Part Examined HEAD, BRAIN or SKULL, or a Series Description
containing HEAD, BRAIN, ГОЛОВ or МОЗГ (not ANGIO/PERFUS/АНГИО/ПЕРФУЗ).

Outputs of the Triton ensemble `{tool}` (`ctbrain_preprocess` -> `{tool}_net` -> `{tool}_post`):
`probability` [1], `positive` [1], `location` [4] (row0, col0, row1, col1 in source pixel
edges on the key slice; -1 when not positive), `measurements` [{len(spec.measurements)}]:

| measurement | unit (UCUM) | meaning |
| --- | --- | --- |
{measurements}

Measurements a negative detection does not make are NaN. Patient sides: with Image Orientation
(Patient) [1,0,0,0,1,0] columns increase towards the patient's left (image right = patient left
in radiological display), so larger columns than the midline are the patient's left.

## Intended use

A reference and test workload for the mosmedai platform (integration, load and result-format
tests). Not a medical device; must not inform any clinical decision.

## Input

The gateway orders the axial series (slice 0 at the feet), converts it to HU (Rescale
Slope/Intercept) and samples it nearest-neighbour onto a {GRID[0]} x {GRID[1]} x {GRID[2]} grid
(`mosmedai.catalog.volumes.to_grid`); the network sees `window(grid, {WINDOW[0]:g}, {WINDOW[1]:g})` in [0, 1]
(blood, brain and CSF spread out; bone and air saturate). Millimetres come back through the
geometry vector (grid column spacing = source columns x column spacing / {GRID[2]}).

## Training data

Synthetic non-contrast head CT (`mosmedai_training.ct_brain`): scalp, skull (ellipsoid shell
750-1300 HU, 5-8 mm), subarachnoid CSF rim, cortex (37-43 HU) with sulci over white matter
(27-32 HU), deep grey nuclei, interhemispheric fissure with the falx, lateral ventricles
(2-8 HU) either side of the septum, third ventricle; 0.6 mm partial-volume blur; white noise
4-6 HU. Series of 20-60 slices, 2.5-5 mm apart, 200-235 mm field of view (0.78-0.92 mm pixels
at 256 x 256; a real 512 x 512 head CT has 0.4-0.5 mm pixels - the cases are rendered at 256
to keep them small). Findings: mass effect in 40 % (septum and ventricles pushed 1-14 mm, the
ventricle on the mass's side compressed; the mass is a large haematoma in 80 %, else a
hypodense tumour with oedema); haemorrhage in 50 % overall (intraparenchymal 9-50 mm, convexity
subdural crescent 3.5-18 mm thick, falcine strip), 60-80 HU; early ischaemia in 50 %
(MCA 60 %, ACA 20 %, PCA 20 %; -5..-10 HU and grey matter at the white-matter level).

| split | seed | series | with this finding | used for |
| --- | --- | --- | --- | --- |
| training | {TRAIN_SEED} | {facts.get('mosmedai.n_train', '?')} | {facts.get('mosmedai.n_train_positive', '?')} | network weights (rendered at {TRAIN_SIZE} x {TRAIN_SIZE}) |
| calibration | {CALIBRATION_SEED} | {calibration['n']} | {calibration.get('n_positive', '-')} | {'Platt scaling, threshold' if tool != 'ctb_midline_shift' else 'shift scale'} |
| held-out | {r['seed']} | {r['n']} | {r['n_positive']} | the metrics below (rendered at {CASE_SIZE} x {CASE_SIZE}) |

## Model

`CtBrainNet` (`mosmedai/training/ct_brain.py`), one network trained once for the three ct_brain
tools (multi-task: haemorrhage and ischaemia logits and heatmaps, septum and midline heatmaps);
this tool's ONNX holds the shared trunk and its own outputs: {outputs}. Heatmap cells are
1 grid slice x 2 x 2 grid pixels.

| | |
| --- | --- |
| parameters (whole network) | {facts.get('mosmedai.parameters', '?')} |
| ONNX | opset 17, dynamic batch, {int(facts['size_bytes']) / 1024:.0f} KiB |
| training | {facts.get('mosmedai.epochs', '?')} epochs, batch {facts.get('mosmedai.batch', '?')}, AdamW, one-cycle learning rate {facts.get('mosmedai.learning_rate', '?')}, left-right flips; loss: logit BCE + class-balanced heatmap BCE + BCE of the 16 highest cells outside the finding (hard negatives) + smooth-L1 of the soft-argmax septum/midline columns and their difference |
| training time | {facts.get('mosmedai.train_seconds', '?')} s network + {facts.get('mosmedai.generation_seconds', '?')} s phantoms ({facts.get('mosmedai.total_seconds', '?')} s to export) on {facts.get('mosmedai.torch_threads', '?')} torch thread of a shared 2-core machine (torch {facts.get('mosmedai.torch_version', '?')}) |
| inference | {r['inference_ms_per_series']} ms per series (ONNX Runtime, one thread, with postprocess) |

## Held-out metrics

`python -m mosmedai_training.ct_brain evaluate --tool {tool} --n {r['n']}` (ONNX Runtime + the
family's `postprocess`; the same numbers are in `evaluation.json`).

| metric | value | 95 % interval |
| --- | --- | --- |
{rows}

## Threshold

{threshold}

## Limitations

- Synthetic phantoms only: an ellipsoidal head, schematic anatomy without skull base, posterior
  fossa, sinuses or face, no motion, streak or beam-hardening artefacts, white noise only, no
  slice-thickness partial volume. Real CT will behave differently; expect failure on it.
- {limitation}
- The grid is {GRID[0]} slices: with 60 source slices one grid slice spans 2.5 source slices,
  so the key slice is accurate to about one grid slice.
- The metrics have the sampling uncertainty shown; they were measured once, on one seed.
"""
    (folder / "MODEL_CARD.md").write_text(with_admission_thresholds(card, tool, result, TOLERANCE))


if __name__ == "__main__":
    sys.exit(main())
