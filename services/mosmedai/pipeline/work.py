"""From DICOM instances to results: the work every interface shares.

The study API (single file or multipart), and the asynchronous jobs, turn DICOM Part-10
instances into work items - one per image for image tools, one per CT series and volume
family for volume tools - send each to the router, and shape what comes back into
``ItemResult`` objects (``mosmedai.results.schemas``).
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from dataclasses import dataclass

import numpy as np

from mosmedai.pipeline.dicom_input import DecodedImage, InputError, decode, is_uncompressed
from mosmedai.catalog.families import IMAGE, VOLUME, ToolSpec
from mosmedai.catalog.imaging import reduce_for_transport
from mosmedai.serving.router import ImageInput, VolumeInput
from mosmedai.results.schemas import Finding, ItemResult, Location, MeasurementValue, ToolResult
from mosmedai.catalog.tools import CATALOG, select_tools
from mosmedai.catalog.volumes import grid_from_images, order_slices

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_RELATED = "multipart/related"


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette request, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- multipart/related (PS3.18 8.6.1.2: STOW-RS request body) -----------------------------
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_TYPE = re.compile(r'type="?([^";]+)"?', re.IGNORECASE)


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(Content-Type, payload) of each part of a multipart/related body.

    Splits on the boundary with bytes.find (a 64 MB series is not copied through an email
    parser); every part must carry application/dicom, or the root type must say so.
    """
    boundary = _BOUNDARY.search(content_type)
    if not boundary:
        raise InputError(400, "no_boundary", "multipart/related Content-Type has no boundary parameter")
    root_type = (_TYPE.search(content_type).group(1).strip().lower() if _TYPE.search(content_type) else "")
    delimiter = b"--" + boundary.group(1).strip().encode("latin-1")
    parts: list[tuple[str, bytes]] = []
    position = body.find(delimiter)
    if position < 0:
        raise InputError(400, "malformed_multipart", "the body does not contain the boundary from Content-Type")
    while True:
        position += len(delimiter)
        if body[position:position + 2] == b"--":
            break  # the close delimiter
        header_end = body.find(b"\r\n\r\n", position)
        following = body.find(b"\r\n" + delimiter, position)
        if header_end < 0 or following < 0 or header_end > following:
            raise InputError(400, "malformed_multipart",
                             f"part {len(parts) + 1} is not terminated by a boundary or has no header block")
        headers = body[position:header_end].decode("latin-1").split("\r\n")
        part_type = root_type
        for line in headers:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.split(";")[0].strip().lower()
        parts.append((part_type, body[header_end + 4:following]))
        position = following + 2
    if not parts:
        raise InputError(400, "empty_multipart", "the multipart body has no parts")
    return parts


def multipart_body(payloads: list[bytes], media_type: str = DICOM_MEDIA_TYPE) -> tuple[bytes, str]:
    """A multipart/related body of the payloads, and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for payload in payloads:
        chunks += [f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode(), payload, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{media_type}"; boundary={boundary}'


# --- work items -----------------------------------------------------------------------------
@dataclass
class WorkItem:
    """One image (image tools) or one CT series for one volume family (volume tools)."""

    kind: str
    images: list[DecodedImage]  # one image, or the series' slices in order
    tools: list[str]
    tensors: ImageInput | VolumeInput
    factors: tuple[float, float] = (1.0, 1.0)  # transport pixels -> source pixels (images)

    @property
    def first(self) -> DecodedImage:
        return self.images[0]


def image_input(image: DecodedImage, max_side: int) -> tuple[ImageInput, tuple[float, float]]:
    """The tensors one image travels as, and the factors mapping their pixels to the source's."""
    pixels, row_factor, col_factor = reduce_for_transport(image.stored, max_side)
    lut = image.params.lut if image.params.lut is not None else np.zeros(1, np.float32)
    tensors = ImageInput(pixels=pixels, params=image.params.as_vector(), voi_lut=np.asarray(lut, np.float32))
    return tensors, (row_factor, col_factor)


def decode_all(bodies: list[bytes], max_pixels: int) -> list[DecodedImage]:
    """Decode every instance; an error names the instance (its position in the request)."""
    images = []
    for index, body in enumerate(bodies):
        try:
            images.append(decode(body, max_pixels))
        except InputError as error:
            error.message = f"instance {index + 1} of {len(bodies)}: {error.message}"
            error.details["instance"] = index + 1
            raise
    return images


def plan(images: list[DecodedImage], enabled: list[str], wanted: list[str] | None,
         transport_max_side: int) -> tuple[list[WorkItem], list[dict]]:
    """Work items for these instances, and what matched no tool (with what was looked at).

    Instances are grouped by Series Instance UID. Image tools read each instance; volume
    tools read a series ordered and checked by ``volumes.order_slices``.
    """
    series: dict[str, list[DecodedImage]] = {}
    for image in images:
        series.setdefault(image.series_instance_uid, []).append(image)
    items: list[WorkItem] = []
    unmatched: list[dict] = []
    for series_uid, members in series.items():
        specs = [spec for spec in select_tools(members[0].facts, enabled) if wanted is None or spec.name in wanted]
        image_tools = [spec.name for spec in specs if spec.kind == IMAGE]
        volume_families: dict[str, list[ToolSpec]] = {}
        for spec in specs:
            if spec.kind == VOLUME:
                volume_families.setdefault(spec.family.name, []).append(spec)
        if not specs:
            unmatched.append({"series_instance_uid": series_uid, "instances": len(members),
                              "looked_at": members[0].facts.looked_at})
            continue
        if image_tools:
            for image in members:
                tensors, factors = image_input(image, transport_max_side)
                items.append(WorkItem(IMAGE, [image], image_tools, tensors, factors))
        if volume_families:
            ordered, spacing = order_slices(members)
            for family_specs in volume_families.values():
                grid, geometry = grid_from_images(ordered, spacing, family_specs[0].family.grid)
                items.append(WorkItem(VOLUME, ordered, [spec.name for spec in family_specs],
                                      VolumeInput(grid, geometry.as_vector())))
    return items, unmatched


def prepare(bodies: list[bytes], settings, wanted: list[str] | None = None, enabled=None):
    """Decode the instances and plan their work: (images, items, unmatched); raises InputError.
    ``enabled``: the caller's tools (mosmedai.catalog.tool_config; default: every served tool)."""
    images = decode_all(bodies, settings.max_pixels)
    check_series_limit(images, settings.max_series_per_request)
    items, unmatched = plan(images, list(settings.enabled_tools if enabled is None else enabled), wanted,
                            settings.transport_max_side)
    return images, items, unmatched


async def prepare_off_loop(bodies: list[bytes], settings, wanted: list[str] | None = None, enabled=None):
    """`prepare`, inline for one uncompressed image (its pixels are a view of the body: a few
    ms, less than the hop to a thread); anything compressed, or several instances, in a thread
    so other uploads are received meanwhile (the decoders release the GIL)."""
    if len(bodies) == 1 and is_uncompressed(bodies[0]):
        return prepare(bodies, settings, wanted, enabled)
    return await asyncio.to_thread(prepare, bodies, settings, wanted, enabled)


# --- results --------------------------------------------------------------------------------
def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def measurement_values(spec: ToolSpec, values: list[float]) -> list[MeasurementValue]:
    out = []
    for measurement, value in zip(spec.measurements, values):
        value = _finite(value)
        if measurement.unit == "{slice}" and value is not None and value < 0:
            value = None  # a slice index of -1: nothing located
        if value is not None:
            value = round(value, 4)  # float32 from Triton: more digits would be noise
        label = None
        if measurement.is_category and value is not None:
            index = int(round(value))
            label = measurement.labels[index] if 0 <= index < len(measurement.labels) else None
        out.append(MeasurementValue(name=measurement.name, value=value, unit=measurement.unit, label=label))
    return out


def tool_result(tool: str, outputs: dict, item: WorkItem) -> ToolResult:
    """Router outputs of one tool on one work item -> the API's ToolResult."""
    spec = CATALOG[tool]
    probability = _finite(outputs["probability"])
    measurements = measurement_values(spec, outputs.get("measurements", []))
    findings = []
    if outputs["positive"]:
        location = None
        row0, col0, row1, col1 = outputs["location"]
        if row0 >= 0:
            if item.kind == IMAGE:
                rows, cols = item.factors  # transport pixels -> source pixels
                location = Location(row0=row0 * rows, col0=col0 * cols, row1=row1 * rows, col1=col1 * cols,
                                    sop_instance_uid=item.first.sop_instance_uid)
            else:
                slice_index = next((int(m.value) for m in measurements
                                    if m.name == "slice" and m.value is not None), None)
                uid = (item.images[slice_index].sop_instance_uid
                       if slice_index is not None and 0 <= slice_index < len(item.images) else None)
                location = Location(row0=row0, col0=col0, row1=row1, col1=col1, slice_index=slice_index,
                                    sop_instance_uid=uid)
        findings.append(Finding(finding=spec.finding, probability=probability, location=location))
    return ToolResult(
        tool=tool,
        title=spec.title,
        model_version=str(outputs.get("model_version") or ""),
        findings=findings,
        scores={} if probability is None else {"probability": probability},
        measurements=measurements,
        pool=str(outputs.get("pool") or ""),
        route=str(outputs.get("route") or ""),
    )


def item_result(item: WorkItem, outputs: dict[str, dict]) -> ItemResult:
    return ItemResult(
        series_instance_uid=item.first.series_instance_uid,
        modality=item.first.facts.modality,
        kind=item.kind,
        sop_instance_uids=[image.sop_instance_uid for image in item.images],
        tools=[tool_result(tool, outputs[tool], item) for tool in item.tools],
    )


# --- running work items -----------------------------------------------------------------------
class ToolsFailed(Exception):
    """Tools failed, or the study was refused under load; ``status`` is the HTTP status to
    answer: 502 or 504 (failed in Triton), 503 (unavailable, or ``reason`` overloaded /
    retry_budget) or 429 (``reason`` fair_share). 503 and 429 carry ``retry_after_s``."""

    def __init__(self, failures: dict[str, dict]):
        self.failures = failures
        refused = [out for out in failures.values() if out.get("reason")]
        # A refusal answers for the whole study (nothing else of it ran); else the worst failure.
        worst = refused[0] if refused else max(failures.values(), key=lambda out: out["status"])
        self.status = worst["status"]
        self.reason = worst.get("reason")
        self.retry_after_s = int(worst.get("retry_after_s", 1 if self.status in (429, 503) else 0))
        self.detail = worst["error"] if refused else "; ".join(f"{tool}: {out['error']}" for tool, out in failures.items())
        super().__init__(self.detail)

    @property
    def transient(self) -> bool:
        return self.status in (429, 503, 504)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.status in (429, 503) else {}

    def as_json(self) -> dict:
        if self.reason:
            return {"error": self.reason, "detail": self.detail, "retry_after_s": self.retry_after_s}
        return {"error": "tool_failed", "detail": self.detail, "tools": sorted(self.failures)}


def no_tool_error(count: int, unmatched: list[dict], enabled: list[str]) -> InputError:
    first = unmatched[0]["looked_at"] if unmatched else {}
    return InputError(422, "no_tool_accepts",
                      "no enabled tool reads this image" if count == 1 else "no enabled tool reads any of these instances",
                      looked_at=first, unmatched=unmatched, enabled_tools=enabled)


def check_series_limit(images: list[DecodedImage], limit: int) -> None:
    count = len({image.series_instance_uid for image in images})
    if count > limit:
        raise InputError(422, "too_many_series",
                         f"{count} series in one request; the limit is {limit} (max_series_per_request)")


async def infer_items(infer, items: list[WorkItem]) -> list[dict[str, dict]]:
    """Every item through the router (``infer(tools, tensors)`` awaits the tool -> outputs map)."""
    return list(await asyncio.gather(*(infer(item.tools, item.tensors) for item in items)))


def failures_of(answers: list[dict[str, dict]]) -> dict[str, dict]:
    return {tool: out for outputs in answers for tool, out in outputs.items() if "error" in out}
