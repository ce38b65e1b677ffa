"""Object-store operations for the remote tier: URLs, retries under a deadline, manifests published last.

A remote checkpoint directory is an fsspec URL (``s3://bucket/prefix``; any protocol whose fsspec package is
installed). Its layout::

    <root>/step_00000010.pt                      the checkpoint object (same name and bytes as the local file)
    <root>/.async_ckpt/step_00000010.pt.json     its manifest: size, CRC-32 of the whole object, step, metrics, ...

A checkpoint exists remotely only once its manifest exists: the object is uploaded first (multipart where it is
large), the manifest is written last with a conditional create (``If-None-Match: *`` on S3), so a reader never sees
a manifest whose object is incomplete. Objects without a manifest are leftovers of an interrupted upload.

fsspec and the protocol's package (s3fs for ``s3://``) are imported only when a URL is used.
:class:`RemoteStore` is thread-safe as far as its filesystem is (s3fs's is): the uploader thread writes, the training
thread lists and reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency
    _crc32 = zlib.crc32

__all__ = [
    "MANIFEST_DIR",
    "RemoteIntegrityError",
    "RemoteStore",
    "RetryPolicy",
    "default_local_dir",
    "file_crc32",
    "is_url",
    "split_url",
]

logger = logging.getLogger("async_ckpt")

MANIFEST_DIR = ".async_ckpt"
_MANIFEST_SUFFIX = ".json"
_FORMAT = 1
_CHUNK = 8 << 20
_INSTALL = "pip install 'async-ckpt[s3]'"
T = TypeVar("T")

# Error codes an object store uses for "try again": throttling, server faults, timeouts.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "InternalServerError",
    "BadGateway",
    "GatewayTimeout",
    "OperationAborted",
}
# ... and for "your credentials ran out": refresh them and try again.
_EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "InternalError", "Service Unavailable")


class RemoteIntegrityError(OSError):
    """An object read from the store does not match its manifest (size or CRC-32)."""


def is_url(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` is a URL (``scheme://...``) rather than a local path."""
    scheme, sep, _ = os.fspath(directory).partition("://")
    return bool(sep and scheme and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum())


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, root)`` of ``url``: ``"s3://bucket/run/"`` -> ``("s3", "bucket/run")``.

    Raises:
        ValueError: ``url`` is not a URL, or names no bucket.
    """
    if not is_url(url):
        raise ValueError(f"{url!r} is not a URL (scheme://bucket/prefix).")
    protocol, _, rest = url.partition("://")
    root = rest.strip("/")
    if not root:
        raise ValueError(f"{url!r} names no bucket: pass {protocol}://<bucket>[/<prefix>].")
    return protocol, root


def default_local_dir(url: str) -> str:
    """The staging directory of ``url`` when none is given: ``$XDG_CACHE_HOME/async_ckpt/<protocol>/<root>``
    (``~/.cache`` without ``XDG_CACHE_HOME``)."""
    protocol, root = split_url(url)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    parts = [p for p in root.split("/") if p not in ("", ".", "..")]
    return os.path.join(cache, "async_ckpt", protocol, *parts)


def file_crc32(path: str) -> tuple[int, int]:
    """``(size, CRC-32)`` of the whole file ``path`` (one sequential read)."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = _crc32(chunk, crc)
            size += len(chunk)
    return size, crc


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one remote operation: exponential backoff with jitter, all within ``deadline_s``.

    Args:
        deadline_s: give up when the next attempt would start later than this many seconds after the first.
        backoff_s: the first wait; it doubles after each failed attempt, up to ``backoff_max_s``.
        backoff_max_s: the longest single wait.
    """

    deadline_s: float = 600.0
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}.")


def _codes(exc: BaseException) -> Iterator[tuple[str, int, str]]:
    """(error code, HTTP status, text) of ``exc`` and every exception it was caused by."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        response = getattr(node, "response", None)
        code, status = "", 0
        if isinstance(response, Mapping):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
        yield code, status, str(node)
        node = node.__cause__ or node.__context__


def classify(exc: BaseException) -> str:
    """``"expired"`` (refresh credentials, retry), ``"transient"`` (retry) or ``"permanent"`` for an error of the
    store or of the connection to it."""
    transient = False
    for code, status, text in _codes(exc):
        if code in _EXPIRED_CODES or "ExpiredToken" in text or "token has expired" in text.lower():
            return "expired"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            transient = True
        if any(t in text for t in _TRANSIENT_TEXT):
            transient = True
    if transient or isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return "transient"
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith(("aiohttp", "botocore", "urllib3", "http")) and any(
        k in name for k in ("Connection", "Disconnected", "Timeout", "Endpoint", "Payload", "IncompleteRead")
    ):
        return "transient"
    return "permanent"


class RemoteStore:
    """A checkpoint directory on an object store: upload, publish, list, read and delete, each retried.

    Args:
        url: ``protocol://bucket/prefix``.
        storage_options: arguments of the fsspec filesystem (for s3fs: ``key``, ``secret``, ``token``,
            ``endpoint_url``, ``client_kwargs``, ``config_kwargs``...). The AWS environment variables
            (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) are read by botocore where these do not say otherwise.
        credentials: called for fresh credentials (a mapping merged over ``storage_options``, e.g. ``{"key": ...,
            "secret": ..., "token": ...}``) at construction and whenever the store says they expired.
        retry: backoff and deadline of each operation.

    Raises:
        ImportError: fsspec, or the protocol's package, is not installed (the message says what to install).
        ValueError: a bad URL or option.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        credentials: Callable[[], Mapping[str, Any]] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.protocol, self.root = split_url(url)
        self.url = f"{self.protocol}://{self.root}"
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a mapping, got {type(storage_options).__name__}.")
        if credentials is not None and not callable(credentials):
            raise TypeError(f"credentials must be a callable returning storage options, got {credentials!r}.")
        self.storage_options = dict(storage_options or {})
        self.credentials = credentials
        self.retry = retry or RetryPolicy()
        self.refreshes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fs = self._build()

    # -- the filesystem ------------------------------------------------------------------------------------------
    def _build(self) -> Any:
        try:
            import fsspec
        except ImportError as exc:
            raise ImportError(f"{self.url} is a URL: it needs fsspec and s3fs ({_INSTALL})") from exc
        options = dict(self.storage_options)
        if self.credentials is not None:
            options.update(self.credentials())
        try:
            return fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)
        except ImportError as exc:
            raise ImportError(
                f"{self.url} is a URL whose fsspec package is not installed ({exc}). For s3://: {_INSTALL}"
            ) from exc
        except ValueError as exc:
            if "Protocol not known" in str(exc):
                raise ValueError(f"{self.url} is a URL of a protocol unknown to fsspec ({self.protocol!r}).") from exc
            raise

    @property
    def is_s3(self) -> bool:
        protocols = getattr(self.fs, "protocol", ())
        return "s3" in ((protocols,) if isinstance(protocols, str) else tuple(protocols))

    def key(self, name: str) -> str:
        """The full path of object ``name`` (``bucket/prefix/name``)."""
        return f"{self.root}/{name}"

    def manifest_key(self, name: str) -> str:
        return f"{self.root}/{MANIFEST_DIR}/{name}{_MANIFEST_SUFFIX}"

    def object_url(self, name: str) -> str:
        return f"{self.protocol}://{self.key(name)}"

    def cancel(self) -> None:
        """Make retry waits return at once (used when the owner gives up at close)."""
        self._stop.set()

    def call(self, what: str, fn: Callable[[Any], T], deadline: float | None = None) -> T:
        """Run ``fn(filesystem)``, retrying transient errors with backoff and refreshing expired credentials, until
        it succeeds or ``deadline`` (``time.monotonic()``; default: the policy's from now) passes.

        Raises:
            The last error, when it is permanent or the deadline passed; ``FileNotFoundError`` and
            ``FileExistsError`` are never retried.
        """
        if deadline is None:
            deadline = time.monotonic() + self.retry.deadline_s
        delay = self.retry.backoff_s
        attempt = expired = 0
        while True:
            attempt += 1
            fs = self.fs
            try:
                return fn(fs)
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as exc:
                kind = classify(exc)
                if kind == "permanent":
                    raise
                left = deadline - time.monotonic()
                if kind == "expired":
                    if self.credentials is None:
                        raise
                    with self._lock:
                        if self.fs is fs:  # another thread may have refreshed already
                            self.refreshes += 1
                            logger.info("async_ckpt: credentials for %s expired; refreshing them", self.url)
                            self.fs = self._build()
                    expired += 1
                    if left <= 0:
                        raise
                    if expired == 1:
                        continue  # fresh credentials: retry at once; if they are refused too, back off below
                wait = min(delay, self.retry.backoff_max_s) * (0.5 + random.random() / 2)
                if left <= wait or self._stop.is_set():
                    raise
                logger.info(
                    "async_ckpt: %s on %s failed (attempt %d, %r); retrying in %.2fs",
                    what,
                    self.url,
                    attempt,
                    exc,
                    wait,
                )
                self._stop.wait(wait)
                delay *= 2

    # -- writing -------------------------------------------------------------------------------------------------
    def upload(self, local: str, name: str, part_size: int, concurrency: int, deadline: float) -> None:
        """Upload the file ``local`` as object ``name`` (multipart in ``part_size`` parts, ``concurrency`` at once,
        on S3). A retry uploads the whole object again."""
        key = self.key(name)
        kwargs: dict[str, Any] = {"chunksize": part_size, "max_concurrency": concurrency} if self.is_s3 else {}

        def put(fs: Any) -> None:
            try:
                fs.put_file(local, key, **kwargs)
            except TypeError:  # an s3fs without max_concurrency: its parts go one at a time
                if not kwargs:
                    raise
                fs.put_file(local, key, chunksize=part_size)

        self.call(f"upload of {name}", put, deadline)

    def publish(self, name: str, entry: Mapping[str, Any], deadline: float) -> None:
        """Write the manifest of ``name`` (the step that makes the object a checkpoint), as a conditional create.

        A manifest already there for the same object (size and CRC-32) is kept; one for other bytes (an earlier
        save of the same name) is deleted first, so a reader sees the old checkpoint, then none, then the new one.
        """
        payload = json.dumps({"format": _FORMAT, "name": name, **entry}, sort_keys=True, default=_plain).encode()
        key = self.manifest_key(name)
        for _ in range(3):
            try:
                self.call(f"publish of {name}", lambda fs: self._create(fs, key, payload), deadline)
                return
            except FileExistsError:
                current = self.read_manifest(name, deadline)
                if current is not None and (current.get("size"), current.get("crc32")) == (
                    entry.get("size"),
                    entry.get("crc32"),
                ):
                    return
                self.call(f"unpublish of the previous {name}", lambda fs: _rm(fs, key), deadline)
        raise FileExistsError(f"{self.url}: another writer keeps publishing {name}; one writer per prefix.")

    def _create(self, fs: Any, key: str, payload: bytes) -> None:
        if self.is_s3:
            try:
                fs.pipe_file(key, payload, mode="create")  # If-None-Match: * (s3fs >= 2025.2)
                return
            except TypeError:  # an older s3fs: no conditional create; one writer per prefix keeps it safe
                pass
        if fs.exists(key):
            raise FileExistsError(key)
        fs.pipe_file(key, payload)

    def delete(self, name: str, deadline: float | None = None, *, keep_object: bool = False) -> None:
        """Unpublish ``name`` (manifest first, so no reader takes a checkpoint whose object is going), then delete
        its object (unless ``keep_object``: it is about to be overwritten)."""
        self.call(f"unpublish of {name}", _remover(self.manifest_key(name)), deadline)
        if not keep_object:
            self.call(f"delete of {name}", _remover(self.key(name)), deadline)

    def cleanup(self, is_checkpoint: Callable[[str], bool]) -> list[str]:
        """Abort the multipart uploads left under the prefix and delete checkpoint objects without a manifest
        (both leftovers of a writer killed while uploading). Returns what it removed."""
        removed: list[str] = []
        if self.is_s3:
            bucket, _, prefix = self.root.partition("/")
            uploads = self.call("list of multipart uploads", lambda fs: fs.list_multipart_uploads(bucket))
            for upload in uploads:
                key, upload_id = str(upload.get("Key", "")), upload.get("UploadId")
                if not prefix or key.startswith(prefix.rstrip("/") + "/"):
                    self.call(f"abort of the upload of {key}", _abort(bucket, key, upload_id))
                    removed.append(f"multipart upload of {key}")
        published = set(self.manifests())
        for name in self.names():
            if is_checkpoint(name) and name not in published:
                self.call(f"delete of {name}", _remover(self.key(name)))
                removed.append(name)
        return removed

    # -- reading -------------------------------------------------------------------------------------------------
    def bucket_exists(self) -> bool:
        """Whether the bucket (the first part of the root) exists and can be seen with these credentials."""
        bucket = self.root.split("/", 1)[0]
        return bool(self.call(f"check of bucket {bucket}", lambda fs: fs.exists(bucket)))

    def names(self) -> list[str]:
        """The object names directly under the prefix (manifests excluded)."""

        def ls(fs: Any) -> list[str]:
            fs.invalidate_cache(self.root)
            try:
                entries = fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []
            return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]

        return sorted(self.call("list", ls))

    def manifests(self) -> dict[str, dict[str, Any]]:
        """The published checkpoints: name -> manifest, oldest save first."""
        directory = f"{self.root}/{MANIFEST_DIR}"

        def ls(fs: Any) -> list[str]:
            fs.invalidate_cache(directory)
            try:
                return [str(p) for p in fs.ls(directory, detail=False)]
            except FileNotFoundError:
                return []

        keys = [k for k in self.call("list of manifests", ls) if k.endswith(_MANIFEST_SUFFIX)]
        found: list[dict[str, Any]] = []
        if keys:
            blobs = self.call("read of manifests", lambda fs: fs.cat(keys, on_error="omit"))
            for blob in blobs.values():
                try:
                    entry = json.loads(blob)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    found.append(entry)
        found.sort(key=lambda e: (float(e.get("saved_at", 0.0)), e["name"]))
        return {e["name"]: e for e in found}

    def read_manifest(self, name: str, deadline: float | None = None) -> dict[str, Any] | None:
        try:
            blob = self.call(
                f"read of the manifest of {name}", lambda fs: fs.cat_file(self.manifest_key(name)), deadline
            )
        except FileNotFoundError:
            return None
        entry = json.loads(blob)
        return entry if isinstance(entry, dict) else None

    def object_size(self, name: str) -> int | None:
        """The size of object ``name``, or ``None`` if there is none."""
        try:
            info = self.call(f"stat of {name}", lambda fs: fs.info(self.key(name)))
        except FileNotFoundError:
            return None
        return int(info.get("size", -1))

    def download(self, name: str, entry: Mapping[str, Any], out: BinaryIO, deadline: float | None = None) -> int:
        """Stream object ``name`` into ``out``, checking its size and CRC-32 against ``entry`` while it reads.

        Returns:
            The bytes read.

        Raises:
            RemoteIntegrityError: the bytes do not match the manifest.
            FileNotFoundError: no such object.
        """

        def read(fs: Any) -> tuple[int, int]:
            out.seek(0)  # a retry rewrites the same bytes from the start
            crc, size = 0, 0
            with fs.open(self.key(name), "rb", block_size=_CHUNK) as f:
                while chunk := f.read(_CHUNK):
                    crc = _crc32(chunk, crc)
                    size += len(chunk)
                    out.write(chunk)
            return size, crc

        size, crc = self.call(f"download of {name}", read, deadline)
        problems = check_entry(entry, size, crc)
        if problems:
            raise RemoteIntegrityError(f"{self.object_url(name)}: {problems}; the object is damaged or was replaced.")
        return size

    def check(self, name: str, entry: Mapping[str, Any]) -> str:
        """Read object ``name`` in full and compare it with ``entry``: ``""`` if it matches, else the problem."""
        crc, size = 0, 0
        try:
            with self.fs.open(self.key(name), "rb", block_size=_CHUNK) as f:
                while chunk := f.read(_CHUNK):
                    crc = _crc32(chunk, crc)
                    size += len(chunk)
        except FileNotFoundError:
            return "published, but its object is missing"
        return check_entry(entry, size, crc)


def check_entry(entry: Mapping[str, Any], size: int, crc: int) -> str:
    """What differs between a manifest entry and the (size, CRC-32) read, in words (``""``: nothing)."""
    problems = []
    if size != entry.get("size"):
        problems.append(f"size {size} B vs {entry.get('size')} B in the manifest")
    if crc != entry.get("crc32"):
        problems.append(f"CRC-32 0x{crc:08x} read vs 0x{int(entry.get('crc32') or 0):08x} in the manifest")
    return "; ".join(problems)


def _rm(fs: Any, key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(key)


def _remover(key: str) -> Callable[[Any], None]:
    return lambda fs: _rm(fs, key)


def _abort(bucket: str, key: str, upload_id: Any) -> Callable[[Any], None]:
    return lambda fs: fs.abort_mpu(bucket, key, upload_id)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if callable(item) else repr(value)
