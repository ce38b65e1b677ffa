"""The background writer: one named worker thread per process, a FIFO of jobs, and per-client error latches.

Every saver owns a :class:`WriterClient`. Clients put :class:`WriteJob` objects on the one process-wide queue;
the worker thread (``async_ckpt-writer``) runs them strictly in submission order. A job writes (or hard-links)
one file durably and then, only if that succeeded, runs the removals attached to it: that is how an eviction
waits until the file that replaces it is durable.

The worker starts when work arrives and waits for more while any client is open, so a checkpoint event does not
pay for starting a thread on the training thread (``benchmarks.save_path --train-ms``); it exits once the queue is
empty and every client is closed (or collected), so a process without savers holds no thread. It is a daemon, and an
``atexit`` hook drains what is still queued and reports what it could not finish, so nothing hangs at exit.
Failures are latched per client and raised on the client's thread by :meth:`WriterClient.take_failures`'s caller,
never swallowed. This module does not know about ignite or tensors.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from async_ckpt.errors import WriterClosedError
from async_ckpt.pipeline.storage import FileStorage, WriteTimes

__all__ = ["JobResult", "WriteJob", "WriterClient"]

logger = logging.getLogger("async_ckpt")

THREAD_NAME = "async_ckpt-writer"


@dataclass
class JobResult:
    """What happened to one job, passed to its ``on_done`` callback on the worker thread.

    ``committed`` is true when the file reached its final name even though the job failed afterwards (the
    directory fsync failed): the file is complete, only the durability of its name is in doubt.
    """

    ok: bool
    committed: bool = False
    linked: bool = False
    times: WriteTimes = field(default_factory=WriteTimes)
    error: BaseException | None = None
    removed: list[str] = field(default_factory=list)
    durable_at: float = 0.0


@dataclass(eq=False)
class WriteJob:
    """Make ``path`` durable, then remove ``removes``.

    Attributes:
        path: final file name.
        produce: writes the file's bytes into an open binary file (used unless the link below succeeds).
        link_from: an earlier job with identical content; if it succeeded and its file still exists, ``path``
            becomes a hard link to it instead of being serialized again.
        removes: files to delete once ``path`` is durable; skipped if this job fails.
        before: called on the worker thread before anything is written (e.g. wait for device copies).
        after_commit: called on the worker thread once ``path`` is durable and before ``removes`` run (e.g. record
            the new file in the manifest, so that no record ever names a file already removed); if it raises, the
            removals are skipped and the job fails at stage ``"record"`` with ``committed`` set.
        on_done: called on the worker thread with the result, whether the job succeeded or not.
        tag: opaque to the writer; returned to the client with the failure.
    """

    path: str
    produce: Callable[[BinaryIO], object] | None
    link_from: WriteJob | None = None
    removes: list[str] = field(default_factory=list)
    before: Callable[[], None] | None = None
    after_commit: Callable[[JobResult], None] | None = None
    on_done: Callable[[JobResult], None] | None = None
    tag: Any = None
    result: JobResult | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Failure:
    """A job that failed, with the exception that stopped it."""

    job: WriteJob
    error: BaseException
    stage: str


class WriterClient:
    """One saver's handle on the shared writer: submit jobs, wait for them, collect their failures.

    Thread-safety: ``submit``/``wait``/``take_failures``/``close`` may be called from any thread; jobs of one
    client run in the order they were submitted, interleaved FIFO with other clients' jobs.

    Args:
        storage: how files are written; tests pass a slow or faulty subclass.
        name: used in log lines and thread-dump friendly reprs.
        exit_timeout: seconds the interpreter-exit hook may wait for this client's pending jobs (``None``: no
            limit). It counts only while the client has jobs pending, so a closed or idle client never lengthens
            another one's exit.
    """

    def __init__(
        self,
        storage: FileStorage | None = None,
        name: str = "saver",
        exit_timeout: float | None = 600.0,
    ) -> None:
        self.storage = storage if storage is not None else FileStorage()
        self.name = name
        self.exit_timeout = exit_timeout
        self._cond = threading.Condition()
        self._pending = 0
        self._failures: list[Failure] = []
        self._closed = False
        _worker.register(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet."""
        with self._cond:
            return self._pending

    def submit(self, job: WriteJob) -> None:
        """Queue ``job`` behind everything submitted before it, by any client.

        Raises:
            WriterClosedError: the client was closed.
        """
        with self._cond:
            if self._closed:
                raise WriterClosedError(f"cannot save {job.path!r}: this saver was closed; create a new one.")
            self._pending += 1
        _worker.put(self, job)

    def _finished(self, job: WriteJob, failure: Failure | None) -> None:
        with self._cond:
            self._pending -= 1
            if failure is not None:
                self._failures.append(failure)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every job submitted so far has finished (durable or failed).

        Returns:
            ``False`` if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def take_failures(self) -> list[Failure]:
        """Return and forget the failures collected since the last call (oldest first)."""
        with self._cond:
            out, self._failures = self._failures, []
        return out

    def close(self, timeout: float | None = None) -> bool:
        """Wait for this client's jobs, refuse new ones, and join the worker if no other client keeps it busy.

        Only this client's jobs are waited for: a worker still running or holding another client's jobs is left to
        that client's ``close`` (or the exit hook). Idempotent. Returns ``False`` if ``timeout`` passed with jobs
        still pending.
        """
        finished = self.wait(timeout)
        with self._cond:
            self._closed = True
        _worker.unregister(self)
        _worker.join_if_idle(self)
        return finished


_IDLE_CHECK_S = 1.0  # how often an idle worker looks for clients that were collected without close()


class _Worker:
    """The process-wide writer thread and its FIFO; started on demand, kept while a client is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by put() and unregister(): the idle worker looks again
        self._queue: collections.deque[tuple[WriterClient, WriteJob]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._exiting: threading.Thread | None = None
        self._running: WriterClient | None = None  # whose job the worker is running now
        # Weak: a saver that is dropped without close() must not keep its buffers alive through the writer.
        self._clients: weakref.WeakSet[WriterClient] = weakref.WeakSet()

    def register(self, client: WriterClient) -> None:
        with self._lock:
            self._clients.add(client)

    def clients(self) -> list[WriterClient]:
        """Live clients: those not closed, and closed ones whose jobs are still queued (the queue holds them)."""
        with self._lock:
            clients = list(self._clients)
            queued = [c for c, _ in self._queue]
            running = self._running
        seen = {id(c) for c in clients}
        for c in [*queued, *([running] if running is not None else [])]:
            if id(c) not in seen:
                seen.add(id(c))
                clients.append(c)
        return clients

    def unregister(self, client: WriterClient) -> None:
        with self._lock:
            self._clients.discard(client)
        self._wake.set()

    def _open_clients(self) -> bool:
        return any(not c.closed for c in self._clients)

    def put(self, client: WriterClient, job: WriteJob) -> None:
        with self._lock:
            self._queue.append((client, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        self._wake.set()

    def join_if_idle(self, client: WriterClient, timeout: float | None = None) -> None:
        """Join the worker thread if it has nothing left to do but ``client``'s finished job and no client is open
        (it is then on its way out); a worker busy with, or kept for, another client is not waited for."""
        with self._lock:
            idle = not self._queue and self._running in (None, client) and not self._open_clients()
            thread = (self._thread or self._exiting) if idle else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before the look below: a put() after it sets the event again
            with self._lock:
                self._running = None
                if not self._queue:
                    if self._open_clients():
                        job = None
                    else:
                        # Still alive for a moment after this: join_if_idle must be able to find and join it.
                        self._exiting = self._thread
                        self._thread = None
                        return
                else:
                    client, job = self._queue.popleft()
                    self._running = client
            if job is None:
                self._wake.wait(_IDLE_CHECK_S)
                continue
            failure = _execute(client.storage, job)
            job.done.set()
            client._finished(job, failure)
            del client, job  # hold nothing while idle

    def drain(self, timeout: float | None) -> list[str]:
        """Wait for every client's jobs; return the paths of jobs still pending when ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for c in self.clients():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            c.wait(remaining)
        busy = any(c.pending for c in self.clients())
        with self._lock:
            left = [job.path for _, job in self._queue]
            thread = self._thread
            running = busy and self._running is not None
            keeps = self._open_clients()  # an idle worker stays for them: nothing to join
        if thread is not None and not busy and not keeps:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            running = thread.is_alive()
        if running:
            left = [*left, "(the file being written now)"]
        return left

    def reset_after_fork(self) -> None:
        # The child has no worker thread; jobs queued by the parent belong to the parent, and so do their counts
        # (otherwise the child would wait for them at exit until its timeout).
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue.clear()
        self._thread = None
        self._exiting = None
        self._running = None
        for client in list(self._clients):
            client._cond = threading.Condition()
            client._pending = 0


def _execute(storage: FileStorage, job: WriteJob) -> Failure | None:
    result = JobResult(ok=False)
    failure: Failure | None = None
    stage = "write"
    try:
        if job.before is not None:
            stage = "stage"
            job.before()
            stage = "write"
        src = job.link_from
        if src is not None and src.done.is_set() and src.result is not None and src.result.ok:
            stage = "link"
            try:
                result.times = storage.link_atomic(src.path, job.path)
                result.linked = True
            except FileNotFoundError:
                src = None
        if not result.linked:
            if job.produce is None:
                raise RuntimeError(f"nothing to write for {job.path!r}: the file it was to be linked from failed")
            stage = "write"
            result.times = storage.write_atomic(job.path, job.produce)
        result.ok = result.committed = True
        result.durable_at = time.perf_counter()
        if job.after_commit is not None:
            stage = "record"
            job.after_commit(result)
        stage = "remove"
        for path in job.removes:
            if path != job.path and storage.remove(path):
                result.removed.append(path)
    except BaseException as exc:
        result.error = exc
        result.committed = result.ok or getattr(exc, "committed_path", None) == job.path
        failure = Failure(job, exc, stage)
    job.result = result
    if job.on_done is not None:
        try:
            job.on_done(result)
        except BaseException as exc:
            logger.debug("async_ckpt: on_done callback for %s failed", job.path, exc_info=True)
            if failure is None:
                failure = Failure(job, exc, "callback")
    return failure


_worker = _Worker()


def flush_all(timeout: float | None = None) -> list[str]:
    """Wait for every queued job of every client; return the paths that were not finished in ``timeout``."""
    return _worker.drain(timeout)


def worker_alive() -> bool:
    """Whether the writer thread is running (tests use this to check nothing leaks)."""
    return any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


_DEFAULT_EXIT_TIMEOUT = 600.0


def _exit_timeout() -> float | None:
    """The longest exit timeout among the clients with jobs pending (``None`` wins; the default if none has)."""
    timeouts = [c.exit_timeout for c in _worker.clients() if c.pending]
    if not timeouts:
        return _DEFAULT_EXIT_TIMEOUT
    if any(t is None for t in timeouts):
        return None
    return max(t for t in timeouts if t is not None)


@atexit.register
def _drain_at_exit() -> None:
    timeout = _exit_timeout()
    left = flush_all(timeout)
    if left:
        logger.error(
            "async_ckpt: interpreter exit after waiting %ss; these checkpoints were NOT written: %s",
            timeout,
            ", ".join(left),
        )
    # Nobody is left to raise failures that happened during this drain (or were never collected): say them.
    for client in _worker.clients():
        for failure in client.take_failures():
            logger.error(
                "async_ckpt: at interpreter exit, %s failed (%s): %r", failure.job.path, failure.stage, failure.error
            )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_worker.reset_after_fork)
