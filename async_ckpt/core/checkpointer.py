"""``Checkpointer``: background, durable checkpoints for a plain PyTorch loop, with retention owned here.

::

    ckpt = Checkpointer("runs/ckpt", keep_last=3)
    for step in range(steps):
        train_step()
        if step % 100 == 0:
            ckpt.save(step, {"model": model, "optim": opt})   # returns once the snapshot is taken
    ckpt.close()                                              # every save durable, failures raised

``save`` copies the state into reused buffers and queues it; the writer thread serializes it (``torch.save``'s
format), writes it to a temporary name, fsyncs and renames it to ``[<file_prefix>_]step_<step, 8 digits>.pt``.
Retention (:mod:`async_ckpt.core.retention`) decides at ``save`` which kept files the new one evicts; they are
removed by the writer only after the new file is durable. A failed write is rolled back in the retention list and
raised on the calling thread at the next ``save``/``wait``/``close``.

Thread-safety: one thread (the training loop) calls ``save``, ``wait``, ``close``, ``checkpoints`` and ``load``;
a :class:`SaveHandle` may be polled from any thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from async_ckpt.core.resume import remove_stale_temp_files
from async_ckpt.core.retention import Decision, Entry, Mode, Retention, entries_from_manifest
from async_ckpt.core.save_pipeline import SavePipeline, close_on_exit, failure_to_error
from async_ckpt.core.uploader import UploadOptions, UploadTelemetry, open_directory, wait_durable
from async_ckpt.errors import CheckpointWriteError, WriterClosedError
from async_ckpt.options import AsyncOptions, OverflowPolicy, SnapshotMode
from async_ckpt.pipeline.integrity import read_manifest, update_manifest
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.telemetry import SaveStats, Telemetry
from async_ckpt.pipeline.writer import Failure, WriteJob

__all__ = ["CheckpointInfo", "Checkpointer", "SaveHandle"]

logger = logging.getLogger("async_ckpt")

REASON = "checkpointer"  # the manifest's "reason" of the files a Checkpointer writes


@dataclass(frozen=True)
class CheckpointInfo:
    """A durable checkpoint on disk.

    Attributes:
        path: the file.
        step: the step given to ``save``.
        metrics: the metrics given to ``save``.
    """

    path: str
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class SaveHandle:
    """The outcome of one :meth:`Checkpointer.save`, like a ``concurrent.futures.Future``.

    A failure read through :meth:`result` or :meth:`exception` counts as reported: the checkpointer does not raise
    it again at its next ``save``/``wait``/``close``.

    Attributes:
        step: the step given to ``save``.
        path: the file being written, or ``None`` when nothing is written (see ``not_written``).
        not_written: why nothing is written (no retention rule keeps it, or ``overflow="skip"`` dropped it), else
            ``None``.
    """

    def __init__(self, step: int, path: str | None, job: WriteJob | None, not_written: str | None = None) -> None:
        self.step = step
        self.path = path
        self.not_written = not_written
        self._job = job
        self._stats: SaveStats | None = None
        self._failure: Failure | None = None
        self._error: CheckpointWriteError | None = None
        self.observed = False

    def done(self) -> bool:
        """Whether the checkpoint is durable, failed, or was not written."""
        return self._job is None or self._job.done.is_set()

    def exception(self, timeout: float | None = None) -> CheckpointWriteError | None:
        """Wait until :meth:`done`; the error that kept the checkpoint from becoming durable, or ``None``.

        A failure to remove an evicted file, or to update the manifest, after this checkpoint was durable is not
        this checkpoint's failure: the checkpointer raises it.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        job = self._job
        if job is None:
            return None
        if not job.done.wait(timeout):
            raise TimeoutError(f"async_ckpt: {job.path} is still being written after {timeout}s.")
        result = job.result
        assert result is not None  # set before done
        if result.ok:
            return None
        self.observed = True
        if self._error is None:
            failure = self._failure or Failure(job, result.error or RuntimeError("unknown failure"), "write")
            self._error = failure_to_error(failure, 0)
        return self._error

    def result(self, timeout: float | None = None) -> SaveStats | None:
        """Wait until :meth:`done`; the durable checkpoint's :class:`~async_ckpt.SaveStats` (``None`` if not written).

        Raises:
            CheckpointWriteError: the checkpoint could not be made durable (the original is ``__cause__``).
            TimeoutError: ``timeout`` seconds passed first.
        """
        error = self.exception(timeout)
        if error is not None:
            raise error
        return self._stats


class Checkpointer:
    """Saves checkpoints of a training loop in the background and keeps the last or best N of them.

    Args:
        directory: where the checkpoints go (created if missing).
        keep_last: keep the N most recent checkpoints (``None``: no such rule).
        keep_best: keep the N best checkpoints by ``metric`` (``None``: no such rule). With neither rule every
            checkpoint is kept; with both, a checkpoint stays while either keeps it.
        metric: the metric (a key of ``save``'s ``metrics``) that ``keep_best`` ranks by.
        mode: ``"max"`` if a larger ``metric`` is better, ``"min"`` if a smaller one is. Ties keep the older file.
        file_prefix: file names are ``<file_prefix>_step_<step>.pt`` (``step_<step>.pt`` without a prefix), the step
            zero-padded to 8 digits so names sort by step.
        max_pending: snapshots in flight at once (each holds a CPU copy of the state).
        overflow: ``"block"`` waits for the writer when ``max_pending`` snapshots are in flight; ``"skip"`` drops the
            save instead (with a warning), unless ``keep_best`` keeps it.
        fsync: make files and renames durable before they count as saved.
        snapshot_mode: ``"eager"`` copies everything in ``save``; ``"overlap"`` copies the parameters and optimizer
            state of the optimizers in ``state`` while the next step runs (their ``step()`` waits for the copy).
        dedup: reuse the snapshot when the same step is saved again with unchanged tensors.
        manifest: keep ``.async_ckpt_manifest.json`` (size, checksum, step, metrics per durable file); retention
            continues from it after a restart.
        exit_timeout: seconds the interpreter-exit hook waits for pending writes (``None``: unbounded).
        on_durable: called with each checkpoint's :class:`~async_ckpt.SaveStats` once it is durable, on the writer
            thread (keep it short; an exception in it is reported like a write failure).
        storage: file operations (a :class:`~async_ckpt.FileStorage` subclass), for tests and special file systems.
        name: label of log lines.
        storage_options: with a URL ``directory``: the fsspec filesystem's arguments (s3fs: ``key``, ``secret``,
            ``endpoint_url``, ``client_kwargs``...); the AWS environment variables work too.
        local_dir: with a URL ``directory``: the local staging directory (default: a cache directory, see
            docs/remote.md). Checkpoints are made durable there first, then uploaded in the background.
        upload: with a URL ``directory``: part size, concurrency, retry deadline, coalescing and credentials
            (:class:`~async_ckpt.core.uploader.UploadOptions`).

    With a URL ``directory`` (``s3://bucket/prefix``), ``checkpoints``/``latest`` list the *published* checkpoints
    (object uploaded and manifest written), ``load`` downloads one (checked against its manifest), ``wait``/``close``
    wait for the uploads too, and an upload failure is raised like a write failure (the local copy is kept).

    Raises:
        ValueError: a bad retention rule or async option.
        OSError: ``directory`` cannot be created or written.
        ImportError: a URL ``directory`` without fsspec/s3fs installed (``pip install 'async-ckpt[s3]'``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: Mode = "max",
        file_prefix: str = "",
        max_pending: int = 2,
        overflow: OverflowPolicy = "block",
        fsync: bool = True,
        snapshot_mode: SnapshotMode = "eager",
        dedup: bool = True,
        manifest: bool = True,
        exit_timeout: float | None = 600.0,
        on_durable: Callable[[SaveStats], None] | None = None,
        storage: FileStorage | None = None,
        name: str = "checkpointer",
        storage_options: Mapping[str, Any] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        upload: UploadOptions | None = None,
    ) -> None:
        self.retention = Retention(keep_last, keep_best, metric, mode)
        self.file_prefix = file_prefix
        self._name_prefix = f"{file_prefix}_" if file_prefix else ""
        self._pattern = re.compile(re.escape(self._name_prefix) + r"step_(\d+)\.pt")
        self.directory, self.remote = open_directory(
            directory,
            storage_options=storage_options,
            local_dir=local_dir,
            upload=upload,
            name=name,
            is_checkpoint=lambda n: self._pattern.fullmatch(n) is not None,
        )
        self.url: str | None = self.remote.url if self.remote is not None else None
        self.options = AsyncOptions(
            max_pending=max_pending,
            overflow=overflow,
            fsync=fsync,
            snapshot_mode=snapshot_mode,
            dedup=dedup,
            manifest=manifest,
            sync_errors=False,
            exit_timeout=exit_timeout,
        )
        os.makedirs(self.directory, exist_ok=True)
        _check_writable(self.directory)
        removed = remove_stale_temp_files(self.directory)
        if removed:
            logger.info("async_ckpt: removed %d temporary file(s) of an interrupted run", len(removed))
        self._pipeline = SavePipeline({}, self.options, storage, lambda: logger, name=name)
        self._pipeline.on_durable = self._durable
        if self.remote is not None:
            self._pipeline.on_evicted = self.remote.evicted
        self._on_durable = on_durable
        self._lock = threading.Lock()
        self._handles: dict[int, SaveHandle] = {}  # id(job) -> handle, until settled
        self._jobs: dict[int, WriteJob] = {}  # entry seq -> its job, until durable
        self._leaving: list[tuple[Entry, WriteJob]] = []  # evicted or replaced, until the evicting job is done
        self._failures: list[Failure] = []
        self._retry_removes: list[str] = []
        self._best_paths: set[str] = set()  # files keep_best kept when saved: never skipped by the uploader
        self._closed = False
        files = read_manifest(self.directory)["files"]
        entries = entries_from_manifest(self.directory, files, self._pattern, reason=REASON)
        if self.remote is not None:
            entries = self._with_remote(entries, files)
        self.retention.restore(entries)
        if self.remote is not None:
            self.remote.submit_unpublished()
            self.remote.start()  # last: a constructor that raised above leaves no thread behind

    # -- saving --------------------------------------------------------------------------------------------------
    def path_for(self, step: int) -> str:
        """The file a checkpoint of ``step`` is written to."""
        return os.path.join(self.directory, f"{self._name_prefix}step_{step:08d}.pt")

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``state`` and queue it to become durable as :meth:`path_for` ``(step)``.

        Returns once later in-place changes to the tensors cannot reach the file (with ``snapshot_mode="overlap"``,
        the optimizers' next ``step()`` waits for the rest of the copy).

        Args:
            step: the training step (an int >= 0); it names the file.
            state: names mapped to objects with ``state_dict()`` (modules, optimizers, schedulers) or to plain state
                (tensors, containers, numbers). ``DataParallel``/``DistributedDataParallel`` are unwrapped.
            metrics: numbers recorded with the checkpoint; ``keep_best`` needs ``metric`` among them.

        Returns:
            A :class:`SaveHandle`; ``handle.path`` is ``None`` when retention (or ``overflow="skip"``) decided not
            to write this checkpoint.

        Raises:
            CheckpointWriteError: an earlier checkpoint failed in the background (raised once, cause chained).
            SnapshotError: the state could not be copied (nothing was queued, retention is unchanged).
            WriterClosedError: the checkpointer was closed.
            ValueError, TypeError: a bad ``step``, ``state`` or ``metrics``.
        """
        if self._closed:
            raise WriterClosedError(f"cannot save step {step}: this Checkpointer was closed; create a new one.")
        self._raise_failures()
        step = _check_step(step)
        if not isinstance(state, Mapping) or not state:
            raise TypeError(f"state must be a non-empty mapping of names to objects, got {type(state).__name__}.")
        numbers = _check_metrics(metrics)
        metric = self.retention.metric
        if self.retention.keep_best is not None and metric not in numbers:
            raise ValueError(
                f"keep_best ranks by metric {metric!r}, but save(step={step}) got metrics={sorted(numbers)}: "
                f"pass metrics={{{metric!r}: value}}."
            )
        path = self.path_for(step)
        decision = self.retention.plan(path, step, numbers)
        if not decision.keep:
            why = f"not written: {metric}={numbers.get(metric or '')} is not among the best {self.retention.keep_best}"
            return SaveHandle(step, None, None, why)
        if self.options.overflow == "skip" and not decision.best and not self._pipeline.has_free_slot():
            self._pipeline.telemetry.skipped += 1
            warnings.warn(
                f"async_ckpt: skipped the checkpoint of step {step}: the writer is still busy with "
                f"{self.options.max_pending} earlier checkpoint(s) (overflow='skip'). Raise max_pending, save less "
                "often, or use overflow='block'.",
                RuntimeWarning,
                stacklevel=2,
            )
            return SaveHandle(step, None, None, "skipped: the writer was busy (overflow='skip')")
        tree = _state_tree(state)
        kept = {e.path for e in self.retention.entries}
        retry = [p for p in self._retry_removes if p != path and p not in kept]
        removes = [e.path for e in decision.evict] + [p for p in retry if p not in {e.path for e in decision.evict}]
        self._pipeline.save_dict = state  # overlap mode guards the optimizers found here
        if decision.best:  # read by the writer thread once the file is durable (before job.tag is set here)
            self._best_paths.add(path)
        else:
            self._best_paths.discard(path)
        job = self._pipeline.save(tree, path, removes, REASON, {"step": step, "metrics": numbers}, step=step)
        job.tag = decision
        self.retention.apply(decision)
        self._retry_removes = []
        handle = SaveHandle(step, path, job)
        with self._lock:
            self._handles[id(job)] = handle
            self._jobs[decision.entry.seq] = job
            gone = [*decision.evict, *([decision.replaced] if decision.replaced is not None else [])]
            self._leaving.extend((e, job) for e in gone)
        return handle

    def prewarm(self, state: Mapping[str, Any]) -> int:
        """Allocate the staging buffers for ``state``'s layout now, so the first ``save`` does not pay for it.

        Returns:
            The number of buffer sets allocated.
        """
        from async_ckpt.pipeline.snapshot import flatten

        return self._pipeline.stager.prewarm(flatten(_state_tree(state)).tensors)

    @property
    def stats(self) -> Telemetry:
        """Per-save telemetry: blocking time, bytes, serialize/write/fsync and durable times."""
        return self._pipeline.telemetry

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint saved so far is durable (and, with a URL, published or skipped), then raise
        any background failure.

        Raises:
            CheckpointWriteError: a checkpoint could not be written (the original is ``__cause__``).
            TimeoutError: ``timeout`` seconds passed first.
        """
        wait_durable(self._pipeline.wait, self.remote, timeout)
        self._raise_failures()

    def close(self) -> None:
        """Wait until every checkpoint is durable, stop accepting saves, and raise any background failure.

        Idempotent. Evictions whose removal failed earlier are retried here.
        """
        if self._closed:
            return
        self._closed = True
        self._pipeline.close()
        if self.remote is not None:
            self.remote.close()
        self._collect()
        if self._retry_removes:
            storage = self._pipeline.client.storage
            kept = {e.path for e in self.retention.entries}
            gone = [p for p in self._retry_removes if p not in kept and storage.remove(p)]
            self._retry_removes = []
            if gone and self.options.manifest:
                update_manifest(storage, self.directory, {}, [os.path.basename(p) for p in gone])
        self._raise_failures()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close; an exception leaving the ``with`` block stays the one raised (a write failure is attached)."""
        close_on_exit(self.close, exc, logger)

    # -- resuming ------------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        """The durable checkpoints on disk that retention keeps, oldest save first.

        A file evicted by a newer save is listed until that save is durable and the file is removed; a save still
        being written is not listed yet. After a restart, the list comes from the directory's manifest.

        With a URL directory: the published checkpoints (``path`` is the object's URL), oldest save first.
        """
        self._collect()
        if self.remote is not None:
            infos = []
            for name, info in self.remote.published().items():
                match = self._pattern.fullmatch(name)
                if match is not None:
                    raw = info.get("metrics") or {}
                    metrics = {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}
                    infos.append(CheckpointInfo(self.remote.store.object_url(name), int(match.group(1)), metrics))
            return infos
        with self._lock:
            leaving = [e for e, _ in self._leaving]
        by_path: dict[str, Entry] = {}
        for e in sorted([*leaving, *self.retention.entries], key=lambda e: e.seq):
            if self._durable_entry(e) and os.path.isfile(e.path):
                by_path.pop(e.path, None)
                by_path[e.path] = e
        return [CheckpointInfo(e.path, e.step, dict(e.metrics)) for e in by_path.values()]

    def latest(self) -> str | None:
        """The path of the newest durable checkpoint (with a URL directory: the URL of the newest published one), or
        ``None``."""
        found = self.checkpoints()
        return found[-1].path if found else None

    def load(
        self,
        which: str | int | os.PathLike[str] = "latest",
        into: Mapping[str, Any] | None = None,
        map_location: Any = None,
        *,
        weights_only: bool = True,
    ) -> Any:
        """Read a checkpoint; with ``into``, also load each entry into the object of the same name.

        Args:
            which: ``"latest"``, a step (int), or a path. A save of that file still in flight is waited for. With a
                URL directory, a URL under it (or a step not present locally) is downloaded into ``local_dir``
                first, checked against its manifest (size and CRC-32) while it downloads.
            into: names mapped to objects with ``load_state_dict`` (e.g. the mapping given to ``save``).
            map_location: as ``torch.load``'s.
            weights_only: as ``torch.load``'s (only tensors and plain Python values).

        Returns:
            The saved state (a dict of the names given to ``save``).

        Raises:
            FileNotFoundError: ``"latest"`` with no checkpoint yet, or no file for ``which``.
            KeyError: a name of ``into`` is not in the checkpoint.
            TypeError: an object of ``into`` has no ``load_state_dict``.
            CheckpointWriteError: the file's save failed in the background.
        """
        if isinstance(which, str) and which == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory!r} yet: save one, or pass a path.")
        elif isinstance(which, bool):
            raise TypeError(f"which must be 'latest', a step or a path, got {which!r}.")
        elif isinstance(which, int):
            path = self.path_for(which)
        else:
            path = os.fspath(which)
        name = self._remote_name(path)
        if self.remote is not None and name is None and not os.path.isfile(path):
            local = os.path.basename(path)
            if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.directory) and local in (
                self.remote.published()
            ):
                name = local
        if name is not None:
            assert self.remote is not None
            self.wait()  # the object may be in flight
            path = self.remote.fetch(name)
        with self._lock:
            pending = any(h.path == path and not h.done() for h in self._handles.values())
        if pending:
            self.wait()
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
        targets = {name: _unwrap(obj) for name, obj in (into or {}).items()}
        for name, target in targets.items():  # check every name before loading any, so a mistake changes nothing
            if name not in state:
                raise KeyError(f"checkpoint {path!r} has no entry {name!r} (it has {sorted(state)}); check the names.")
            if not callable(getattr(target, "load_state_dict", None)):
                raise TypeError(f"into[{name!r}] is a {type(target).__name__}, which has no load_state_dict().")
        for name, target in targets.items():
            target.load_state_dict(state[name])
        return state

    # -- failures and bookkeeping ----------------------------------------------------------------------------------
    def _durable(self, stats: SaveStats) -> None:
        # Writer thread: the job being finished is the one whose result is set and done flag is not yet.
        with self._lock:
            for handle in self._handles.values():
                job = handle._job
                if job is not None and job.result is not None and not job.done.is_set():
                    handle._stats = stats
                    break
        if self.remote is not None:
            self.remote.submit(stats.path, protected=stats.path in self._best_paths)
        if self._on_durable is not None:
            self._on_durable(stats)

    def _durable_entry(self, entry: Entry) -> bool:
        with self._lock:
            job = self._jobs.get(entry.seq)
        if job is None:
            return True  # restored from the manifest, or durable and forgotten
        return job.done.is_set() and job.result is not None and (job.result.ok or job.result.committed)

    def _collect(self) -> None:
        """Take the writer's failures, roll retention back for each, and forget finished bookkeeping."""
        for failure in self._pipeline.take_failures():
            self._roll_back(failure)
            with self._lock:
                handle = self._handles.pop(id(failure.job), None)
            if handle is not None:
                handle._failure = failure
                if handle.observed and not (failure.job.result and failure.job.result.ok):
                    continue  # reported through its handle already
            self._failures.append(failure)
        with self._lock:
            self._leaving = [(e, j) for e, j in self._leaving if not j.done.is_set()]
            for seq in [s for s, j in self._jobs.items() if j.done.is_set() and j.result and j.result.ok]:
                del self._jobs[seq]
            for key in [
                k
                for k, h in self._handles.items()
                if h._job and h._job.done.is_set() and h._job.result and h._job.result.ok
            ]:
                del self._handles[key]

    def _roll_back(self, failure: Failure) -> None:
        """Make the retention list match the disk again after ``failure``."""
        job, result = failure.job, failure.job.result
        decision = job.tag
        if not isinstance(decision, Decision) or result is None:
            return
        if not (result.ok or result.committed):
            self.retention.undo(decision)
            with self._lock:
                self._jobs.pop(decision.entry.seq, None)
        # Evictions that did not run must still happen, after the next durable save.
        kept = {e.path for e in self.retention.entries}
        self._retry_removes += [p for p in job.removes if p not in result.removed and p != job.path and p not in kept]

    def _raise_failures(self) -> None:
        self._collect()
        failures, self._failures = self._failures, []
        uploads = self.remote.take_errors() if self.remote is not None else []
        if failures:
            raise failure_to_error(failures[0], more=len(failures) - 1 + len(uploads))
        if uploads:
            uploads[0].more = len(uploads) - 1
            raise uploads[0]

    # -- the remote tier -----------------------------------------------------------------------------------------
    @property
    def upload_stats(self) -> UploadTelemetry | None:
        """With a URL directory: per-upload time, bytes and throughput, and how far the remote tier lags."""
        return self.remote.stats if self.remote is not None else None

    def _with_remote(self, local: list[Entry], files: Mapping[str, Any]) -> list[Entry]:
        """``local`` (the local manifest's entries) merged with the published checkpoints the local directory does
        not hold, oldest save first, so retention continues from the bucket on an empty machine."""
        assert self.remote is not None
        dated = [(float((files.get(os.path.basename(e.path)) or {}).get("saved_at", 0.0)), e) for e in local]
        names = {os.path.basename(e.path) for e in local}
        for name, info in self.remote.published().items():
            match = self._pattern.fullmatch(name)
            if match is None or name in names or info.get("reason", REASON) != REASON:
                continue
            raw = info.get("metrics") or {}
            metrics = {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}
            entry = Entry(os.path.join(self.directory, name), int(match.group(1)), metrics)
            dated.append((float(info.get("saved_at", 0.0)), entry))
        dated.sort(key=lambda it: (it[0], it[1].step))
        return [e for _, e in dated]

    def _remote_name(self, which: str) -> str | None:
        """The object name of ``which`` if it is a URL under this checkpointer's ``directory``."""
        if self.url is not None and which.startswith(self.url.rstrip("/") + "/"):
            return which[len(self.url.rstrip("/")) + 1 :]
        return None


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (it names the file), got {step!r}.")
    return step


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metrics[{key!r}] must be a number (or a 0-d tensor), got {value!r}.") from exc
    return out


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


def _state_tree(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every object that has ``state_dict()`` replaced by its state dict."""
    out: dict[str, Any] = {}
    for name, value in state.items():
        target = _unwrap(value)
        out[name] = target.state_dict() if callable(getattr(target, "state_dict", None)) else value
    return out


def _check_writable(directory: str) -> None:
    """Fail at construction, not at the first background write, if ``directory`` cannot take files."""
    probe = FileStorage.temp_path(os.path.join(directory, "probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise PermissionError(
            f"directory={directory!r} is not writable ({exc.strerror}); fix its permissions or choose another one."
        ) from exc
    os.close(fd)
    os.unlink(probe)
