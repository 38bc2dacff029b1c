"""Object storage: the platform's only persistent state, over the S3 API.

`ObjectStore` is a thin boto3 wrapper with the few operations the platform needs (put,
conditional put, get, exists, list, delete, ensure_buckets); every botocore failure becomes
a `StorageError` whose message names the bucket and key. In a cluster the endpoint is an
S3-compatible service (AWS, Yandex Object Storage, MinIO, Ceph RGW); credentials come from
boto3's standard chain (environment, shared config, instance/pod identity), never from
Settings.

Conditional writes. ``put(..., if_none_match=True)`` sends ``If-None-Match: *`` (create only
if absent) and ``put(..., if_match=etag)`` sends ``If-Match`` (compare-and-swap). Both are
what make job acceptance and completion exactly-once (jobs.py). AWS S3 supports both since
2024-11, MinIO since RELEASE.2024-11, moto 5.1+; a store that ignores the headers silently
turns exactly-once into "single writer per job" (see jobs.py).

The local S3 server. ``make up`` and the tests run moto's S3 server (the ``moto[server]``
package) in a child process: ``python -m mosmedai.jobs.storage --host H --port P [--data-dir D]``
or `start_local_s3`. Moto keeps everything in memory and has no persistence of its own
(its "recorder" logs every request, reads included, unserialised, and replays on demand).
So that a local restart loses nothing accepted, this module wraps moto's WSGI app:

* every *successful* mutating request (PUT/POST/DELETE) is appended, under one lock that
  also serialises the request itself, to ``D/s3-log`` and fsync'ed before the client
  gets its response: an acknowledged write is on disk, and the log order is the order in
  which moto applied the writes (so conditional writes replay to the same winner);
* each entry is a JSON line (method, path, query, headers, body length) followed by the raw
  body: writing a 10 MiB instance as base64 inside JSON had cost 90 ms of CPU, under the
  lock (a log of the older ``D/s3-log.jsonl`` form is replayed and converted at start);
* at start the log is replayed into the fresh in-memory moto, then compacted: rewritten
  as one bucket-create per bucket and one PUT per surviving object (atomic rename), so
  the log does not grow with deleted or overwritten objects across restarts.

Limits of the local server, by design: one process, all mutations serialised, all data in
memory (sized for a developer's studies, not a region's), object metadata other than the
body is not kept across restarts (the platform stores none). Without ``--data-dir`` it is
purely in memory (tests).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Static credentials of the local moto server (it accepts any). Never used for a real store.
LOCAL_CREDENTIALS = {"aws_access_key_id": "mosmedai-local", "aws_secret_access_key": "mosmedai-local"}
LOG_NAME = "s3-log"
#: the log's first form (one JSON line per write, the body in base64): replayed, then converted
LEGACY_LOG_NAME = "s3-log.jsonl"
READY_PREFIX = "MOSMEDAI_S3_READY "


class StorageError(RuntimeError):
    """An object-store operation failed; the message names the operation, bucket and key."""

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.bucket, self.key, self.code = bucket, key, code


class ObjectNotFound(StorageError):
    """The object (or its bucket) does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # epoch seconds (server clock)
    etag: str


def _where(bucket: str, key: str | None) -> str:
    return f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"


class ObjectStore:
    """S3 client for the platform's buckets.

    endpoint_url: None for AWS; the S3-compatible service's URL otherwise (the local moto
    server, MinIO, https://storage.yandexcloud.net). region: the store's region name.
    buckets: the buckets `ensure_buckets()` creates when missing.
    """

    def __init__(self, endpoint_url: str | None = None, region: str = "us-east-1", *,
                 buckets: Iterable[str] = (), credentials: dict[str, str] | None = None,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0, max_attempts: int = 5):
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.buckets = tuple(buckets)
        config = Config(
            region_name=region,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Path-style addressing and checksums only where required: what S3-compatible
            # stores (moto, MinIO, Yandex) accept; boto3's newer defaults (aws-chunked
            # uploads with trailing checksums) are not understood by all of them.
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, config=config, **(credentials or {}))

    @classmethod
    def local(cls, endpoint_url: str, *, buckets: Iterable[str] = ()) -> "ObjectStore":
        """A client of the local moto server (static dummy credentials)."""
        return cls(endpoint_url, "us-east-1", buckets=buckets, credentials=LOCAL_CREDENTIALS)

    # --- errors -----------------------------------------------------------------------------
    def _error(self, op: str, exc: Exception, bucket: str, key: str | None = None) -> StorageError:
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = f"{op} {_where(bucket, key)} failed: {code or status} {err.get('Message', '')}".rstrip()
            kind = ObjectNotFound if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") else StorageError
            return kind(text, bucket=bucket, key=key, code=code)
        return StorageError(f"{op} {_where(bucket, key)} failed: {type(exc).__name__}: {exc}",
                            bucket=bucket, key=key)

    @staticmethod
    def _code(exc: ClientError) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    # --- operations -------------------------------------------------------------------------
    def put(self, bucket: str, key: str, data: bytes, if_none_match: bool = False,
            if_match: str | None = None, content_type: str = "application/octet-stream") -> str | None:
        """Store `data`; returns the new ETag once the store has acknowledged the write.

        if_none_match: write only if the key does not exist. if_match: write only if the
        object's ETag is still this one. Either condition failing returns None (nothing
        written); every other failure raises StorageError.
        """
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data, "ContentType": content_type}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        for attempt in range(5):
            try:
                return str(self._client.put_object(**args).get("ETag", ""))
            except ClientError as exc:
                code = self._code(exc)
                if code in ("PreconditionFailed", "412"):
                    return None
                if code in ("ConditionalRequestConflict", "409") and attempt < 4:
                    # S3: a concurrent conditional write to the same key is in flight.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if code in ("NoSuchKey", "404") and if_match is not None:
                    return None  # If-Match on a deleted object
                raise self._error("put", exc, bucket, key) from exc
            except BotoCoreError as exc:
                raise self._error("put", exc, bucket, key) from exc
        return None

    def get(self, bucket: str, key: str) -> bytes:
        """The object's bytes; ObjectNotFound when it does not exist."""
        return self.get_with_etag(bucket, key)[0]

    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), str(response.get("ETag", ""))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("get", exc, bucket, key) from exc

    def get_optional(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.get(bucket, key)
        except ObjectNotFound as exc:
            if exc.code == "NoSuchBucket":
                raise
            return None

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error("head", exc, bucket, key) from exc
        except BotoCoreError as exc:
            raise self._error("head", exc, bucket, key) from exc

    def list_info(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (all pages), in key order."""
        out: list[ObjectInfo] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    out.append(ObjectInfo(item["Key"], int(item.get("Size", 0)),
                                          item["LastModified"].timestamp(), str(item.get("ETag", ""))))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", exc, bucket, prefix + "*") from exc
        return out

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys under `prefix`, in key order."""
        return [info.key for info in self.list_info(bucket, prefix)]

    def delete(self, bucket: str, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey"):
                return
            raise self._error("delete", exc, bucket, key) from exc
        except BotoCoreError as exc:
            raise self._error("delete", exc, bucket, key) from exc

    def ensure_buckets(self, *buckets: str) -> None:
        """Create the configured buckets (and `buckets`) that do not exist yet."""
        for bucket in dict.fromkeys(self.buckets + buckets):
            try:
                self._client.head_bucket(Bucket=bucket)
                continue
            except ClientError as exc:
                if self._code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise self._error("head bucket", exc, bucket) from exc
            except BotoCoreError as exc:
                raise self._error("head bucket", exc, bucket) from exc
            try:
                args: dict[str, Any] = {"Bucket": bucket}
                if self.region != "us-east-1":
                    args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                self._client.create_bucket(**args)
            except ClientError as exc:
                if self._code(exc) in ("BucketAlreadyOwnedByYou",):
                    continue
                raise self._error("create bucket", exc, bucket) from exc
            except BotoCoreError as exc:
                raise self._error("create bucket", exc, bucket) from exc


# ===========================================================================================
# Local S3 server (moto) with an append-only write log.
# ===========================================================================================

_MUTATING = {"PUT", "POST", "DELETE"}


class _LoggedApp:
    """WSGI middleware over moto's app: serialises mutations and logs the successful ones."""

    def __init__(self, app: Any):
        self.app = app
        self.log_path: Path | None = None
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in _MUTATING or environ.get("PATH_INFO", "").startswith("/moto-api"):
            result = self.app(environ, start_response)
            try:
                return list(result)  # the server does not close what it iterates
            finally:
                if hasattr(result, "close"):
                    result.close()
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else (
            environ["wsgi.input"].read() if environ.get("wsgi.input_terminated") else b"")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> Any:
            captured["status"], captured["headers"], captured["exc_info"] = status, headers, exc_info
            return lambda chunk: captured.setdefault("written", []).append(chunk)

        with self.lock:
            result = self.app(environ, capture)
            try:
                chunks = captured.pop("written", []) + list(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            if self.log_path is not None and int(captured["status"].split()[0]) < 300:
                headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                           if k.startswith("HTTP_") and k not in ("HTTP_CONTENT_LENGTH",)}
                if environ.get("CONTENT_TYPE"):
                    headers["Content-Type"] = environ["CONTENT_TYPE"]
                headers.pop("Transfer-Encoding", None)
                with open(self.log_path, "ab") as log:
                    _write_entry(log, {"method": method, "path": environ.get("PATH_INFO", "/"),
                                       "query": environ.get("QUERY_STRING", ""), "headers": headers}, body)
                    log.flush()
                    os.fsync(log.fileno())
        start_response(captured["status"], captured["headers"], captured["exc_info"])
        return chunks


def _write_entry(f: Any, entry: dict, body: bytes) -> None:
    """One log entry: its JSON line with the body's length, then the body as it came."""
    f.write(json.dumps({**entry, "length": len(body)}, separators=(",", ":")).encode() + b"\n")
    f.write(body)


def _entries(path: Path) -> Iterable[tuple[dict, bytes]]:
    """The log's entries in order, either form; a torn last entry (its write was never
    acknowledged) ends it."""
    legacy = path.name == LEGACY_LOG_NAME
    with open(path, "rb") as f:
        while line := f.readline():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                body = base64.b64decode(entry["body"]) if legacy else f.read(entry["length"])
            except (json.JSONDecodeError, KeyError, ValueError):
                return
            if not legacy and len(body) < entry["length"]:
                return
            yield entry, body


def _replay(app: Any, path: Path) -> int:
    from werkzeug.test import Client

    client = Client(app)
    count = 0
    for entry, body in _entries(path):
        client.open(entry["path"], method=entry["method"], query_string=entry["query"],
                    headers=entry["headers"], data=body)
        count += 1
    return count


def _compact(app: Any, endpoint_url: str, path: Path) -> None:
    """Rewrite the log as the current state: one bucket PUT per bucket, one PUT per object."""
    store = ObjectStore.local(endpoint_url)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for bucket in store._client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            _write_entry(f, {"method": "PUT", "path": f"/{name}", "query": "", "headers": {}}, b"")
            for key in store.list(name):
                _write_entry(f, {"method": "PUT", "path": f"/{name}/{_quote(key)}", "query": "",
                                 "headers": {"Content-Type": "application/octet-stream"}}, store.get(name, key))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _quote(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="/-_.~")


def serve(host: str, port: int, data_dir: Path | None) -> None:
    """Run the local S3 server until SIGTERM/SIGINT (the ``python -m`` entry point)."""
    import uvicorn
    from moto import backends
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        create_backend_app,
    )
    from uvicorn.middleware.wsgi import WSGIMiddleware

    # Per request moto lists and stats its ~150 service folders to find the backend (the list
    # never changes while it runs). Every synchronous study writes a record (mosmedai.results.answered),
    # so this is CPU the platform's own work waits for: 3.35 ms of server CPU per small PUT
    # before, 2.05 ms without it (an empty store, werkzeug's server).
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules

    app = _LoggedApp(DomainDispatcherApplication(create_backend_app))
    # Served by uvicorn (moto's app in a thread pool), not werkzeug's development server:
    # that one closes every connection, so each request cost a new connection and a new
    # thread on both sides. Every synchronous study writes a record (mosmedai.results.answered); at
    # twice the capacity the server used 30 % of a core. 1.37 ms per small PUT now.
    listener = socket.create_server((host, port))
    bound_port = listener.getsockname()[1]
    endpoint = f"http://{host}:{bound_port}"
    server = uvicorn.Server(uvicorn.Config(WSGIMiddleware(app, workers=4), log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"local S3 server did not start on {endpoint}")
        time.sleep(0.01)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        log, legacy = data_dir / LOG_NAME, data_dir / LEGACY_LOG_NAME
        replayed = [older for older in (legacy, log) if older.exists()]
        for older in replayed:
            _replay(app, older)
        if replayed:
            _compact(app, endpoint, log)
            legacy.unlink(missing_ok=True)  # its writes are in the new log now
        app.log_path = log
    print(READY_PREFIX + endpoint, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.should_exit = True  # answers what it has begun, takes nothing new
    thread.join(10.0)
    app.lock.acquire()  # no write is half-logged when the process exits


def local_s3_command(host: str, port: int, data_dir: Path | str | None = None) -> list[str]:
    """The command line of the local S3 server (for `make up`'s process manager)."""
    cmd = [sys.executable, "-m", "mosmedai.jobs.storage", "--host", host, "--port", str(port)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return cmd


@dataclass
class LocalS3:
    endpoint_url: str
    process: subprocess.Popen

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_local_s3(host: str = "127.0.0.1", port: int = 0, data_dir: Path | str | None = None,
                   timeout_s: float = 60.0) -> LocalS3:
    """Start the local S3 server in a child process; returns once it serves requests.

    port 0 picks a free port (see `.endpoint_url`). data_dir: keep a write log there and
    restore it at start (see the module docstring); None: in memory only.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(local_s3_command(host, port, data_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s
    result: dict[str, str] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                result["url"] = line[len(READY_PREFIX):].strip()
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if "url" not in result:
        proc.kill()
        proc.wait()
        raise StorageError(f"local S3 server on {host}:{port} did not start within {timeout_s:.0f} s "
                           f"(exit code {proc.returncode})")
    return LocalS3(result["url"], proc)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mosmedai.jobs.storage",
                                     description="Local S3 server (moto) with a write log.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the write log here and restore it at start; omit: in memory only")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data_dir)


if __name__ == "__main__":
    main()
