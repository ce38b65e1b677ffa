"""A real S3 API on loopback for the remote-tier tests: moto's server app in a werkzeug server on a free 127.0.0.1
port, and a fault-injecting HTTP proxy in front of it (503 SlowDown, connection resets, expired credentials, and
requests held until the test lets them go, so a test can kill a writer in the middle of an upload).

Nothing leaves the machine: the clients get ``endpoint_url`` of the server (or the proxy) and fake credentials.
Run as a script, this is the subprocess worker of the SIGKILL test (``python _s3server.py worker ...``).
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import struct
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

BUCKET = "ckpt"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.'
    b"</Message></Error>"
)
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code><Message>Service is unable to '
    b"handle request.</Message></Error>"
)
_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code><Message>The provided token has '
    b"expired.</Message></Error>"
)


class MotoServer:
    """moto's S3 (all services) on ``127.0.0.1:<free port>``, in a thread of this process."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-server", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@dataclass
class Request:
    """What the proxy saw of one request."""

    method: str
    path: str
    access_key: str


@dataclass
class Fault:
    """Do ``action`` to the requests ``match`` accepts, ``times`` times (``None``: every time).

    Actions: ``"slowdown"`` (503 SlowDown), ``"unavailable"`` (503 ServiceUnavailable), ``"reset"`` (close the
    connection with a TCP reset before answering), ``"expired"`` (400 ExpiredToken), ``"hold"`` (set ``seen`` and
    block until ``release`` is set, then reset).
    """

    action: str
    match: Callable[[Request], bool]
    times: int | None = None
    hits: int = 0
    seen: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """An HTTP proxy to ``target`` that injects :class:`Fault` s; ``log`` records every request it saw."""

    def __init__(self, target_port: int) -> None:
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self, target_port)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            for f in self.faults:
                f.release.set()
            self.faults.clear()
            self.log.clear()

    def stop(self) -> None:
        self.clear()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _pick(self, request: Request) -> Fault | None:
        with self._lock:
            self.log.append(request)
            for fault in self.faults:
                if (fault.times is None or fault.hits < fault.times) and fault.match(request):
                    fault.hits += 1
                    return fault
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler, target_port: int) -> None:
        auth = h.headers.get("Authorization", "")
        key = re.search(r"Credential=([^/]+)/", auth)
        request = Request(h.command, h.path, key.group(1) if key else "")
        fault = self._pick(request)
        if fault is not None and fault.action in ("reset", "hold"):
            if fault.action == "hold":
                fault.seen.set()
                fault.release.wait(60)
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        body = _read_body(h)
        if fault is not None:
            payload, status = {"slowdown": (_SLOWDOWN, 503), "unavailable": (_UNAVAILABLE, 503)}.get(
                fault.action, (_EXPIRED, 400)
            )
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    h.send_header(k, v)
            length = resp.getheader("Content-Length") if h.command == "HEAD" else None
            h.send_header("Content-Length", length or str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def storage_options(endpoint: str, key: str = "testing", **extra: Any) -> dict[str, Any]:
    """s3fs options for the loopback server: fake credentials, no botocore retries (the tests count requests)."""
    return {
        "key": key,
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        **extra,
    }


@dataclass
class S3:
    """The loopback server, its fault proxy, and a fresh bucket for one test."""

    server: MotoServer
    proxy: FaultProxy
    bucket: str = BUCKET

    @property
    def options(self) -> dict[str, Any]:
        """Options reaching moto directly."""
        return storage_options(self.server.endpoint)

    @property
    def proxied(self) -> dict[str, Any]:
        """Options going through the fault proxy."""
        return storage_options(self.proxy.endpoint)

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)


@pytest.fixture(scope="module", name="s3_module")
def s3_module_fixture() -> Iterator[tuple[MotoServer, FaultProxy]]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = MotoServer()
    proxy = FaultProxy(server.port)
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.fixture(name="s3")
def s3_fixture(s3_module: tuple[MotoServer, FaultProxy]) -> Iterator[S3]:
    """A real S3 API on 127.0.0.1 with an empty bucket ``ckpt`` (reset after the test). Test modules import
    ``s3_fixture`` and ``s3_module_fixture`` and take ``s3`` as an argument."""
    server, proxy = s3_module
    server.reset()
    env = S3(server, proxy)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield env
    proxy.clear()
    server.reset()


def aws_env(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the AWS environment variables (AWS_ENDPOINT_URL included) at the loopback server."""
    for var, value in (
        ("AWS_ENDPOINT_URL", s3.server.endpoint),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(var, value)


def _worker(argv: list[str]) -> None:
    """Save step 1 and wait until it is published (print ``published 1``), then save step 2 and wait: the parent
    holds an upload request of step 2 at its proxy and kills this process then."""
    import torch

    from async_ckpt.core.checkpointer import Checkpointer
    from async_ckpt.core.uploader import UploadOptions

    endpoint, url, local_dir = argv
    ckpt = Checkpointer(
        url,
        storage_options=storage_options(endpoint),
        local_dir=local_dir,
        keep_last=2,
        fsync=False,
        upload=UploadOptions(part_size=5 << 20, concurrency=2, deadline_s=60),
    )
    torch.manual_seed(0)
    state = {"w": torch.randn(3 << 20)}  # 12 MiB: a multipart upload of 3 parts
    ckpt.save(1, state)
    ckpt.wait()
    print("published 1", flush=True)
    state["w"].add_(1)
    ckpt.save(2, state)
    ckpt.wait()
    print(json.dumps({"unexpected": "step 2 published"}), flush=True)


def _exit_worker(argv: list[str]) -> None:
    """Save step 1 and leave the interpreter without close() or wait(): the exit hooks must publish it."""
    import torch

    from async_ckpt.core.checkpointer import Checkpointer
    from async_ckpt.core.uploader import UploadOptions

    endpoint, url, local_dir = argv
    ckpt = Checkpointer(
        url,
        storage_options=storage_options(endpoint),
        local_dir=local_dir,
        fsync=False,
        upload=UploadOptions(part_size=5 << 20, concurrency=2, deadline_s=60),
    )
    torch.manual_seed(0)
    ckpt.save(1, {"w": torch.randn(3 << 20)})  # 12 MiB: a multipart upload
    print("saved 1", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2:])
    elif sys.argv[1:2] == ["exit-worker"]:
        _exit_worker(sys.argv[2:])
