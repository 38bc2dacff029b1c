"""The load generators' HTTP/1.1 client: cheap enough per request that a generator sharing the
platform's cores offers the load it claims.

httpx spends milliseconds of Python per request and its connection pool scans every
connection on each one; at a few hundred requests per second with hundreds open, the
generator itself became the queue (studies "waited" up to 100 s in the client, in random
order, while the gateway saw a trickle). Here each request is one prebuilt write and one
header parse on a kept-alive connection.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

#: what a reused connection the server has closed meanwhile (keep-alive timeout) raises
_STALE = (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


class HttpLoadClient:
    """Keep-alive connections to one ``http://host:port``, opened as concurrency asks."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"load client: {url!r} is not an http://host:port URL")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> HttpLoadClient:
        return self

    async def __aexit__(self, *_) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
                   + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                   + "\r\n").encode("latin-1") + body
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await asyncio.wait_for(self._exchange(reader, writer, request), self.timeout_s)
            except _STALE as error:
                writer.close()
                if getattr(error, "partial", b""):  # the server had begun to answer: not stale
                    raise
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await asyncio.wait_for(self._exchange(reader, writer, request), self.timeout_s)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        request: bytes) -> Response:
        try:
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                name, colon, value = line.partition(":")
                if colon:
                    headers[name.strip().lower()] = value.strip()
            if "content-length" not in headers:
                raise ValueError(f"load client: answer {status} without Content-Length (chunked is not read here)")
            body = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return Response(status, headers, body)
