"""Reference spine X-ray model (scoliosis, Cobb angle): training, evaluation, card.

    python -m mosmedai_training.spine_xray train [--out model_repository]
    python -m mosmedai_training.spine_xray evaluate [--n N] [--repository model_repository]

The phantoms (AP whole-spine radiographs whose end-plate tilts, and so Cobb angle, are
known) are `mosmedai.phantoms.spine_xray`; their names are importable from here too.
Reference model trained on synthetic data: not for clinical use.
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
from mosmedai.catalog.families.spine_xray import (
    GRADES,
    MAP_SIZE,
    POSITIVE_COBB_DEG,
    TILT_SCALE_DEG,
    row_tilts,
)
from mosmedai.catalog.imaging import NETWORK_SIZE, Letterbox
from mosmedai.phantoms.spine_xray import (  # noqa: F401 (the phantoms' names, re-exported)
    HEADERS,
    SERVED_ROWS,
    VERTEBRAE,
    Box,
    Seed,
    SpinePhantom,
    make_phantom,
    network_input,
    to_dataset,
)
from mosmedai_training import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED
from mosmedai_training.common import (Case, model_facts, pct, run_onnx, write_calibration,
                                      with_admission_thresholds)
from mosmedai_training.common import export_onnx as common_export_onnx
from mosmedai_training.metrics import box_hit, sensitivity_specificity, wilson_interval

TOOLS = ("spine_scoliosis",)

#: Rows of the training images (the served ones: SERVED_ROWS).
TRAIN_ROWS = (400, 460)

N_TRAIN = 1500
N_CALIBRATION = 300
EPOCHS = 10
BATCH = 32
LEARNING_RATE = 4e-3
TILT_LOSS_WEIGHT = 5.0
OPSET = 17

def map_targets(phantom: SpinePhantom, geometry: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """Targets on the 32 x 32 cell grid: cover (share of the cell on a vertebral body) and the
    tilt (units of TILT_SCALE_DEG) of the bodies in the cell."""
    label = phantom._label  # type: ignore[attr-defined]
    inside = (label > 0).astype(np.float32)
    tilt = np.where(label > 0, phantom.tilts_deg[np.maximum(label.astype(int) - 1, 0)], 0.0).astype(np.float32)
    new_h = max(1, round(geometry.height * geometry.scale))
    new_w = max(1, round(geometry.width * geometry.scale))
    canvas = np.zeros((2, NETWORK_SIZE, NETWORK_SIZE), np.float32)
    top, left = int(geometry.pad_top), int(geometry.pad_left)
    canvas[0, top : top + new_h, left : left + new_w] = cv2.resize(inside, (new_w, new_h), interpolation=cv2.INTER_AREA)
    canvas[1, top : top + new_h, left : left + new_w] = cv2.resize(tilt * inside, (new_w, new_h), interpolation=cv2.INTER_AREA)
    cell = NETWORK_SIZE // MAP_SIZE
    cells = canvas.reshape(2, MAP_SIZE, cell, MAP_SIZE, cell).mean(axis=(2, 4))
    cover = cells[0]
    return cover.astype(np.float32), (cells[1] / np.maximum(cover, 1e-6) / TILT_SCALE_DEG).astype(np.float32)


def _sample(args) -> tuple[np.ndarray, ...]:
    cv2.setNumThreads(1)
    seed, rows_range = args
    phantom = make_phantom(seed, rows_range=rows_range)
    image, geometry = network_input(phantom)
    cover, tilt = map_targets(phantom, geometry)
    return (image.astype(np.float16), geometry.as_vector(), cover.astype(np.float16), tilt.astype(np.float16),
            np.float32(phantom.cobb_deg))


def network_arrays(seed: int, n: int, rows_range: tuple[int, int] = TRAIN_ROWS) -> dict[str, np.ndarray]:
    rows = [_sample(((seed, i), rows_range)) for i in range(n)]
    names = ("image", "geometry", "cover", "tilt", "cobb")
    return {name: np.stack(column) for name, column in zip(names, zip(*rows))}


# --------------------------------------------------------------------------------------
# network and training (torch only here)


def _build_network():
    from torch import nn

    from mosmedai_training.common import block2d as _block

    class SpineNet(nn.Module):
        """256 x 256 -> ``spine`` logits and ``tilt`` (units of 30 deg) maps at 32 x 32."""

        def __init__(self, widths=(8, 16, 32)):
            super().__init__()
            w1, w2, w3 = widths
            self.features = nn.Sequential(
                _block(1, w1, stride=2), _block(w1, w2, stride=2), _block(w2, w2),
                _block(w2, w3, stride=2), _block(w3, w3), _block(w3, w3, dilation=2), _block(w3, w3, dilation=4),
                _block(w3, w3),
            )
            self.head = nn.Conv2d(w3, 2, 1)

        def forward(self, image):
            out = self.head(self.features(image))
            return out[:, 0:1], out[:, 1:2]

    return SpineNet()


def export_onnx(model, path: Path, metadata: dict) -> None:
    common_export_onnx(model, path, metadata, (1, NETWORK_SIZE, NETWORK_SIZE), ("spine", "tilt"), check_batch=2)


def train(tools: list[str] | None = None, out: Path = Path("model_repository"), *, n_train: int = N_TRAIN,
          n_calibration: int = N_CALIBRATION, epochs: int = EPOCHS, log=print) -> dict:
    import torch
    from torch import nn

    from mosmedai_training.common import count_macs, minibatches, one_cycle, optimise

    out = Path(out)
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = network_arrays(TRAIN_SEED, n_train)
    calibration_data = network_arrays(CALIBRATION_SEED, n_calibration)
    generated = time.perf_counter() - started
    log(f"spine phantoms: {n_train} + {n_calibration} in {generated:.0f} s")
    torch.manual_seed(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    net = _build_network()
    images = torch.from_numpy(data["image"])[:, None]
    cover = torch.from_numpy(data["cover"])[:, None]
    tilt = torch.from_numpy(data["tilt"])[:, None]
    n = len(images)
    optimizer, schedule = one_cycle(net.parameters(), LEARNING_RATE, epochs * (n // BATCH))
    train_started = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        totals = [0.0, 0.0]
        for batch in minibatches(n, BATCH, generator):
            x, c, t = images[batch].float(), cover[batch].float(), tilt[batch].float()
            flip = (torch.rand(len(batch), generator=generator) < 0.5)[:, None, None, None]
            x, c = torch.where(flip, x.flip(3), x), torch.where(flip, c.flip(3), c)
            t = torch.where(flip, -t.flip(3), t)  # a mirror image turns every tilt the other way
            gamma = torch.exp((torch.rand(len(batch), generator=generator) - 0.5) * 0.45)
            x = x.clamp_min(0.0) ** gamma[:, None, None, None]
            spine, predicted = net(x)
            target = (c > 0.3).float()
            per_cell = nn.functional.binary_cross_entropy_with_logits(spine, target, reduction="none")
            loss_spine = per_cell[target > 0.5].mean() + per_cell[target < 0.5].mean()
            weight = c.clamp(0.0, 1.0) * (c > 0.15)
            loss_tilt = (nn.functional.smooth_l1_loss(predicted, t, reduction="none", beta=0.1) * weight).sum() / weight.sum()
            optimise(optimizer, schedule, loss_spine + TILT_LOSS_WEIGHT * loss_tilt)
            totals[0] += float(loss_spine.detach())
            totals[1] += float(loss_tilt.detach())
        k = n // BATCH
        log(f"spine_scoliosis: epoch {epoch + 1}/{epochs} spine loss {totals[0] / k:.4f} tilt loss {totals[1] / k:.4f} "
            f"({time.perf_counter() - train_started:.0f} s)")
    net.eval()
    train_seconds = time.perf_counter() - train_started
    tool = "spine_scoliosis"
    path = out / f"{tool}_net" / "1" / "model.onnx"
    export_onnx(net, path, {
        "mosmedai.tool": tool,
        "mosmedai.architecture": "SpineNet (mosmedai_training.spine_xray)",
        "mosmedai.train_seed": TRAIN_SEED,
        "mosmedai.n_train": n_train,
        "mosmedai.epochs": epochs,
        "mosmedai.batch": BATCH,
        "mosmedai.learning_rate": LEARNING_RATE,
        "mosmedai.train_seconds": round(train_seconds, 1),
        "mosmedai.generation_seconds": round(generated, 1),
        "mosmedai.parameters": sum(p.numel() for p in net.parameters()),
        "mosmedai.macs_per_image": count_macs(net),
        "mosmedai.torch_threads": 1,
        "mosmedai.torch_version": torch.__version__,
    })
    record = _calibrate(path, calibration_data, out)
    log(f"{tool}: ONNX {path.stat().st_size / 1024:.0f} KiB; calibration a={record['a']:.3f} b={record['b']:.3f}, "
        f"calibration MAE {record['mae_deg_after']} deg; total {time.perf_counter() - started:.0f} s")
    return {tool: record}


def _raw_cobb(outputs: dict[str, np.ndarray]) -> float:
    rows, values, _ = row_tilts(outputs["spine"], outputs["tilt"])
    return float(values.max() - values.min()) if rows.size >= 3 else float("nan")


def _calibrate(onnx_path: Path, data: dict[str, np.ndarray], out: Path) -> dict:
    """Least-squares line truth Cobb ~ a * raw + b on the calibration split."""
    outputs = run_network(onnx_path, data["image"][:, None].astype(np.float32))
    raw = np.array([_raw_cobb(o) for o in outputs])
    truth = data["cobb"].astype(np.float64)
    ok = np.isfinite(raw)
    a, b = np.polyfit(raw[ok], truth[ok], 1)
    corrected = np.maximum(0.0, a * raw[ok] + b)
    record = {
        "a": float(a),
        "b": float(b),
        "meaning": "cobb_deg = max(0, a * raw_cobb_deg + b); raw = max - min of the row tilts (see families.spine_xray)",
        "fitted_on": (f"calibration split: spine phantoms (seed {CALIBRATION_SEED}, i) for i in 0..{len(truth) - 1}, "
                      f"outputs of spine_scoliosis_net/1/model.onnx under ONNX Runtime; least squares"),
        "seed": CALIBRATION_SEED,
        "n": int(len(truth)),
        "n_measured": int(ok.sum()),
        "mae_deg_before": round(float(np.mean(np.abs(raw[ok] - truth[ok]))), 3),
        "mae_deg_after": round(float(np.mean(np.abs(corrected - truth[ok]))), 3),
        "model_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    return write_calibration(out, "spine_scoliosis", record)


# --------------------------------------------------------------------------------------
# evaluation (numpy + onnxruntime)


def run_network(path: Path, images: np.ndarray, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Per-item outputs (no batch dim) of the exported network for images [n, 1, 256, 256]."""
    outputs = run_onnx(path, images, batch, names=("spine", "tilt"))
    return [{"spine": outputs["spine"][i], "tilt": outputs["tilt"][i]} for i in range(len(outputs["spine"]))]


def _spec():
    from mosmedai.catalog.families.spine_xray import TOOLS as SPECS

    return SPECS[0]


@functools.lru_cache(maxsize=2)
def _held_out(seed: int, n: int) -> tuple[SpinePhantom, ...]:
    return tuple(make_phantom((seed, i)) for i in range(n))


def metrics(outputs: list[ToolOutput], cobb: np.ndarray, grades: np.ndarray, boxes: list[Box]) -> dict:
    """Headline metrics from ToolOutputs and truth (shared by evaluate() and score())."""
    cobb = np.asarray(cobb, np.float64)
    predicted = np.array([o.measurements[0] for o in outputs], np.float64)
    predicted_grade = np.array([o.measurements[1] for o in outputs], np.float64)
    measured = np.isfinite(predicted)
    error = np.where(measured, predicted - cobb, np.nan)
    absolute = np.abs(error[measured])
    n = len(cobb)
    within = int((absolute <= 5.0).sum())
    grade_ok = int((predicted_grade[measured] == np.asarray(grades)[measured]).sum())
    labels = cobb >= POSITIVE_COBB_DEG
    positive = np.array([o.positive for o in outputs], bool)
    sensitivity, specificity, counts = sensitivity_specificity(positive, labels)
    hits = [box_hit(outputs[i].location, np.asarray(boxes[i], np.float32)) for i in np.flatnonzero(positive & labels)]
    mae = float(absolute.mean()) if absolute.size else float("nan")
    sd = float(absolute.std(ddof=1)) if absolute.size > 1 else 0.0
    confusion = np.zeros((len(GRADES), len(GRADES)), int)
    for t, p in zip(np.asarray(grades)[measured], predicted_grade[measured]):
        confusion[int(t), int(p)] += 1
    return {
        "tool": "spine_scoliosis",
        "n": n,
        "n_measured": int(measured.sum()),
        "n_positive": int(labels.sum()),
        "n_negative": int((~labels).sum()),
        "mae_deg": round(mae, 3),
        "mae_deg_ci95": [round(mae - 1.96 * sd / math.sqrt(max(absolute.size, 1)), 3),
                         round(mae + 1.96 * sd / math.sqrt(max(absolute.size, 1)), 3)],
        "bias_deg": round(float(np.nanmean(error)), 3) if measured.any() else None,
        "limits_of_agreement_deg": ([round(float(np.nanmean(error) - 1.96 * np.nanstd(error, ddof=1)), 2),
                                     round(float(np.nanmean(error) + 1.96 * np.nanstd(error, ddof=1)), 2)]
                                    if measured.sum() > 1 else None),
        "within_5deg_rate": round(within / n, 4),
        "within_5deg_ci95": [round(x, 4) for x in wilson_interval(within, n)],
        "grade_accuracy": round(grade_ok / n, 4),
        "grade_accuracy_ci95": [round(x, 4) for x in wilson_interval(grade_ok, n)],
        "grade_confusion": {"labels": list(GRADES), "rows_truth_columns_predicted": confusion.tolist()},
        "positive_rule": f"cobb_angle >= {POSITIVE_COBB_DEG:g} deg (SRS)",
        "sensitivity": round(sensitivity, 4),
        "sensitivity_ci95": [round(x, 4) for x in wilson_interval(counts["tp"], int(labels.sum()))],
        "specificity": round(specificity, 4),
        "specificity_ci95": [round(x, 4) for x in wilson_interval(counts["tn"], int((~labels).sum()))],
        "counts": counts,
        "localisation_hit_rate": round(float(np.mean(hits)), 4) if hits else None,
        "localisation_n": len(hits),
        "localisation_hit_rule": ("centre of the predicted box inside the true end-vertebrae box enlarged by 25 %, "
                                  "over true positives"),
    }


def evaluate(tool: str = "spine_scoliosis", repository: Path = Path("model_repository"), n: int = 300,
             seed: int = HELD_OUT_SEED) -> dict:
    from mosmedai.catalog.families.spine_xray import postprocess

    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    if seed in (TRAIN_SEED, CALIBRATION_SEED):
        raise ValueError(f"seed {seed} is a training or calibration split")
    repository = Path(repository)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    phantoms = _held_out(seed, n)
    inputs = [network_input(p) for p in phantoms]
    model_path = repository / f"{tool}_net" / "1" / "model.onnx"
    started = time.perf_counter()
    raw = run_network(model_path, np.stack([i for i, _ in inputs])[:, None])
    inference_ms = (time.perf_counter() - started) * 1000.0 / n
    spec = _spec()
    outputs = [postprocess(spec, raw[i], inputs[i][1].as_vector(), None, calibration, spec.default_threshold)
               for i in range(n)]
    cobb = np.array([p.cobb_deg for p in phantoms])
    result = metrics(outputs, cobb, np.array([p.grade for p in phantoms]), [p.box for p in phantoms])
    bands = {}
    for low, high in ((0, 10), (10, 25), (25, 50), (50, 90)):
        chosen = (cobb >= low) & (cobb < high)
        errors = [abs(outputs[i].measurements[0] - cobb[i]) for i in np.flatnonzero(chosen)]
        bands[f"{low}-{high} deg"] = {"n": int(chosen.sum()), "mae_deg": round(float(np.nanmean(errors)), 2) if errors else None}
    result.update({
        "split": "held-out",
        "seed": seed,
        "mae_by_cobb": bands,
        "curves": {"C": int(sum(p.curve == "C" for p in phantoms)), "S": int(sum(p.curve == "S" for p in phantoms))},
        "calibration": {"a": calibration["a"], "b": calibration["b"]},
        "model": f"{tool}_net/1/model.onnx",
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "inference_ms_per_image": round(inference_ms, 2),
    })
    return result


# --------------------------------------------------------------------------------------
# DICOM cases and served scores


def cases(tool: str = "spine_scoliosis", seed: int = TEST_SEED, n: int = 20) -> list[Case]:
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    out = []
    for i in range(n):
        phantom = make_phantom((seed, i))
        body_part, description = HEADERS[i % len(HEADERS)]
        out.append(Case([to_dataset(phantom, body_part, description)], {
            "cobb_deg": phantom.cobb_deg,
            "grade": phantom.grade,
            "positive": phantom.positive,
            "box": list(phantom.box),
            "end_vertebrae": [VERTEBRAE[k] for k in phantom.end_vertebrae],
            "curve": phantom.curve,
            "pixel_spacing_mm": phantom.pixel_spacing_mm,
        }))
    return out


def score(tool: str, outputs: list[ToolOutput], cases: list[Case]) -> dict:
    return metrics(outputs, np.array([c.truth["cobb_deg"] for c in cases]), np.array([c.truth["grade"] for c in cases]),
                   [tuple(c.truth["box"]) for c in cases])


#: How far score() on ~20 fresh cases may differ from the card (n = 300): sampling noise.
#: The absolute error's SD is about 0.8 x MAE, so at n = 20 the MAE's standard error is about
#: 0.18 x MAE (~0.6 deg at an MAE of 3.5): 2.5 deg is > 3 standard errors even for an MAE of 4.
#: Rates near 0.7-0.9 over 20 cases (or ~6 negatives for specificity) have standard errors of
#: 0.07-0.19: 0.3 (0.45 for specificity) is about 2.5 of them.
TOLERANCE = {"mae_deg": 2.5, "within_5deg_rate": 0.3, "grade_accuracy": 0.3, "sensitivity": 0.3,
             "specificity": 0.45, "localisation_hit_rate": 0.35}


# --------------------------------------------------------------------------------------
# model card


def write_card(tool: str, result: dict, repository: Path = Path("model_repository")) -> None:
    repository = Path(repository)
    facts = model_facts(repository, tool)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    ci = lambda pair: f"{pct(pair[0])}-{pct(pair[1])} (Wilson)"  # noqa: E731
    c = result["counts"]
    bands = "\n".join(f"| {band} | {row['n']} | {row['mae_deg']} |" for band, row in result["mae_by_cobb"].items())
    confusion = result["grade_confusion"]["rows_truth_columns_predicted"]
    confusion_rows = "\n".join(f"| {GRADES[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(confusion))
    folder = repository / tool
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(with_admission_thresholds(f"""# Model card: `{tool}`

> **Reference model trained on synthetic data; not for clinical use.** It has never seen a
> real radiograph; the numbers below describe synthetic phantoms only.

## Task

Frontal (AP/PA) whole-spine radiograph -> the Cobb angle of the major scoliotic curve in
degrees and its Chaklin grade, with a box of the curve (end vertebra to end vertebra).

Outputs of the Triton ensemble `{tool}` (`xr_preprocess` -> `{tool}_net` -> `{tool}_post`):
`probability` [1] = NaN (the tool estimates no probability), `positive` [1], `location` [4]
(row0, col0, row1, col1 in source pixel edges, -1 when not positive), `measurements` [2]:

| measurement | unit | meaning |
| --- | --- | --- |
| `cobb_angle` | deg | largest angle between two vertebral end plates, measured in source pixel space |
| `scoliosis_grade` | {{category}} | index into ("0", "I", "II", "III", "IV") |

Chaklin grade on the reported Cobb angle c: "0" c < 1; "I" 1 <= c <= 10; "II" 10 < c <= 25;
"III" 25 < c <= 50; "IV" c > 50. **Positive** (scoliosis, SRS definition): c >= 10 deg.
Angles are measured in pixel space; they are angles on the patient only for square pixels
(Pixel Spacing row = column), which the tool assumes. Rotation of the vertebrae, the lateral
view and sagittal balance are not assessed.

## Intended use

A reference and test workload for the mosmedai platform. Not a medical device; must not
inform any clinical decision.

## Training data

Synthetic AP whole-spine radiographs (`mosmedai_training.spine_xray`): the 17 vertebrae
T1-L5 as rotated, slightly waisted rectangles (bright end plates, pedicle rings, spinous
process) along a C (55 %) or S (45 %) curve with known end-plate tilts (per-vertebra
irregularity SD 0.7 deg, global lean +-3 deg), ribs, lungs, pelvis, soft tissue, blur and noise.
Target Cobb angles: 30 % 0-10 deg, 30 % 10-25, 25 % 25-50, 15 % 50-75. Truth Cobb = max - min
of the vertebral tilts. Stored values vary (Bits Stored 10-16, Rescale, MONOCHROME1/2, a
window or none). Training images are 400-460 rows; held-out and test images 900-1024 rows
(width 0.42-0.55 x height, 520-600 mm field); all go through `mosmedai.catalog.imaging.preprocess`.

| split | seed | images | used for |
| --- | --- | --- | --- |
| training | {TRAIN_SEED} | {facts.get('mosmedai.n_train', '?')} | network weights |
| calibration | {CALIBRATION_SEED} | {calibration['n']} | linear Cobb correction |
| held-out | {result['seed']} | {result['n']} | the metrics below |

## Model

`SpineNet` (`mosmedai/training/spine_xray.py`): 8 convolutions (widths 8-16-32, 3 with stride 2,
2 dilated), a 1x1 head giving two 32 x 32 maps: `spine` (logits that a cell is on a vertebral
body) and `tilt` (end-plate tilt of that body, units of {TILT_SCALE_DEG:g} deg). Input `image`
float32 [N, 1, 256, 256]; outputs `spine` [N, 1, 32, 32], `tilt` [N, 1, 32, 32].
Postprocess (`mosmedai.catalog.families.spine_xray.postprocess`): per cell row on the spine the
spine-probability-weighted tilt, smoothed over 3 rows; raw Cobb = max - min over the rows;
Cobb = max(0, a * raw + b) with a = {calibration['a']:.4f}, b = {calibration['b']:.4f} fitted by least
squares on the calibration split (MAE there {calibration['mae_deg_before']} deg before, {calibration['mae_deg_after']} after).

| | |
| --- | --- |
| parameters | {facts.get('mosmedai.parameters', '?')} |
| compute per image | {int(facts.get('mosmedai.macs_per_image', '0')) / 1e6:.0f} M multiply-accumulates |
| ONNX | opset {OPSET}, {int(facts['size_bytes']) / 1024:.0f} KiB |
| training | {facts.get('mosmedai.epochs', '?')} epochs, batch {facts.get('mosmedai.batch', '?')}, AdamW, one-cycle lr {facts.get('mosmedai.learning_rate', '?')}, mirror flips (tilts negated) and gamma; loss: class-balanced BCE on the spine map + {TILT_LOSS_WEIGHT:g} x smooth-L1 on the tilt over body cells |
| training time | {facts.get('mosmedai.train_seconds', '?')} s + {facts.get('mosmedai.generation_seconds', '?')} s phantoms, one torch thread, shared 2-core machine |
| inference | {result['inference_ms_per_image']} ms per image, ONNX Runtime, one thread |

## Held-out metrics

`python -m mosmedai_training.spine_xray evaluate --n {result['n']}` (ONNX Runtime + the family
postprocess; same numbers in `evaluation.json`). {result['n']} images ({result['n_positive']} with Cobb >= 10,
{result['n_negative']} below; curves C {result['curves']['C']} / S {result['curves']['S']}).

| metric | value | 95 % interval |
| --- | --- | --- |
| Cobb MAE | {result['mae_deg']:.2f} deg | {result['mae_deg_ci95'][0]:.2f}-{result['mae_deg_ci95'][1]:.2f} deg (normal approx.) |
| bias (predicted - truth) | {result['bias_deg']:.2f} deg | limits of agreement {result['limits_of_agreement_deg'][0]} to {result['limits_of_agreement_deg'][1]} deg |
| within 5 deg | {pct(result['within_5deg_rate'])} | {ci(result['within_5deg_ci95'])} |
| grade accuracy | {pct(result['grade_accuracy'])} | {ci(result['grade_accuracy_ci95'])} |
| sensitivity (Cobb >= 10) | {pct(result['sensitivity'])} ({c['tp']}/{c['tp'] + c['fn']}) | {ci(result['sensitivity_ci95'])} |
| specificity (Cobb >= 10) | {pct(result['specificity'])} ({c['tn']}/{c['tn'] + c['fp']}) | {ci(result['specificity_ci95'])} |
| localisation hit rate | {pct(result['localisation_hit_rate'])} of {result['localisation_n']} true positives | |

Localisation: {result['localisation_hit_rule']}.

MAE by true Cobb angle:

| Cobb | n | MAE (deg) |
| --- | --- | --- |
{bands}

Grade confusion (rows: truth, columns: predicted; 0, I, II, III, IV):

| truth | 0 | I | II | III | IV |
| --- | --- | --- | --- | --- | --- |
{confusion_rows}

Grade "0" (< 1 deg) hardly occurs in the phantoms: the per-vertebra irregularity alone makes
the max - min of 17 tilts about 2-3 deg.

## Limitations

- Synthetic phantoms only: rectangles for vertebrae, no vertebral rotation, wedging, fusion,
  implants, rods or screws, no congenital anomalies, no lateral view; real spines differ.
- Cobb angles near a grade boundary or near 10 deg flip grade/positive within the error above.
- Tilts are read at 1/8 input resolution (one cell row is about 1-1.5 vertebrae); the end
  vertebrae are taken as the most tilted rows, not by vertebra labelling, and are not named.
- Square pixels assumed; angles are in pixel space.
- The metrics have the sampling uncertainty shown; measured once, on one seed.
""", tool, result, TOLERANCE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="spine X-ray reference model")
    parser.add_argument("command", choices=("train", "evaluate"))
    parser.add_argument("--tool", default="spine_scoliosis", choices=TOOLS)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--out", "--repository", dest="repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args(argv)
    if args.command == "train":
        train([args.tool], args.repository, n_train=args.n_train, epochs=args.epochs, log=lambda m: print(m, flush=True))
    else:
        result = evaluate(args.tool, args.repository, n=args.n)
        write_card(args.tool, result, args.repository)
        print(json.dumps({k: result[k] for k in ("n", "mae_deg", "within_5deg_rate", "grade_accuracy", "sensitivity",
                                                 "specificity", "localisation_hit_rate")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
