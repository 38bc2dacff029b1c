"""A small asynchronous Kubernetes API client for the operator's own calls.

kopf watches and patches the GpuPools itself; the operator's handlers need a few more
verbs (get/create/merge-patch/delete of children, patches of the pool's status
subresource). This client uses the same credentials as kopf (kopf's public login
functions: in-cluster service account, then kubeconfig) and speaks plain REST with
JSON merge patches (RFC 7386, ``application/merge-patch+json``).
"""
from __future__ import annotations

import json
import logging
import ssl
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from mosmedai_operator import MANAGER

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failed API call: HTTP status (0 = no response) and the server's reason/message."""

    def __init__(self, status: int, reason: str, message: str, path: str = "") -> None:
        super().__init__(f"{status} {reason}: {message} ({path})")
        self.status, self.reason, self.message, self.path = status, reason, message, path


def login(settings: kopf.OperatorSettings, log: logging.Logger | logging.LoggerAdapter = logger) -> kopf.ConnectionInfo:
    """Credentials the way kopf finds them: service account, kubernetes client, kubeconfig."""
    attempts = (kopf.login_with_service_account, kopf.login_via_client, kopf.login_with_kubeconfig)
    for attempt in attempts:
        try:
            info = attempt(logger=log, settings=settings)
        except kopf.LoginError:
            continue
        if info is not None:
            return info
    raise kopf.LoginError("no Kubernetes credentials: neither a service account nor a kubeconfig")


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    ca_data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
    context = ssl.create_default_context(cafile=info.ca_path, cadata=ca_data)  # type: ignore[arg-type]
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data or info.private_key_data:
        # ssl wants files; kopf's login functions return either paths or data.
        def to_file(data: str | bytes) -> str:
            handle = tempfile.NamedTemporaryFile(delete=False, suffix=".pem")
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.close()
            return handle.name
        cert = to_file(info.certificate_data) if info.certificate_data else cert
        key = to_file(info.private_key_data) if info.private_key_data else key
    if cert:
        context.load_cert_chain(cert, key)  # type: ignore[arg-type]
    return context


class KubeClient:
    """get / create / merge_patch / delete by REST path. Re-logs in once on 401."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo], timeout_seconds: float = 30.0) -> None:
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None
        # One id per operator process: audit logs (and tests) can tell two replicas apart.
        self.user_agent = f"{MANAGER}/{uuid.uuid4().hex[:8]}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._info = self._credentials()
            headers = {"User-Agent": self.user_agent, **self._info.as_http_headers()}
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                headers=headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self._info), limit=20),
            )
        return self._session

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any] | None:
        """One call; None for 404 on GET/DELETE; ApiError for any other failure."""
        for attempt in (1, 2):
            session = await self._open()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            try:
                async with session.request(method, path.lstrip("/"), data=data, headers=headers,
                                           params={"fieldManager": MANAGER} if method in ("POST", "PATCH") else None) as response:
                    if response.status == 401 and attempt == 1:
                        await self.close()  # expired token: log in again once
                        continue
                    if response.status == 404 and method in ("GET", "DELETE"):
                        return None
                    payload = await response.json(content_type=None) if response.content_length != 0 else {}
                    if response.status >= 400:
                        payload = payload if isinstance(payload, dict) else {}
                        raise ApiError(response.status, str(payload.get("reason") or response.reason),
                                       str(payload.get("message") or ""), path)
                    return payload
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                raise ApiError(0, type(exc).__name__, str(exc) or "no response", path) from exc
        raise ApiError(401, "Unauthorized", "credentials refused twice", path)

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.request("GET", path)

    async def create(self, collection_path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", collection_path, body) or {}

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, "application/merge-patch+json") or {}

    async def delete(self, path: str) -> dict[str, Any] | None:
        return await self.request("DELETE", path, {"propagationPolicy": "Background"})
