"""`mosmedai profile`: per-tool service times of a live Triton pool at several batch sizes.

For each tool ensemble and batch size b, sends batches of b chest radiographs (decoded and
reduced exactly as the gateway does) to Triton over gRPC, one batch at a time, and records
the median time of one batch. With ``--gateway`` it also times whole studies through the
study API at concurrency 1: the part of a study's time that is not the tools' own
(``overhead_ms`` of the modality: HTTP, decode, Ray Serve hops) is what the planner adds to
each study's time-to-result. Writes a profile file in the planner's format (YAML).
"""
from __future__ import annotations

import argparse
import asyncio
import platform as platform_mod
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

CXR_TOOLS = ("cxr_opacity", "cxr_nodule", "cxr_pneumothorax")


def sample_study(shape=(2500, 2048), seed: int = 5_000_001) -> bytes:
    """A real-sized synthetic DX chest radiograph, DICOM Part-10, uncompressed."""
    from mosmedai.phantoms.dicom_build import to_bytes
    from mosmedai.phantoms.chest_xray import make_phantom, to_dataset

    return to_bytes(to_dataset(make_phantom((seed, 1), shape=shape, findings=["cxr_nodule"])))


def tensors_for(body: bytes, max_side: int = 512, max_pixels: int = 67108864):
    """The three input tensors of a chest X-ray ensemble for one image (as the gateway makes them)."""
    from mosmedai.pipeline.dicom_input import decode
    from mosmedai.pipeline.work import image_input

    tensors, _ = image_input(decode(body, max_pixels), max_side)
    return tensors.pixels, tensors.params, tensors.voi_lut


async def _time_batches(url: str, tool: str, tensors, batch: int, seconds: float, min_calls: int) -> list[float]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    pixels, params, voi = tensors
    inputs = []
    for name, array, dtype in (("pixels", pixels, "UINT16"), ("params", params, "FP32"), ("voi_lut", voi, "FP32")):
        stacked = np.ascontiguousarray(np.repeat(array[None], batch, axis=0))
        tensor = grpcclient.InferInput(name, list(stacked.shape), dtype)
        tensor.set_data_from_numpy(stacked)
        inputs.append(tensor)
    try:
        await client.infer(tool, inputs)  # warm
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < min_calls:
            begin = time.perf_counter()
            await client.infer(tool, inputs)
            times.append((time.perf_counter() - begin) * 1000)
        return times
    finally:
        await client.close()


def _time_studies(gateway: str, body: bytes, seconds: float, min_calls: int) -> list[float]:
    import httpx

    times: list[float] = []
    from mosmedai.ingress.tenants import auth_headers

    with httpx.Client(base_url=gateway, timeout=120, headers=auth_headers()) as client:
        def once():
            answer = client.post("/v1/studies", content=body, headers={"Content-Type": "application/dicom"})
            answer.raise_for_status()

        once()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < min_calls:
            begin = time.perf_counter()
            once()
            times.append((time.perf_counter() - begin) * 1000)
    return times


def measure(triton: str, tools: list[str], batches: list[int], seconds: float, gateway: str | None = None,
            name: str = "local-cpu", min_calls: int = 5, log=print) -> dict:
    body = sample_study()
    tensors = tensors_for(body)
    tool_entries: dict[str, dict] = {}
    cv_samples: list[float] = []
    for tool in tools:
        ms = []
        for b in batches:
            times = asyncio.run(_time_batches(triton, tool, tensors, b, seconds, min_calls))
            ms.append(round(statistics.median(times), 3))
            if b == batches[0]:
                cv_samples.append(statistics.pstdev(times) / statistics.mean(times))
            log(f"  {tool:20s} batch {b:2d}: {ms[-1]:8.2f} ms per batch ({ms[-1] / b:7.2f} ms per image, {len(times)} calls)")
        tool_entries[tool] = {"batch": list(batches), "ms": ms}
    entry: dict = {
        "source": f"measured by `mosmedai profile` against Triton {triton} on {platform_mod.node()} "
                  f"at {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {seconds:g} s per point, median",
        "cost_per_gpu_hour": 0.0,
        "service_cv": round(float(np.mean(cv_samples)), 3) if cv_samples else 0.0,
        "tools": tool_entries,
    }
    if gateway:
        times = _time_studies(gateway, body, seconds, min_calls)
        study = statistics.median(times)
        model = sum(entry["tools"][t]["ms"][0] for t in CXR_TOOLS if t in entry["tools"])
        entry["study_ms_concurrency_1"] = round(study, 3)
        # The gateway runs a study's tools side by side; the planner's replica runs them one after
        # another. The overhead keeps the unloaded time-to-result equal to the measured one.
        entry["overhead_ms"] = {"chest_xray": round(study - model, 3)}
        log(f"  full study path (gateway, concurrency 1): {study:.1f} ms; tools in sequence {model:.1f} ms; "
            f"overhead {study - model:+.1f} ms")
    return {"gpu_types": {name: entry}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mosmedai profile", description=__doc__.splitlines()[0])
    p.add_argument("--triton", default="127.0.0.1:8101", help="Triton gRPC host:port of the pool")
    p.add_argument("--gateway", default=None, help="also time whole studies through this gateway URL (e.g. http://127.0.0.1:8000)")
    p.add_argument("--tools", default=",".join(CXR_TOOLS), help="tool ensembles, comma-separated")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes, comma-separated")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per tool and batch size")
    p.add_argument("--name", default="local-cpu", help="GPU type name to write (e.g. the pool's GPU product)")
    p.add_argument("--out", type=Path, default=Path("profile-local.yaml"))
    args = p.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    if not batches or batches[0] < 1:
        p.error("--batches needs sizes >= 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    print(f"profiling {tools} at batch sizes {batches} against {args.triton}")
    try:
        profile = measure(args.triton, tools, batches, args.seconds, args.gateway, args.name)
    except Exception as exc:  # a dead or unready pool: say which and why
        print(f"mosmedai profile: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    args.out.write_text("# written by `mosmedai profile`; ms = one whole batch\n" + yaml.safe_dump(profile, sort_keys=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
