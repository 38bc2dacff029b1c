"""The multipart/related form of several DICOM instances (PS3.18 8.6.1.2, the STOW-RS request
body, and WADO-RS answers): split a body into its parts, and build one."""

from __future__ import annotations

import re
import uuid

from mosmedai.pipeline.errors import InputError

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_RELATED = "multipart/related"


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
