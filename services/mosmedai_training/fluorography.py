"""Reference fluorography models: training, evaluation, cards, cases.

    python -m mosmedai_training.fluorography train [--tool T] [--out model_repository]
    python -m mosmedai_training.fluorography evaluate [--tool T] [--n N] [--repository model_repository]

The phantoms (synthetic screening fluorograms with nodule, fibrosis and opacity findings)
are `mosmedai.phantoms.fluorography`; their names are importable from here too.

The three tools share one small trunk trained jointly (one pass over the data, three
heads); each tool's ONNX holds the trunk and its own head, so the tools stay independent
Triton models. Reference models on synthetic data: not for clinical use.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from mosmedai.catalog.families import ToolOutput
from mosmedai.phantoms import chest_xray as cxr
from mosmedai.phantoms.fluorography import (  # noqa: F401 (the phantoms' names, re-exported)
    DESCRIPTIONS,
    FINDINGS,
    NOISE_AT_1000,
    PREVALENCE,
    SERVED_LONG_SIDE,
    TOOL_FINDINGS,
    TOOLS,
    Box,
    FlgPhantom,
    Seed,
    make_phantom,
    network_input,
    to_dataset,
)
from mosmedai_training import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED
from mosmedai_training.common import Case, model_facts, pct, with_admission_thresholds
from mosmedai_training.metrics import (
    auc_score,
    auc_standard_error,
    box_hit,
    expected_calibration_error,
    sensitivity_specificity,
    wilson_interval,
)

HEATMAP_SIZE = cxr.HEATMAP_SIZE

#: Long side of the training images (the served ones: SERVED_LONG_SIDE).
TRAIN_LONG_SIDE = (320, 420)

N_TRAIN = 1800
N_CALIBRATION = 400
EPOCHS = 10
BATCH = 32
LEARNING_RATE = 4e-3
#: Operating point rule: highest threshold (0.01 steps, at most 0.5) with calibration-split
#: sensitivity >= target. Triage is a screening tool: a missed abnormal film costs most.
TARGET_SENSITIVITY = {"flg_triage": 0.95, "flg_nodule": 0.9, "flg_fibrosis": 0.9}
OPSET = 17


def _sample(args: tuple[Seed, tuple[int, int]]) -> tuple[np.ndarray, ...]:
    cv2.setNumThreads(1)
    seed, long_side = args
    phantom = make_phantom(seed, long_side=long_side)
    image, geometry = network_input(phantom)
    labels = np.array([phantom.label(t) for t in TOOLS], bool)
    boxes = np.array([phantom.box(t) or (-1, -1, -1, -1) for t in TOOLS], np.float32)
    heat = np.stack([cxr.heatmap_target(phantom.mask(t), geometry) for t in TOOLS]).astype(np.uint8)
    return image.astype(np.float16), geometry.as_vector(), labels, boxes, heat, np.float32(phantom.pixel_spacing_mm)


def network_arrays(seed: int, n: int, long_side: tuple[int, int] = TRAIN_LONG_SIDE) -> dict[str, np.ndarray]:
    """Phantoms (seed, 0..n-1) as arrays: image float16 [n,256,256], geometry [n,5], labels bool
    [n,3], boxes [n,3,4] (source pixels), heatmaps uint8 [n,3,32,32], spacing_mm [n]; axis 1 follows TOOLS."""
    rows = [_sample(((seed, i), long_side)) for i in range(n)]
    names = ("image", "geometry", "labels", "boxes", "heatmaps", "spacing_mm")
    return {name: np.stack(column) for name, column in zip(names, zip(*rows))}


# --------------------------------------------------------------------------------------
# network (torch is imported only here and in train)


def _build_network(n_heads: int = len(TOOLS)):
    import torch
    from torch import nn

    from mosmedai_training.common import block2d as _block

    class FlgNet(nn.Module):
        """256 x 256 -> per tool a logit and a 32 x 32 heatmap. Three stride-2 stages to 1/8,
        then two dilated convolutions (receptive field ~130 input pixels); each head reads the
        features' mean and max and its heatmap's max."""

        def __init__(self, widths=(8, 16, 32)):
            super().__init__()
            w1, w2, w3 = widths
            self.features = nn.Sequential(
                _block(1, w1, stride=2), _block(w1, w2, stride=2), _block(w2, w2),
                _block(w2, w3, stride=2), _block(w3, w3), _block(w3, w3, dilation=2), _block(w3, w3, dilation=4),
            )
            self.heatmaps = nn.Conv2d(w3, n_heads, 1)
            self.classifiers = nn.ModuleList([nn.Linear(2 * w3 + 1, 1) for _ in range(n_heads)])

        def forward(self, image):
            features = self.features(image)
            heatmaps = self.heatmaps(features)
            common = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
            logits = torch.cat([head(torch.cat([common, heatmaps[:, i].amax(dim=(1, 2))[:, None]], dim=1))
                                for i, head in enumerate(self.classifiers)], dim=1)
            return logits, heatmaps

    class OneHead(nn.Module):
        """One tool's view of the shared network: outputs ``logit`` [N,1], ``heatmap`` [N,1,32,32]."""

        def __init__(self, net, index):
            super().__init__()
            self.net, self.index = net, index

        def forward(self, image):
            logits, heatmaps = self.net(image)
            return logits[:, self.index : self.index + 1], heatmaps[:, self.index : self.index + 1]

    return FlgNet(), OneHead


def train(tools: list[str] | None = None, out: Path = Path("model_repository"), *, n_train: int = N_TRAIN,
          n_calibration: int = N_CALIBRATION, epochs: int = EPOCHS, log=print) -> dict:
    """Train the shared network once (all three heads), export each requested tool's ONNX and
    fit its calibration. One torch thread."""
    import torch
    from torch import nn

    from mosmedai_training.common import count_macs, minibatches, one_cycle, optimise
    from mosmedai_training.train import export_onnx, heatmap_loss

    tools = list(tools or TOOLS)
    out = Path(out)
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = network_arrays(TRAIN_SEED, n_train)
    calibration_data = network_arrays(CALIBRATION_SEED, n_calibration)
    generated = time.perf_counter() - started
    log(f"fluorography phantoms: {n_train} + {n_calibration} in {generated:.0f} s")

    torch.manual_seed(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    net, one_head = _build_network()
    images = torch.from_numpy(data["image"])[:, None]
    labels = torch.from_numpy(data["labels"].astype(np.float32))
    heat = torch.from_numpy(data["heatmaps"])
    n = len(labels)
    optimizer, schedule = one_cycle(net.parameters(), LEARNING_RATE, epochs * (n // BATCH))
    bce = nn.BCEWithLogitsLoss()
    train_started = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        total = 0.0
        for batch in minibatches(n, BATCH, generator):
            x, h = images[batch].float(), heat[batch].float()
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            h = torch.where(flip[:, None, None, None], h.flip(3), h)
            gamma = torch.exp((torch.rand(len(batch), generator=generator) - 0.5) * 0.45)
            x = x.clamp_min(0.0) ** gamma[:, None, None, None]
            logits, heatmaps = net(x)
            loss = bce(logits, labels[batch]) * len(TOOLS)
            for i in range(len(TOOLS)):
                loss = loss + heatmap_loss(heatmaps[:, i : i + 1], h[:, i : i + 1])
            optimise(optimizer, schedule, loss)
            total += float(loss.detach())
        log(f"fluorography: epoch {epoch + 1}/{epochs} loss {total / (n // BATCH):.4f} "
            f"({time.perf_counter() - train_started:.0f} s)")
    net.eval()
    train_seconds = time.perf_counter() - train_started
    records = {}
    for tool in tools:
        index = TOOLS.index(tool)
        model = one_head(net, index).eval()
        path = out / f"{tool}_net" / "1" / "model.onnx"
        metadata = {
            "mosmedai.tool": tool,
            "mosmedai.architecture": "FlgNet shared trunk + this tool's head (mosmedai_training.fluorography)",
            "mosmedai.train_seed": TRAIN_SEED,
            "mosmedai.n_train": n_train,
            "mosmedai.n_train_positive": int(data["labels"][:, index].sum()),
            "mosmedai.epochs": epochs,
            "mosmedai.batch": BATCH,
            "mosmedai.learning_rate": LEARNING_RATE,
            "mosmedai.train_seconds_all_heads": round(train_seconds, 1),
            "mosmedai.generation_seconds": round(generated, 1),
            "mosmedai.parameters": sum(p.numel() for p in model.parameters()),
            "mosmedai.macs_per_image": count_macs(model),
            "mosmedai.torch_threads": 1,
            "mosmedai.torch_version": torch.__version__,
        }
        export_onnx(model, path, metadata)
        records[tool] = _calibrate(tool, path, calibration_data, out)
        log(f"{tool}: ONNX {path.stat().st_size / 1024:.0f} KiB; calibration AUC {records[tool]['auc']}, "
            f"threshold {records[tool]['suggested_threshold']} (sens {records[tool]['sensitivity_at_suggested']}, "
            f"spec {records[tool]['specificity_at_suggested']})")
    log(f"fluorography: total {time.perf_counter() - started:.0f} s")
    return records


def _calibrate(tool: str, onnx_path: Path, data: dict[str, np.ndarray], out: Path) -> dict:
    from mosmedai_training.common import platt_operating_point, threshold_rule, write_calibration
    from mosmedai_training.evaluate import onnx_outputs

    index = TOOLS.index(tool)
    labels = data["labels"][:, index]
    logits, _ = onnx_outputs(onnx_path, data["image"][:, None].astype(np.float32))
    logits = logits[:, 0]
    target = TARGET_SENSITIVITY[tool]
    calibration, threshold, sensitivity, specificity = platt_operating_point(logits, labels, target)
    record = {
        "a": calibration.a,
        "b": calibration.b,
        "fitted_on": (f"calibration split: fluorography phantoms (seed {CALIBRATION_SEED}, i) for i in "
                      f"0..{len(labels) - 1}, outputs of {tool}_net/1/model.onnx under ONNX Runtime; Platt scaling"),
        "seed": CALIBRATION_SEED,
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "auc": round(auc_score(logits, labels), 4),
        "suggested_threshold": threshold,
        "threshold_rule": threshold_rule(target),
        "sensitivity_at_suggested": round(sensitivity, 4),
        "specificity_at_suggested": round(specificity, 4),
        "model_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    return write_calibration(out, tool, record)


# --------------------------------------------------------------------------------------
# evaluation (numpy + onnxruntime; no torch)


def _spec(tool: str):
    from mosmedai.catalog.families import fluorography

    return {spec.name: spec for spec in fluorography.TOOLS}[tool]


def run_network(tool: str, repository: Path, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per-item network outputs (no batch dim) of the exported ONNX for images [n, 1, 256, 256]."""
    from mosmedai_training.evaluate import onnx_outputs

    logits, heatmaps = onnx_outputs(Path(repository) / f"{tool}_net" / "1" / "model.onnx", images)
    return [{"logit": logits[i], "heatmap": heatmaps[i]} for i in range(len(logits))]


@functools.lru_cache(maxsize=24)
def _served_phantom(seed: int, index: int) -> FlgPhantom:
    """A served-size phantom, cached: evaluate() and cases() of the three tools share them."""
    return make_phantom((seed, index))


def _held_out(seed: int, n: int) -> tuple[FlgPhantom, ...]:
    return tuple(_served_phantom(seed, i) for i in range(n))


def metrics(tool: str, outputs: list[ToolOutput], labels: np.ndarray, boxes: list[Box | None],
            spacing_mm: np.ndarray, threshold: float) -> dict:
    """Headline metrics from ToolOutputs and truth (shared by evaluate() and score())."""
    labels = np.asarray(labels, bool)
    probability = np.array([o.probability for o in outputs], np.float64)
    positive = np.array([o.positive for o in outputs], bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    auc = auc_score(probability, labels)
    sensitivity, specificity, counts = sensitivity_specificity(positive, labels)
    npv_n = counts["tn"] + counts["fn"]
    ppv_n = counts["tp"] + counts["fp"]
    hits, errors = [], []
    for i in np.flatnonzero(positive & labels):
        if boxes[i] is None:
            continue
        truth = np.asarray(boxes[i], np.float32)
        hits.append(box_hit(outputs[i].location, truth))
        loc = outputs[i].location
        errors.append(math.hypot((truth[0] + truth[2] - loc[0] - loc[2]) / 2, (truth[1] + truth[3] - loc[1] - loc[3]) / 2)
                      * float(spacing_mm[i]))
    auc_se = auc_standard_error(auc, n_pos, n_neg) if n_pos and n_neg else float("nan")
    return {
        "tool": tool,
        "n": int(len(labels)),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": float(threshold),
        "auc": round(auc, 4),
        "auc_ci95": [round(max(0.0, auc - 1.96 * auc_se), 4), round(min(1.0, auc + 1.96 * auc_se), 4)],
        "sensitivity": round(sensitivity, 4),
        "sensitivity_ci95": [round(x, 4) for x in wilson_interval(counts["tp"], n_pos)],
        "specificity": round(specificity, 4),
        "specificity_ci95": [round(x, 4) for x in wilson_interval(counts["tn"], n_neg)],
        "npv": round(counts["tn"] / npv_n, 4) if npv_n else None,
        "npv_ci95": [round(x, 4) for x in wilson_interval(counts["tn"], npv_n)] if npv_n else None,
        "ppv": round(counts["tp"] / ppv_n, 4) if ppv_n else None,
        "counts": counts,
        "localisation_hit_rate": round(float(np.mean(hits)), 4) if hits else None,
        "localisation_n": len(hits),
        "localisation_hit_rule": "centre of the predicted box inside the true box enlarged by 25 %, over true positives",
        "localisation_median_error_mm": round(float(np.median(errors)), 1) if errors else None,
        "brier": round(float(np.mean((probability - labels) ** 2)), 4),
        "ece": round(expected_calibration_error(probability, labels), 4),
    }


def evaluate(tool: str, repository: Path = Path("model_repository"), n: int = 300, seed: int = HELD_OUT_SEED) -> dict:
    """Held-out metrics: fresh served-size phantoms -> preprocess -> ONNX Runtime -> family postprocess."""
    from mosmedai.catalog.families.fluorography import postprocess

    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    if seed in (TRAIN_SEED, CALIBRATION_SEED):
        raise ValueError(f"seed {seed} is a training or calibration split")
    repository = Path(repository)
    spec = _spec(tool)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    phantoms = _held_out(seed, n)
    inputs = [network_input(p) for p in phantoms]
    images = np.stack([image for image, _ in inputs])[:, None]
    started = time.perf_counter()
    raw = run_network(tool, repository, images)
    inference_ms = (time.perf_counter() - started) * 1000.0 / n
    outputs = [postprocess(spec, raw[i], inputs[i][1].as_vector(), None, calibration, spec.default_threshold)
               for i in range(n)]
    result = metrics(tool, outputs, np.array([p.label(tool) for p in phantoms]), [p.box(tool) for p in phantoms],
                     np.array([p.pixel_spacing_mm for p in phantoms]), spec.default_threshold)
    model_path = repository / f"{tool}_net" / "1" / "model.onnx"
    result.update({
        "split": "held-out",
        "seed": seed,
        "threshold_source": "ToolSpec.default_threshold (mosmedai.catalog.families.fluorography.THRESHOLDS)",
        "auc_logit": round(auc_score(np.array([r["logit"][0] for r in raw]), np.array([p.label(tool) for p in phantoms])), 4),
        "calibration": {"a": calibration["a"], "b": calibration["b"]},
        "model": f"{tool}_net/1/model.onnx",
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "inference_ms_per_image": round(inference_ms, 2),
    })
    return result


# --------------------------------------------------------------------------------------
# DICOM cases and served scores


def cases(tool: str, seed: int = TEST_SEED, n: int = 20) -> list[Case]:
    """n served-size fluorograms as DICOM with their truth for `tool` (label, box in source pixels)."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    out = []
    for i in range(n):
        phantom = _served_phantom(seed, i)
        box = phantom.box(tool)
        out.append(Case([to_dataset(phantom, DESCRIPTIONS[i % len(DESCRIPTIONS)])], {
            "label": phantom.label(tool),
            "box": None if box is None else [float(x) for x in box],
            "pixel_spacing_mm": phantom.pixel_spacing_mm,
            "findings": {f: phantom.labels[f] for f in FINDINGS},
        }))
    return out


def score(tool: str, outputs: list[ToolOutput], cases: list[Case]) -> dict:
    """The evaluate() headline metrics from served ToolOutputs of `cases`."""
    return metrics(tool, outputs, np.array([c.truth["label"] for c in cases]),
                   [None if c.truth["box"] is None else tuple(c.truth["box"]) for c in cases],
                   np.array([c.truth["pixel_spacing_mm"] for c in cases]), _spec(tool).default_threshold)


#: How far score() on ~20 fresh cases (TEST_SEED) may differ from the card (n = 300) and still
#: be sampling noise. At n = 20 (about 12 positive / 8 negative for triage, 7 / 13 for the
#: finding tools) one case moves a rate by 0.08-0.14; the binomial standard error of a rate
#: near 0.85 over 7 cases is 0.13, so 0.35 is about 2.5-3 standard errors. The AUC's
#: Hanley-McNeil standard error at 7 / 13 cases and AUC 0.9 is about 0.07: 0.2 is ~3 of them.
TOLERANCE = {"auc": 0.2, "sensitivity": 0.35, "specificity": 0.35, "npv": 0.35, "localisation_hit_rate": 0.4}


# --------------------------------------------------------------------------------------
# model cards

TITLES = {
    "flg_triage": "normal/abnormal triage of a screening fluorogram (any finding: nodule, fibrosis, opacity)",
    "flg_nodule": "focal lung nodule (round bright spot 5-30 mm) with its location",
    "flg_fibrosis": ("fibrotic or post-tuberculous changes in one upper zone (fibrous strands towards the hilum, "
                     "calcified foci 1.5-5 mm, apical pleural cap) with their location"),
}
LIMITATIONS = {
    "flg_triage": ("Abnormal means one of the three drawn findings; effusion, cardiomegaly, pneumothorax, "
                   "fractures, devices and the many other abnormalities of real screening are not drawn, so a "
                   "negative says nothing about them."),
    "flg_nodule": ("Nodules of 5-10 mm are 3-6 pixels at the 256-pixel input and are missed more often; calcified "
                   "foci of post-tuberculous changes can be taken for small nodules."),
    "flg_fibrosis": ("Only one upper zone is affected in the phantoms; bilateral, basal or diffuse fibrosis, "
                     "volume loss with hilar elevation and tracheal shift are not drawn."),
}


def write_card(tool: str, result: dict, repository: Path = Path("model_repository")) -> None:
    repository = Path(repository)
    facts = model_facts(repository, tool)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    c = result["counts"]
    ci = lambda pair: "" if not pair else f"{pct(pair[0])}-{pct(pair[1])} (Wilson)"  # noqa: E731
    macs = int(facts.get("mosmedai.macs_per_image", "0"))
    folder = repository / tool
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(with_admission_thresholds(f"""# Model card: `{tool}`

> **Reference model trained on synthetic data; not for clinical use.** It has never seen a
> real fluorogram; the numbers below describe synthetic phantoms only.

## Task

Screening fluorogram (low-dose frontal chest film; Series Description with "FLG", "ФЛГ",
"FLUORO" or "ФЛЮОРО") -> {TITLES[tool]}: a calibrated probability and, when positive, a box
(row0, col0, row1, col1) in source pixel edges (-1 when not positive).

Outputs of the Triton ensemble `{tool}` (`xr_preprocess` -> `{tool}_net` -> `{tool}_post`):
`probability` [1] (Platt-calibrated), `positive` [1] (probability >= threshold), `location` [4].

## Intended use

A reference and test workload for the mosmedai platform (integration and load tests,
demonstrations of result formats). Not a medical device; must not inform any clinical decision.

## Training data

Synthetic fluorograms from `mosmedai_training.fluorography`: the chest anatomy of
`mosmedai.phantoms.chest_xray` (lungs, heart, mediastinum, ribs, clavicles, vessels), with
findings drawn independently - nodule 5-30 mm (35 %), fibrotic/post-tuberculous changes in
one upper zone (35 %), opacity 30-100 mm (20 %); triage "abnormal" is any of them. Stored
mostly 8-bit (70 %; else 10-12 bit), MONOCHROME1 or 2 (50 %), a LINEAR window or none, with
more quantum noise than diagnostic films. Training images are drawn at a 320-420 pixel long
side, the held-out and test images at the served 800-1200 pixels; all reach the network
through `mosmedai.catalog.imaging.preprocess`.

| split | seed | images | with this finding | used for |
| --- | --- | --- | --- | --- |
| training | {TRAIN_SEED} | {facts.get('mosmedai.n_train', '?')} | {facts.get('mosmedai.n_train_positive', '?')} | network weights |
| calibration | {CALIBRATION_SEED} | {calibration['n']} | {calibration['n_positive']} | Platt scaling, threshold |
| held-out | {result['seed']} | {result['n']} | {result['n_positive']} | the metrics below |

## Model

`FlgNet` (`mosmedai/training/fluorography.py`): 7 convolutions (widths 8-16-32, 3 with stride 2,
2 dilated) shared by the three fluorography tools, trained jointly; this tool's head is a 1x1
heatmap convolution at 1/8 resolution and a linear classifier on the features' mean and max and
its heatmap's max. Input `image` float32 [N, 1, 256, 256]; outputs `logit` [N, 1], `heatmap` [N, 1, 32, 32].

| | |
| --- | --- |
| parameters | {facts.get('mosmedai.parameters', '?')} |
| compute per image | {macs / 1e6:.0f} M multiply-accumulates |
| ONNX | opset {OPSET}, {int(facts['size_bytes']) / 1024:.0f} KiB |
| training | {facts.get('mosmedai.epochs', '?')} epochs, batch {facts.get('mosmedai.batch', '?')}, AdamW, one-cycle lr {facts.get('mosmedai.learning_rate', '?')}, flips and gamma; loss: image BCE + class-balanced heatmap BCE, summed over the three heads |
| training time | {facts.get('mosmedai.train_seconds_all_heads', '?')} s (all three heads) + {facts.get('mosmedai.generation_seconds', '?')} s phantoms, one torch thread, shared 2-core machine |
| inference | {result['inference_ms_per_image']} ms per image, ONNX Runtime, one thread |

## Held-out metrics

`python -m mosmedai_training.fluorography evaluate --tool {tool} --n {result['n']}` (ONNX Runtime +
`mosmedai.catalog.families.fluorography.postprocess`; same numbers in `evaluation.json`).

| metric | value | 95 % interval |
| --- | --- | --- |
| images (positive / negative) | {result['n']} ({result['n_positive']} / {result['n_negative']}) | |
| AUC | {result['auc']:.4f} | {result['auc_ci95'][0]:.3f}-{result['auc_ci95'][1]:.3f} (Hanley-McNeil) |
| sensitivity at {result['threshold']} | {pct(result['sensitivity'])} ({c['tp']}/{c['tp'] + c['fn']}) | {ci(result['sensitivity_ci95'])} |
| specificity at {result['threshold']} | {pct(result['specificity'])} ({c['tn']}/{c['tn'] + c['fp']}) | {ci(result['specificity_ci95'])} |
| NPV at {result['threshold']} (this split's prevalence) | {pct(result['npv'])} | {ci(result['npv_ci95'])} |
| PPV at {result['threshold']} | {pct(result['ppv'])} | |
| localisation hit rate | {pct(result['localisation_hit_rate'])} of {result['localisation_n']} true positives | |
| median box-centre error | {result['localisation_median_error_mm']} mm | |
| Brier score / ECE | {result['brier']:.4f} / {result['ece']:.4f} | |

Localisation: {result['localisation_hit_rule']}.

## Threshold

Operating threshold {result['threshold']} ({result['threshold_source']}). Rule on the calibration
split: {calibration['threshold_rule']}; it gave {calibration['suggested_threshold']} (calibration
sensitivity {calibration['sensitivity_at_suggested']}, specificity {calibration['specificity_at_suggested']}).
{'Triage is a screening tool: the threshold favours sensitivity (few missed abnormal films) over specificity.' if tool == 'flg_triage' else ''}

## Calibration

Platt scaling p = sigmoid(a * logit + b), a = {calibration['a']:.4f}, b = {calibration['b']:.4f}, fitted on
the calibration split ({calibration['n']} images, prevalence {calibration['n_positive'] / calibration['n']:.0%}).
NPV and PPV depend on prevalence: real screening prevalence is far lower than here.

## Limitations

- Synthetic phantoms only; real fluorograms (and their artefacts, positioning, body habitus) differ.
- {LIMITATIONS[tool]}
- The location is a box around the heatmap peak region at 1/8 input resolution (about 8 input
  pixels, ~12 mm): it marks where, not the outline.
- The metrics have the sampling uncertainty shown; measured once, on one seed.
""", tool, result, TOLERANCE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fluorography reference models")
    parser.add_argument("command", choices=("train", "evaluate"))
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--out", "--repository", dest="repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args(argv)
    tools = list(TOOLS) if args.tool == "all" else [args.tool]
    if args.command == "train":
        train(tools, args.repository, n_train=args.n_train, epochs=args.epochs, log=lambda m: print(m, flush=True))
    else:
        for tool in tools:
            result = evaluate(tool, args.repository, n=args.n)
            write_card(tool, result, args.repository)
            print(json.dumps({k: result[k] for k in ("tool", "n", "auc", "sensitivity", "specificity", "npv",
                                                     "localisation_hit_rate")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
