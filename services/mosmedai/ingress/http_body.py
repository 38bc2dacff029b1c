"""Reading an HTTP request body within a limit (Starlette requests of the gateway's routers)."""

from __future__ import annotations

from mosmedai.pipeline.errors import InputError


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
