"""The remote tier: a background uploader that mirrors a local checkpoint directory to an object store.

The local directory is an ordinary async_ckpt directory (written durably, pruned by the local retention). Each
checkpoint that becomes durable there is handed to :meth:`RemoteTier.submit`; the uploader thread
(``async_ckpt-upload``) uploads it (multipart, parts in parallel), then publishes its manifest last
(:class:`~async_ckpt.pipeline.remote.RemoteStore`). After each publish, remote checkpoints that the local retention
evicted (the owner reports them through :meth:`RemoteTier.evicted`, e.g. from ``SavePipeline.on_evicted``) are
deleted (manifest first), so the remote tier prunes only after a newer checkpoint is published.

When the uploader falls behind (more than ``max_behind`` checkpoints waiting), the older waiting ones that are not
protected (best-metric or final) are skipped: the remote tier coalesces to the newest. A checkpoint whose local file
was already evicted is skipped too. Failures (after retries within the deadline) are kept as
:class:`~async_ckpt.errors.CheckpointWriteError` for the owner to raise on the training thread; the local copy stays.

Thread-safety: ``submit`` may be called from any thread (the writer thread calls it); ``wait``, ``close``,
``take_errors``, ``published`` and ``fetch`` from the owner's thread. Construction cleans up leftovers of a killed
writer and lists what is published (network calls, no thread); :meth:`RemoteTier.start` starts the thread and
:meth:`RemoteTier.close` joins it.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from async_ckpt.errors import CheckpointWriteError
from async_ckpt.pipeline.integrity import read_manifest
from async_ckpt.pipeline.remote import RemoteStore, RetryPolicy, default_local_dir, file_crc32, is_url
from async_ckpt.pipeline.storage import FileStorage, check_local_dir, is_temp_name
from async_ckpt.pipeline.writer import flush_all

__all__ = [
    "UPLOAD_THREAD_NAME",
    "RemoteStats",
    "RemoteTier",
    "UploadOptions",
    "UploadTelemetry",
    "open_directory",
    "wait_durable",
]

logger = logging.getLogger("async_ckpt")

UPLOAD_THREAD_NAME = "async_ckpt-upload"
_MIN_PART = 5 << 20  # S3's smallest part (all but the last)


_ABANDON_JOIN_S = 10.0
"""How long ``RemoteTier.close`` waits for the request in flight once its timeout has passed."""


@dataclass(frozen=True)
class UploadOptions:
    """How the remote tier uploads.

    Args:
        part_size: bytes per multipart part (S3 needs >= 5 MiB); objects under twice this go in one request.
        concurrency: parts uploaded at once.
        deadline_s: retries of one checkpoint's upload and publish stop this many seconds after its first attempt.
        backoff_s: the first wait between retries (doubling, with jitter, up to ``backoff_max_s``).
        backoff_max_s: the longest wait between retries.
        max_behind: checkpoints that may wait for upload before older, unprotected ones are skipped.
        credentials: called for fresh credentials (a mapping merged over ``storage_options``) at start and
            whenever the store says they expired.
    """

    part_size: int = 64 << 20
    concurrency: int = 8
    deadline_s: float = 600.0
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0
    max_behind: int = 4
    credentials: Callable[[], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        for name, low in (("part_size", _MIN_PART), ("concurrency", 1), ("max_behind", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        self.retry  # noqa: B018 - validates the times
        if self.credentials is not None and not callable(self.credentials):
            raise TypeError(f"credentials must be a callable returning storage options, got {self.credentials!r}.")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.deadline_s, self.backoff_s, self.backoff_max_s)


@dataclass(frozen=True)
class RemoteStats:
    """One checkpoint, from its local durable file to its published manifest.

    Attributes:
        name: the file (and object) name.
        ok: published; ``False``: failed (see the owner's error) or skipped (``skipped`` says why).
        nbytes: bytes uploaded.
        checksum_s: time reading the local file for its CRC-32.
        upload_s: time uploading the object (retries included).
        publish_s: time writing the manifest.
        lag_s: time from ``submit`` (the local file was durable) until published.
        attempts_refreshed: credential refreshes so far (for the whole store).
        skipped: why it was not uploaded (coalesced, or evicted locally first), else ``""``.
    """

    name: str
    ok: bool
    nbytes: int = 0
    checksum_s: float = 0.0
    upload_s: float = 0.0
    publish_s: float = 0.0
    lag_s: float = 0.0
    attempts_refreshed: int = 0
    skipped: str = ""

    @property
    def throughput_mib_s(self) -> float:
        """Upload throughput in MiB/s (0 when nothing was uploaded)."""
        return self.nbytes / self.upload_s / 2**20 if self.upload_s > 0 and self.nbytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_mib_s"] = self.throughput_mib_s
        return d


class UploadTelemetry:
    """Per-checkpoint upload measurements and how far the remote tier lags (thread-safe)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._uploads: collections.deque[RemoteStats] = collections.deque(maxlen=maxlen)
        self._waiting: dict[str, float] = {}  # name -> submit time, until published, failed or skipped

    def record(self, stats: RemoteStats) -> None:
        with self._lock:
            self._uploads.append(stats)
            self._waiting.pop(stats.name, None)

    def queued(self, name: str) -> None:
        with self._lock:
            self._waiting.setdefault(name, time.monotonic())

    @property
    def uploads(self) -> list[RemoteStats]:
        """A copy of the recorded uploads, oldest first."""
        with self._lock:
            return list(self._uploads)

    @property
    def pending(self) -> int:
        """Checkpoints durable locally and not yet published (nor failed, nor skipped)."""
        with self._lock:
            return len(self._waiting)

    @property
    def lag_s(self) -> float:
        """Age of the oldest checkpoint waiting for upload, in seconds (0 when none waits)."""
        with self._lock:
            oldest = min(self._waiting.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def summary(self) -> dict[str, float]:
        """Counts, bytes, mean upload time and throughput, and the current lag."""
        ups = self.uploads
        done = [u for u in ups if u.ok]
        busy = sum(u.upload_s for u in done)
        return {
            "published": len(done),
            "skipped": sum(bool(u.skipped) for u in ups),
            "failed": sum(not u.ok and not u.skipped for u in ups),
            "bytes": sum(u.nbytes for u in done),
            "upload_mean_s": busy / len(done) if done else 0.0,
            "throughput_mib_s": sum(u.nbytes for u in done) / busy / 2**20 if busy > 0 else 0.0,
            "pending": self.pending,
            "lag_s": self.lag_s,
        }


def _identity(path: str) -> tuple[int, int, int]:
    """(inode, size, mtime) of ``path``: a new save of the same name renames a new file onto it."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class _Job:
    path: str
    protected: bool
    queued_at: float = field(default_factory=time.monotonic)


class RemoteTier:
    """Mirror a local checkpoint directory to ``url`` in the background; read what is published there.

    Args:
        url: ``protocol://bucket/prefix``.
        storage_options: the fsspec filesystem's arguments (see :class:`~async_ckpt.pipeline.remote.RemoteStore`).
        local_dir: the local staging directory (default :func:`~async_ckpt.pipeline.remote.default_local_dir`).
        options: upload options.
        is_checkpoint: whether an object name is one of this owner's checkpoints (cleanup deletes only those).
        name: label of log lines.

    Raises:
        ImportError: fsspec or the protocol's package is missing.
        ValueError, TypeError: a bad URL or option.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        options: UploadOptions | None = None,
        is_checkpoint: Callable[[str], bool] = lambda n: n.endswith(".pt"),
        name: str = "upload",
    ) -> None:
        self.options = options if options is not None else UploadOptions()
        if not isinstance(self.options, UploadOptions):
            raise TypeError(f"upload must be an UploadOptions, got {type(self.options).__name__}.")
        self.store = RemoteStore(url, storage_options, credentials=self.options.credentials, retry=self.options.retry)
        self.url = self.store.url
        self.local_dir = os.fspath(local_dir) if local_dir is not None else default_local_dir(self.url)
        check_local_dir(self.local_dir, "local_dir")
        self.name = name
        self.stats = UploadTelemetry()
        self._is_checkpoint = is_checkpoint
        self._evicted: set[str] = set()  # names the local retention evicted, until deleted remotely
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._busy = False
        self._closing = False
        self._errors: list[CheckpointWriteError] = []
        self._published: dict[str, dict[str, Any]] = {}
        removed = self.store.cleanup(is_checkpoint)
        if removed:
            logger.info(
                "async_ckpt: removed %d leftover(s) of an interrupted upload from %s: %s",
                len(removed),
                self.url,
                ", ".join(removed),
            )
        self._published = self.store.manifests()
        self._thread = threading.Thread(target=self._run, name=UPLOAD_THREAD_NAME, daemon=True)
        _live.add(self)

    def start(self) -> None:
        """Start the uploader thread (once the owner is fully constructed; jobs submitted before wait for it)."""
        if self._thread.ident is None and not self._closing:
            self._thread.start()

    # -- the owner's side ----------------------------------------------------------------------------------------
    def submit(self, path: str, *, protected: bool = False) -> None:
        """Queue the durable local file ``path`` for upload (any thread). ``protected``: never skipped when the
        uploader falls behind (best-metric and final checkpoints)."""
        with self._cond:
            if self._closing:
                return
            self._evicted.discard(os.path.basename(path))  # saved again under an evicted name
            self._queue = collections.deque(j for j in self._queue if j.path != path)
            self._queue.append(_Job(path, protected))
            self.stats.queued(os.path.basename(path))
            self._coalesce()
            self._cond.notify_all()

    def evicted(self, paths: Collection[str]) -> None:
        """The owner's retention evicted these local files (any thread; call it once the file replacing them is
        durable). A waiting upload of one is skipped; a published one is deleted after the next publish."""
        names = {os.path.basename(p) for p in paths}
        with self._cond:
            self._evicted |= names

    def _coalesce(self) -> None:
        """Skip the oldest unprotected waiting jobs while more than ``max_behind`` wait (lock held)."""
        while len(self._queue) > self.options.max_behind:
            victim = next((j for j in list(self._queue)[:-1] if not j.protected), None)
            if victim is None:
                return
            self._queue.remove(victim)
            self.stats.record(RemoteStats(os.path.basename(victim.path), False, skipped="coalesced: a newer one waits"))

    def submit_unpublished(self, protected: Callable[[Mapping[str, Any]], bool] = lambda entry: False) -> list[str]:
        """Queue the local checkpoints that are not published with the same size (a previous run stopped before
        their upload), oldest first; call it once at start, before :meth:`start`.

        Args:
            protected: given a file's local manifest entry (``{}`` if unlisted), whether coalescing must keep it.

        Returns:
            The queued paths.
        """
        files: dict[str, Any] = read_manifest(self.local_dir)["files"]
        found: list[tuple[float, str, Mapping[str, Any]]] = []
        try:
            names = os.listdir(self.local_dir)
        except FileNotFoundError:
            return []
        for name in names:
            path = self.local_path(name)
            if self._is_checkpoint(name) and not is_temp_name(name) and os.path.isfile(path):
                entry = files.get(name) or {}
                found.append((float(entry.get("saved_at", os.path.getmtime(path))), path, entry))
        with self._cond:
            published = dict(self._published)
        queued = []
        for _, path, entry in sorted(found, key=lambda it: it[0]):
            remote = published.get(os.path.basename(path))
            if remote is None or remote.get("size") != os.path.getsize(path):
                self.submit(path, protected=protected(entry))
                queued.append(path)
        return queued

    def saved_items(self, reason: str, prefix: str) -> list[tuple[Any, str]]:
        """(score, name) of the published checkpoints saved for ``reason`` whose name starts with ``prefix``, best
        last: :func:`async_ckpt.core.resume.saved_items` for the bucket (the shape of the list in ignite's
        ``Checkpoint.state_dict()``), so a saver on an empty ``local_dir`` continues its retention from what is
        published."""
        items = [
            (e["score"], name)
            for name, e in self.published().items()
            if e.get("reason") == reason and name.startswith(prefix) and e.get("score") is not None
        ]
        return sorted(items, key=lambda it: it[0])

    def published(self) -> dict[str, dict[str, Any]]:
        """The published checkpoints (name -> manifest), oldest save first, as listed by the store now."""
        return self.store.manifests()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits for upload (``False`` if ``timeout`` passed first)."""
        if self._thread.ident is None and self._queue:
            raise RuntimeError("RemoteTier.wait: uploads are queued but start() was not called.")
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Upload what is queued, stop the thread and join it. Idempotent. ``False`` if ``timeout`` passed first
        (the thread is told to give up; what is left is reported by :meth:`take_errors`)."""
        finished = self.wait(timeout) if self._thread.ident is not None else not self._queue
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if not finished:
            self.store.cancel()
            for job in left:
                self._fail(job, TimeoutError(f"still waiting for upload after {timeout}s at close"))
        if self._thread.ident is not None:
            # After a timeout the request in flight (one part, or a whole small file) cannot be interrupted: wait
            # for it a bounded while, so that close(timeout) and the exit hook never hang on a stalled connection.
            self._thread.join(None if finished else _ABANDON_JOIN_S)
            if self._thread.is_alive():
                logger.error(
                    "async_ckpt: the uploader of %s is still in a request %ss after close gave up; left behind "
                    "(a daemon thread; the next start cleans up its partial upload)",
                    self.url,
                    _ABANDON_JOIN_S,
                )
        return finished

    def take_errors(self) -> list[CheckpointWriteError]:
        """The upload failures not yet taken, oldest first."""
        with self._cond:
            errors, self._errors = self._errors, []
        return errors

    def local_path(self, name: str) -> str:
        return os.path.join(self.local_dir, name)

    def fetch(self, name: str, storage: FileStorage | None = None) -> str:
        """Download the published checkpoint ``name`` into the local directory (durably, checked against its
        manifest while it downloads) unless the local file already matches; returns the local path.

        Raises:
            FileNotFoundError: ``name`` is not published.
            RemoteIntegrityError: the object does not match its manifest.
        """
        entry = self.store.read_manifest(name)
        if entry is None:
            raise FileNotFoundError(f"{self.store.object_url(name)} is not a published checkpoint.")
        path = self.local_path(name)
        if (
            os.path.isfile(path)
            and os.path.getsize(path) == entry.get("size")
            and file_crc32(path)[1] == entry.get("crc32")
        ):
            return path
        os.makedirs(self.local_dir, exist_ok=True)
        (storage or FileStorage()).write_atomic(path, lambda f: self.store.download(name, entry, f))
        return path

    # -- the uploader thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._upload(job)
            except Exception as exc:  # recorded and raised on the owner's thread
                self._fail(job, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _fail(self, job: _Job, exc: BaseException) -> None:
        name = os.path.basename(job.path)
        self.stats.record(RemoteStats(name, False, lag_s=time.monotonic() - job.queued_at))
        err = CheckpointWriteError(
            f"async_ckpt could not upload checkpoint {job.path!r} to {self.store.object_url(name)}: {exc!r}. "
            "The local copy is kept and earlier published checkpoints are intact; fix the cause (credentials, "
            "network, bucket permissions) and resume.",
            path=job.path,
        )
        err.__cause__ = exc
        logger.error("async_ckpt: %s", err)
        with self._cond:
            self._errors.append(err)

    def _upload(self, job: _Job) -> None:
        name = os.path.basename(job.path)
        with self._cond:
            gone = name in self._evicted
        if gone or not os.path.isfile(job.path):
            self.stats.record(RemoteStats(name, False, skipped="evicted locally before its upload"))
            return
        deadline = time.monotonic() + self.options.deadline_s
        t0 = time.perf_counter()
        try:
            before = _identity(job.path)
            size, crc = file_crc32(job.path)
        except FileNotFoundError:
            self.stats.record(RemoteStats(name, False, skipped="evicted locally before its upload"))
            return
        t1 = time.perf_counter()
        with self._cond:
            previous = self._published.get(name)
        if previous is not None and (previous.get("size"), previous.get("crc32")) == (size, crc):
            self.stats.record(RemoteStats(name, True, 0, t1 - t0, lag_s=time.monotonic() - job.queued_at))
            return  # published already (a restart re-submitted it)
        if previous is not None:
            # A new save of the same name: unpublish the old one before its object is overwritten, so no reader
            # takes the old manifest for the new bytes (readers see the old checkpoint, then none, then the new).
            self.store.delete(name, deadline, keep_object=True)
            with self._cond:
                self._published.pop(name, None)
        info = dict(read_manifest(self.local_dir)["files"].get(name) or {})
        entry = {**info, "size": size, "crc32": crc, "published_at": time.time()}
        entry.setdefault("saved_at", time.time())
        try:
            self.store.upload(job.path, name, self.options.part_size, self.options.concurrency, deadline)
            t2 = time.perf_counter()
            replaced = _identity(job.path) != before  # saved again: the job queued for the new file publishes it
        except FileNotFoundError:
            if os.path.exists(job.path):
                raise
            self.store.delete(name, deadline)  # evicted locally while uploading: not wanted any more
            self.stats.record(RemoteStats(name, False, skipped="evicted locally during its upload"))
            return
        if replaced:
            self.stats.record(RemoteStats(name, False, skipped="saved again during its upload"))
            return
        if self.store.object_size(name) != size:  # cheap guard against an object replaced under us
            raise OSError(f"{self.store.object_url(name)} does not hold the {size} B just uploaded")
        self.store.publish(name, entry, deadline)
        t3 = time.perf_counter()
        with self._cond:
            self._published[name] = entry  # only this thread changes it after construction
        self.stats.record(
            RemoteStats(
                name, True, size, t1 - t0, t2 - t1, t3 - t2, time.monotonic() - job.queued_at, self.store.refreshes
            )
        )
        logger.info(
            "async_ckpt: %s published in %.3fs (%.1f MiB, %.0f MiB/s)",
            self.store.object_url(name),
            t3 - t0,
            size / 2**20,
            size / max(t2 - t1, 1e-9) / 2**20,
        )
        self._prune(name)

    def _prune(self, newest: str) -> None:
        """Delete the published checkpoints older than ``newest`` that the local retention evicted."""
        with self._cond:
            published = dict(self._published)
            evicted = set(self._evicted)
        newest_at = float(published[newest].get("saved_at", 0.0))
        for name, entry in published.items():
            if name == newest or name not in evicted or not self._is_checkpoint(name):
                continue
            if float(entry.get("saved_at", 0.0)) > newest_at:
                continue
            self.store.delete(name)
            with self._cond:
                self._published.pop(name, None)
                self._evicted.discard(name)
            logger.info("async_ckpt: removed %s (evicted by the local retention)", self.store.object_url(name))


def open_directory(
    directory: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None,
    local_dir: str | os.PathLike[str] | None,
    upload: UploadOptions | None,
    name: str,
    is_checkpoint: Callable[[str], bool],
    arg: str = "directory",
    uploads_here: bool = True,
) -> tuple[str, RemoteTier | None]:
    """Resolve an owner's directory argument: the local directory it writes to, and the remote tier for a URL.

    Args:
        directory: a local path, or a URL (``s3://bucket/prefix``).
        storage_options, local_dir, upload: the URL's options (see :class:`RemoteTier`); refused with a local path.
        name: label of log lines.
        is_checkpoint: whether an object name is one of this owner's checkpoints.
        arg: the owner's name for ``directory``, for error messages.
        uploads_here: whether this process uploads (in a distributed run, only the saving rank does; the others
            need only the local directory's name and must not touch the store).

    Raises:
        ValueError: a remote option with a local path, or a bad URL.
        ImportError: fsspec or the protocol's package is missing.
    """
    if not is_url(directory):
        if storage_options is not None or local_dir is not None or upload is not None:
            raise ValueError(
                f"storage_options, local_dir and upload apply to a URL {arg} (s3://...), and {arg}="
                f"{os.fspath(directory)!r} is local: drop them, or pass a URL."
            )
        check_local_dir(os.fspath(directory), arg)
        return os.fspath(directory), None
    if not uploads_here:
        return (os.fspath(local_dir) if local_dir is not None else default_local_dir(os.fspath(directory))), None
    tier = RemoteTier(
        os.fspath(directory),
        storage_options=storage_options,
        local_dir=local_dir,
        options=upload,
        is_checkpoint=is_checkpoint,
        name=name,
    )
    return tier.local_dir, tier


def wait_durable(pipeline_wait: Callable[[float | None], bool], tier: RemoteTier | None, timeout: float | None) -> None:
    """Wait until every queued checkpoint is durable (``pipeline_wait``) and, with a remote tier, published or
    skipped, within one ``timeout`` for both.

    Raises:
        TimeoutError: ``timeout`` seconds passed first (the message says which tier was still busy).
    """
    start = time.monotonic()
    if not pipeline_wait(timeout):
        raise TimeoutError(f"async_ckpt: checkpoints still pending after {timeout}s.")
    if tier is not None:
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        if not tier.wait(left):
            raise TimeoutError(f"async_ckpt: uploads to {tier.url} still pending after {timeout}s.")


_live: weakref.WeakSet[RemoteTier] = weakref.WeakSet()


@atexit.register
def _upload_at_exit() -> None:
    """At interpreter exit, publish what an owner that was never closed left queued, within the upload deadline.

    The local writes go first (this hook is registered after the writer's own, so it runs before it: it drains the
    writer itself, whose durable callbacks queue the last uploads); then each open tier uploads what is queued, for
    at most its ``deadline_s``. What is left is logged at ERROR: the local copies are durable, and the next start
    on the same ``local_dir`` uploads them.
    """
    tiers = [t for t in list(_live) if t._thread.ident is not None and not t._closing]
    if not tiers:
        return
    flush_all(max(t.options.deadline_s for t in tiers))
    for tier in tiers:
        if not tier.close(tier.options.deadline_s):
            logger.error("async_ckpt: interpreter exit before every upload to %s was published", tier.url)
        for error in tier.take_errors():
            logger.error("async_ckpt: at interpreter exit, an upload to %s failed: %s", tier.url, error)
