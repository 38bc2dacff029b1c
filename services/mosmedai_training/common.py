"""Pieces every family's training module shares: ONNX Runtime sessions, ONNX export with
metadata, Platt scaling and the operating-threshold rule, calibration files, model facts for
the cards, the torch training-loop boilerplate and the `Case` of the served-score tests.
The phantoms' own helpers (``apply_overrides``, ``map_items``, ``stack_columns``) live in
``mosmedai.phantoms.common`` and are re-exported here.

numpy (and onnx / onnxruntime, imported where used) only at import time: torch is imported
inside the functions that need it, so evaluation and the quality tests run without it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mosmedai.catalog.postprocess import Calibration, calibrated_probability
from mosmedai.phantoms.common import apply_overrides, map_items, stack_columns  # noqa: F401 (re-exported)
from mosmedai_training.metrics import sensitivity_specificity

#: ONNX opset of every exported reference network.
OPSET = 17
#: Operating point of the detection tools unless a family says otherwise.
TARGET_SENSITIVITY = 0.9
ONNX_DOC_STRING = "mosmedai reference model trained on synthetic phantoms; not for clinical use"


@dataclass
class Case:
    """One study as a hospital sends it and its ground truth."""

    instances: list  # pydicom Datasets (a series: ordered)
    truth: dict


# --------------------------------------------------------------------------------------
# ONNX Runtime


@functools.lru_cache(maxsize=8)
def _session(path: str, modified: float):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session(path: str | Path):
    """A cached one-thread CPU session of an exported network (reloaded when the file changes)."""
    path = Path(path)
    return _session(str(path.resolve()), path.stat().st_mtime)


def run_onnx(path: str | Path, images: np.ndarray, batch: int = 16,
             names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Outputs (`names`, default all) of an exported network for ``image`` batches, by name."""
    runner = session(path)
    names = list(names) if names is not None else [o.name for o in runner.get_outputs()]
    chunks: dict[str, list] = {name: [] for name in names}
    for start in range(0, len(images), batch):
        values = runner.run(names, {"image": np.ascontiguousarray(images[start : start + batch], np.float32)})
        for name, value in zip(names, values):
            chunks[name].append(value)
    return {name: np.concatenate(value) for name, value in chunks.items()}


# --------------------------------------------------------------------------------------
# ONNX export


def export_onnx(model, path: Path, metadata: dict, input_shape: Sequence[int], output_names: Sequence[str],
                check_batch: int, check: Callable[[dict[str, np.ndarray], list[np.ndarray]], bool] | None = None,
                atol: float = 1e-3, run: Callable[[Path, np.ndarray], dict[str, np.ndarray]] | None = None) -> None:
    """ONNX opset 17 (TorchScript exporter), dynamic batch axis, input ``image`` [N, *input_shape],
    the given outputs, metadata as model properties; then the exported graph must agree with
    the network on `check_batch` random inputs (ONNX Runtime vs PyTorch, within `atol`, or
    by `check(onnx_outputs_by_name, torch_outputs)`)."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = list(output_names)
    temporary = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (torch.zeros(1, *input_shape),), str(temporary),
        input_names=["image"], output_names=names,
        dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in names}},
        opset_version=OPSET, do_constant_folding=True,
        dynamo=False,  # the TorchScript exporter: no onnxscript needed, plain Conv/Relu graph
    )
    proto = onnx.load(str(temporary))
    proto.doc_string = ONNX_DOC_STRING
    onnx.helper.set_model_props(proto, {key: str(value) for key, value in metadata.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    temporary.unlink()
    sample = torch.rand(check_batch, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(sample)
    expected = [t.numpy() for t in ((expected,) if isinstance(expected, torch.Tensor) else expected)]
    got = (run or run_onnx)(path, sample.numpy())
    if check is not None:
        if not check(got, expected):
            raise RuntimeError(f"{path}: ONNX Runtime outputs differ from PyTorch's")
        return
    for name, value in zip(names, expected):
        if not np.allclose(got[name], value, atol=atol):
            raise RuntimeError(f"{path}: ONNX Runtime output {name} differs from PyTorch's")


# --------------------------------------------------------------------------------------
# calibration


def fit_platt(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> Calibration:
    """Platt scaling by Newton's method on the log-loss, with Platt's smoothed targets
    ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) so a separable split does not give infinite a."""
    logits = np.asarray(logits, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    target = np.where(labels, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 1.0, 0.0
    design = np.stack([logits, np.ones_like(logits)], axis=1)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * logits + b, -50, 50)))
        gradient = design.T @ (p - target)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
    return Calibration(float(a), float(b))


def suggest_threshold(probability: np.ndarray, labels: np.ndarray, target: float = TARGET_SENSITIVITY) -> float:
    """Highest threshold on a 0.01 grid with sensitivity >= `target`, at most 0.5."""
    labels = np.asarray(labels, bool)
    best = 0.01
    for threshold in np.round(np.arange(0.01, 0.505, 0.01), 2):
        if float((probability[labels] >= threshold).mean()) >= target:
            best = float(threshold)
    return best


def threshold_rule(target: float, suffix: str = " on this split") -> str:
    return f"highest threshold (0.01 steps, at most 0.5) with sensitivity >= {target}{suffix}"


def platt_operating_point(logits: np.ndarray, labels: np.ndarray, target: float = TARGET_SENSITIVITY,
                          probability: Callable[[np.ndarray, Calibration], np.ndarray] = calibrated_probability,
                          ) -> tuple[Calibration, float, float, float]:
    """Platt scaling fitted on (logits, labels), the suggested threshold for `target`
    sensitivity and the sensitivity and specificity there: (calibration, threshold, sens, spec)."""
    calibration = fit_platt(logits, labels)
    p = probability(logits, calibration)
    threshold = suggest_threshold(p, labels, target)
    sensitivity, specificity, _ = sensitivity_specificity(p >= threshold, labels)
    return calibration, threshold, sensitivity, specificity


def write_calibration(out: Path, tool: str, record: dict, version: int = 1) -> dict:
    """``<out>/<tool>_post/<version>/calibration.json``; returns the record."""
    path = Path(out) / f"{tool}_post" / str(version) / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# --------------------------------------------------------------------------------------
# model cards


def model_facts(repository: Path, tool: str, version: int = 1) -> dict[str, str]:
    """The exported network's metadata properties plus ``size_bytes`` and ``opset``."""
    import onnx

    path = Path(repository) / f"{tool}_net" / str(version) / "model.onnx"
    proto = onnx.load(str(path))
    facts = {prop.key: prop.value for prop in proto.metadata_props}
    facts["size_bytes"] = str(path.stat().st_size)
    facts["opset"] = str(max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))
    return facts


# --------------------------------------------------------------------------------------
# admission thresholds of the model cards (read by mosmedai.catalog.version_admission)

#: Lower bounds (rates, AUC) sit at least this far below the held-out figure...
ADMISSION_MIN_MARGIN = 0.05
#: ...or this many of its binomial standard errors, whichever is more, rounded down to a 0.05 step.
ADMISSION_STANDARD_ERRORS = 2.0
#: Upper bounds (mean absolute errors) sit this share above the held-out figure, rounded up.
ADMISSION_ERROR_HEADROOM = 0.3
ADMISSION_RULE = (
    f"Lower bounds sit below the held-out figure by {ADMISSION_MIN_MARGIN} or "
    f"{ADMISSION_STANDARD_ERRORS:g} binomial standard errors at the held-out size, whichever is more, "
    f"rounded down to a 0.05 step; upper bounds (mean absolute errors) sit "
    f"{ADMISSION_ERROR_HEADROOM * 100:.0f} % above it, rounded up. They are set for the whole reference set: "
    "a run on fewer cases (`-n`) is noisier."
)


def _upper_bound(value: float) -> float:
    target = value * (1 + ADMISSION_ERROR_HEADROOM)
    step = 10 ** math.floor(math.log10(target)) / 2 if target > 0 else 0.05  # 1.44 -> 1.5, 32.9 -> 35
    return round(math.ceil(target / step - 1e-9) * step, 6)


def admission_thresholds(result: dict, metrics: Sequence[str]):
    """Bounds for the named headline metrics of a held-out result (those it measured):
    ``<=`` for mean absolute errors (names with ``mae``), ``>=`` for rates and AUC."""
    from mosmedai.catalog.version_admission import Threshold

    thresholds = []
    for metric in metrics:
        value = result.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if "mae" in metric:
            thresholds.append(Threshold(metric, "<=", _upper_bound(float(value))))
            continue
        n = {"sensitivity": result.get("n_positive"), "specificity": result.get("n_negative")}.get(metric)
        n = n or min(result.get("n_positive") or result["n"], result.get("n_negative") or result["n"])
        margin = max(ADMISSION_MIN_MARGIN, ADMISSION_STANDARD_ERRORS * math.sqrt(value * (1 - value) / max(n, 1)))
        bound = round(math.floor((value - margin) / 0.05 + 1e-9) * 0.05, 2)
        thresholds.append(Threshold(metric, ">=", max(0.0, bound)))
    return thresholds


def with_admission_thresholds(card: str, tool: str, result: dict, metrics: Sequence[str]) -> str:
    """The card text with its ``## Admission thresholds`` section (mosmedai.catalog.version_admission)."""
    from mosmedai.catalog.version_admission import replace_section, thresholds_section

    thresholds = admission_thresholds(result, metrics)
    section = thresholds_section(tool, int(result.get("version", 1)), thresholds,
                                 {t.metric: result[t.metric] for t in thresholds}, ADMISSION_RULE)
    return replace_section(card, section)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def frozen(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays made read-only (they are shared through an lru_cache)."""
    for array in data.values():
        array.setflags(write=False)
    return data


# --------------------------------------------------------------------------------------
# torch


def block2d(cin: int, cout: int, stride: int = 1, dilation: int = 1):
    """3x3 convolution (no bias), batch norm, ReLU."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def count_macs(model, size: int | None = None) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers)."""
    import torch
    from torch import nn

    from mosmedai.catalog.imaging import NETWORK_SIZE

    size = NETWORK_SIZE if size is None else size
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    for handle in handles:
        handle.remove()
    return total


def one_cycle(parameters, learning_rate: float, steps: int, pct_start: float = 0.2, max_lr=None):
    """AdamW (weight decay 1e-4) under a one-cycle schedule: (optimizer, schedule)."""
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate if max_lr is None else max_lr,
                                                   total_steps=steps, pct_start=pct_start)
    return optimizer, schedule


def minibatches(n: int, batch: int, generator) -> Iterator:
    """One epoch: a permutation of 0..n-1 drawn from `generator`, in n // batch full batches."""
    import torch

    order = torch.randperm(n, generator=generator)
    for step in range(n // batch):
        yield order[step * batch : (step + 1) * batch]


def optimise(optimizer, schedule, loss) -> None:
    """One optimiser step on `loss` and one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def training_summary(model, epochs: int, batch: int, learning_rate: float, started: float, **extra) -> dict:
    """What the exported metadata records of a training run (`extra` before the thread count)."""
    import torch

    return {
        "epochs": epochs, "batch": batch, "learning_rate": learning_rate,
        "train_seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        **extra,
        "torch_threads": torch.get_num_threads(),
    }
