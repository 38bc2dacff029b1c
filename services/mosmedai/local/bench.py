"""`make bench`: one chest X-ray tool measured side by side in one run, then a CT study.

(a) the path's own work in one process and one thread: decode, transport reduction,
    preprocess, ONNX Runtime network, postprocess;
(limit) the same work in one process per core, on all cores: this machine's ceiling;
(b) Triton directly: per request the client decodes the DICOM and reduces it as the
    gateway does, then calls the tool's ensemble over gRPC (asyncio tritonclient);
(c) the full path: DICOM bytes over HTTP to the gateway, Ray Serve router, Triton;
then the other front doors as rows of their own: the gRPC study service (``Submit``) and
DICOMweb STOW-RS (accepted, then drained by the job runner: instances per second until
the backlog is empty).

Then the CT row: one 128-slice 512 x 512 chest CT series through the full path, seconds
per study and the shares of upload, decode and series assembly, transfer and inference;
then the national rows (``mosmedai.local.bench_national``): overload at twice the peak, and
failover when RU-TA's Triton is killed mid-run.

Ratios compare throughput at saturation (the load generator shares the machine's cores with
the platform, as a client on the same host would). The (b) and (c) rows also give the CPU
they used per image (the whole machine's, while the row ran), and the ceiling follows: (c)
does (b)'s work and more, and must move the DICOM body over TCP, which costs the kernel a
measured amount of CPU per body at both ends; so (c) can finish at most cores / ((b)'s CPU
per image + that) images per second on this machine, whatever the gateway and router do.
The machine is noisy: read ratios from one run, not absolute numbers across runs. The figures go to ``.run/bench/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from mosmedai.local import bench_national

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.phantoms.dicom_build import ct_series, to_bytes
from mosmedai.pipeline.dicom_input import decode
from mosmedai.catalog.imaging import preprocess
from mosmedai.serving.model_repo import output_names, read_threshold
from mosmedai.pipeline.work import image_input
from mosmedai.pipeline.multipart import multipart_body
from mosmedai.catalog.postprocess import Calibration, postprocess
from mosmedai.ingress.tenants import auth_headers
from mosmedai.catalog.tools import CATALOG
from mosmedai.phantoms.chest_xray import make_phantom, to_dataset

TOOL = "cxr_nodule"
RESULTS = Path(".run/bench/results.json")
CONCURRENCIES = (1, 4, 16)


@dataclass
class Run:
    label: str
    concurrency: int
    images: int
    seconds: float
    latencies_ms: list[float]
    refused: int = 0  # requests refused under load (503/429 + Retry-After), not counted as images
    cpu_busy: float | None = None  # the share of all the machine's cores busy while it ran

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float | None:
        """Machine CPU (ms, every process) per image answered: the row's cost, load generator included."""
        if self.cpu_busy is None or not self.images:
            return None
        return self.cpu_busy * (os.cpu_count() or 1) * self.seconds * 1000.0 / self.images

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def _path_work(body: bytes, settings: Settings):
    """The work the path does for one image, as a function of no arguments: decode, transport
    reduction, preprocess (of the reduced image, as Triton's preprocess step receives it),
    the ONNX network in one thread, postprocess."""
    import onnxruntime

    from mosmedai.catalog.imaging import GrayscaleParams

    spec = CATALOG[TOOL]
    repository = settings.model_repository
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(repository / spec.network_model / "1" / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    calibration = Calibration.load(repository / spec.postprocess_model / "1" / "calibration.json")
    threshold = read_threshold(repository, TOOL)

    def once():
        tensors, _ = image_input(decode(body, settings.max_pixels), settings.transport_max_side)
        params = GrayscaleParams.from_vector(tensors.params, tensors.voi_lut)  # as Triton's preprocess step reads them
        network_input, geometry = preprocess(tensors.pixels, params)
        logit, heatmap = session.run(["logit", "heatmap"], {"image": network_input[None, None]})
        return postprocess(logit[0], heatmap[0], geometry.as_vector(), calibration, threshold)

    return once


def _timed(once, seconds: float) -> tuple[list[float], float]:
    for _ in range(3):
        once()
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        once()
        latencies.append((time.perf_counter() - begin) * 1000)
    return latencies, time.perf_counter() - started


def in_process(body: bytes, settings: Settings, seconds: float) -> Run:
    """(a): the path's own work, in one process and one thread."""
    latencies, elapsed = _timed(_path_work(body, settings), seconds)
    return Run("(a) in-process", 1, len(latencies), elapsed, latencies)


def _limit_worker(body: bytes, settings: dict, seconds: float, start_at: float) -> tuple[int, float]:
    once = _path_work(body, Settings(**settings))
    once()  # warm
    time.sleep(max(0.0, start_at - time.time()))  # every core starts together
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        once()
        count += 1
    return count, time.perf_counter() - started


def machine_limit(body: bytes, settings: Settings, seconds: float) -> Run:
    """(limit): the same work in one process per core, all at once: what this machine can do
    with no server at all (fork: the workers share the loaded modules)."""
    import concurrent.futures
    import multiprocessing

    cores = os.cpu_count() or 1
    start_at = time.time() + 5.0  # time for every worker to load its session
    with concurrent.futures.ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(_limit_worker, [body] * cores, [settings.model_dump(mode="json")] * cores,
                             [seconds] * cores, [start_at] * cores))
    images = sum(count for count, _ in done)
    elapsed = max(span for _, span in done)
    return Run(f"(limit) {cores} procs", cores, images, elapsed, [elapsed * 1000.0 / max(1, images / cores)])


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of every core since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def loopback_upload_ms(body: bytes, repeats: int = 40) -> tuple[float, float]:
    """(CPU ms at both ends, wall ms) to move ``body`` over loopback TCP with the least
    work there is: one ``sendall``, ``recv_into`` a buffer made once, no HTTP. The kernel's
    copies, which any server of a DICOM body over HTTP pays on top of its own work. The real
    body is sent: an untouched buffer (zero pages) copies faster than memory does."""
    import resource
    import socket
    import threading

    size = len(body)
    with socket.create_server(("127.0.0.1", 0)) as server:
        def receive() -> None:
            connection, _ = server.accept()
            with connection:
                view = memoryview(bytearray(size))
                while True:
                    got = 0
                    while got < size:
                        n = connection.recv_into(view[got:], size - got)
                        if not n:
                            return
                        got += n
                    connection.sendall(b"k")

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        with socket.create_connection(server.getsockname()) as client:
            for _ in range(3):  # warm the socket buffers
                client.sendall(body)
                client.recv(1)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(repeats):
                client.sendall(body)
                client.recv(1)
            after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
        thread.join(5.0)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used * 1000.0 / repeats, wall * 1000.0 / repeats


async def _closed_loop(send, concurrency: int, seconds: float, label: str) -> Run:
    """`concurrency` clients, each sending its next request when the last one answers."""
    for _ in range(concurrency):
        await send()  # warm connections and the models
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    refused = 0

    async def client():
        nonlocal refused
        while time.perf_counter() < deadline:
            begin = time.perf_counter()
            if await send() is False:  # refused under load (503/429 with Retry-After): not an image
                refused += 1
                await asyncio.sleep(0.05)
                continue
            latencies.append((time.perf_counter() - begin) * 1000)

    started, cpu = time.perf_counter(), _machine_cpu()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run(label, concurrency, len(latencies), time.perf_counter() - started, latencies, refused,
               _busy_share(cpu, _machine_cpu()))


async def through_triton(body: bytes, settings: Settings, seconds: float) -> list[Run]:
    """(b): per request, the client decodes and reduces the DICOM as the gateway does, then
    calls the tool's ensemble; no HTTP server and no Ray in between."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(settings.triton_grpc_target)
    outputs = [grpcclient.InferRequestedOutput(name) for name in output_names(CATALOG[TOOL])]

    async def send():
        tensors, _ = image_input(decode(body, settings.max_pixels), settings.transport_max_side)
        inputs = []
        for name, array, dtype in (("pixels", tensors.pixels[None], "UINT16"),
                                   ("params", tensors.params[None], "FP32"),
                                   ("voi_lut", tensors.voi_lut[None], "FP32")):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        await client.infer(TOOL, inputs, outputs=outputs)

    runs = [await _closed_loop(send, c, seconds, "(b) Triton gRPC") for c in CONCURRENCIES]
    await client.close()
    return runs


#: the gateway's timings of a study (``timings_ms``), in the order the path spends them
STAGES = ("receive", "decode", "router hop", "triton", "rest of the gateway")


def stages_of(timings: list[dict], client_ms: list[float]) -> dict[str, float]:
    """Where the milliseconds of a study go (medians): outside the handler (the client's send
    and the HTTP server before the handler runs), then the gateway's own stages."""
    median = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
    shares = {
        "client and HTTP server": statistics.median(client_ms) - median["total"],
        "receive": median["receive"],
        "decode": median["decode"],
        "router hop": median["inference"] - median["triton"],
        "triton": median["triton"],
    }
    shares["rest of the gateway"] = median["total"] - median["receive"] - median["decode"] - median["inference"]
    return shares


async def through_gateway(body: bytes, url: str, seconds: float,
                          profile: "Profiler | None" = None) -> tuple[list[Run], list[float], dict[str, float]]:
    """(c) at each concurrency; the realised mean batch of each; where the milliseconds go at
    the lowest concurrency. ``profile`` samples the gateway and router during the highest."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    batch_sizes = []
    timings: list[dict] = []
    client_ms: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits, headers=auth_headers()) as client:
        async def send(record: bool = False):
            started = time.perf_counter()
            answer = await client.post("/v1/studies", params={"tools": TOOL}, content=body,
                                       headers={"Content-Type": "application/dicom"})
            if answer.status_code in (429, 503) and "retry-after" in answer.headers:
                return False
            if answer.status_code != 200:
                raise RuntimeError(f"gateway answered {answer.status_code}: {answer.text}")
            if record:
                client_ms.append((time.perf_counter() - started) * 1000)
                timings.append(answer.json()["timings_ms"])
            return True

        runs = []
        for concurrency in CONCURRENCIES:
            await client.post("/v1/router/batches/reset")
            first, last = concurrency == CONCURRENCIES[0], concurrency == CONCURRENCIES[-1]
            if profile and last:
                profile.start(seconds)
            runs.append(await _closed_loop(functools.partial(send, record=first), concurrency, seconds,
                                           "(c) full path"))
            batch_sizes.append((await client.get("/v1/router/batches")).json()[TOOL]["mean_batch_size"])
    return runs, batch_sizes, stages_of(timings, client_ms)


class Profiler:
    """py-spy on the gateway and router replicas while a row runs (``make bench
    BENCH_ARGS=--profile``): the share of the time each holds the GIL (Python on a core),
    and the functions it runs most, by samples taken while it does."""

    REPLICAS = {"gateway": "ServeReplica:mosmedai:Gateway", "router": "ServeReplica:mosmedai:Router"}

    def __init__(self, out: Path, rate: int = 200):
        self.out, self.rate = out, rate
        self.spies: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.seconds = 0.0

    def start(self, seconds: float) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out.mkdir(parents=True, exist_ok=True)
        self.seconds = seconds
        for name, marker in self.REPLICAS.items():
            pids = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
            if not pids:
                raise RuntimeError(f"profile: no {name} replica ({marker}) is running")
            raw = self.out / f"{name}.txt"
            command = [spy, "record", "--pid", str(pids[0]), "--duration", str(math.ceil(seconds)),
                       "--rate", str(self.rate), "--gil", "--format", "raw", "--output", str(raw)]
            self.spies[name] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), raw)

    def report(self, top: int = 12) -> dict[str, dict]:
        figures = {}
        for name, (spy, raw) in self.spies.items():
            _, error = spy.communicate(timeout=self.seconds + 60)
            if spy.returncode != 0 or not raw.exists():
                raise RuntimeError(f"profile: py-spy on the {name} failed: {error.decode()[-500:]}")
            leaves: dict[str, int] = {}
            samples = 0
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                leaves[stack.rsplit(";", 1)[-1]] = leaves.get(stack.rsplit(";", 1)[-1], 0) + int(count)
                samples += int(count)
            gil = samples / (self.rate * self.seconds)
            print(f"   {name}: holds the GIL {100 * gil:.0f} % of the time; by samples with the GIL:")
            ranked = sorted(leaves.items(), key=lambda item: -item[1])[:top]
            for frame, count in ranked:
                print(f"     {100 * count / samples:5.1f} %  {frame[:110]}")
            figures[name] = {"gil_share": gil, "top": [[frame, count / samples] for frame, count in ranked],
                             "raw": str(raw)}
        self.spies.clear()
        return figures


async def through_grpc_studies(body: bytes, settings: Settings, seconds: float) -> list[Run]:
    """The gRPC study service (``Studies.Submit``) with the same image, the same tool."""
    import grpc

    from mosmedai.ingress.grpc_api import studies_pb2, studies_pb2_grpc

    target = local.endpoints(settings)["grpc"]
    metadata = [("authorization", auth_headers()["Authorization"])]
    request = studies_pb2.SubmitRequest(instances=[body], tools=[TOOL])
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    runs = []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        studies = studies_pb2_grpc.StudiesStub(channel)

        async def send():
            try:
                await studies.Submit(request, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):  # refused under load
                    return False
                raise
            return True

        for concurrency in CONCURRENCIES:
            runs.append(await _closed_loop(send, concurrency, seconds, "gRPC Submit"))
    return runs


def _jobs_backlog(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("mosmedai_jobs_backlog{"))


def through_stow(body: bytes, settings: Settings, seconds: float, concurrency: int = 4) -> Run:
    """DICOMweb STOW-RS: ``concurrency`` clients store fresh instances (new UIDs each) for
    ``seconds``; the rate is instances over the time until the job backlog is empty again,
    the pace the asynchronous path drains at (every enabled tool that reads the image runs,
    and the SR and secondary captures are written)."""
    import io

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    template = dcmread(io.BytesIO(body))
    url = local.endpoints(settings)["gateway"]

    def fresh() -> tuple[bytes, str]:
        template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        return multipart_body([buffer.getvalue()])

    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=120.0, headers=auth_headers()) as client:
        if _jobs_backlog(client):
            raise RuntimeError("STOW row: the job backlog is not empty before it starts")

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120.0, headers=auth_headers()) as stow:
                stop = time.perf_counter() + seconds

                async def store() -> None:
                    while time.perf_counter() < stop:
                        content, content_type = fresh()
                        begin = time.perf_counter()
                        answer = await stow.post("/dicomweb/studies", content=content,
                                                 headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
                        if answer.status_code != 200:
                            raise RuntimeError(f"STOW row: {answer.status_code} {answer.text[:300]}")
                        latencies.append((time.perf_counter() - begin) * 1000)

                await asyncio.gather(*(store() for _ in range(concurrency)))

        started = time.perf_counter()
        asyncio.run(run())
        while _jobs_backlog(client):
            if time.perf_counter() - started > 60 * seconds + 300:
                raise RuntimeError("STOW row: the job backlog did not drain")
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    return Run("STOW-RS (drained)", concurrency, len(latencies), elapsed, latencies)


def platform_memory(settings: Settings) -> tuple[float, float, int, dict[str, float]]:
    """PSS and RSS (MiB) summed over the platform's processes, their count, and PSS by part.

    `make up` starts each group in a session of its own; Triton's stubs and Ray's
    processes stay in their group's session. PSS shares shared pages out fairly.
    The parts are the groups `make up` names (triton, triton-RU-TA, serve, ...), with
    Triton's Python-backend stubs counted apart from the server that spawned them.
    """
    groups = {pid: name for name, pid in local.status(settings).items() if pid}
    pss = rss = 0.0
    count = 0
    parts: dict[str, float] = {}
    for process in psutil.process_iter():
        try:
            group = groups.get(os.getsid(process.pid))
            if group is None:
                continue
            info = process.memory_full_info()
            stub = "python_backend_stub" in process.name() or "python_backend_stub" in " ".join(process.cmdline()[:1])
        except (psutil.Error, OSError):
            continue
        part = f"{group} (python-backend stubs)" if stub else group
        parts[part] = parts.get(part, 0.0) + info.pss / 2**20
        pss += info.pss / 2**20
        rss += info.rss / 2**20
        count += 1
    return pss, rss, count, parts


SYNTAXES = {
    "uncompressed": ExplicitVRLittleEndian,  # transfer-bound: 10 MB per image over HTTP
    "rle": RLELossless,  # lossless, 10 ms to decode: the common compressed case
    "jpegls": JPEGLSLossless,  # decode-bound: slow to decode on a noisy image
    "jpeg2000": JPEG2000Lossless,
}


def _row(run: Run, base: float | None = None, batch: float | None = None, note: str = "") -> str:
    ratio = f"{run.rate / base:6.2f}" if base else f"{'':6s}"
    size = f"{batch:6.2f}" if batch is not None else f"{'':6s}"
    cpu = run.cpu_ms_per_image
    cpu_text = f"{cpu:7.1f} {run.cpu_busy * 100:4.0f}%" if cpu is not None else f"{'':12s}"
    return (f"{run.label:18s} {run.concurrency:4d} {run.rate:8.1f} {run.percentile(50):8.1f} "
            f"{run.percentile(99):8.1f} {ratio} {size} {cpu_text}{note}")


def _cpu_ratio(runs: list[Run], reference: list[Run]) -> float | None:
    """CPU per image of the best of ``runs`` over that of the best ``reference`` run (each at its
    saturation), or None where either was not measured."""
    best, base = max(runs, key=lambda run: run.rate), max(reference, key=lambda run: run.rate)
    if not best.cpu_ms_per_image or not base.cpu_ms_per_image:
        return None
    return best.cpu_ms_per_image / base.cpu_ms_per_image


def ceiling(b_saturated: Run, upload_cpu_ms: float, upload_wall_ms: float, limit_img_s: float) -> dict:
    """What (c) can reach on this machine at most: (b)'s CPU per image at its best, plus moving
    the body to the gateway, on every core and nothing else (no HTTP, no Ray, no gateway
    work of its own)."""
    cores = os.cpu_count() or 1
    b_cpu = b_saturated.cpu_ms_per_image or 0.0
    full_max = cores * 1000.0 / (b_cpu + upload_cpu_ms) if b_cpu + upload_cpu_ms > 0 else math.inf
    return {"upload_cpu_ms": upload_cpu_ms, "upload_wall_ms": upload_wall_ms,
            "triton_cpu_ms_per_image": b_cpu, "full_img_s_max": full_max,
            "c_over_b_max": full_max / b_saturated.rate, "c_over_limit_max": full_max / limit_img_s}


def measure(body: bytes, settings: Settings, seconds: float, profile: Profiler | None = None) -> dict:
    """Every row for one image, printed as a table; returns the figures."""
    a = in_process(body, settings, seconds)
    limit = machine_limit(body, settings, seconds)
    b = asyncio.run(through_triton(body, settings, seconds))
    c, batch_sizes, stages = asyncio.run(through_gateway(body, local.endpoints(settings)["gateway"], seconds, profile))
    grpc_runs = asyncio.run(through_grpc_studies(body, settings, seconds))
    stow = through_stow(body, settings, seconds)

    upload_cpu_ms, upload_wall_ms = loopback_upload_ms(body)

    b_best, c_best = max(r.rate for r in b), max(r.rate for r in c)
    print(f"{'path':18s} {'conc':>4s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'/ b':>6s} {'batch':>6s} "
          f"{'CPU ms/img, busy':>17s}")
    print(_row(a, b_best))
    print(f"{limit.label:18s} {limit.concurrency:4d} {limit.rate:8.1f} {'':8s} {'':8s} {limit.rate / b_best:6.2f}")
    for run in b:
        print(_row(run, b_best))
    for run, batch in zip(c, batch_sizes):
        print(_row(run, b_best, batch, f"  ({run.refused} refused under load)" if run.refused else ""))
    for run in grpc_runs:
        print(_row(run, b_best))
    print(_row(stow, b_best, note="  (accepted instances over the time to drain them)"))
    # Goal 4: the realised mean batch at saturation against what the concurrency allows.
    saturated = max(range(len(c)), key=lambda i: c[i].rate)
    batch_fill = batch_sizes[-1] / min(c[-1].concurrency, settings.router_max_batch_size)
    added_p50 = c[0].percentile(50) - b[0].percentile(50)
    added_p99 = c[0].percentile(99) - b[0].percentile(99)
    print(f"saturation: c/b = {c_best / b_best:.2f} (target >= 0.8), c/limit = {c_best / limit.rate:.2f} "
          f"(target >= 0.7), b/limit = {b_best / limit.rate:.2f}; best (c) at concurrency {c[saturated].concurrency}")
    print(f"added latency of (c) over (b) at concurrency 1: p50 {added_p50:+.1f} ms (target <= 3), "
          f"p99 {added_p99:+.1f} ms (target <= 10); batch fill at concurrency {c[-1].concurrency}: "
          f"{batch_fill:.2f} (target >= 0.8)")
    print(f"where the {sum(stages.values()):.1f} ms of (c) at concurrency {c[0].concurrency} go (medians; (b) "
          f"takes {b[0].percentile(50):.1f}): " + ", ".join(f"{name} {ms:.1f}" for name, ms in stages.items()))
    grpc_cpu_over_c = _cpu_ratio(grpc_runs, c)
    if grpc_cpu_over_c is not None:
        print(f"gRPC Submit at saturation: {max(r.rate for r in grpc_runs) / c_best:.2f} of (c)'s throughput, "
              f"{grpc_cpu_over_c:.2f} x (c)'s CPU per image (target <= 1.3: the gRPC door calls the study "
              "service in the gateway replica, no hop)")
    most = ceiling(max(b, key=lambda run: run.rate), upload_cpu_ms, upload_wall_ms, limit.rate)
    print(f"ceiling of (c) here: (b)'s {most['triton_cpu_ms_per_image']:.1f} ms of CPU per image plus "
          f"{most['upload_cpu_ms']:.1f} ms to move the {len(body) / 2**20:.1f} MiB body over loopback TCP "
          f"(both ends, no HTTP) allow at most {most['full_img_s_max']:.0f} img/s: c/b <= "
          f"{most['c_over_b_max']:.2f}, c/limit <= {most['c_over_limit_max']:.2f}; and moving the body alone "
          f"takes {most['upload_wall_ms']:.1f} ms, the least (c) can add over (b) at concurrency 1")
    profiled = {}
    if profile:
        print(f"profile of (c) at concurrency {c[-1].concurrency} (py-spy, {profile.rate} samples/s):")
        profiled = profile.report()
    print()
    summary = lambda run: {"concurrency": run.concurrency, "rate": run.rate,  # noqa: E731
                           "p50_ms": run.percentile(50), "p99_ms": run.percentile(99),
                           "cpu_busy": run.cpu_busy, "cpu_ms_per_image": run.cpu_ms_per_image}
    return {
        "limit_img_s": limit.rate, "triton_img_s": b_best, "full_img_s": c_best,
        "added_p50_ms": added_p50, "added_p99_ms": added_p99, "batch_fill": batch_fill,
        "stages_ms": stages, "profile": profiled, "ceiling": most, "grpc_cpu_over_c": grpc_cpu_over_c,
        "rows": {
            "a": summary(a), "limit": {"processes": limit.concurrency, "rate": limit.rate},
            "b": [summary(run) for run in b],
            "c": [summary(run) | {"mean_batch_size": size, "refused": run.refused} for run, size in zip(c, batch_sizes)],
            "grpc_studies": [summary(run) for run in grpc_runs],
            "stow": summary(stow),
        },
    }


#: The CT row: one chest CT series as a scanner writes it.
CT_SERIES = {"slices": 128, "matrix": 512, "spacing_mm": (2.5, 0.7, 0.7), "studies": 3}


def ct_study(settings: Settings) -> dict | None:
    """One 128-slice 512 x 512 chest CT series through the full path (multipart/related to the
    gateway, every enabled chest CT tool): seconds per study and where the time goes."""
    from mosmedai.phantoms.ct_chest import make_phantom as chest_phantom

    tools = [name for name in settings.enabled_tools if CATALOG[name].family.name == "ct_chest"]
    if not tools:
        print("CT row: no chest CT tool is enabled; skipped\n")
        return None
    slices, matrix = CT_SERIES["slices"], CT_SERIES["matrix"]
    phantom = chest_phantom((5_000_002, 1), shape=(slices, matrix, matrix), spacing_mm=CT_SERIES["spacing_mm"])
    hu, _ = phantom.render()
    body, content_type = multipart_body([to_bytes(ds) for ds in ct_series(hu, CT_SERIES["spacing_mm"])])
    url = local.endpoints(settings)["gateway"]
    rows = []
    with httpx.Client(base_url=url, timeout=600.0, headers=auth_headers()) as client:
        for attempt in range(CT_SERIES["studies"] + 1):  # the first warms the models
            started = time.perf_counter()
            answer = client.post("/v1/studies", content=body, headers={"Content-Type": content_type})
            seconds = time.perf_counter() - started
            if answer.status_code != 200:
                raise RuntimeError(f"CT study: {answer.status_code} {answer.text[:300]}")
            if attempt:
                rows.append((seconds, answer.json()["timings_ms"]))
    seconds = statistics.median(row[0] for row in rows)
    timing = {key: statistics.median(row[1][key] for row in rows) for key in rows[0][1]}
    shares = {
        "upload (HTTP receive)": timing["receive"],
        "decode + series assembly + grid": timing["decode"],
        "transfer (router hop, object store)": max(0.0, timing["inference"] - timing["triton"]),
        "inference (Triton ensembles)": timing["triton"],
    }
    total_ms = sum(shares.values())
    print(f"== CT: one chest CT series, {slices} slices of {matrix}x{matrix} ({len(body) / 2**20:.0f} MiB), "
          f"tools {', '.join(tools)}")
    print(f"seconds per study (median of {len(rows)}): {seconds:.2f} s")
    for name, ms in shares.items():
        print(f"  {name:38s} {ms:8.0f} ms  {100 * ms / total_ms:5.1f} %")
    print()
    return {"seconds_per_study": seconds, "body_mib": len(body) / 2**20, "tools": tools, "timings_ms": timing,
            "shares": {name: ms / total_ms for name, ms in shares.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per row (s)")
    parser.add_argument("--syntaxes", default="uncompressed,rle",
                        help=f"transfer syntaxes of the image, comma-separated, from {sorted(SYNTAXES)}")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where the figures go (default {RESULTS})")
    parser.add_argument("--profile", action="store_true",
                        help="sample the gateway and router with py-spy during (c) at the highest concurrency "
                        "(raw stacks beside the results file)")
    args = parser.parse_args(argv)
    syntaxes = [name.strip() for name in args.syntaxes.split(",") if name.strip()]
    unknown = [name for name in syntaxes if name not in SYNTAXES]
    if unknown:
        parser.error(f"unknown syntaxes {unknown}; choose from {sorted(SYNTAXES)}")
    settings = Settings()

    already_running = all(local.status(settings).values())
    up_seconds = None
    if not already_running:
        started = time.perf_counter()
        local.up(settings)
        up_seconds = time.perf_counter() - started
    figures: dict = {}
    try:
        phantom = make_phantom((5_000_001, 1), shape=(2500, 2048), findings=[TOOL])
        dataset = to_dataset(phantom)
        print(f"bench: tool {TOOL}, one {phantom.stored.shape[0]}x{phantom.stored.shape[1]} DX image, "
              f"{args.seconds:.0f} s per row; ratio = img/s over (a)'s\n")
        for name in syntaxes:
            body = to_bytes(dataset, SYNTAXES[name])
            print(f"== {name} ({SYNTAXES[name].name}): {len(body) / 2**20:.1f} MiB")
            profile = Profiler(args.json.parent / f"profile-{name}") if args.profile else None
            figures[name] = measure(body, settings, args.seconds, profile)
        figures["ct"] = ct_study(settings)
        pss, rss, processes, memory_parts = platform_memory(settings)
        if "triton-RU-TA" in local.local_pools(settings):
            figures["overload"] = bench_national.overload_row(settings)
            figures["national"] = bench_national.national_row(settings)
            bench_national.report(figures["national"], figures["overload"])
    finally:
        if not already_running:
            local.down(settings)

    print(f"platform memory: {pss:.0f} MiB PSS ({rss:.0f} MiB RSS summed) in {processes} processes, "
          f"{len(settings.enabled_tools)} tools loaded (target: all 18 and the second pool within 5 GB)")
    for part, mib in sorted(memory_parts.items(), key=lambda item: -item[1]):
        print(f"  {part:40s} {mib:8.0f} MiB")
    if up_seconds is not None:
        print(f"make up (installed, cold processes): ready in {up_seconds:.1f} s (target <= 60)")
    figures.update(pss_mib=pss, rss_mib=rss, pss_parts_mib=memory_parts, up_seconds=up_seconds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2))
    print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
