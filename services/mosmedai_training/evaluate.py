"""Held-out evaluation of the reference chest X-ray models, and their model cards.

    python -m mosmedai_training.evaluate [--tool all] [--n 400] [--version 1] [--write-cards]

Fresh phantoms from the held-out split (HELD_OUT_SEED, disjoint from training and
calibration) go through `mosmedai.catalog.imaging.preprocess`, the exported ONNX model under ONNX
Runtime (one thread, no spinning, as served on CPU) and `mosmedai.catalog.postprocess.postprocess`
with the tool's calibration and threshold - the serving path without Triton. With
``--write-cards`` the numbers are written to ``<repository>/<ensemble>/evaluation.json`` and
``<repository>/<ensemble>/MODEL_CARD.md``, the ensemble of the version evaluated
(``<tool>`` for version 1, ``<tool>_v<N>`` after: ``ToolSpec.ensemble``).

No torch here: the quality tests import this module and run in seconds. The metrics are
``mosmedai_training.metrics`` and the threshold reader
``mosmedai.serving.model_repo.read_threshold``, both importable from here too.
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

from mosmedai.catalog.postprocess import Calibration, postprocess
from mosmedai.phantoms.chest_xray import TOOLS, network_arrays
from mosmedai.serving.model_repo import read_threshold
from mosmedai_training import CALIBRATION_SEED, HELD_OUT_SEED, TRAIN_SEED
from mosmedai_training.common import frozen, model_facts, pct, run_onnx, with_admission_thresholds
from mosmedai_training.metrics import (
    ECE_BINS,
    HIT_ENLARGEMENT,
    auc_score,
    auc_standard_error,
    box_hit,
    expected_calibration_error,
    sensitivity_specificity,
    wilson_interval,
)

#: Threshold when the postprocess config does not exist yet.
DEFAULT_THRESHOLD = 0.5
#: The figures `mosmedai tools admit` checks (chest_xray.score measures them from served answers).
ADMISSION_METRICS = ("auc", "sensitivity", "specificity", "localisation_hit_rate")
#: Size bands (mm) for sensitivity by size: diameter (opacity, nodule), apical depth (pneumothorax).
#: The last band is open-ended. Opacity size is the diameter of a disc of the mask's area
#: (a blob cut by the lung edge can be under 30 mm).
SIZE_BANDS = {
    "cxr_opacity": (0.0, 30.0, 50.0, 75.0),
    "cxr_nodule": (5.0, 10.0, 15.0, 20.0),
    "cxr_pneumothorax": (0.0, 25.0, 40.0, 55.0),
}
TOOL_LIMITATIONS = {
    "cxr_opacity": (
        "Opacities cut small by the lung edge (under 30 mm equivalent diameter) are often missed; "
        "see the table above."
    ),
    "cxr_nodule": (
        "Nodules of 5-10 mm are 3-6 pixels at the 256-pixel input and are missed more often; "
        "see the table above. Small opacities can be taken for large nodules."
    ),
    "cxr_pneumothorax": (
        "The phantoms' pneumothoraces are conspicuous (apical depth about 15-75 mm, a dark band "
        "without markings); a perfect score on them says nothing about subtle or basal pneumothorax. "
        "The box covers the whole air crescent, so its centre lies far from the true box's centre "
        "even when it hits."
    ),
}
FINDINGS = {
    "cxr_opacity": "lung opacity (consolidation): a diffuse bright area 30-100 mm across inside a lung",
    "cxr_nodule": "focal lung nodule: a round bright spot 5-30 mm across inside a lung",
    "cxr_pneumothorax": (
        "pneumothorax: the lung fallen away from the apex and lateral chest wall, a dark band without "
        "lung markings bounded by a thin visceral pleural line"
    ),
}


# --------------------------------------------------------------------------------------
# ONNX Runtime


def onnx_outputs(path: str | Path, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """logit [n, 1] and heatmap [n, 1, 32, 32] of an exported network for images [n, 1, 256, 256]."""
    outputs = run_onnx(path, images, batch, names=("logit", "heatmap"))
    return outputs["logit"], outputs["heatmap"]


# --------------------------------------------------------------------------------------
# evaluation


@functools.lru_cache(maxsize=2)
def _held_out(seed: int, n: int) -> dict[str, np.ndarray]:
    return frozen(network_arrays(seed, n))


def evaluate(
    tool: str,
    n: int = 400,
    seed: int = HELD_OUT_SEED,
    repository: str | Path = "model_repository",
    threshold: float | None = None,
    version: int = 1,
) -> dict:
    """Metrics of one tool version on phantoms (seed, 0..n-1), through ONNX Runtime and `postprocess`."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    if seed in (TRAIN_SEED, CALIBRATION_SEED):
        raise ValueError(f"seed {seed} is a training or calibration split, not held-out data")
    repository = Path(repository)
    model_path = repository / f"{tool}_net" / str(version) / "model.onnx"
    calibration_path = repository / f"{tool}_post" / str(version) / "calibration.json"
    calibration = Calibration.load(calibration_path)
    source = "argument"
    if threshold is None:
        threshold = read_threshold(repository, tool)
        source = f"`{tool}_post/config.pbtxt` (parameter `threshold`)"
        if threshold is None:
            threshold, source = DEFAULT_THRESHOLD, "default (no postprocess config)"

    index = TOOLS.index(tool)
    data = _held_out(seed, n)
    labels = data["labels"][:, index]
    started = time.perf_counter()
    logits, heatmaps = onnx_outputs(model_path, data["image"][:, None])
    inference_ms = (time.perf_counter() - started) * 1000.0 / n

    probability = np.empty(n, np.float32)
    positive = np.empty(n, bool)
    locations = np.empty((n, 4), np.float32)
    for i in range(n):
        p, pos, loc = postprocess(logits[i], heatmaps[i], data["geometry"][i], calibration, threshold)
        probability[i], positive[i], locations[i] = p[0], pos[0], loc

    auc = auc_score(probability, labels)
    # Calibrated probabilities are monotone in the logit only if a > 0: report the raw AUC too.
    auc_logit = auc_score(logits[:, 0], labels)
    sensitivity, specificity, counts = sensitivity_specificity(positive, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())

    true_positive = np.flatnonzero(positive & labels)
    hits = [box_hit(locations[i], data["boxes"][i, index]) for i in true_positive]
    errors_mm = []
    for i in true_positive:
        box, loc = data["boxes"][i, index], locations[i]
        dr = (box[0] + box[2] - loc[0] - loc[2]) / 2.0
        dc = (box[1] + box[3] - loc[1] - loc[3]) / 2.0
        errors_mm.append(math.hypot(dr, dc) * float(data["spacing_mm"][i]))

    bands = SIZE_BANDS[tool]
    sizes = data["sizes_mm"][:, index]
    by_size = {}
    for low, high in zip(bands, (*bands[1:], math.inf)):
        chosen = labels & (sizes >= low) & (sizes < high)
        found = int((positive & chosen).sum())
        by_size[f"{low:g}-{high:g} mm" if high < math.inf else f">= {low:g} mm"] = {
            "n": int(chosen.sum()),
            "detected": found,
            "sensitivity": round(found / chosen.sum(), 4) if chosen.any() else None,
        }

    auc_se = auc_standard_error(auc, n_pos, n_neg)
    return {
        "tool": tool,
        **({"version": version} if version != 1 else {}),  # version 1's records predate versions
        "split": "held-out",
        "seed": seed,
        "n": n,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": float(threshold),
        "threshold_source": source,
        "auc": round(auc, 4),
        "auc_ci95": [round(max(0.0, auc - 1.96 * auc_se), 4), round(min(1.0, auc + 1.96 * auc_se), 4)],
        "auc_logit": round(auc_logit, 4),
        "sensitivity": round(sensitivity, 4),
        "sensitivity_ci95": [round(v, 4) for v in wilson_interval(counts["tp"], n_pos)],
        "specificity": round(specificity, 4),
        "specificity_ci95": [round(v, 4) for v in wilson_interval(counts["tn"], n_neg)],
        "counts": counts,
        "localisation_hit_rate": round(float(np.mean(hits)), 4) if hits else None,
        "localisation_n": len(hits),
        "localisation_hit_rule": (
            f"centre of the predicted box inside the true box enlarged by {HIT_ENLARGEMENT:.0%}, over true positives"
        ),
        "localisation_median_error_mm": round(float(np.median(errors_mm)), 1) if errors_mm else None,
        "brier": round(float(np.mean((probability - labels) ** 2)), 4),
        "ece": round(expected_calibration_error(probability, labels), 4),
        "ece_bins": ECE_BINS,
        "sensitivity_by_size": by_size,
        "calibration": {"a": calibration.a, "b": calibration.b},
        "model": f"{tool}_net/{version}/model.onnx",
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "inference_ms_per_image": round(inference_ms, 2),
    }


# --------------------------------------------------------------------------------------
# model cards


def _version_section(tool: str, version: int, facts: dict[str, str]) -> str:
    """What sets a later version apart (version 1's card has no such section)."""
    if version == 1:
        return ""
    from mosmedai.catalog.tools import CATALOG
    from mosmedai_training import RECIPES

    note = RECIPES[version].note if version in RECIPES else ""
    return f"""
## Version

Version {version} of `{tool}`, side by side with the others in the model repository: Triton
ensemble `{CATALOG[tool].ensemble(version)}`, network `{tool}_net` version {version}, postprocess
`{tool}_post` version {version}. Results it produces name version {version} (JSON and gRPC
`model_version`, the SR's Algorithm Version). {note[:1].upper() + note[1:] + ': n' if note else 'N'}etwork
widths {facts.get('mosmedai.widths', '?')}, initialisation seed {facts.get('mosmedai.init_seed', '?')}; the same
training and calibration splits as every version.
"""


def model_card(result: dict, repository: Path) -> str:
    tool = result["tool"]
    version = int(result.get("version", 1))
    facts = model_facts(repository, tool, version)
    calibration = json.loads((repository / f"{tool}_post" / str(version) / "calibration.json").read_text())
    c = result["counts"]
    size_rows = "\n".join(
        f"| {band} | {row['n']} | {row['detected']} | {pct(row['sensitivity'])} |"
        for band, row in result["sensitivity_by_size"].items()
    )
    size_name = "apical depth" if tool == "cxr_pneumothorax" else "diameter"
    macs = int(facts.get("mosmedai.macs_per_image", "0"))
    threshold_note = f"The operating threshold is {result['threshold']}, from {result['threshold_source']}."
    suggested = calibration.get("suggested_threshold")
    if suggested is not None:
        threshold_note += (
            f" It was chosen on the calibration split by the rule: {calibration['threshold_rule']}; "
            f"that rule gave {suggested} (calibration-split sensitivity "
            f"{calibration['sensitivity_at_suggested']}, specificity {calibration['specificity_at_suggested']})."
        )
        if abs(suggested - result["threshold"]) > 1e-9:
            threshold_note += " **The deployed threshold differs from the suggested one.**"
    title = f"`{tool}`" if version == 1 else f"`{tool}` version {version}"
    ensemble = tool if version == 1 else f"{tool}_v{version}"
    command_version = "" if version == 1 else f" --version {version}"
    return f"""# Model card: {title}

> **Reference model trained on synthetic data; not for clinical use.** It has never seen a
> real radiograph. Its numbers below describe synthetic phantoms only and say nothing about
> performance on patients.

## Task

Frontal (PA/AP) chest radiograph -> whether it shows {FINDINGS[tool]}, with a calibrated
probability and, when positive, a bounding box of the finding in source pixels.

Outputs of the Triton ensemble `{ensemble}`: `probability` [1] (Platt-calibrated), `positive` [1]
(probability >= threshold), `location` [4] (row0, col0, row1, col1 in source pixel edges;
-1 when not positive).

## Intended use

A reference and test workload for the mosmedai platform: integration tests, load tests,
capacity planning and demonstrations of the result formats. Not a medical device; must not
inform any clinical decision.
{_version_section(tool, version, facts)}
## Training data

Synthetic PA chest radiographs from `mosmedai.phantoms.chest_xray` (body outline, lung fields,
mediastinum, heart, spine, ribs, clavicles, diaphragm, vessel trees), with findings drawn at
known places: opacity 30-100 mm, nodule 5-30 mm, pneumothorax (apical/lateral crescent with a
pleural line). Each finding is present independently with probability 0.5, so the other two
findings appear as distractors. Stored values vary as modalities vary them (Bits Stored
10-16, Rescale Slope/Intercept, MONOCHROME1/2, a LINEAR window or none, long side 300-700
pixels, collimator borders, burnt-in markers); every image reaches the network through
`mosmedai.catalog.imaging.preprocess`, the serving path's own function.

| split | seed | images | with this finding | used for |
| --- | --- | --- | --- | --- |
| training | {TRAIN_SEED} | {facts.get('mosmedai.n_train', '?')} | {facts.get('mosmedai.n_train_positive', '?')} | network weights |
| calibration | {CALIBRATION_SEED} | {calibration['n']} | {calibration['n_positive']} | Platt scaling, threshold |
| held-out | {result['seed']} | {result['n']} | {result['n_positive']} | the metrics below |

Phantom i of a split has the seed sequence (split seed, i): no image is in two splits.

## Model

`CxrNet` (`mosmedai/training/train.py`): 7 convolutions (3 with stride 2, 2 dilated) with
batch norm and ReLU, a 1x1 heatmap head at 1/8 resolution (32 x 32) and a linear classifier
on the features' mean and max and the heatmap's max. Input `image` float32 [N, 1, 256, 256];
outputs `logit` [N, 1], `heatmap` [N, 1, 32, 32].

| | |
| --- | --- |
| parameters | {facts.get('mosmedai.parameters', '?')} |
| compute per image | {macs / 1e6:.0f} M multiply-accumulates ({2 * macs / 1e6:.0f} MFLOPs) |
| ONNX | opset {facts['opset']}, {int(facts['size_bytes']) / 1024:.0f} KiB, `{tool}_net/{version}/model.onnx` |
| training | {facts.get('mosmedai.epochs', '?')} epochs, batch {facts.get('mosmedai.batch', '?')}, AdamW, one-cycle learning rate {facts.get('mosmedai.learning_rate', '?')}, left-right flips and gamma augmentation; loss: image BCE + class-balanced heatmap BCE against the finding's mask |
| training time | {facts.get('mosmedai.train_seconds', '?')} s wall on {facts.get('mosmedai.torch_threads', '?')} CPU threads of a shared 2-core machine (torch {facts.get('mosmedai.torch_version', '?')}) |
| inference | {result['inference_ms_per_image']} ms per image, ONNX Runtime, one thread, on the machine that wrote this card |

## Held-out metrics

Produced by `python -m mosmedai_training.evaluate --tool {tool} --n {result['n']} --seed {result['seed']}{command_version} --write-cards`
(ONNX Runtime + `mosmedai.catalog.postprocess`; same numbers in `evaluation.json`).

| metric | value | 95 % interval |
| --- | --- | --- |
| images (positive / negative) | {result['n']} ({result['n_positive']} / {result['n_negative']}) | |
| AUC | {result['auc']:.4f} | {result['auc_ci95'][0]:.3f}-{result['auc_ci95'][1]:.3f} (Hanley-McNeil{'; no spread at a perfect separation' if result['auc'] >= 1.0 else ''}) |
| sensitivity at {result['threshold']} | {pct(result['sensitivity'])} ({c['tp']}/{c['tp'] + c['fn']}) | {pct(result['sensitivity_ci95'][0])}-{pct(result['sensitivity_ci95'][1])} (Wilson) |
| specificity at {result['threshold']} | {pct(result['specificity'])} ({c['tn']}/{c['tn'] + c['fp']}) | {pct(result['specificity_ci95'][0])}-{pct(result['specificity_ci95'][1])} (Wilson) |
| localisation hit rate | {pct(result['localisation_hit_rate'])} of {result['localisation_n']} true positives | |
| median box-centre error | {result['localisation_median_error_mm']} mm | |
| Brier score | {result['brier']:.4f} | |
| ECE ({result['ece_bins']} bins) | {result['ece']:.4f} | |

Localisation: {result['localisation_hit_rule']}.

Sensitivity by {size_name}:

| {size_name} | positives | detected | sensitivity |
| --- | --- | --- | --- |
{size_rows}

## Threshold

{threshold_note}

## Calibration

Platt scaling p = sigmoid(a * logit + b) with a = {calibration['a']:.4f}, b = {calibration['b']:.4f},
fitted on the calibration split (seed {CALIBRATION_SEED}, {calibration['n']} images) on the
exported model's own outputs. The probabilities are calibrated to that split's prevalence
(about 50 %); at another prevalence the same score means a different post-test probability.

## Limitations

- Synthetic phantoms only: simplified anatomy and findings, no devices, lines, tubes,
  fractures, effusions, atelectasis, rotation, lordotic or lateral views, paediatric or
  post-operative chests. Real radiographs will behave differently; expect failure on them.
- Each finding is drawn one way; real opacities, nodules and pneumothoraces vary far more
  (calcified, cavitating, basal or anterior pneumothorax, supine films).
- {TOOL_LIMITATIONS[tool]}
- The location is a box around the heatmap peak region at 1/8 input resolution (about
  8 input pixels, about {8 / 0.64:.0f} mm on a 43 cm film): it marks where, not the outline.
- The metrics have the sampling uncertainty shown; they were measured once, on one seed.
"""


def write_card(result: dict, repository: Path) -> Path:
    """evaluation.json and MODEL_CARD.md of the result's tool version, in its ensemble's folder."""
    from mosmedai.catalog.tools import CATALOG

    folder = Path(repository) / CATALOG[result["tool"]].ensemble(int(result.get("version", 1)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    card = model_card(result, Path(repository))
    (folder / "MODEL_CARD.md").write_text(with_admission_thresholds(card, result["tool"], result, ADMISSION_METRICS))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--threshold", type=float, default=None, help="override the config's threshold")
    parser.add_argument("--write-cards", action="store_true")
    parser.add_argument("--version", type=int, default=1, help="the tool version to evaluate")
    args = parser.parse_args(argv)
    for tool in TOOLS if args.tool == "all" else (args.tool,):
        result = evaluate(tool, n=args.n, seed=args.seed, repository=args.repository, threshold=args.threshold,
                          version=args.version)
        print(json.dumps(result, indent=2), flush=True)
        if args.write_cards:
            write_card(result, args.repository)
    return 0


if __name__ == "__main__":
    sys.exit(main())
