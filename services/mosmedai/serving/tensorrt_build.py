"""TensorRT engines for the gpu variant of the model repository.

The gpu variant (``mosmedai.serving.model_repo`` ``variant="gpu"``) runs every network step as
``platform: "tensorrt_plan"`` from ``<tool>_net/1/model.plan``; the pre and post steps stay
the same Python-backend models on CPU (they never load ONNX). This module builds those
plans from the same ``model.onnx`` the cpu variant serves and renders the gpu repository.

Why engines are not portable, hence the cache key
-------------------------------------------------
A TensorRT engine is not a model format but a compiled program: the builder times and
picks kernels (tactics) for the exact GPU it runs on - its architecture / compute
capability (SM 8.0 A100, 8.9 L4, 9.0 H100 ...), SM count and memory - and serialises them
with the TensorRT runtime's own layout. An engine built on one GPU model may refuse to load
(or load and run with poorly chosen kernels) on another, and a plan written by one TensorRT
version is rejected by any other (``Serialization assertion ... version tag``); Triton's
TensorRT backend has to be of the same TensorRT version too. So an engine is built on (or
for) each GPU product and TensorRT version of a pool, and cached under

    <cache>/<gpu product slug>-sm<compute capability>/trt-<TensorRT version>/
        <tool>-<first 12 hex of the ONNX sha256>-<fp16|fp32>.plan

(e.g. ``.cache/engines/nvidia-h100-80gb-hbm3-sm90/trt-10.13.3.9/cxr_opacity_net-1a2b3c4d5e6f-fp16.plan``);
a changed ONNX file changes its hash, so a stale engine is never reused.

The optimization profile covers batch 1 .. ``model_repo.MAX_BATCH_SIZE`` (Triton's dynamic
batcher sends any size in between), optimised for the largest.

``tensorrt`` is imported lazily: it exists only on GPU machines (``scripts/gpu-check``
installs the ``tensorrt`` wheel); everything else here (keys, rendering) runs anywhere.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mosmedai.serving.model_repo import MAX_BATCH_SIZE, network_input_dims

#: Default engine cache, relative to the repository root.
CACHE_DIR = Path(".cache") / "engines"
#: Builder workspace, bytes.
WORKSPACE_BYTES = 2 << 30
#: Tolerances of the gpu check: max |TensorRT - ONNX Runtime| per output (logits / maps).
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


class NoGpu(RuntimeError):
    """No usable NVIDIA GPU on this machine."""


# --- the cache key -------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class GpuInfo:
    product: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"


def gpu_info(index: int = 0) -> GpuInfo:
    """The product name and compute capability of GPU ``index``: nvidia-smi, then pynvml,
    then torch; NoGpu when none answers."""
    smi = os.environ.get("NVIDIA_SMI", "nvidia-smi")
    try:
        answer = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={index}"],
                                capture_output=True, text=True, timeout=30)
        if answer.returncode == 0 and answer.stdout.strip():
            name, _, capability = answer.stdout.strip().splitlines()[0].rpartition(",")
            return GpuInfo(name.strip(), capability.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return GpuInfo(name.decode() if isinstance(name, bytes) else name, f"{major}.{minor}")
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(index)
            return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}")
    except Exception:  # noqa: BLE001
        pass
    raise NoGpu("no NVIDIA GPU found: nvidia-smi, pynvml and torch.cuda all failed "
                "(is the driver installed and the GPU visible to this container?)")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on (see the module docstring)."""

    tool: str  # network model name, e.g. "cxr_opacity_net"
    gpu_product: str
    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str
    fp16: bool

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def path(self, cache: Path = CACHE_DIR) -> Path:
        gpu = f"{slug(self.gpu_product)}-sm{self.compute_capability.replace('.', '')}"
        return (Path(cache) / gpu / f"trt-{self.tensorrt_version}"
                / f"{self.tool}-{self.onnx_sha256[:12]}-{self.precision}.plan")


def _trt():
    try:
        import tensorrt
    except ModuleNotFoundError:
        raise RuntimeError("the 'tensorrt' Python package is not installed: `pip install tensorrt` on a machine "
                           "with an NVIDIA GPU (scripts/gpu-check does it), or use an NGC TensorRT container") from None
    return tensorrt


# --- build -------------------------------------------------------------------------------------
def build_engine(onnx_path: Path, plan_path: Path, input_dims: tuple[int, ...], fp16: bool = False,
                 max_batch: int = MAX_BATCH_SIZE, workspace: int = WORKSPACE_BYTES) -> Path:
    """ONNX -> serialised TensorRT engine at ``plan_path`` (batch 1..max_batch profile)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # deprecated (default) in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, (1, *input_dims), (max_batch, *input_dims), (max_batch, *input_dims))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    partial = plan_path.with_suffix(".partial")
    partial.write_bytes(bytes(serialized))
    partial.replace(plan_path)  # atomic: a crashed build never leaves a half plan in the cache
    return plan_path


def engine_for(tool: str, onnx_path: Path, fp16: bool = False, cache: Path = CACHE_DIR,
               gpu: GpuInfo | None = None) -> tuple[Path, bool]:
    """The cached engine of a tool's network (built when missing): (path, built now)."""
    from mosmedai.catalog.tools import CATALOG

    trt = _trt()
    gpu = gpu or gpu_info()
    spec = CATALOG[tool]
    key = EngineKey(spec.network_model, gpu.product, gpu.compute_capability, trt.__version__,
                    sha256(Path(onnx_path)), fp16)
    path = key.path(cache)
    if path.exists():
        return path, False
    return build_engine(Path(onnx_path), path, network_input_dims(spec), fp16), True


def render_gpu_repository(out_dir: Path, tools: list[str], engines: dict[str, Path],
                          source: Path | None = None) -> list[Path]:
    """The gpu variant of ``tools`` in ``out_dir``: configs (model_repo, variant "gpu"),
    ``<tool>_net/1/model.plan`` from ``engines[tool]``, and the post steps' calibration
    from the cpu repository ``source``. No model.onnx is copied: the pre/post steps are the
    ONNX-free Python models and the network is the plan."""
    from mosmedai.catalog.tools import CATALOG
    from mosmedai.config import REPO_ROOT
    from mosmedai.serving import model_repo

    source = Path(source) if source else REPO_ROOT / "model_repository"
    out_dir = Path(out_dir)
    missing = [tool for tool in tools if tool not in engines]
    if missing:
        raise ValueError(f"no engine for {missing}")
    written = model_repo.write(out_dir, "gpu", tools)
    for tool in tools:
        spec = CATALOG[tool]
        plan = out_dir / spec.network_model / "1" / "model.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engines[tool], plan)
        written.append(plan)
        for extra in ("calibration.json", "manifest.yaml"):
            path = source / spec.postprocess_model / "1" / extra
            if path.exists():
                target = out_dir / spec.postprocess_model / "1" / extra
                shutil.copyfile(path, target)
                written.append(target)
    return written


# --- run an engine (gpu-check) -----------------------------------------------------------------
class _Cuda:
    """The few CUDA runtime calls an engine run needs, through ctypes (no extra package)."""

    def __init__(self):
        names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
        for base in map(Path, sys.path):  # the nvidia-cuda-runtime wheel the tensorrt wheel pulls in
            for found in (base / "nvidia").glob("cu*/lib/libcudart.so*") if (base / "nvidia").is_dir() else []:
                names.append(str(found))
            for found in (base / "nvidia" / "cuda_runtime" / "lib").glob("libcudart.so*") \
                    if (base / "nvidia" / "cuda_runtime" / "lib").is_dir() else []:
                names.append(str(found))
        self.lib = None
        for name in names:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise RuntimeError("CUDA runtime (libcudart) not found: `pip install nvidia-cuda-runtime-cu12`")
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA {what} failed with error {status}")

    def malloc(self, size: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), max(size, 1)), "cudaMalloc")
        return pointer.value

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.check(self.lib.cudaMemcpy(pointer, array.ctypes.data, array.nbytes, 1), "cudaMemcpy H2D")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.check(self.lib.cudaMemcpy(array.ctypes.data, pointer, array.nbytes, 2), "cudaMemcpy D2H")

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(handle)), "cudaStreamCreate")
        return handle.value or 0

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class EngineRunner:
    """Runs a serialised engine on a batch (TensorRT >= 8.6 tensor-address API)."""

    def __init__(self, plan_path: Path):
        trt = _trt()
        self.trt = trt
        self.cuda = _Cuda()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT cannot load it (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = self.cuda.stream()

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        image = np.ascontiguousarray(image, np.float32)
        name = self.inputs[0]
        self.context.set_input_shape(name, tuple(image.shape))
        pointers = {name: self.cuda.malloc(image.nbytes)}
        try:
            self.cuda.to_device(pointers[name], image)
            self.context.set_tensor_address(name, pointers[name])
            results = {}
            for output in self.outputs:
                results[output] = np.empty(tuple(self.context.get_tensor_shape(output)), np.float32)
                pointers[output] = self.cuda.malloc(results[output].nbytes)
                self.context.set_tensor_address(output, pointers[output])
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.cuda.sync(self.stream)
            for output, array in results.items():
                self.cuda.to_host(array, pointers[output])
            return results
        finally:
            for pointer in pointers.values():
                self.cuda.lib.cudaFree(pointer)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tolerance: float) -> dict:
    """Max |candidate - reference| per output and pass/fail against ``tolerance``."""
    report = {}
    for name, expected in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != expected.shape:
            report[name] = {"max_abs_diff": None, "passed": False,
                            "error": f"shape {None if got is None else got.shape} vs {expected.shape}"}
            continue
        difference = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        report[name] = {"max_abs_diff": difference, "tolerance": tolerance,
                        "passed": bool(np.isfinite(difference) and difference <= tolerance)}
    return report


def phantom_batch(n: int = 8, seed: int = 20240, size: int | None = None) -> np.ndarray:
    """n preprocessed synthetic chest radiographs (fixed seed): float32 [n, 1, S, S]."""
    from mosmedai.catalog.imaging import NETWORK_SIZE, preprocess
    from mosmedai.phantoms.chest_xray import TOOLS as FINDINGS
    from mosmedai.phantoms.chest_xray import make_phantom

    size = size or NETWORK_SIZE
    images = []
    for i in range(n):
        findings = [] if i % 2 == 0 else [FINDINGS[i % len(FINDINGS)]]
        phantom = make_phantom((seed, i), shape=(1024, 832), findings=findings)
        image, _ = preprocess(phantom.stored, phantom.params, size)
        images.append(image[None])
    return np.stack(images).astype(np.float32)


def gpu_check(tool: str = "cxr_opacity", n: int = 8, cache: Path = CACHE_DIR,
              repository: Path | None = None, repeats: int = 50) -> dict:
    """Build ``tool``'s engine in FP32 and FP16, run both and ONNX Runtime on the same
    phantoms, and report max abs differences (pass/fail by TOLERANCE) and timings."""
    import onnxruntime

    from mosmedai.catalog.tools import CATALOG
    from mosmedai.config import REPO_ROOT

    gpu = gpu_info()
    trt = _trt()
    spec = CATALOG[tool]
    repository = Path(repository) if repository else REPO_ROOT / "model_repository"
    onnx_path = repository / spec.network_model / "1" / "model.onnx"
    images = phantom_batch(n, size=network_input_dims(spec)[-1])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    started = time.perf_counter()
    reference = dict(zip(names, session.run(names, {session.get_inputs()[0].name: images})))
    ort_ms = (time.perf_counter() - started) * 1e3
    report = {"gpu": gpu.product, "compute_capability": gpu.compute_capability, "tensorrt": trt.__version__,
              "tool": tool, "network": spec.network_model, "onnx_sha256": sha256(onnx_path), "batch": n,
              "onnxruntime_cpu_ms": round(ort_ms, 3), "tolerance": TOLERANCE, "precisions": {}}
    for fp16 in (False, True):
        precision = "fp16" if fp16 else "fp32"
        started = time.perf_counter()
        plan, built = engine_for(tool, onnx_path, fp16, cache, gpu)
        build_s = time.perf_counter() - started
        runner = EngineRunner(plan)
        result = runner(images)
        for _ in range(5):
            runner(images)
        started = time.perf_counter()
        for _ in range(repeats):
            runner(images)  # includes host<->device copies, as Triton's would
        batch_ms = (time.perf_counter() - started) * 1e3 / repeats
        one_ms = _time(lambda: runner(images[:1]), repeats)
        outputs = compare(reference, result, TOLERANCE[precision])
        report["precisions"][precision] = {
            "engine": str(plan), "built_now": built, "build_or_load_s": round(build_s, 2),
            "plan_bytes": plan.stat().st_size, "batch_ms": round(batch_ms, 3), "batch1_ms": round(one_ms, 3),
            "outputs": outputs, "passed": all(o["passed"] for o in outputs.values()),
        }
    report["passed"] = all(p["passed"] for p in report["precisions"].values())
    return report


def _time(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) * 1e3 / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="build one engine in FP32/FP16 and compare with ONNX Runtime")
    check.add_argument("--tool", default="cxr_opacity")
    check.add_argument("--n", type=int, default=8)
    check.add_argument("--cache", type=Path, default=CACHE_DIR)
    check.add_argument("--json", type=Path, help="write the report here")
    build = commands.add_parser("build", help="build (or reuse) engines and render the gpu repository")
    build.add_argument("--tools", nargs="*", help="default: every tool")
    build.add_argument("--fp16", action="store_true")
    build.add_argument("--cache", type=Path, default=CACHE_DIR)
    build.add_argument("--out", type=Path, required=True, help="the gpu model repository to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            report = gpu_check(args.tool, args.n, args.cache)
            text = json.dumps(report, indent=2)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(text + "\n")
            print(text)
            for precision, result in report["precisions"].items():
                for name, output in result["outputs"].items():
                    print(f"{precision} {name:10s} max|trt-ort| {output['max_abs_diff']!s:>12} "
                          f"tol {TOLERANCE[precision]:g}  {'PASS' if output['passed'] else 'FAIL'}")
                print(f"{precision} batch {report['batch']}: {result['batch_ms']:.3f} ms, batch 1: "
                      f"{result['batch1_ms']:.3f} ms (ONNX Runtime CPU batch: {report['onnxruntime_cpu_ms']:.1f} ms)")
            print("gpu-check: " + ("PASS" if report["passed"] else "FAIL"))
            return 0 if report["passed"] else 1
        from mosmedai.catalog.tools import CATALOG
        from mosmedai.config import REPO_ROOT

        tools = args.tools or list(CATALOG)
        gpu = gpu_info()
        engines = {}
        for tool in tools:
            onnx_path = REPO_ROOT / "model_repository" / CATALOG[tool].network_model / "1" / "model.onnx"
            engines[tool], built = engine_for(tool, onnx_path, args.fp16, args.cache, gpu)
            print(f"{tool}: {'built' if built else 'cached'} {engines[tool]}")
        for path in render_gpu_repository(args.out, tools, engines):
            print(f"wrote {path}")
        return 0
    except NoGpu as error:
        print(f"tensorrt_build: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
