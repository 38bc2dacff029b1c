"""Reference chest CT models: one multi-task 3-D CNN on synthetic CT phantoms, evaluation, cards.

    python -m mosmedai_training.ct_chest train [--tool T] [--out model_repository]
    python -m mosmedai_training.ct_chest calibrate [--tool T]   (re-fit calibration.json only)
    python -m mosmedai_training.ct_chest evaluate [--tool T] [--n N] [--repository model_repository]

The phantoms (an axial chest CT in Hounsfield units with COVID-19-type involvement, a
nodule, emphysema and coronary calcium) are `mosmedai.phantoms.ct_chest`; their names are
importable from here too.

Training: the five tools share one network, `ChestNet`, trained once on all findings (each
phantom a random subset); each tool's ONNX is that network exported with its own heads only.
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

import numpy as np
import pydicom

from mosmedai.catalog import volumes
from mosmedai.catalog.families import ToolOutput
from mosmedai.catalog.families import ct_chest as family
from mosmedai.catalog.families.ct_chest import GRID, HEAD, HEADS, TOOL_NAMES, WINDOW
from mosmedai.phantoms import dicom_build
from mosmedai.phantoms.ct_chest import (  # noqa: F401 (the phantoms' names, re-exported)
    FINDING_RATE,
    FINDINGS,
    MATRIX,
    PIXEL_SPACING_MM,
    SLICE_SPACING_MM,
    SLICES,
    ChestPhantom,
    Seed,
    make_phantom,
)
from mosmedai_training import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED, common
from mosmedai_training.common import (Case, minibatches, one_cycle, optimise, training_summary,
                                      with_admission_thresholds)
from mosmedai_training.metrics import (
    auc_score,
    auc_standard_error,
    box_hit,
    sensitivity_specificity,
    wilson_interval,
)

TOOLS = TOOL_NAMES

N_TRAIN = 400
N_CALIBRATION = 160
EPOCHS = 10
BATCH = 4
LEARNING_RATE = 4e-3
OPSET = 17
TARGET_SENSITIVITY = 0.9
#: Weight of the nodule presence loss (BCE of the nodule map's peak) against the segmentation losses.
NODULE_DETECTION_WEIGHT = 2.0


# ======================================================================================
# network data


def network_input(grid_volume: np.ndarray) -> np.ndarray:
    """The ctchest_preprocess step: int16 HU grid -> float32 [1, D, H, W] in [0, 1]."""
    return volumes.window(grid_volume, *WINDOW)[None]


def _training_item(seed: Seed) -> tuple[np.ndarray, np.ndarray, dict]:
    phantom = make_phantom(seed)
    hu, masks = phantom.grid_sample()
    grid = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    bits = np.zeros(GRID, np.uint8)
    for index, name in enumerate(HEADS):
        bits |= masks[name].astype(np.uint8) << index
    return grid, bits, {"nodule": phantom.findings["nodule"]}


def training_arrays(seed: int, n: int, log=None) -> dict[str, np.ndarray]:
    """Grid-sampled phantoms (seed, i): HU grids int16 [n, D, H, W], label bits uint8 (bit k =
    HEADS[k]) and the nodule presence [n]."""
    grids = np.empty((n, *GRID), np.int16)
    bits = np.empty((n, *GRID), np.uint8)
    nodule = np.empty(n, bool)
    started = time.perf_counter()
    for i in range(n):
        grids[i], bits[i], info = _training_item((seed, i))
        nodule[i] = info["nodule"]
        if log and (i + 1) % 100 == 0:
            log(f"phantoms {seed}: {i + 1}/{n} ({time.perf_counter() - started:.0f} s)")
    return {"grid": grids, "bits": bits, "nodule": nodule}


# ======================================================================================
# network (torch is imported lazily: evaluation and tests run without it)


def _build_network():
    import torch
    from torch import nn

    def block(cin, cout, stride=1, dilation=1):
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                             nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

    class ChestNet(nn.Module):
        """[N,1,48,96,96] -> head logits [N, 6, 24, 48, 48] (HEADS order).

        Stride-2 stem (half grid), a stride-2 stage (quarter grid) with dilated convolutions
        (receptive field ~ the whole chest at quarter resolution), upsampled and joined with
        the stem's features, then 1x1 heads at half the grid.
        """

        def __init__(self, widths=(8, 16, 16)):
            super().__init__()
            a, b, c = widths
            self.stem = block(1, a, 2)
            self.body = nn.Sequential(block(a, b, 2), block(b, c), block(c, c, dilation=2), block(c, c, dilation=4))
            self.head = nn.Sequential(nn.Conv3d(c + a, 16, 1), nn.ReLU(inplace=True), nn.Conv3d(16, len(HEADS), 1))

        def forward(self, image):
            stem = self.stem(image)
            context = nn.functional.interpolate(self.body(stem), scale_factor=2, mode="trilinear", align_corners=False)
            return self.head(torch.cat([context, stem], 1))

    class ToolNet(nn.Module):
        """One tool's view of ChestNet: its heads, as named ONNX outputs."""

        def __init__(self, net, tool):
            super().__init__()
            self.net, self.names = net, [t.name for t in _spec(tool).network_outputs]

        def forward(self, image):
            heads = self.net(image)
            out = []
            for name in self.names:
                if name == "logit":
                    out.append(heads[:, HEADS.index("nodule")].amax(dim=(1, 2, 3))[:, None])
                else:
                    k = HEADS.index(name)
                    out.append(heads[:, k : k + 1])
            return tuple(out)

    return ChestNet, ToolNet


def _spec(tool: str):
    return next(s for s in family.TOOLS if s.name == tool)


def train_network(data: dict[str, np.ndarray], epochs: int = EPOCHS, log=print):
    import torch
    from torch import nn

    ChestNet, _ = _build_network()
    torch.manual_seed(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    model = ChestNet()
    n = len(data["grid"])
    optimizer, schedule = one_cycle(model.parameters(), LEARNING_RATE, epochs * (n // BATCH), pct_start=0.15)
    shifts = torch.arange(len(HEADS), dtype=torch.uint8)[None, :, None, None, None]
    nodule_index = HEADS.index("nodule")
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        totals = np.zeros(3)
        for batch in minibatches(n, BATCH, generator):
            batch = batch.numpy()
            x = torch.from_numpy(np.stack([network_input(g) for g in data["grid"][batch]]))
            bits = torch.from_numpy(data["bits"][batch])[:, None]
            target = ((bits >> shifts) & 1).float()
            present = torch.from_numpy(data["nodule"][batch].astype(np.float32))
            logits = model(x)
            # targets at the heads' resolution: the share of each half-grid cell's 8 grid voxels
            target = nn.functional.avg_pool3d(target, 2)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
            # class-balanced BCE per head: mean over (soft) positives + mean over negatives
            pos_mean = (bce * target).sum(dim=(0, 2, 3, 4)) / target.sum(dim=(0, 2, 3, 4)).clamp_min(1)
            neg_mean = (bce * (1 - target)).sum(dim=(0, 2, 3, 4)) / (1 - target).sum(dim=(0, 2, 3, 4)).clamp_min(1)
            probability = torch.sigmoid(logits)
            dice = 1 - (2 * (probability * target).sum(dim=(0, 2, 3, 4)) + 1) / (
                probability.sum(dim=(0, 2, 3, 4)) + target.sum(dim=(0, 2, 3, 4)) + 1)
            seg = (pos_mean + neg_mean).sum() + dice.sum()
            peak = logits[:, nodule_index].amax(dim=(1, 2, 3))
            detect = nn.functional.binary_cross_entropy_with_logits(peak, present)
            loss = seg + NODULE_DETECTION_WEIGHT * detect
            optimise(optimizer, schedule, loss)
            totals += [float(loss.detach()), float(dice.detach().mean()), float(detect.detach())]
        k = n // BATCH
        log(f"ct_chest: epoch {epoch + 1}/{epochs} loss {totals[0] / k:.3f} dice-loss {totals[1] / k:.3f} "
            f"nodule {totals[2] / k:.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return model, {**training_summary(model, epochs, BATCH, LEARNING_RATE, started), "torch_version": torch.__version__}


def export_tool(model, tool: str, path: Path, metadata: dict) -> None:
    _, ToolNet = _build_network()
    net = ToolNet(model, tool)
    common.export_onnx(net, path, metadata, (1, *GRID), net.names, check_batch=2, run=run_onnx)


# ======================================================================================
# ONNX Runtime


def run_onnx(path: Path, images: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
    return common.run_onnx(path, images, batch)


# ======================================================================================
# calibration


def calibrate(tool: str, onnx_path: Path, data: dict[str, np.ndarray], out: Path) -> dict:
    """calibration.json: Platt scaling and threshold (nodule); postprocess constants (others)."""
    record: dict = {"tool": tool, "model_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}
    if tool == "ctc_nodule":
        images = np.stack([network_input(g) for g in data["grid"]])
        logits = run_onnx(onnx_path, images)["logit"][:, 0]
        labels = data["nodule"]
        calibration, threshold, sensitivity, specificity = common.platt_operating_point(logits, labels, TARGET_SENSITIVITY)
        record.update({
            "a": calibration.a, "b": calibration.b,
            "fitted_on": (f"calibration split: grid-sampled phantoms (seed {CALIBRATION_SEED}, i) for i in "
                          f"0..{len(labels) - 1}; Platt scaling of the nodule map's peak logit"),
            "seed": CALIBRATION_SEED, "n": int(len(labels)), "n_positive": int(labels.sum()),
            "auc": round(auc_score(logits, labels), 4), "suggested_threshold": threshold,
            "threshold_rule": common.threshold_rule(TARGET_SENSITIVITY),
            "sensitivity_at_suggested": round(sensitivity, 4), "specificity_at_suggested": round(specificity, 4),
        })
    elif tool == "ctc_cac":
        threshold, table = tune_calcium_threshold(onnx_path)
        record.update({"calcium_logit_threshold": threshold, "min_area_mm2": 1.0,
                       "rule": "components >= 130 HU in the heart region (dilated 1 slice, 2 pixels) "
                               "touching the calcium mask (upsampled logit > calcium_logit_threshold, dilated "
                               "1 pixel); area >= min_area_mm2",
                       "fitted_on": (f"calibration split: full-source phantoms (seed {CALIBRATION_SEED}, i) for i in "
                                     f"0..{N_CALIBRATION_FULL - 1}; the threshold with the best category accuracy "
                                     "(ties: the lower score MAE)"),
                       "search": table})
    elif tool == "ctc_bone_density":
        record.update({"erode_mm": 3.0, "rim_hu": 400.0, "rim_share": 0.3, "cortical_hu": 500.0,
                       "rule": "vertebral-body mask; slices whose outline has under rim_share voxels >= rim_hu "
                               "dropped (discs have no cortex); eroded by ceil(erode_mm / grid spacing) in-plane "
                               "and one grid slice in z; voxels >= cortical_hu dropped; mean HU of the rest"})
    else:
        record.update({"rule": "fixed rule, no fitted constants"})
    return common.write_calibration(out, tool, record)


#: Full-source calibration phantoms for the calcium threshold.
N_CALIBRATION_FULL = 40
CALCIUM_THRESHOLDS = (0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0)


def tune_calcium_threshold(onnx_path: Path) -> tuple[float, list[dict]]:
    """The calcium-mask logit threshold with the best CAC category accuracy on full-source
    calibration phantoms (ties: lower score MAE). Small plaques give logits below 0 at the
    half grid, so the best threshold is usually negative."""
    items = held_out(CALIBRATION_SEED, N_CALIBRATION_FULL)
    raw = run_onnx(onnx_path, np.stack([network_input(item[0]) for item in items]))
    table = []
    for threshold in CALCIUM_THRESHOLDS:
        hits, errors = 0, []
        for i, (grid, geometry, truth, _) in enumerate(items):
            out = {name: raw[name][i] for name in raw}
            score_ = family.calcium_score(out, grid, volumes.VolumeGeometry.from_vector(geometry),
                                          {"calcium_logit_threshold": threshold})
            hits += family.cac_category(score_) == truth["cac_category"]
            errors.append(abs(score_ - truth["calcium_score"]))
        table.append({"threshold": threshold, "category_accuracy": round(hits / len(items), 4),
                      "score_mae": round(float(np.mean(errors)), 1)})
    best = max(table, key=lambda row: (row["category_accuracy"], -row["score_mae"]))
    return best["threshold"], table


def calibrate_all(tools: list[str], out: Path, n_calibration: int = N_CALIBRATION) -> None:
    """Re-fit calibration.json of exported models (without training)."""
    data = training_arrays(CALIBRATION_SEED, n_calibration) if "ctc_nodule" in tools else None
    for tool in tools:
        print(json.dumps(calibrate(tool, Path(out) / f"{tool}_net" / "1" / "model.onnx", data, Path(out)))[:400])


def train(tools: list[str] | None = None, out: Path = Path("model_repository"), epochs: int = EPOCHS,
          n_train: int = N_TRAIN, n_calibration: int = N_CALIBRATION, log=print) -> None:
    import torch

    tools = list(tools or TOOLS)
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = training_arrays(TRAIN_SEED, n_train, log=log)
    generated = time.perf_counter() - started
    log(f"ct_chest: {n_train} training phantoms in {generated:.0f} s")
    model, summary = train_network(data, epochs=epochs, log=log)
    del data
    calibration_data = training_arrays(CALIBRATION_SEED, n_calibration) if "ctc_nodule" in tools else None
    for tool in tools:
        onnx_path = Path(out) / f"{tool}_net" / "1" / "model.onnx"
        metadata = {"mosmedai.tool": tool, "mosmedai.architecture": "ChestNet (mosmedai_training.ct_chest), shared by "
                    "the five ct_chest tools; this file holds its heads for this tool",
                    "mosmedai.train_seed": TRAIN_SEED, "mosmedai.n_train": n_train,
                    "mosmedai.generation_seconds": round(generated, 1),
                    **{f"mosmedai.{k}": v for k, v in summary.items()}}
        export_tool(model, tool, onnx_path, metadata)
        calibrate(tool, onnx_path, calibration_data, Path(out))
        log(f"{tool}: exported {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB)")
    log(f"ct_chest: all done in {time.perf_counter() - started:.0f} s")


# ======================================================================================
# evaluation


def _grid_truth(masks: dict[str, np.ndarray], shape) -> dict[str, np.ndarray]:
    index = np.ix_(*(volumes.sample_indices(s, g) for s, g in zip(shape, GRID)))
    return {name: m[index] for name, m in masks.items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


@functools.lru_cache(maxsize=2)
def held_out(seed: int, n: int) -> tuple:
    """Full-source phantoms (seed, i): grid volumes, geometries, truths, grid truth masks."""
    items = []
    for i in range(n):
        phantom = make_phantom((seed, i))
        hu, masks = phantom.render()
        grid, geometry = volumes.to_grid(hu, phantom.spacing_mm, GRID)
        items.append((grid, geometry.as_vector(), phantom.truth(hu, masks), _grid_truth(masks, phantom.shape)))
    return tuple(items)


def _threshold(tool: str, repository: Path) -> tuple[float, str]:
    """The served threshold: ``<tool>_post/config.pbtxt`` when rendered, else the ToolSpec's."""
    from mosmedai.serving.model_repo import read_threshold

    threshold = read_threshold(repository, tool)
    if threshold is not None:
        return threshold, f"`{tool}_post/config.pbtxt` (parameter `threshold`)"
    return _spec(tool).default_threshold, "ToolSpec.default_threshold (no postprocess config yet)"


def _metrics(tool: str, outputs: list[ToolOutput], truths: list[dict]) -> dict:
    """Headline metrics of a tool from its standard outputs and the truths (evaluate and score)."""
    n = len(truths)
    m = np.array([o.measurements for o in outputs], np.float64)
    positive = np.array([o.positive for o in outputs], bool)
    result: dict = {"tool": tool, "n": n}

    def sens_spec(labels):
        labels = np.asarray(labels, bool)
        sens, spec, counts = sensitivity_specificity(positive, labels)
        result.update({"n_positive": int(labels.sum()), "n_negative": int((~labels).sum()),
                       "sensitivity": round(sens, 4),
                       "sensitivity_ci95": [round(v, 4) for v in wilson_interval(counts["tp"], int(labels.sum()))],
                       "specificity": round(spec, 4),
                       "specificity_ci95": [round(v, 4) for v in wilson_interval(counts["tn"], int((~labels).sum()))],
                       "counts": counts})

    def mae(predicted, true, key, digits=2):
        errors = np.abs(np.asarray(predicted, float) - np.asarray(true, float))
        errors = errors[np.isfinite(errors)]
        result[key] = round(float(errors.mean()), digits) if len(errors) else None
        result[key + "_ci95"] = ([round(float(errors.mean() - 1.96 * errors.std(ddof=1) / math.sqrt(len(errors))), digits),
                                  round(float(errors.mean() + 1.96 * errors.std(ddof=1) / math.sqrt(len(errors))), digits)]
                                 if len(errors) > 1 else None)

    if tool == "ctc_covid":
        true = np.array([t["involvement_percent"] for t in truths])
        mae(m[:, 0], true, "involvement_mae_pp")
        category = np.array([t["ct_category"] for t in truths])
        hits = int((m[:, 1].astype(int) == category).sum())
        result["category_accuracy"] = round(hits / n, 4)
        result["category_accuracy_ci95"] = [round(v, 4) for v in wilson_interval(hits, n)]
        result["category_counts_truth"] = {family.COVID_CATEGORIES[k]: int((category == k).sum()) for k in range(5)}
        sens_spec(true > 0)
    elif tool == "ctc_emphysema":
        true = np.array([t["laa950_percent"] for t in truths])
        mae(m[:, 0], true, "laa950_mae_pp")
        result["laa950_bias_pp"] = round(float(np.mean(m[:, 0] - true)), 3)
        sens_spec(true >= family.EMPHYSEMA_POSITIVE_PERCENT)
    elif tool == "ctc_cac":
        true = np.array([t["calcium_score"] for t in truths])
        category = np.array([t["cac_category"] for t in truths])
        hits = int((m[:, 1].astype(int) == category).sum())
        result["category_accuracy"] = round(hits / n, 4)
        result["category_accuracy_ci95"] = [round(v, 4) for v in wilson_interval(hits, n)]
        result["category_counts_truth"] = {family.CAC_CATEGORIES[k]: int((category == k).sum()) for k in range(4)}
        mae(m[:, 0], true, "score_mae", 1)
        if n > 2 and np.std(m[:, 0]) > 0 and np.std(true) > 0:
            result["log_score_correlation"] = round(float(np.corrcoef(np.log1p(m[:, 0]), np.log1p(true))[0, 1]), 4)
        sens_spec(true > 0)
    elif tool == "ctc_bone_density":
        true = np.array([t["vertebral_hu"] for t in truths])
        mae(m[:, 0], true, "vertebral_hu_mae", 1)
        result["vertebral_hu_bias"] = round(float(np.nanmean(m[:, 0] - true)), 2)
        sens_spec(true < family.BONE_POSITIVE_HU)
    elif tool == "ctc_nodule":
        labels = np.array([t["findings"]["nodule"] for t in truths], bool)
        probability = np.array([o.probability for o in outputs])
        auc = auc_score(probability, labels)
        se = auc_standard_error(auc, int(labels.sum()), int((~labels).sum())) if 0 < labels.sum() < n else float("nan")
        result["auc"] = round(auc, 4)
        result["auc_ci95"] = [round(max(0.0, auc - 1.96 * se), 4), round(min(1.0, auc + 1.96 * se), 4)]
        sens_spec(labels)
        sizes = np.array([t.get("nodule_diameter_mm", 0.0) for t in truths])
        by_size = {}
        for low, high in ((5.0, 10.0), (10.0, 20.0), (20.0, math.inf)):
            chosen = labels & (sizes >= low) & (sizes < high)
            by_size[f"{low:g}-{high:g} mm" if high < math.inf else f">= {low:g} mm"] = {
                "n": int(chosen.sum()), "detected": int((positive & chosen).sum())}
        result["sensitivity_by_diameter"] = by_size
        true_positive = np.flatnonzero(positive & labels)
        hits, diameters = [], []
        for i in true_positive:
            t, o = truths[i], outputs[i]
            in_slice = abs(int(o.measurements[0]) - t["nodule_slice"]) <= t["nodule_slice_halfwidth"]
            hits.append(bool(in_slice and box_hit(o.location, np.array(t["nodule_box"]))))
            diameters.append((o.measurements[1], t["nodule_diameter_mm"]))
        result["location_hit_rate"] = round(float(np.mean(hits)), 4) if hits else None
        result["location_n"] = len(hits)
        result["location_hit_rule"] = ("true positives whose key slice lies within the nodule's slices and whose box "
                                       "centre lies in the true box (nodule's equator) enlarged by 25 %")
        if diameters:
            d = np.array(diameters, float)
            mae(d[:, 0], d[:, 1], "diameter_mae_mm")
            result["diameter_bias_mm"] = round(float(np.nanmean(d[:, 0] - d[:, 1])), 2)
    return result


def evaluate(tool: str, repository: Path = Path("model_repository"), n: int = 200, seed: int = HELD_OUT_SEED) -> dict:
    """Metrics of one tool on full-source held-out phantoms through ONNX Runtime and `postprocess`."""
    if seed in (TRAIN_SEED, CALIBRATION_SEED):
        raise ValueError(f"seed {seed} is a training or calibration split")
    repository = Path(repository)
    spec = _spec(tool)
    model_path = repository / f"{tool}_net" / "1" / "model.onnx"
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    threshold, threshold_source = _threshold(tool, repository)
    items = held_out(seed, n)
    images = np.stack([network_input(item[0]) for item in items])
    started = time.perf_counter()
    raw = run_onnx(model_path, images)
    inference_ms = (time.perf_counter() - started) * 1000 / n
    outputs, dice = [], []
    started = time.perf_counter()
    for i, (grid, geometry, truth, grid_masks) in enumerate(items):
        out = {name: raw[name][i] for name in raw}
        outputs.append(family.postprocess(spec, out, geometry, grid, calibration, threshold))
        head = {"ctc_covid": "lung", "ctc_emphysema": "lung", "ctc_cac": "heart", "ctc_bone_density": "vertebra",
                "ctc_nodule": None}[tool]
        if head:
            dice.append(_dice(family.head_mask(out[head]), grid_masks[head]))
    post_ms = (time.perf_counter() - started) * 1000 / n
    result = _metrics(tool, outputs, [item[2] for item in items])
    if dice:
        result[f"{head}_dice"] = round(float(np.mean(dice)), 4)
    result.update({"split": "held-out", "seed": seed, "threshold": threshold, "threshold_source": threshold_source,
                   "model": f"{tool}_net/1/model.onnx",
                   "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
                   "inference_ms_per_series": round(inference_ms, 1), "postprocess_ms_per_series": round(post_ms, 1)})
    return result


# ======================================================================================
# cases and scoring of served outputs


DESCRIPTIONS = ("CT CHEST", "ОГК без контраста", "THORAX LOW DOSE", "КТ ОГК", "LUNG SCREENING")


def cases(tool: str, seed: int = TEST_SEED, n: int = 20) -> list[Case]:
    """n chest CT series (40-64 slices of 192-256 pixels) with the truth of every tool."""
    out = []
    for i in range(n):
        phantom = make_phantom((seed, i))
        hu, masks = phantom.render()
        truth = phantom.truth(hu, masks)
        truth["tool"] = tool
        rng = np.random.default_rng([seed, i, 5])
        description = DESCRIPTIONS[int(rng.integers(len(DESCRIPTIONS)))]
        body_part = ("CHEST", "CHEST", "THORAX", "LUNG", "")[int(rng.integers(5))]
        instances = dicom_build.ct_series(hu, phantom.spacing_mm, body_part=body_part, series_description=description,
                                          KVP="120", ConvolutionKernel="STANDARD")
        out.append(Case(instances, truth))
    return out


def series_volume(instances: list[pydicom.Dataset]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A series -> HU volume ordered along the slice normal, and (slice, row, column) spacing (tests)."""
    ordered = sorted(instances, key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ordered]).astype(np.float32)
    z = [float(d.ImagePositionPatient[2]) for d in ordered]
    dz = float(np.median(np.diff(z))) if len(z) > 1 else float(ordered[0].SliceThickness)
    dy, dx = (float(s) for s in ordered[0].PixelSpacing)
    return hu, (dz, dy, dx)


def score(tool: str, outputs: list[ToolOutput], cases: list[Case]) -> dict:
    """The headline metrics of `evaluate` from served outputs."""
    return _metrics(tool, outputs, [case.truth for case in cases])


#: How far score() on ~20 fresh cases (TEST_SEED) may differ from the card's value per headline
#: metric: roughly two standard errors at n = 20 (a proportion near 0.8-0.9 has SE ~0.08-0.1
#: at n = 20 and fewer positives/negatives for sensitivity/specificity; MAEs vary with the few
#: large cases).
TOLERANCE: dict[str, float] = {
    "involvement_mae_pp": 3.0,
    "category_accuracy": 0.3,
    "laa950_mae_pp": 1.5,
    "score_mae": 150.0,
    "vertebral_hu_mae": 10.0,
    "auc": 0.2,
    "sensitivity": 0.35,
    "specificity": 0.35,
    "location_hit_rate": 0.3,
    "diameter_mae_mm": 2.5,
}
HEADLINE = {
    "ctc_covid": ("involvement_mae_pp", "category_accuracy", "sensitivity", "specificity"),
    "ctc_nodule": ("auc", "sensitivity", "specificity", "location_hit_rate", "diameter_mae_mm"),
    "ctc_emphysema": ("laa950_mae_pp", "sensitivity", "specificity"),
    "ctc_cac": ("category_accuracy", "score_mae", "sensitivity", "specificity"),
    "ctc_bone_density": ("vertebral_hu_mae", "sensitivity", "specificity"),
}


# ======================================================================================
# model cards


TASKS = {
    "ctc_covid": ("Chest CT -> share of the lung volume involved by ground-glass opacity / consolidation "
                  "(`involvement_percent`, %) and the Russian MoH category CT-0..CT-4 (`ct_category`: "
                  "0 %, < 25 %, 25-50 %, 50-75 %, >= 75 %). The network segments the lungs and the involved "
                  "lung; the percentage is their voxel ratio on the grid. **Positive** (CT-1 or more) when "
                  f"the involvement is >= {family.COVID_POSITIVE_PERCENT} % - below that, a few voxels of "
                  "segmentation noise would otherwise make every series positive. No probability."),
    "ctc_nodule": ("Chest CT -> whether it shows a solid lung nodule (Platt-calibrated probability of the nodule "
                   "map's peak logit), and when positive: the key slice (`slice`, index in the ordered series), "
                   "the box of the nodule on that slice (`location`, source pixels) and its equivalent-sphere "
                   "diameter (`diameter_mm`) from the voxels above -500 HU connected to the peak inside the "
                   "network's nodule mask. Negative: slice -1, diameter NaN."),
    "ctc_emphysema": ("Chest CT -> LAA-950 (`laa950_percent`): the share of lung voxels below -950 HU, the "
                      "standard densitometric emphysema index. The network segments the lungs; the share is "
                      "counted on the int16 HU grid (a nearest-neighbour sample of the source, so unbiased). "
                      f"**Positive** when LAA-950 >= {family.EMPHYSEMA_POSITIVE_PERCENT} %: the upper limit of "
                      "normal reported for healthy never-smokers is about 5-6 % (COPDGene uses 5 %); 6 % keeps "
                      "noise-level values of normal lungs negative. No probability."),
    "ctc_cac": ("Chest CT (non-gated) -> Agatston-equivalent coronary calcium score (`calcium_score`) and its "
                "category (`cac_category`: 0, 1-99, 100-399, >= 400). Per grid slice: 8-connected components of "
                "voxels >= 130 HU inside the network's heart region that touch the network's coronary-calcium "
                "mask (its logit threshold fitted on the calibration split); area (mm^2) x density weight of the peak HU (1: 130-199, 2: 200-299, 3: 300-399, "
                "4: >= 400), summed and scaled by grid slice spacing / 3 mm. **Positive** when the score is > 0. "
                "No probability."),
    "ctc_bone_density": ("Chest CT -> mean attenuation of the cancellous vertebral bodies (`vertebral_hu`, HU): "
                         "the network segments the vertebral bodies; slices whose mask outline is not cortical bone "
                         "(discs) are dropped, the mask is eroded past the cortical rim (3 mm in-plane, one grid "
                         "slice in z), voxels >= 500 HU the erosion left (cortex) are dropped, and the HU grid is "
                         "averaged over the rest. **Positive** (possible "
                         "osteoporosis) when the mean is < 100 HU, a common opportunistic-CT threshold (e.g. "
                         "L1 < 100 HU: high specificity for osteoporosis; Pickhardt et al. 2013). No probability."),
}


TOOL_LIMITATIONS = {
    "ctc_covid": ("Involvement is drawn as one smooth pattern (peripheral, basal) of ground glass and "
                  "consolidation; crazy paving, organising pneumonia, fibrosis or other pneumonias are absent, "
                  "so nothing here says the tool can tell COVID-19 from anything else."),
    "ctc_nodule": ("The weakest tool of the family: small nodules (5-10 mm, 2-6 grid voxels) are often missed "
                   "and vessel crossings or dense consolidation give false positives (see sensitivity by "
                   "diameter). The deployed threshold 0.5 is the Bayes threshold at the calibration split's "
                   "~50 % prevalence; the sensitivity >= 0.9 rule would suggest a lower one at ~25 % "
                   "specificity. Only solid spherical nodules; no part-solid, ground-glass or calcified nodules."),
    "ctc_emphysema": ("Emphysema is drawn as low-attenuation regions; the phantoms' normal lung has almost no "
                      "voxels below -950 HU (real normal lungs have a few %), and no scanner, kernel or "
                      "inspiration-level effects exist here."),
    "ctc_cac": ("The Agatston-equivalent score is computed on the grid, not on 3 mm ECG-gated slices; "
                "category boundaries (1, 100, 400) are where it errs most. Noise voxels >= 130 HU inside the heart region that the (low-threshold) calcium mask touches "
                "give small false scores: specificity for score > 0 is the weak number. No aortic or valve "
                "calcification, stents or motion."),
    "ctc_bone_density": ("The vertebral bodies are drawn as uniform cancellous bone with a cortical rim; no "
                         "fractures, degenerative sclerosis, Schmorl nodes or contrast. A real threshold of "
                         "100 HU is level-specific (L1); here every vertebra has the same density."),
}


def _table(result: dict) -> str:
    rows = []
    skip = {"tool", "split", "seed", "model", "model_sha256", "counts", "location_hit_rule"}
    if result.get("tool") != "ctc_nodule":
        skip |= {"threshold", "threshold_source"}  # no probability: the rule decides
    for key, value in result.items():
        if key in skip or key.endswith("_ci95"):
            continue
        interval = result.get(key + "_ci95")
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
        rows.append(f"| {key} | {text} | {'' if interval is None else f'{interval[0]}-{interval[1]}'} |")
    return "\n".join(rows)


def write_card(tool: str, result: dict, repository: Path = Path("model_repository")) -> None:
    repository = Path(repository)
    facts = common.model_facts(repository, tool)
    spec = _spec(tool)
    calibration = json.loads((repository / f"{tool}_post" / "1" / "calibration.json").read_text())
    measurements = "\n".join(f"| `{m.name}` | `{m.unit}` | {m.description}{' (' + ', '.join(m.labels) + ')' if m.labels else ''} |"
                             for m in spec.measurements)
    threshold = (f"Operating threshold on the calibrated probability: {result['threshold']} from "
                 f"{result.get('threshold_source')}; suggested on the calibration split: "
                 f"{calibration.get('suggested_threshold')} ({calibration.get('threshold_rule', '')}; calibration AUC {calibration.get('auc')}, "
                 f"a = {calibration.get('a', float('nan')):.4f}, b = {calibration.get('b', float('nan')):.4f}; "
                 f"{calibration.get('fitted_on', '')})." if tool == "ctc_nodule" else
                 "No probability: the decision is the rule on the measurement stated under Task.")
    text = f"""# Model card: `{tool}`

> **Reference model trained on synthetic data; not for clinical use.** It has never seen a
> real CT. Its numbers describe synthetic phantoms only and say nothing about patients.

## Task

{TASKS[tool]}

| measurement | unit (UCUM) | meaning |
| --- | --- | --- |
{measurements}

Routing: Modality CT with Body Part Examined CHEST / THORAX / LUNG, or a Series Description
containing CHEST, THORAX, LUNG, ГРУД or ОГК.

## Intended use

A reference and test workload for the mosmedai platform (integration and load tests, result
formats, capacity planning). Not a medical device; must not inform any clinical decision.

## Data

Synthetic chest CT phantoms (`mosmedai_training.ct_chest`): body, fat, lungs (~-860 HU with
vessel trees), heart in epicardial fat, aorta, sternum, spine with vertebral bodies (cortex
~+700 HU, cancellous 50-300 HU per case), noise 15-28 HU; findings each present at random:
COVID-19-type involvement 1-90 % of the lungs (-700..-300 HU), a solid nodule 5-30 mm,
emphysema 2-45 % of the lungs (-980..-960 HU), 1-12 coronary plaques (150-1000 HU). The
anatomy scales with the field of view (pixel spacing 0.6-0.9 mm, 192-256 pixels, 40-64
slices of 1-5 mm), the findings are in millimetres. Training ({facts.get('mosmedai.n_train', '?')} phantoms, seed
{TRAIN_SEED}) and calibration (seed {CALIBRATION_SEED}) sample only the source voxels the grid keeps;
the held-out phantoms (seed {result['seed']}) are rendered in full and go through
`volumes.to_grid`, the window, ONNX Runtime and `mosmedai.catalog.families.ct_chest.postprocess` -
the serving path without Triton.

## Model

`ChestNet`: one multi-task 3-D CNN shared by the five ct_chest tools, trained once on all
findings; `{tool}_net/1/model.onnx` is it exported with this tool's heads
({', '.join(t.name for t in spec.network_outputs)}). Input `image` float32 [N, 1, {GRID[0]}, {GRID[1]}, {GRID[2]}]
(HU window {WINDOW[0]:g}..{WINDOW[1]:g} -> [0, 1]); head logits at [N, 1, {HEAD[0]}, {HEAD[1]}, {HEAD[2]}],
upsampled x2 (trilinear) in the postprocess.

| | |
| --- | --- |
| parameters | {facts.get('mosmedai.parameters', '?')} |
| ONNX | opset {OPSET}, {int(facts['size_bytes']) / 1024:.0f} KiB |
| training | {facts.get('mosmedai.epochs', '?')} epochs, batch {facts.get('mosmedai.batch', '?')}, AdamW one-cycle lr {facts.get('mosmedai.learning_rate', '?')}; loss: class-balanced BCE + soft Dice per head against the share of each head cell's grid voxels, BCE of the nodule map's peak |
| training time | {facts.get('mosmedai.train_seconds', '?')} s (+ {facts.get('mosmedai.generation_seconds', '?')} s phantoms) on {facts.get('mosmedai.torch_threads', '?')} CPU thread, all five tools together (wall time on a shared 2-core machine under load; one step is ~0.35 s on a quiet core, ~6.5 min in all) |
| inference | {result['inference_ms_per_series']} ms network + {result['postprocess_ms_per_series']} ms postprocess per series (ONNX Runtime, one thread) |

## Held-out metrics

`python -m mosmedai_training.ct_chest evaluate --tool {tool} --n {result['n']}` (same numbers in
`evaluation.json`). Intervals: Wilson for proportions, mean +- 1.96 SE for errors,
Hanley-McNeil for AUC.

| metric | value | 95 % interval |
| --- | --- | --- |
{_table(result)}

{threshold}

## Limitations

- Synthetic phantoms only: a simplified, field-of-view-scaled anatomy, one drawing of each
  finding, no motion, beam hardening, contrast, devices, effusions, fibrosis or other disease.
- Everything is measured on the {GRID[0]} x {GRID[1]} x {GRID[2]} grid (nearest-neighbour sample of the source):
  HU shares and means are unbiased, but small structures (plaques of 2-3 mm, nodules near 5 mm,
  thin cortex) may fall between grid samples; with thick or many slices whole source slices are skipped.
- {TOOL_LIMITATIONS[tool]}
- The metrics were measured once, on one seed, with the sampling uncertainty shown.
"""
    folder = repository / tool
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (folder / "MODEL_CARD.md").write_text(with_admission_thresholds(text, tool, result, HEADLINE[tool]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("train", "calibrate", "evaluate"))
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--out", "--repository", dest="repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    args = parser.parse_args(argv)
    tools = list(TOOLS) if args.tool == "all" else [args.tool]
    if args.command == "train":
        train(tools, args.repository, epochs=args.epochs, n_train=args.n_train, log=lambda m: print(m, flush=True))
    elif args.command == "calibrate":
        calibrate_all(tools, args.repository)
    else:
        for tool in tools:
            result = evaluate(tool, args.repository, n=args.n)
            print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
            write_card(tool, result, args.repository)
    return 0


if __name__ == "__main__":
    sys.exit(main())
