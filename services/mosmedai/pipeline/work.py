"""From decoded DICOM instances to work for the router: the work every door shares.

Instances become work items - one per image for image tools, one per CT series and volume
family for volume tools - each with the tensors it travels as; ``infer_items`` sends them to
the router. What comes back is shaped by ``mosmedai.results.findings``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from mosmedai.catalog.families import IMAGE, VOLUME, ToolSpec
from mosmedai.catalog.imaging import reduce_for_transport
from mosmedai.catalog.tools import select_tools
from mosmedai.pipeline.dicom_input import DecodedImage, decode, is_uncompressed
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.series import grid_from_images, order_slices
from mosmedai.serving.router import ImageInput, VolumeInput


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


# --- running work items -----------------------------------------------------------------------
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
