"""``AsyncCheckpointSaver``: MONAI's ``CheckpointSaver``, with the writing moved off the training thread.

The class reproduces MONAI 1.6's constructor, events, file names and file contents by composing the same three
ignite ``Checkpoint`` objects MONAI builds (final, key metric, interval). Only their save handler differs: an
:class:`~async_ckpt.ignite.save_handler.AsyncSaveHandler` that snapshots at the event and lets the core's
:class:`~async_ckpt.core.save_pipeline.SavePipeline` make the file durable in the background. Scoring, naming and
top-N retention are ignite's own code; the saver changes a ``Checkpoint``'s list only through its public
``state_dict``/``load_state_dict`` (:mod:`~async_ckpt.ignite.kept`), to undo a save that did not reach the disk
and to resume from the manifest.

On top of MONAI it adds: ``wait()`` / ``close()`` / context manager, a flush at the end of the run
(:mod:`~async_ckpt.ignite.flush`), a flush of the final checkpoint before an exception leaves ``engine.run``,
background errors raised on the training thread (agreed across ranks), per-save telemetry, and two optional pieces
it attaches: background prewarm (:mod:`~async_ckpt.ignite.prewarm`) and a preemption signal
(:mod:`~async_ckpt.ignite.preemption`).
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from async_ckpt.core.agreement import RankAgreement
from async_ckpt.core.resume import remove_stale_temp_files
from async_ckpt.core.save_pipeline import SavePipeline, attach_failure, close_on_exit, failure_to_error
from async_ckpt.core.uploader import UploadOptions, wait_durable
from async_ckpt.errors import CheckpointWriteError, SnapshotError
from async_ckpt.ignite.flush import RunEndFlush
from async_ckpt.ignite.kept import drop_oldest, resume_kept, roll_back, save_tracked
from async_ckpt.ignite.preemption import PreemptionGuard
from async_ckpt.ignite.prewarm import Prewarm
from async_ckpt.ignite.save_handler import AsyncSaveHandler, save_dict_objects
from async_ckpt.ignite.scores import final_score, key_metric_score
from async_ckpt.ignite.upload import connect, open_remote
from async_ckpt.options import AsyncOptions, OverflowPolicy, SnapshotMode
from async_ckpt.pipeline.remote import is_url
from async_ckpt.pipeline.storage import DirectIO, FileStorage

if TYPE_CHECKING:
    from async_ckpt.pipeline.telemetry import SaveStats, Telemetry
    from async_ckpt.pipeline.writer import Failure

__all__ = ["AsyncCheckpointSaver"]


class AsyncCheckpointSaver:
    """Saves checkpoints like MONAI's ``CheckpointSaver`` while training keeps running.

    Drop-in: ``from async_ckpt import AsyncCheckpointSaver as CheckpointSaver``. The positional and keyword
    arguments up to ``n_saved`` are MONAI's, with MONAI's defaults and MONAI's exceptions for bad values; see
    MONAI's documentation for their meaning. The keyword-only arguments after them control the background work.

    Args:
        save_dir: the target directory to save the checkpoints.
        save_dict: source objects that save to the checkpoint, e.g. ``{"network": net, "optimizer": opt}``.
        name: identifier of the ``logging.Logger`` to use; ``None`` uses ``engine.logger``.
        file_prefix: prefix for the file names.
        save_final: save a checkpoint at ``COMPLETED`` and on ``EXCEPTION_RAISED``.
        final_filename: fixed file name of the final checkpoint.
        save_key_metric: save when the key metric improves.
        key_metric_name: the metric in ``engine.state.metrics``; ``None`` uses ``engine.state.key_metric_name``.
        key_metric_n_saved: keep the best N key-metric checkpoints.
        key_metric_filename: fixed file name of the best checkpoint (requires ``key_metric_n_saved == 1``).
        key_metric_save_state: also store the key-metric tracking list under ``"checkpointer"``.
        key_metric_greater_or_equal: a tie replaces the saved checkpoint.
        key_metric_negative_sign: smaller metric is better.
        epoch_level: ``save_interval`` counts epochs (``True``) or iterations (``False``).
        save_interval: save every N epochs/iterations; 0 disables interval saves.
        n_saved: keep the latest N interval checkpoints; ``None`` keeps all.
        max_pending: snapshots in flight at once (each holds a CPU copy of the state). Default 2: one being
            written, one waiting.
        overflow: ``"block"`` (default) waits when ``max_pending`` snapshots are in flight; ``"skip"`` drops
            interval saves with a warning instead. Key-metric and final saves are never dropped.
        fsync: make files and renames durable before they count as saved (default ``True``).
        snapshot_mode: ``"eager"`` (default) copies everything at the event; ``"overlap"`` copies parameters and
            optimizer state while the next step runs, and the optimizers' ``step()`` waits for the copy.
        dedup: stage and serialize once when several checkpoints are due for the same unchanged state.
        manifest: keep ``.async_ckpt_manifest.json`` (size, checksum, step, score, reason per durable file).
        exit_timeout: seconds the interpreter-exit hook waits for pending writes (``None``: unbounded).
        direct_io: ``"auto"`` (default) writes the large aligned spans of each record with ``O_DIRECT`` from the
            staging buffers (no page-cache copy) where the file system allows it, and buffered elsewhere;
            ``True`` fails a save where ``O_DIRECT`` is refused; ``False`` always writes through the page cache.
        sync_errors: in a distributed run, agree across ranks (small all-reduces on a gloo group of the saver's
            own) at every checkpoint event, at ``COMPLETED`` and, with ``preempt_signal``, at every iteration end,
            so that every rank raises on a failure, skips with ``overflow="skip"`` and acts on a preemption signal
            together (see docs/distributed.md). ``False`` turns all of it off.
        prewarm: allocate and touch the staging buffers on a background thread from ``attach`` on (default), and
            again after the first iteration if the state grew by then (optimizers such as Adam create their state
            at their first step), so that the first save costs what a later one does; ``False`` allocates them in
            the first save.
        on_durable: called with the :class:`~async_ckpt.SaveStats` of each checkpoint once its file is durable,
            on the writer thread (keep it short; an exception in it is reported like a write failure). ignite's
            ``Checkpoint.SAVED_CHECKPOINT`` event, by contrast, fires when the snapshot is taken and queued.
        resume: rebuild the interval, key-metric and final retention lists from the files an earlier run
            recorded in ``save_dir``'s manifest, so ``n_saved`` pruning continues across restarts.
        preempt_signal: a signal (e.g. ``signal.SIGTERM``, or ``signal.SIGUSR1`` for SLURM) that makes the saver
            write the final checkpoint at the end of the current iteration, flush, and then hand the signal to the
            previous handler. Requires ``save_final=True``; installed at ``attach`` from the main thread.
        preempt_grace_s: seconds to wait for pending writes after a preemption signal.
        storage: file operations (a :class:`~async_ckpt.pipeline.storage.FileStorage` subclass); for tests and
            special file systems.
        storage_options: with a URL ``save_dir`` (``s3://bucket/prefix``): the fsspec filesystem's arguments
            (endpoint, credentials); the AWS environment variables work too. See docs/remote.md.
        local_dir: with a URL ``save_dir``: the local staging directory the files are made durable in before
            they are uploaded (default ``~/.cache/async_ckpt/<protocol>/<bucket>/<prefix>``).
        upload: with a URL ``save_dir``: part size, concurrency, retry deadline, coalescing and credentials
            (:class:`~async_ckpt.core.uploader.UploadOptions`). ``wait()``, ``close()`` and the flush at the end
            of a run also wait for the uploads; an upload failure is raised like a write failure.

    Raises:
        AssertionError: ``save_dir`` is ``None`` or ``save_dict`` is empty (as MONAI).
        TypeError: a ``save_dict`` value, or an object nested in one (lists, tuples and dicts of objects, as
            ignite accepts them), has no ``state_dict`` method (as ignite).
        ValueError: ``key_metric_filename`` with ``key_metric_n_saved > 1``, ``n_saved < 1``, the key
            ``"checkpointer"`` with ``key_metric_save_state`` (as MONAI/ignite), or a bad async option.
        OSError: ``save_dir`` cannot be created, is not a directory, or is not writable.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,  # type: ignore[type-arg]
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
        *,
        max_pending: int = 2,
        overflow: OverflowPolicy = "block",
        fsync: bool = True,
        snapshot_mode: SnapshotMode = "eager",
        dedup: bool = True,
        manifest: bool = True,
        exit_timeout: float | None = 600.0,
        sync_errors: bool = True,
        direct_io: DirectIO = "auto",
        prewarm: bool = True,
        on_durable: Callable[[SaveStats], None] | None = None,
        resume: bool = False,
        preempt_signal: int | None = None,
        preempt_grace_s: float = 60.0,
        storage: FileStorage | None = None,
        storage_options: Mapping[str, Any] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        upload: UploadOptions | None = None,
    ) -> None:
        if save_dir is None:
            raise AssertionError("must provide directory to save the checkpoints.")
        if not (save_dict is not None and len(save_dict) > 0):
            raise AssertionError("must provide source objects to save.")
        self.url = os.fspath(save_dir) if is_url(save_dir) else None
        save_dir, self.remote = open_remote(save_dir, storage_options, local_dir, upload, name or "saver")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.options = AsyncOptions(
            max_pending=max_pending,
            overflow=overflow,
            fsync=fsync,
            snapshot_mode=snapshot_mode,
            dedup=dedup,
            manifest=manifest,
            sync_errors=sync_errors,
            exit_timeout=exit_timeout,
            direct_io=direct_io,
        )
        self.logger = logging.getLogger(name)
        self.epoch_level = epoch_level
        self.save_interval = save_interval
        self._name = name
        self._final_filename = final_filename
        self._closed = False
        saves = save_final or save_key_metric or save_interval > 0
        if saves:
            _check_state_dicts(save_dict)
        if save_key_metric and key_metric_n_saved is not None and key_metric_n_saved < 1:
            raise ValueError(f"key_metric_n_saved must be a positive integer, got {key_metric_n_saved}.")
        if save_key_metric and key_metric_save_state and "checkpointer" in save_dict:
            raise ValueError(
                "save_dict has a 'checkpointer' entry, but key_metric_save_state=True stores the key-metric tracking "
                "list under that key: rename the entry or set key_metric_save_state=False."
            )
        if save_key_metric and key_metric_filename is not None and key_metric_n_saved > 1:
            raise ValueError("if using fixed filename to save the best metric model, we should only save 1 model.")
        if save_interval > 0 and n_saved is not None and n_saved < 1:
            raise ValueError(f"n_saved must be a positive integer or None, got {n_saved}.")
        if preempt_signal is not None and not save_final:
            raise ValueError(
                f"preempt_signal={preempt_signal!r} writes the final checkpoint on the signal; pass save_final=True."
            )
        self._pipeline = SavePipeline(save_dict, self.options, storage, lambda: self.logger, name=name or "saver")
        self._pipeline.prewarm_after_allocation = prewarm
        self._pipeline.on_durable = on_durable
        start_upload = connect(self._pipeline, self.remote, on_durable) if self.remote is not None else None
        if saves and idist.get_rank() == 0:
            # Before ignite's DiskSaver would create it: a new directory must be fsynced into its parent too.
            self._pipeline.client.storage.make_dirs(str(save_dir))
        self._handlers: dict[int, AsyncSaveHandler] = {}

        def interval_score(engine: Engine) -> Any:
            return engine.state.epoch if self.epoch_level else engine.state.iteration

        common = {"to_save": self.save_dict, "filename_prefix": file_prefix}
        self._final_checkpoint = (
            self._checkpoint(
                final_filename, "final", score_function=final_score, score_name="final_iteration", **common
            )
            if save_final
            else None
        )
        self._key_metric_checkpoint = (
            self._checkpoint(
                key_metric_filename,
                "key_metric",
                score_function=key_metric_score(key_metric_name, key_metric_negative_sign),
                score_name="key_metric",
                n_saved=key_metric_n_saved,
                include_self=key_metric_save_state,
                greater_or_equal=key_metric_greater_or_equal,
                **common,
            )
            if save_key_metric
            else None
        )
        self._interval_checkpoint = (
            self._checkpoint(
                None,
                "interval",
                score_function=interval_score,
                score_name="epoch" if self.epoch_level else "iteration",
                n_saved=n_saved,
                **common,
            )
            if save_interval > 0
            else None
        )
        self._agreement = RankAgreement(
            enabled=bool(self._handlers) and sync_errors, world_size=idist.get_world_size(), all_reduce=_idist_max
        )
        if self._handlers and idist.get_rank() == 0:  # as ignite's DiskSaver: only the saving rank touches files
            _check_writable(str(save_dir))
        # An evaluator restarts its counters at every run(): the run count keeps each round a step of its own.
        self._runs: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
        self._run_end_flush = RunEndFlush(lambda: self.wait(barrier=True))
        self._prewarm = Prewarm(self._pipeline) if prewarm and self._handlers else None
        self._preemption = (
            PreemptionGuard(
                self._save_on_preemption,
                self._pipeline.wait,
                preempt_signal,
                preempt_grace_s,
                agree=lambda requested: self._agreement.any(requested)[0],
            )
            if preempt_signal is not None
            else None
        )
        if resume:
            published = self.remote.saved_items if self.remote is not None else None
            resume_kept(self._checkpoints(), str(save_dir), save_dict, file_prefix, published)
        if start_upload is not None:
            start_upload()  # last: a constructor that raised above leaves no uploader thread behind

    def _checkpoint(self, filename: str | None, reason: str, **kwargs: Any) -> Checkpoint:
        handler = AsyncSaveHandler(self._pipeline, self.save_dir, filename=filename, reason=reason)
        checkpoint = Checkpoint(save_handler=handler, **kwargs)
        self._handlers[id(checkpoint)] = handler
        return checkpoint

    def _checkpoints(self) -> list[tuple[Checkpoint, AsyncSaveHandler]]:
        """The ``Checkpoint`` objects this saver has (final, key metric, interval), each with its handler."""
        built = (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint)
        return [(c, self._handlers[id(c)]) for c in built if c is not None]

    # -- MONAI's public surface ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[type-arg]
        """Resume the key-metric tracking list from a checkpoint saved with ``key_metric_save_state=True``."""
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict(state_dict)
        else:
            warnings.warn("no key metric checkpoint saver to resume the key metric tracking list.", stacklevel=2)

    def attach(self, engine: Engine) -> None:
        """Register the saver's handlers on ``engine`` (a trainer, validator or evaluator), as MONAI does.

        Also registers a flush at the end of the run, so every checkpoint is durable when ``engine.run`` returns,
        and the prewarm and preemption pieces where they are enabled.
        """
        if self._name is None:
            self.logger = engine.logger
        if self._final_checkpoint is not None:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self._key_metric_checkpoint is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.metrics_completed)
        if self._interval_checkpoint is not None:
            if self.epoch_level:
                engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.interval_completed)
            else:
                engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.interval_completed)
        if self._handlers:
            engine.add_event_handler(Events.STARTED, self._count_run)
            self._run_end_flush.attach(engine)  # after the final save, which COMPLETED runs first
            removed = remove_stale_temp_files(str(self.save_dir)) if idist.get_rank() == 0 else []
            if removed:
                self.logger.info(f"async_ckpt: removed {len(removed)} temporary file(s) of an interrupted run")
        if self._preemption is not None:
            self._preemption.install(engine)
        if self._prewarm is not None and idist.get_rank() == 0:  # only the saving rank stages
            self._prewarm.attach(engine)

    def _delete_previous_final_ckpt(self) -> None:
        if self._final_checkpoint is not None:
            item = drop_oldest(self._final_checkpoint)
            if item is not None:
                self._final_checkpoint.save_handler.remove(item.filename)
                self.logger.info(f"Deleted previous saved final checkpoint: {item.filename}")

    def completed(self, engine: Engine) -> None:
        """``COMPLETED``: queue the final checkpoint (it is made durable by the flush that follows)."""
        if not callable(self._final_checkpoint):
            raise AssertionError("Error: _final_checkpoint function not specified.")
        self._save_agreed(self._final_checkpoint, engine, final=True)
        self.logger.info(f"Train completed, saved final checkpoint: {self._final_path()}")

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """``EXCEPTION_RAISED``: write the final checkpoint, wait until it is durable, then re-raise ``e``.

        ``e`` is what leaves ``engine.run`` even if this or an earlier checkpoint failed: the failure is attached
        to it (a note on Python 3.11+) and logged at ERROR, never raised in its place.
        """
        if not callable(self._final_checkpoint):
            raise AssertionError("Error: _final_checkpoint function not specified.")
        try:
            self._delete_previous_final_ckpt()
            self._save(self._final_checkpoint, engine)
            self.wait()
        except Exception as failure:
            attach_failure(e, failure, self.logger)
        else:
            self.logger.info(f"Exception raised, saved the last checkpoint: {self._final_path()}")
        raise e

    def metrics_completed(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``: save if the key metric improved."""
        if not callable(self._key_metric_checkpoint):
            raise AssertionError("Error: _key_metric_checkpoint function not specified.")
        self._save_agreed(self._key_metric_checkpoint, engine)

    def interval_completed(self, engine: Engine) -> None:
        """Every ``save_interval`` epochs or iterations: save (or, with ``overflow="skip"``, maybe drop)."""
        if not callable(self._interval_checkpoint):
            raise AssertionError("Error: _interval_checkpoint function not specified.")
        if not self._save_agreed(self._interval_checkpoint, engine, may_skip=True):
            return
        if self.epoch_level:
            self.logger.info(f"Saved checkpoint at epoch: {engine.state.epoch}")
        else:
            self.logger.info(f"Saved checkpoint at iteration: {engine.state.iteration}")

    # -- asynchronous additions ----------------------------------------------------------------------------------
    @property
    def stats(self) -> Telemetry:
        """Per-save telemetry: training-thread blocking time, bytes, serialize/write/fsync and durable times."""
        return self._pipeline.telemetry

    def wait(self, timeout: float | None = None, *, barrier: bool = False) -> None:
        """Block until every checkpoint queued so far is durable, then raise any background failure.

        Args:
            timeout: seconds to wait at most (``None``: as long as it takes).
            barrier: in a distributed run, also make every rank learn of a failure on the saving rank (all ranks
                must call ``wait(barrier=True)`` at the same point).

        Raises:
            CheckpointWriteError: a queued checkpoint could not be written (the original is ``__cause__``).
            TimeoutError: ``timeout`` seconds passed first.
        """
        wait_durable(self._pipeline.wait, self.remote, timeout)
        self.raise_pending(sync=barrier)

    def close(self) -> None:
        """Wait for pending checkpoints, stop accepting new ones, and raise any background failure. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._preemption is not None:
            self._preemption.uninstall()
        try:
            self._pipeline.close()
        finally:
            if self.remote is not None:
                self.remote.close()
        self.raise_pending()

    def __enter__(self) -> AsyncCheckpointSaver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close; an exception leaving the ``with`` block stays the one raised (a write failure is attached)."""
        close_on_exit(self.close, exc, self.logger)

    def raise_pending(self, *, sync: bool = False) -> None:
        """Raise the first background failure not reported yet (and forget the rest of them).

        Before raising, the bookkeeping of the ``Checkpoint`` that queued the failed file is rolled back: the
        failed name leaves its top-N list and the files whose eviction was cancelled come back into it.

        Args:
            sync: in a distributed run, first agree with every rank (one small all-reduce on the saver's gloo
                group) whether some rank has a failure, so that all ranks raise together instead of the others
                hanging in their next collective. Every rank must call it at the same point, as ``wait(barrier=True)``
                does; the checkpoint events agree on their own.
        """
        failures, uploads = self._take_failures()
        failed = bool(failures or uploads)
        if sync:
            (failed,) = self._agreement.any(failed)
        if failed:
            _raise_failures(failures, uploads)

    # -- internals -------------------------------------------------------------------------------------------------
    def _save(self, checkpoint: Checkpoint, engine: Engine) -> None:
        handler = self._handlers[id(checkpoint)]
        handler.context = {"iteration": engine.state.iteration, "epoch": engine.state.epoch}
        handler.step = (self._runs.get(engine, 0), engine.state.iteration, engine.state.epoch)
        save_tracked(checkpoint, handler, engine)

    def _save_agreed(
        self, checkpoint: Checkpoint, engine: Engine, *, may_skip: bool = False, final: bool = False
    ) -> bool:
        """Save at an event that every rank reaches; every rank raises, skips or saves together. Returns whether saved.

        Two agreements (see :class:`~async_ckpt.core.agreement.RankAgreement`), each a no-op in a single process:
        first whether any rank has an unreported write failure (all raise) or the saving rank has no free slot
        with ``overflow="skip"`` (all skip, so that ignite's lists stay the same on every rank); then, after the
        saving rank staged, whether any rank raised while saving (all raise: that rank its own exception, the
        others :class:`SnapshotError`).
        """
        failures, uploads = self._take_failures()
        skip = may_skip and self.options.overflow == "skip" and not self._pipeline.has_free_slot()
        failed, skip = self._agreement.any(bool(failures or uploads), skip)
        if failed:
            _raise_failures(failures, uploads)
        if skip:
            self._pipeline.telemetry.skipped += 1
            _warn_skipped(engine, self.epoch_level, self.options.max_pending)
            return False
        error: Exception | None = None
        try:
            if final:
                self._delete_previous_final_ckpt()
            self._save(checkpoint, engine)
        except Exception as exc:
            error = exc
        (failed,) = self._agreement.any(error is not None)
        if error is not None:
            raise error
        if failed:
            reason = self._handlers[id(checkpoint)].reason
            raise SnapshotError(
                f"async_ckpt: another rank raised while taking the {reason} checkpoint (rank {idist.get_rank()} "
                "stops with it); see the exception raised on that rank for the cause."
            )
        return True

    def _take_failures(self) -> tuple[list[Failure], list[CheckpointWriteError]]:
        """The background failures not reported yet: the writes' (with their ``Checkpoint`` bookkeeping rolled
        back) and, with a URL ``save_dir``, the uploads' (the local files stay, so nothing is rolled back)."""
        failures = self._pipeline.take_failures()
        for failure in failures:
            roll_back(self._handlers, failure)
        return failures, self.remote.take_errors() if self.remote is not None else []

    def _save_on_preemption(self, engine: Engine) -> None:
        assert self._final_checkpoint is not None
        self._save_agreed(self._final_checkpoint, engine, final=True)
        self.logger.info(f"Preempted, saved the last checkpoint: {self._final_path()}")

    def _final_path(self) -> Any:
        if self._final_filename is not None:
            return os.path.join(self.save_dir, self._final_filename)
        assert self._final_checkpoint is not None
        return self._final_checkpoint.last_checkpoint

    def _count_run(self, engine: Engine) -> None:
        self._runs[engine] = self._runs.get(engine, 0) + 1


def _raise_failures(failures: list[Failure], uploads: list[CheckpointWriteError]) -> None:
    """Raise this rank's first write failure (counting the rest and the upload failures in ``more``), else its
    first upload failure, or, on a rank without any, that the saving rank had one."""
    if failures:
        raise failure_to_error(failures[0], more=len(failures) - 1 + len(uploads))
    if uploads:
        uploads[0].more = len(uploads) - 1
        raise uploads[0]
    raise CheckpointWriteError(
        f"async_ckpt: the saving rank could not write a checkpoint (rank {idist.get_rank()} stops with it); see "
        "the saving rank's CheckpointWriteError for the cause.",
        path="",
    )


def _warn_skipped(engine: Engine, epoch_level: bool, max_pending: int) -> None:
    step = engine.state.epoch if epoch_level else engine.state.iteration
    unit = "epoch" if epoch_level else "iteration"
    warnings.warn(
        f"async_ckpt: skipped the interval checkpoint at {unit} {step}: the writer is still busy with "
        f"{max_pending} earlier checkpoint(s) (overflow='skip'). Raise max_pending or save_interval, or use "
        "overflow='block'.",
        RuntimeWarning,
        stacklevel=4,
    )


def _check_state_dicts(save_dict: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` (as ignite) naming the first object, however deeply nested, without ``state_dict()``."""
    for path, obj in save_dict_objects(save_dict):
        if not callable(getattr(obj, "state_dict", None)):
            raise TypeError(
                f"save_dict{path} is a {type(obj).__name__}, which has no state_dict() method. Pass objects "
                "with state_dict()/load_state_dict() (modules, optimizers, schedulers, engines), or lists and dicts "
                "of them, or wrap the value."
            )


def _check_writable(save_dir: str) -> None:
    """Fail at construction, not at the first background write, if ``save_dir`` cannot take files."""
    if not os.path.isdir(save_dir):
        raise NotADirectoryError(f"save_dir={save_dir!r} exists but is not a directory; pass a directory path.")
    probe = FileStorage.temp_path(os.path.join(save_dir, "probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise PermissionError(
            f"save_dir={save_dir!r} is not writable ({exc.strerror}); fix its permissions or choose another directory."
        ) from exc
    os.close(fd)
    os.unlink(probe)


def _idist_max(values: torch.Tensor) -> torch.Tensor:
    """ignite's ``MAX`` all-reduce, for a distributed backend other than ``torch.distributed`` (XLA, Horovod)."""
    reduced = idist.all_reduce(values, op="MAX")
    assert isinstance(reduced, torch.Tensor)
    return reduced
