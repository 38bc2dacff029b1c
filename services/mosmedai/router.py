"""The router: batches images per tool and calls the region's Triton pool over gRPC.

One ``@serve.batch`` queue per tool. A batch is sent as one Triton request per image
shape (Triton stacks a batch along its first axis, so only equal shapes share a request).

Batch wait: an image reaching a tool with no batch in flight goes at once; only while the
tool already has a batch in Triton does a new batch wait up to ``router_batch_wait_ms``
for company. Under load this forms batches; at idle it adds no latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from ray import serve

from mosmedai.config import Settings
from mosmedai.model_repo import output_names
from mosmedai.tools import CATALOG
from mosmedai.metrics import TRITON_OUTCOME, ReadinessCollector, RouterMetrics, start_router_metrics_server

log = logging.getLogger("mosmedai.router")



@dataclass
class ImageInput:
    """One image as it travels to Triton: stored values and the grayscale parameters."""

    pixels: np.ndarray  # (rows, columns) uint16
    params: np.ndarray  # float32 [N_PARAMS]
    voi_lut: np.ndarray  # float32 [L], L >= 1 (a single 0 when the header has no table)

    @property
    def shape(self) -> tuple:
        return self.pixels.shape


@dataclass
class VolumeInput:
    """One CT series as it travels to Triton: HU sampled on the family grid, and its geometry."""

    volume: np.ndarray  # (slices, rows, columns) int16 HU on the grid
    geometry: np.ndarray  # float32 [N_GEOMETRY] (mosmedai.volumes.VolumeGeometry)

    @property
    def shape(self) -> tuple:
        return self.volume.shape


def triton_inputs(grpc, images: list) -> list:
    """The InferInputs of one Triton request for images (or volumes) of equal shape."""
    if isinstance(images[0], VolumeInput):
        arrays = (("volume", np.stack([item.volume for item in images]), "INT16"),
                  ("geometry", np.stack([item.geometry for item in images]).astype(np.float32, copy=False), "FP32"))
    else:
        lut_length = max(len(image.voi_lut) for image in images)
        luts = np.zeros((len(images), lut_length), np.float32)
        for row, image in enumerate(images):
            luts[row, : len(image.voi_lut)] = image.voi_lut
        arrays = (("pixels", np.stack([image.pixels for image in images]), "UINT16"),
                  ("params", np.stack([image.params for image in images]).astype(np.float32, copy=False), "FP32"),
                  ("voi_lut", luts, "FP32"))
    inputs = []
    for name, array, dtype in arrays:
        tensor = grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class ToolFailure(Exception):
    """A tool failed in Triton; ``status`` is the HTTP status the gateway answers with."""

    def __init__(self, tool: str, status: int, message: str):
        super().__init__(f"{tool}: {message}")
        self.tool, self.status, self.message = tool, status, message


def _status_of(error: Exception) -> int:
    """HTTP status for a failed Triton call: 503 unreachable, 504 deadline, 502 otherwise."""
    status = str(getattr(error, "status", lambda: "")() or "")
    text = str(error)
    if "UNAVAILABLE" in status or "UNAVAILABLE" in text or "failed to connect" in text.lower():
        return 503
    # A model that is (re)loading - Triton starting, or a repository update - has no version
    # ready yet: unavailable for now, not broken.
    if "no available versions" in text or "is not ready" in text:
        return 503
    if "DEADLINE_EXCEEDED" in status or "Deadline" in text:
        return 504
    return 502


class ToolBatcher:
    """The @serve.batch queue of one tool and what it has in flight."""

    def __init__(self, router: "Router", tool: str, max_batch_size: int, wait_s: float):
        self.router, self.tool, self.wait_s = router, tool, wait_s
        self.in_flight = 0
        metrics = router.metrics
        self.queue_depth = metrics.queue_depth[tool]
        self.queue_seconds = metrics.queue_seconds[tool]
        self.batch_size_metric = metrics.batch_size[tool]
        self.batch_sizes: list[int] = []
        # Two batches at once: one in Triton's network, one in pre/postprocessing.
        self.submit = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s,
                                  max_concurrent_batches=2)(self._run)

    async def infer(self, image: ImageInput) -> dict:
        self.submit.set_batch_wait_timeout_s(self.wait_s if self.in_flight else 0.0)
        self.queue_depth.inc()
        return await self.submit((image, time.perf_counter()))

    async def _run(self, queued: list[tuple[ImageInput, float]]) -> list[dict]:
        self.in_flight += 1
        started = time.perf_counter()
        self.queue_depth.dec(len(queued))
        self.batch_size_metric.observe(len(queued))
        for _, enqueued in queued:
            self.queue_seconds.observe(started - enqueued)
        images = [image for image, _ in queued]
        self.batch_sizes.append(len(images))
        del self.batch_sizes[:-10000]  # the recent batches are what /v1/router/batches reports
        try:
            groups: dict[tuple, list[int]] = {}
            for index, image in enumerate(images):
                groups.setdefault(image.shape, []).append(index)
            results: list[dict] = [{} for _ in images]
            answers = await asyncio.gather(
                *(self.router.call_triton(self.tool, [images[i] for i in group]) for group in groups.values()),
                return_exceptions=True,
            )
            for group, answer in zip(groups.values(), answers):
                for position, index in enumerate(group):
                    if isinstance(answer, Exception):
                        failure = answer if isinstance(answer, ToolFailure) else ToolFailure(
                            self.tool, _status_of(answer), str(answer))
                        results[index] = {"error": failure.message, "status": failure.status}
                    else:
                        results[index] = answer[position]
            return results
        finally:
            self.in_flight -= 1


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, settings: dict):
        import tritonclient.grpc.aio as grpcclient

        self.settings = Settings(**settings)
        self.client = grpcclient.InferenceServerClient(self.settings.triton_grpc_target)
        self.grpc = grpcclient
        tools = self.settings.enabled_tools
        self.metrics = RouterMetrics(tools)
        self.metrics.registry.register(ReadinessCollector(self.settings.triton_grpc_target, tools))
        self.metrics_port = start_router_metrics_server(
            self.metrics, self.settings.bind_host, self.settings.router_metrics_port, self.settings.router_replicas)
        if self.metrics_port is None:
            log.warning("router metrics: ports %d..%d are all taken; this replica exports no metrics",
                        self.settings.router_metrics_port,
                        self.settings.router_metrics_port + self.settings.router_replicas - 1)
        wait_s = self.settings.router_batch_wait_ms / 1000.0
        self.batchers = {
            tool: ToolBatcher(self, tool, self.settings.router_max_batch_size, wait_s)
            for tool in self.settings.enabled_tools
        }

    async def infer_image(self, tools: list[str], image: ImageInput | VolumeInput) -> dict[str, dict]:
        """Run every named tool on one image; tool -> outputs, or {'error', 'status'}."""
        unknown = [tool for tool in tools if tool not in self.batchers]
        if unknown:
            raise ValueError(f"tools not enabled on this router: {unknown}")
        results = await asyncio.gather(*(self.batchers[tool].infer(image) for tool in tools))
        return dict(zip(tools, results))

    async def call_triton(self, tool: str, images: list[ImageInput | VolumeInput]) -> list[dict]:
        """One Triton request for images (or volumes) of equal shape; retried while Triton is unreachable."""
        grpc = self.grpc
        inputs = triton_inputs(grpc, images)
        names = output_names(CATALOG[tool])
        outputs = [grpc.InferRequestedOutput(name) for name in names]

        attempt = 0
        first_started = time.perf_counter()
        while True:
            started = time.perf_counter()
            try:
                result = await self.client.infer(tool, inputs, outputs=outputs,
                                                 client_timeout=self.settings.triton_timeout_s)
                break
            except Exception as error:
                status = _status_of(error)
                if status == 503 and attempt < self.settings.triton_retries:
                    attempt += 1
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                log.warning("tool %s failed in Triton: %s", tool, error)
                self.metrics.triton_seconds[tool].observe(time.perf_counter() - first_started)
                self.metrics.triton_requests.labels(tool, TRITON_OUTCOME.get(status, "error")).inc()
                raise ToolFailure(tool, status, str(error)) from None
        finished = time.perf_counter()
        triton_ms = (finished - started) * 1000.0
        self.metrics.triton_seconds[tool].observe(finished - first_started)
        self.metrics.triton_requests.labels(tool, "ok").inc()
        version = result.get_response().model_version
        values = {name: result.as_numpy(name) for name in names}
        return [
            {
                "probability": float(values["probability"][i][0]),
                "positive": bool(values["positive"][i][0]),
                "location": [float(v) for v in values["location"][i]],
                "measurements": [float(v) for v in values["measurements"][i]] if "measurements" in values else [],
                "model_version": version,
                "triton_ms": triton_ms,
                "batch_size": len(images),
            }
            for i in range(len(images))
        ]

    async def ready(self) -> dict[str, bool]:
        """Whether Triton is ready and each enabled tool is loaded."""
        try:
            if not await self.client.is_server_ready():
                return {"triton": False}
            states = {"triton": True}
            for tool in self.batchers:
                states[tool] = await self.client.is_model_ready(tool)
            return states
        except Exception as error:
            log.info("Triton not ready: %s", error)
            return {"triton": False}

    async def batch_stats(self) -> dict[str, dict[str, float]]:
        """Mean realised batch size per tool over the recent batches (for the benchmark)."""
        return {
            tool: {
                "batches": len(b.batch_sizes),
                "images": int(sum(b.batch_sizes)),
                "mean_batch_size": float(np.mean(b.batch_sizes)) if b.batch_sizes else 0.0,
            }
            for tool, b in self.batchers.items()
        }

    async def reset_stats(self) -> None:
        for batcher in self.batchers.values():
            batcher.batch_sizes.clear()

