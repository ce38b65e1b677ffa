"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written in the background, published atomically.

Every rank writes its own shard of the state (its DTensor/FSDP shards; replicated tensors are written once, by
one rank) with ``dcp.async_save``; this module adds the guarantees of :mod:`async_ckpt` on top:

* **Atomic visibility.** A checkpoint is written into a directory whose name carries
  :data:`~async_ckpt.pipeline.storage.TMP_MARKER` (``<final><marker><host>.<pid>.<token>.<n>``, with rank 0's host and
  process id). It appears under its final name by one ``rename`` on rank 0, and only after every shard file, every
  rank's directory entries and the ``.metadata`` file have been fsynced. A directory without the marker is either
  absent or a complete checkpoint.
* **Completion known on rank 0 without extra collectives.** DCP's own last step gathers every rank's write result
  on rank 0 before rank 0 writes ``.metadata``; the writer below fsyncs each rank's directory inside that step. So
  when rank 0's upload future resolves without an error, every rank's shard is durable: rank 0 then publishes from
  the training thread (at the next iteration, save or ``wait()``).
* **Keep-last-N and top-N pruning** of whole checkpoint directories, after the replacement is visible. Interval
  checkpoints keep the latest N, scored checkpoints the best N by ``score_function`` (ignite's ``Checkpoint``
  rules and names), the final checkpoint the latest one. A pruned directory is first renamed to a temporary name,
  so it is never seen half-deleted under a checkpoint name. Rank 0's lists are authoritative: whether a scored
  checkpoint is saved is rank 0's decision, sent with the error agreement, so every rank enters DCP's collectives
  or none does.
* **Errors on every rank.** A failed write, a failed copy at the event or a failed publish is raised on every rank
  at the next save or ``wait()``: each rank contributes a flag (and, for a scored save, its score and decision)
  to one small all-gather, issued from the training thread on a gloo group of its own (DCP's collectives run in
  its upload thread on a second gloo group, so the two never interleave, nor do they interleave with the model's
  collectives).
* **A final checkpoint** at ``COMPLETED`` and on ``EXCEPTION_RAISED``; on an exception, without a collective on
  the training thread and with DCP's collectives on a third group whose timeout is ``exception_timeout``, since
  the other ranks may not have raised.

One save is in flight at a time: a save waits for the previous upload (backpressure) before it copies the state
into DCP's cached CPU buffers, which are reused from one checkpoint to the next.

Every rank must construct the saver (the constructor creates process groups) and call
``save``/``save_best``/``wait``/``close`` at the same points; with :meth:`ShardedCheckpointSaver.attach` that holds
as long as every rank attaches it.

The package needs torch>=2.9 (:data:`~async_ckpt.sharded._dcp.MIN_TORCH`: DCP's ``DefaultStager``,
``StagingOptions``, ``AsyncSaveResponse`` and ``async_save(async_stager=..., no_dist=...)``); on an older torch,
importing it raises an ``ImportError`` that says so.

This module holds the saver and its ignite handlers; its parts are modules of their own: the state adapters
(:mod:`~async_ckpt.sharded.state`), the directory operations and publish protocol
(:mod:`~async_ckpt.sharded.storage`), DCP's durable writer (:mod:`~async_ckpt.sharded.writer`), the names
(:mod:`~async_ckpt.sharded.naming`), the lists kept (:mod:`~async_ckpt.sharded.kept`, the core's retention), the
error agreement (:mod:`~async_ckpt.sharded.agreement`) and reading back (:mod:`~async_ckpt.sharded.loading`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from ignite.engine import Engine, Events

from async_ckpt.core.retention import Decision
from async_ckpt.errors import CheckpointWriteError, SnapshotError
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER, FileStorage, is_temp_name
from async_ckpt.sharded._dcp import MIN_TORCH as MIN_TORCH  # read from this module by code older than the split
from async_ckpt.sharded._dcp import (
    AsyncSaveResponse,
    DefaultSavePlanner,
    DefaultStager,
    StagingOptions,
    async_save,
)
from async_ckpt.sharded.agreement import ErrorAgreement
from async_ckpt.sharded.kept import SCORE, KeptCheckpoints, Kind, Lists
from async_ckpt.sharded.loading import prepare_save_dir
from async_ckpt.sharded.naming import CheckpointNames
from async_ckpt.sharded.state import as_dcp_items
from async_ckpt.sharded.storage import sharded_storage
from async_ckpt.sharded.writer import DurableFileSystemWriter, StateDict, _AlreadyStaged, default_staging

__all__ = ["ShardedCheckpointSaver"]

logger = logging.getLogger("async_ckpt")


@dataclass
class _InFlight:
    name: str
    final: str
    tmp: str
    future: Future[Any]
    kind: Kind
    decision: Decision  # which list it enters, and what it evicts, once published


def _same_score(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _check_arguments(
    save_dict: Mapping[str, Any],
    save_interval: int,
    n_saved: int | None,
    n_best: int | None,
    score_function: Callable[[Engine], float] | None,
    score_name: str | None,
    greater_or_equal: bool,
    file_prefix: str,
) -> None:
    """Raise at construction, with what to change, for arguments the saver cannot work with."""
    if not save_dict:
        raise ValueError("save_dict is empty: pass the objects to checkpoint, e.g. {'model': model}.")
    if save_interval < 0:
        raise ValueError(f"save_interval={save_interval} must be >= 0 (0 disables interval saves).")
    if n_saved is not None and n_saved < 1:
        raise ValueError(f"n_saved={n_saved} must be None or >= 1.")
    if n_best is not None and n_best < 1:
        raise ValueError(f"n_best={n_best} must be None or >= 1 (the number of best checkpoints to keep).")
    if score_function is not None and not callable(score_function):
        raise TypeError(f"score_function must be a callable (engine -> number), got {score_function!r}.")
    if score_function is None and score_name is not None:
        raise ValueError(
            f"score_name={score_name!r} only names the score; there is no score_function to compute it. Pass "
            f"score_function=Checkpoint.get_default_score_fn({score_name!r}) to rank checkpoints by "
            f"engine.state.metrics[{score_name!r}], or drop score_name."
        )
    if score_function is None and greater_or_equal:
        raise ValueError("greater_or_equal=True decides ties between scores: pass a score_function, or drop it.")
    for arg, value in (("file_prefix", file_prefix), ("score_name", score_name)):
        if value is not None and (os.sep in value or "/" in value or TMP_MARKER in value):
            raise ValueError(f"{arg}={value!r} cannot be part of a directory name: remove '/' and {TMP_MARKER!r}.")
    if score_name == "":
        raise ValueError("score_name='' would name directories 'checkpoint_=<score>': pass a name or None.")


class ShardedCheckpointSaver:
    """Checkpoint sharded (FSDP/DTensor) or replicated state with DCP in the background, per rank, atomically.

    Each checkpoint is a directory in ``save_dir`` named as ignite's ``Checkpoint`` (and so MONAI's
    ``CheckpointSaver``) names its files, without ``.pt``:

    * ``[<file_prefix>_]checkpoint_<epoch|iteration>=<n>`` for interval saves;
    * ``[<file_prefix>_]checkpoint_<score_name>=<score>`` (``[<file_prefix>_]checkpoint_<score>`` without
      ``score_name``) for scored saves, the score written as ignite writes it: an integer as it is, any other number
      with four decimals. Two scores that print the same share a name: the later save replaces the earlier one, as
      with ignite;
    * ``[<file_prefix>_]checkpoint_final_iteration=<n>`` for the final checkpoint (MONAI's name).

    A directory holds one file per rank and DCP's ``.metadata``. Load one with :func:`load`.

    Three lists are kept, and each is pruned only after a new checkpoint of its kind has been published: interval
    and manual saves (the latest ``n_saved``), scored saves (the best ``n_best``, by the rules of ignite's
    ``Checkpoint``) and the final checkpoint (the latest one). A directory that another list still holds is not
    deleted.

    Args:
        save_dir: directory that holds the checkpoint directories (on a file system every rank sees).
        save_dict: what to save, by key: modules (saved by parameter name, without DDP/FSDP prefixes),
            :class:`ModelOptimizerState`, objects with ``state_dict()``/``load_state_dict()`` (schedulers, ignite
            engines), or plain dicts. A bare optimizer is refused: wrap it with its model.
        file_prefix: prefix of the directory names.
        save_interval: with :meth:`attach`, save every N epochs/iterations; 0 disables interval saves.
        epoch_level: ``save_interval`` counts epochs (``True``) or iterations (``False``).
        n_saved: keep the latest N interval and manual (:meth:`save`) checkpoints (``None``: all). Older ones are
            deleted after the new one is visible.
        score_function: enables scored saves (ignite's ``score_function``): maps the engine to a number, higher is
            better, e.g. ``Checkpoint.get_default_score_fn("acc")`` (or ``(..., -1.0)`` for a loss). It must give
            the same number on every rank, so compute it from metrics that ignite reduces across ranks; a
            difference is raised on every rank. With :meth:`attach`, called at every ``EPOCH_COMPLETED``.
        score_name: the score's name in the directory names of scored saves.
        n_best: keep the best N scored checkpoints (``None``: all). A score enters while fewer are kept, or when it
            beats the worst one kept, which is deleted once the new one is visible.
        greater_or_equal: a score equal to the worst one kept also enters (the later checkpoint is kept).
        save_final: with :meth:`attach`, save the final checkpoint at ``COMPLETED`` (it replaces the previous
            final checkpoint), and on ``EXCEPTION_RAISED`` before the exception propagates: see
            :meth:`attach` for what happens when not every rank raised.
        fsync: fsync shard files, ``.metadata`` and directories (without it a crash can lose a checkpoint that was
            published).
        thread_count: DCP writer threads per rank.
        replicas_from_rank0: a tensor or value that every rank holds (DDP replicas, unsharded buffers, plain
            values) is written once; ``True`` takes rank 0's copy, as ignite and MONAI do. Replicas are not always
            identical (DDP's BatchNorm running statistics are each rank's own), and DCP's own default (``False``)
            takes each one from whichever rank balances the file sizes, which can mix ranks in one checkpoint.
            ``False`` spreads the writing over the ranks when the replicas are known to be identical.
        staging: DCP ``StagingOptions`` for the copy at the event (default: synchronous copy into cached CPU
            buffers, pinned when CUDA is available).
        resume: adopt the complete checkpoints already in ``save_dir`` whose names this saver would write, so that
            pruning continues across restarts: interval ones (oldest step first), scored ones (the best ``n_best``,
            with the score read back from the name, i.e. rounded to 4 decimals; the others are left alone) and
            final ones. Rank 0 reads the directory and sends the lists to the other ranks.
        timeout: timeout of the saver's collectives (DCP's and the error agreement); a rank that stops taking part
            makes the others fail after it instead of hanging.
        exception_timeout: on ``EXCEPTION_RAISED``, seconds to wait for the save in flight and the final
            checkpoint, so they can still be published (no collective is issued by the training thread then).
        storage: every change to ``save_dir`` (a :class:`ShardedStorage` subclass, for tests and special file
            systems; a plain :class:`~async_ckpt.pipeline.storage.FileStorage` subclass provides fsyncs, renames and
            unlinks, the rest is :class:`ShardedStorage`'s).

    Raises:
        ValueError: empty ``save_dict``; ``save_interval < 0``; ``n_saved`` or ``n_best < 1``; ``score_name`` or
            ``greater_or_equal`` without ``score_function``; a ``file_prefix`` or ``score_name`` that cannot be
            part of a directory name; ``exception_timeout < 0``.
        TypeError: a ``save_dict`` value cannot be checkpointed with DCP; ``score_function`` is not callable.
        OSError: ``save_dir`` cannot be created.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        save_dict: Mapping[str, Any],
        *,
        file_prefix: str = "",
        save_interval: int = 1,
        epoch_level: bool = True,
        n_saved: int | None = None,
        score_function: Callable[[Engine], float] | None = None,
        score_name: str | None = None,
        n_best: int | None = 1,
        greater_or_equal: bool = False,
        save_final: bool = False,
        fsync: bool = True,
        thread_count: int = 1,
        replicas_from_rank0: bool = True,
        staging: StagingOptions | None = None,
        resume: bool = False,
        timeout: timedelta = timedelta(minutes=30),
        exception_timeout: float = 300.0,
        storage: FileStorage | None = None,
    ) -> None:
        _check_arguments(
            save_dict, save_interval, n_saved, n_best, score_function, score_name, greater_or_equal, file_prefix
        )
        if exception_timeout < 0:
            raise ValueError(f"exception_timeout={exception_timeout} must be >= 0 (seconds).")
        self.save_dir = os.fspath(save_dir)
        self.save_dict = dict(save_dict)
        self._items = as_dcp_items(self.save_dict)
        self.file_prefix = file_prefix
        self.save_interval = save_interval
        self.epoch_level = epoch_level
        self.n_saved = n_saved
        self.score_function = score_function
        self.score_name = score_name
        self.n_best = n_best
        self.greater_or_equal = greater_or_equal
        self.save_final = save_final
        self.fsync = fsync
        self.thread_count = thread_count
        self.replicas_from_rank0 = replicas_from_rank0
        self.exception_timeout = exception_timeout
        self.storage = sharded_storage(storage, fsync=fsync)
        self._names = CheckpointNames(file_prefix, epoch_level, score_name)
        self._stager = DefaultStager(staging if staging is not None else default_staging())
        self._in_flight: _InFlight | None = None
        # The lists change only when a checkpoint has been published.
        self._kept = KeptCheckpoints(n_saved, n_best, greater_or_equal, scored=score_function is not None)
        self._counter = 0
        self._asides = 0
        self._closed = False

        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1
        self._dcp_group: dist.ProcessGroup | None = None
        ctl_group: dist.ProcessGroup | None = None
        self._exc_group: dist.ProcessGroup | None = None
        setup_error: BaseException | None = None
        adopted: Lists | None = None
        token = f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if self.rank == 0:
            try:
                prepare_save_dir(self.save_dir, self.storage)
                if resume:
                    adopted = self._names.kept_in(self.save_dir, score_function is not None, n_best)
            except OSError as exc:
                setup_error = exc
        if self._distributed:
            # Gloo groups, created in the same order on every rank: DCP's upload thread uses one, the training
            # thread's error agreement the other, so that collectives of different threads never share a group.
            self._dcp_group = dist.new_group(backend="gloo", timeout=timeout)
            ctl_group = dist.new_group(backend="gloo", timeout=timeout)
            if save_final:
                # DCP's collectives for the final checkpoint on EXCEPTION_RAISED, which a rank that did not raise
                # never joins: they give up after exception_timeout, and cannot pair with the other groups' calls.
                self._exc_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(exception_timeout, 1)))
            shared: list[Any] = [token, repr(setup_error) if setup_error is not None else None, adopted]
            dist.broadcast_object_list(shared, src=0, group=ctl_group)
            token, remote_error, adopted = shared
            if remote_error is not None and setup_error is None:
                raise OSError(f"rank 0 could not prepare save_dir={self.save_dir!r}: {remote_error}")
        if setup_error is not None:
            raise setup_error
        self._token = token
        self._errors = ErrorAgreement(self.rank, self.world_size, ctl_group, self._kept)
        if adopted is not None:
            self._kept.set_lists(adopted)

    # -- public API ------------------------------------------------------------------------------------------------
    @property
    def saved(self) -> list[str]:
        """Paths of the interval and manual checkpoints kept, oldest first.

        Rank 0's lists are authoritative; the other ranks' are the same after every ``save``/``save_best``/``wait``
        (when a failure is agreed, rank 0's lists replace theirs).
        """
        return [entry.path for entry in self._kept.interval.entries]

    @property
    def best(self) -> list[tuple[float, str]]:
        """``(score, path)`` of the scored checkpoints kept, worst first (the order of ignite's ``Checkpoint``)."""
        if self._kept.best is None:
            return []
        return [(entry.metrics[SCORE], entry.path) for entry in self._kept.best.ranked]

    @property
    def best_checkpoint(self) -> str | None:
        """Path of the kept checkpoint with the highest score."""
        best = self.best
        return best[-1][1] if best else None

    @property
    def final_checkpoint(self) -> str | None:
        """Path of the final checkpoint kept."""
        finals = self._kept.finals.entries
        return finals[-1].path if finals else None

    @property
    def last_checkpoint(self) -> str | None:
        """Path of the checkpoint this saver published last, of any kind. After ``resume``, and until this saver
        publishes one, the newest adopted interval checkpoint."""
        return self._kept.last

    def checkpoint_name(self, step: int) -> str:
        """Name of the interval checkpoint at ``step`` (an epoch or an iteration, after ``epoch_level``)."""
        return self._names.interval(step)

    def best_name(self, score: float) -> str:
        """Name of the scored checkpoint with ``score``."""
        return self._names.best(score)

    def final_name(self, iteration: int) -> str:
        """Name of the final checkpoint at ``iteration``."""
        return self._names.final(iteration)

    def attach(self, engine: Engine, score_engine: Engine | None = None) -> None:
        """Register the saver's handlers. Every rank must attach it, to the same engines.

        On ``engine`` (the trainer): an interval save every ``save_interval`` epochs/iterations; publishing of a
        finished save after each iteration; at ``COMPLETED``, the final checkpoint (with ``save_final``), then
        :meth:`wait`; on ``EXCEPTION_RAISED``, see below. With ``score_function``, :meth:`save_best` runs at every
        ``EPOCH_COMPLETED`` of ``score_engine`` (default: ``engine``; an evaluator must then run on every rank).
        Handlers of one event run in the order they were added: attach after the metrics or the validation that
        the score reads.

        On ``EXCEPTION_RAISED`` no rank issues a collective from the training thread, since the other ranks may
        not have raised. The saver waits up to ``exception_timeout`` seconds in all for the save in flight and
        publishes it if it succeeded. Then, with ``save_final``, it writes the final checkpoint and waits for it
        within the same time, then the exception propagates. DCP's collectives for it run on a process group of
        their own with ``exception_timeout`` as its timeout: when every rank raised, it completes and rank 0
        publishes it; when a rank did not raise, that rank never joins, the final checkpoint is not published (its
        temporary directory is removed by the next run) and DCP's thread fails after ``exception_timeout``. The
        final checkpoint is not tried when the exception comes from the saver's error agreement (a failed save, or
        a rank that could not copy its state or compute its score): every rank raised there, and each one skips
        it, so none is left waiting for the others.
        """
        if score_engine is not None and self.score_function is None:
            raise ValueError(
                "score_engine only triggers scored saves: pass a score_function too, or drop score_engine."
            )
        if self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self._interval_completed)
        if self.score_function is not None:
            (score_engine if score_engine is not None else engine).add_event_handler(
                Events.EPOCH_COMPLETED, self.save_best
            )
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._poll)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def save(self, name: str) -> None:
        """Start writing a checkpoint named ``name`` (a collective: every rank calls it with the same name).

        Waits for the previous save to finish uploading, copies the state into the staging buffers, agrees with
        every rank that nothing failed, and starts the upload. Returns when the state may be modified again. The
        checkpoint joins the interval list (pruned to ``n_saved``).

        Raises:
            CheckpointWriteError: an earlier save failed on some rank (raised on every rank; the rank that failed
                has the original as ``__cause__``).
            SnapshotError: this rank could not copy its state (the other ranks raise ``CheckpointWriteError``).
        """
        self._save(name, "interval", 0)

    def save_best(self, engine: Engine) -> str | None:
        """Score ``engine`` and save a checkpoint if the score enters the best ``n_best`` (a collective).

        Every rank calls it at the same point. It waits for the save in flight (so that a scored save still being
        written counts), scores ``engine`` with ``score_function``, and sends the score and rank 0's decision with
        the error agreement: every rank saves, or none does. A NaN score is never saved. The checkpoint this one
        displaces is deleted after this one is published.

        Returns:
            The name of the checkpoint started, or ``None`` when the score does not enter.

        Raises:
            ValueError: the score differs between ranks (on every rank), or is not a number.
            CheckpointWriteError, SnapshotError: as :meth:`save`.
        """
        self._check_usable()
        if self._kept.best is None:
            raise RuntimeError("save_best needs a score_function: pass one to ShardedCheckpointSaver.")
        self._settle(timeout=None)
        error: BaseException | None = self._errors.take_error()
        score: float = math.nan
        if error is None:
            try:
                score = self._score(engine)
            except Exception as exc:
                error = exc
        step = engine.state.iteration
        enters = error is None and not math.isnan(score) and self._plan("best", self.best_name(score), step, score).keep
        rows = self._errors.agree(error, what="the scored save", values=(score, float(enters)))
        if not all(_same_score(row[1], score) for row in rows):
            scores = ", ".join(f"rank {rank}: {row[1]!r}" for rank, row in enumerate(rows))
            raise ValueError(
                f"score_function gave different scores on the ranks ({scores}); the decision to save and the "
                "directory name must be the same on every rank. Compute the score from metrics that ignite reduces "
                "across ranks (engine.state.metrics), not from per-rank values."
            )
        if math.isnan(score):
            logger.warning("async_ckpt: the score is NaN; no scored checkpoint is saved")
            return None
        if not rows[0][2]:
            return None
        name = self.best_name(score)
        self._save(name, "best", step, score)
        return name

    def wait(self) -> None:
        """Wait for the save in flight, publish it, and raise any failure on every rank (a collective)."""
        self._check_usable()
        self._settle(timeout=None)
        self._errors.agree(self._errors.take_error(), what="the last checkpoint")

    def close(self) -> None:
        """``wait()``, then release the staging buffers. Idempotent; a collective the first time."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._stager.close()

    def __enter__(self) -> ShardedCheckpointSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ignite handlers -------------------------------------------------------------------------------------------
    def _interval_completed(self, engine: Engine) -> None:
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        self._save(self.checkpoint_name(step), "interval", step)

    def _poll(self, engine: Engine) -> None:
        self._settle(timeout=0.0)

    def _completed(self, engine: Engine) -> None:
        if self.save_final:
            self._save(self.final_name(engine.state.iteration), "final", engine.state.iteration)
        self.wait()

    def _exception_raised(self, engine: Engine, e: BaseException) -> None:
        # No collective here: the other ranks may not have raised. See attach().
        deadline = time.monotonic() + self.exception_timeout
        try:
            self._settle(timeout=self.exception_timeout)
            if self.save_final and not self._closed and e is not self._errors.last_error:
                self._save_final_on_exception(engine, deadline)
        except Exception:  # pragma: no cover - _settle latches errors instead of raising
            logger.exception("async_ckpt: could not settle the checkpoint in flight")
        raise e

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointWriteError("this ShardedCheckpointSaver was closed; create a new one.", path="")

    def _score(self, engine: Engine) -> float:
        assert self.score_function is not None
        score = self.score_function(engine)
        if not isinstance(score, numbers.Real):
            raise ValueError(
                f"score_function returned {score!r} ({type(score).__name__}); it must return a number, e.g. a "
                "float metric from engine.state.metrics."
            )
        return score

    def _plan(self, kind: Kind, name: str, step: int, score: float = math.nan) -> Decision:
        """What the lists would do with a checkpoint ``name`` of ``kind``, should it be published."""
        return self._kept.plan(kind, os.path.join(self.save_dir, name), step, score)

    def _save(self, name: str, kind: Kind, step: int, score: float = math.nan) -> None:
        self._check_usable()
        if os.sep in name or is_temp_name(name) or name in ("", ".", ".."):
            raise ValueError(f"invalid checkpoint name {name!r}")
        self._settle(timeout=None)
        error: BaseException | None = self._errors.take_error()
        staged: StateDict | None = None
        if error is None:
            try:
                staged = self._stage()
            except Exception as exc:
                error = SnapshotError(f"could not copy the state for checkpoint {name!r} on rank {self.rank}: {exc!r}")
                error.__cause__ = exc
        self._errors.agree(error, what=f"checkpoint {name!r}")
        assert staged is not None
        self._launch(name, staged, kind, self._plan(kind, name, step, score), self._dcp_group)

    def _save_final_on_exception(self, engine: Engine, deadline: float) -> None:
        """Write the final checkpoint and wait for it until ``deadline``, without a collective on this thread."""
        if self._in_flight is not None:
            logger.warning(
                "async_ckpt: no final checkpoint: the save in flight did not finish within exception_timeout=%ss",
                self.exception_timeout,
            )
            return
        name = self.final_name(engine.state.iteration)
        try:
            staged = self._stage()
        except Exception:
            logger.exception("async_ckpt: could not copy the state for the final checkpoint %r", name)
            return
        self._launch(name, staged, "final", self._plan("final", name, engine.state.iteration), self._exc_group)
        self._settle(timeout=max(0.0, deadline - time.monotonic()))
        if self._in_flight is not None:
            logger.warning(
                "async_ckpt: the final checkpoint %r did not finish within exception_timeout=%ss and is not "
                "published (a rank that did not raise does not take part in it)",
                name,
                self.exception_timeout,
            )
        elif self.rank == 0 and self.final_checkpoint == os.path.join(self.save_dir, name):
            logger.info("async_ckpt: saved the final checkpoint %r after an exception", name)

    def _stage(self) -> StateDict:
        state = {key: item.state_dict() if not isinstance(item, dict) else item for key, item in self._items.items()}
        staged = self._stager.stage(state)
        if isinstance(staged, Future):
            staged = staged.result()
        return staged

    def _launch(
        self, name: str, staged: StateDict, kind: Kind, decision: Decision, group: dist.ProcessGroup | None
    ) -> None:
        final = os.path.join(self.save_dir, name)
        tmp = f"{final}{TMP_MARKER}{self._token}.{self._counter}"
        self._counter += 1
        writer = DurableFileSystemWriter(tmp, self.storage, sync_files=self.fsync, thread_count=self.thread_count)
        try:
            result = async_save(
                staged,
                storage_writer=writer,
                process_group=group,
                async_stager=_AlreadyStaged(),
                planner=DefaultSavePlanner(dedup_save_to_lowest_rank=self.replicas_from_rank0),
                no_dist=not self._distributed,
            )
        except Exception as exc:  # raised here, it surfaces on every rank at the next save or wait()
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            result = failed
        future = result.upload_completion if isinstance(result, AsyncSaveResponse) else result
        self._in_flight = _InFlight(name, final, tmp, future, kind, decision)

    def _settle(self, timeout: float | None) -> None:
        """If the save in flight finished (waiting up to ``timeout``), publish it on rank 0 or latch its error."""
        job = self._in_flight
        if job is None or (timeout is not None and not job.future.done() and timeout <= 0):
            return
        try:
            job.future.result(timeout=timeout)
        except FutureTimeoutError:
            return
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if not job.future.done():
                raise  # interrupted while waiting (KeyboardInterrupt): the upload itself goes on
            self._in_flight = None
            self._errors.latch(job.final, exc, "write")
            if self.rank == 0:  # every rank's upload has resolved: nobody writes into it any more
                with contextlib.suppress(OSError):  # if not, the stale-temp cleanup of the next run removes it
                    self.storage.remove_tree(job.tmp)
            return
        self._in_flight = None
        self._publish(job)

    def _publish(self, job: _InFlight) -> None:
        if self.rank == 0:
            try:
                self._rename_into_place(job.tmp, job.final)
            except OSError as exc:
                self._errors.latch(job.final, exc, "publish")
                return
            logger.info("async_ckpt: sharded checkpoint %s is durable and visible", job.final)
        for old in self._kept.record(job.kind, job.decision):
            if self.rank == 0:
                try:
                    self._remove_checkpoint(old)
                except OSError as exc:
                    self._errors.latch(old, exc, "remove")

    def _rename_into_place(self, tmp: str, final: str) -> None:
        self.storage.publish_dir(tmp, final, aside=f"{final}{TMP_MARKER}{self._token}.old{self._counter}")

    def _remove_checkpoint(self, path: str) -> None:
        aside = f"{path}{TMP_MARKER}{self._token}.del{self._asides}"
        self._asides += 1
        self.storage.remove_dir(path, aside)
