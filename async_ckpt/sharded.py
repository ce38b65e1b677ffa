"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written in the background, published atomically.

Every rank writes its own shard of the state (its DTensor/FSDP shards; replicated tensors are written once, by
one rank) with ``dcp.async_save``; this module adds the guarantees of :mod:`async_ckpt` on top:

* **Atomic visibility.** A checkpoint is written into a directory whose name carries
  :data:`~async_ckpt.storage.TMP_MARKER` (``<final><marker><host>.<pid>.<token>.<n>``, with rank 0's host and
  process id). It appears under its final name by one ``rename`` on rank 0, and only after every shard file, every
  rank's directory entries and the ``.metadata`` file have been fsynced. A directory without the marker is either
  absent or a complete checkpoint.
* **Completion known on rank 0 without extra collectives.** DCP's own last step gathers every rank's write result
  on rank 0 before rank 0 writes ``.metadata``; the writer below fsyncs each rank's directory inside that step. So
  when rank 0's upload future resolves without an error, every rank's shard is durable: rank 0 then publishes from
  the training thread (at the next iteration, save or ``wait()``).
* **Keep-last-N pruning** of whole checkpoint directories, after the replacement is visible. A pruned directory is
  first renamed to a temporary name, so it is never seen half-deleted under a checkpoint name.
* **Errors on every rank.** A failed write, a failed copy at the event or a failed publish is raised on every rank
  at the next save or ``wait()``: each rank contributes a flag to one small all-reduce, issued from the training
  thread on a gloo group of its own (DCP's collectives run in its upload thread on a second gloo group, so the two
  never interleave, nor do they interleave with the model's collectives).

One save is in flight at a time: a save waits for the previous upload (backpressure) before it copies the state
into DCP's cached CPU buffers, which are reused from one checkpoint to the next.

Every rank must construct the saver (the constructor creates process groups) and call ``save``/``wait``/``close``
at the same points; with :meth:`ShardedCheckpointSaver.attach` that holds as long as every rank attaches it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future as TorchFuture

from async_ckpt.errors import CheckpointWriteError, SnapshotError
from async_ckpt.resume import _pid_alive
from async_ckpt.storage import _HOST, TMP_MARKER, FileStorage, is_temp_name, temp_owner

__all__ = [
    "DurableFileSystemWriter",
    "ModelOptimizerState",
    "ShardedCheckpointSaver",
    "is_complete",
    "latest_sharded_checkpoint",
    "load",
]

logger = logging.getLogger("async_ckpt")

StateDict = dict[str, Any]

METADATA_NAME = ".metadata"


# -- state adapters --------------------------------------------------------------------------------------------------
class ModelOptimizerState:
    """A model and its optimizer(s) as one DCP ``Stateful`` item, keyed by parameter names.

    Uses ``torch.distributed.checkpoint.state_dict.get_state_dict``/``set_state_dict``: the keys carry no
    ``module.`` prefix of DDP/FSDP wrappers, FSDP/DTensor parameters stay sharded, and a fresh optimizer's state is
    initialized before loading (a bare ``optimizer.state_dict()`` of a fresh optimizer has no entries to load into).

    Args:
        model: the (possibly wrapped) model.
        optimizers: its optimizer, or several.
        options: passed to ``get_state_dict``/``set_state_dict`` (e.g. ``StateDictOptions(strict=False)``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )


class _ModuleState:
    """A module as a DCP ``Stateful`` item (wrapper prefixes removed, sharded parameters kept sharded)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict)


def _as_item(key: str, value: Any) -> Any:
    """What DCP gets for ``save_dict[key]``: a ``Stateful`` object or a plain dict (loaded in place)."""
    if isinstance(value, torch.optim.Optimizer):
        raise TypeError(
            f"save_dict[{key!r}] is an optimizer on its own; its state_dict() is keyed by parameter index and a fresh "
            "optimizer has no state to load into. Pass ModelOptimizerState(model, optimizer) instead."
        )
    if isinstance(value, torch.nn.Module):
        return _ModuleState(value)
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return value
    if isinstance(value, dict):
        return value
    raise TypeError(
        f"save_dict[{key!r}] is a {type(value).__name__}: pass modules, ModelOptimizerState, objects with "
        "state_dict()/load_state_dict() (schedulers, ignite engines) or plain dicts."
    )


def _items(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _as_item(key, value) for key, value in save_dict.items()}


# -- durable DCP writer ----------------------------------------------------------------------------------------------
class DurableFileSystemWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that also fsyncs the checkpoint directory.

    DCP fsyncs every file it writes (``sync_files``) but not the directory that holds them, so after a power cut a
    complete-looking checkpoint could miss a shard's directory entry. Each rank fsyncs the directory after its
    shard files (inside DCP's write step, before rank 0 gathers the results), and rank 0 again after it renamed
    ``.metadata`` into place.

    Args:
        path: the (temporary) checkpoint directory.
        storage: provides ``sync_dir`` (and is where tests inject faults).
        kwargs: passed to ``FileSystemWriter``.
    """

    def __init__(self, path: str | os.PathLike[str], storage: FileStorage, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.storage = storage

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        fut = super().write_data(plan, planner)
        fut.wait()  # FileSystemWriter writes synchronously; this only surfaces its error here
        self.storage.sync_dir(str(self.path))
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        super().finish(metadata, results)
        self.storage.sync_dir(str(self.path))


class _AlreadyStaged(AsyncStager):
    """The stager ``dcp.async_save`` gets: the state was copied on the training thread before the call."""

    _synchronize_after_execute = False

    def stage(self, state_dict: StateDict) -> StateDict:
        return state_dict

    def synchronize_staging(self) -> None:
        return None

    def close(self) -> None:
        return None


def _default_staging() -> StagingOptions:
    cuda = torch.cuda.is_available()
    # Synchronous copy (training-safe when ``save`` returns) into cached buffers, pinned where a GPU can use them.
    return StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
    )


# -- file system helpers ---------------------------------------------------------------------------------------------
def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _remove_tree(path: str) -> None:
    """Delete a directory tree, or a file; a path that is already gone is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale_temp_dirs(save_dir: str) -> list[str]:
    """Delete the temporary checkpoint directories that a sharded saver of a finished or crashed run left behind.

    Only names written on this host by a process that no longer runs are removed (the process is rank 0's); those
    of a live process or of another host sharing the directory are left alone.
    """
    removed: list[str] = []
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        owner = temp_owner(name, fields=4)
        if owner is None or owner[0] != _HOST or _pid_alive(owner[1]):
            continue
        path = os.path.join(save_dir, name)
        try:
            _remove_tree(path)
        except OSError as exc:
            logger.warning("async_ckpt: could not remove the stale temporary %s: %r", path, exc)
            continue
        removed.append(path)
    return removed


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete DCP checkpoint: not a temporary name, ``.metadata`` readable, every file
    it refers to present and long enough."""
    path = os.fspath(path)
    if is_temp_name(path) or not os.path.isfile(os.path.join(path, METADATA_NAME)):
        return False
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception:
        return False
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in ends.items():
        try:
            if os.path.getsize(os.path.join(path, rel)) < end:
                return False
        except OSError:
            return False
    return True


def latest_sharded_checkpoint(save_dir: str | os.PathLike[str], *, full_check: bool = False) -> str | None:
    """The newest published checkpoint directory in ``save_dir`` (by the time its ``.metadata`` was written).

    Temporary directories are never returned. With ``full_check``, directories that :func:`is_complete` rejects are
    skipped (a published directory is complete unless something else modified it).
    """
    save_dir = os.fspath(save_dir)
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return None
    found: list[tuple[int, str]] = []
    for name in names:
        path = os.path.join(save_dir, name)
        if is_temp_name(name):
            continue
        try:
            mtime = os.stat(os.path.join(path, METADATA_NAME)).st_mtime_ns
        except OSError:
            continue
        found.append((mtime, path))
    for _, path in sorted(found, reverse=True):
        if not full_check or is_complete(path):
            return path
    return None


def load(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load a checkpoint written by :class:`ShardedCheckpointSaver` into ``state`` in place.

    ``state`` has the keys the checkpoint was saved with and the same kinds of values (modules,
    :class:`ModelOptimizerState`, objects with ``load_state_dict``, plain dicts), built for the current run: its
    tensors must already be allocated with their target placement. DCP reads for each rank only what its shards
    need, so the world size and the sharding may differ from the run that saved (resharding on load). Without an
    initialized process group (or with one process) the checkpoint is read in this process alone.

    Must be called by every rank of the process group at the same time.
    """
    items = _items(state)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    dcp_load(items, checkpoint_id=os.fspath(path), process_group=process_group, no_dist=not distributed)


def _describe(error: BaseException) -> str:
    """``repr`` of an error; for DCP's ``CheckpointException``, the original error of each rank that failed."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            original = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            parts.append(f"rank {rank}: {original!r}")
        return f"{type(error).__name__} in DCP's {error.args[0] if error.args else 'save'} step ({'; '.join(parts)})"
    return repr(error)


# -- the saver -------------------------------------------------------------------------------------------------------
@dataclass
class _InFlight:
    name: str
    final: str
    tmp: str
    future: Future[Any]


@dataclass
class _Latched:
    path: str
    error: BaseException
    stage: str  # "write", "stage", "publish" or "remove"


class ShardedCheckpointSaver:
    """Checkpoint sharded (FSDP/DTensor) or replicated state with DCP in the background, per rank, atomically.

    Each checkpoint is a directory ``<save_dir>/<file_prefix>_checkpoint_<epoch|iteration>=<n>`` (MONAI/ignite's
    interval names without ``.pt``) holding one file per rank and DCP's ``.metadata``. Load one with :func:`load`.

    Args:
        save_dir: directory that holds the checkpoint directories (on a file system every rank sees).
        save_dict: what to save, by key: modules (saved by parameter name, without DDP/FSDP prefixes),
            :class:`ModelOptimizerState`, objects with ``state_dict()``/``load_state_dict()`` (schedulers, ignite
            engines), or plain dicts. A bare optimizer is refused: wrap it with its model.
        file_prefix: prefix of the directory names.
        save_interval: with :meth:`attach`, save every N epochs/iterations; 0 disables interval saves.
        epoch_level: ``save_interval`` counts epochs (``True``) or iterations (``False``).
        n_saved: keep the latest N checkpoints of this saver (``None``: all). Older ones are deleted after the new
            one is visible.
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
        resume: adopt the complete checkpoints already in ``save_dir`` whose names this saver would write (oldest
            step first), so that ``n_saved`` pruning continues across restarts.
        timeout: timeout of the saver's collectives (DCP's and the error agreement); a rank that stops taking part
            makes the others fail after it instead of hanging.
        exception_timeout: on ``EXCEPTION_RAISED``, seconds to wait for the save in flight so it can still be
            published (no collective is issued then).
        storage: directory fsyncs, renames and removals (a :class:`~async_ckpt.storage.FileStorage` subclass; for
            tests and special file systems).

    Raises:
        ValueError: empty ``save_dict``, ``save_interval < 0`` or ``n_saved < 1``.
        TypeError: a ``save_dict`` value cannot be checkpointed with DCP.
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
        fsync: bool = True,
        thread_count: int = 1,
        replicas_from_rank0: bool = True,
        staging: StagingOptions | None = None,
        resume: bool = False,
        timeout: timedelta = timedelta(minutes=30),
        exception_timeout: float = 300.0,
        storage: FileStorage | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict is empty: pass the objects to checkpoint, e.g. {'model': model}.")
        if save_interval < 0:
            raise ValueError(f"save_interval={save_interval} must be >= 0 (0 disables interval saves).")
        if n_saved is not None and n_saved < 1:
            raise ValueError(f"n_saved={n_saved} must be None or >= 1.")
        self.save_dir = os.fspath(save_dir)
        self.save_dict = dict(save_dict)
        self._items = _items(self.save_dict)
        self.file_prefix = file_prefix
        self.save_interval = save_interval
        self.epoch_level = epoch_level
        self.n_saved = n_saved
        self.fsync = fsync
        self.thread_count = thread_count
        self.replicas_from_rank0 = replicas_from_rank0
        self.exception_timeout = exception_timeout
        self.storage = storage if storage is not None else FileStorage(fsync=fsync)
        self._stager = DefaultStager(staging if staging is not None else _default_staging())
        self._in_flight: _InFlight | None = None
        self._latched: list[_Latched] = []
        self._saved: list[str] = []
        self._counter = 0
        self._closed = False

        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1
        self._dcp_group: dist.ProcessGroup | None = None
        self._ctl_group: dist.ProcessGroup | None = None
        setup_error: BaseException | None = None
        token = f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if self.rank == 0:
            try:
                os.makedirs(self.save_dir, exist_ok=True)
                self.storage.sync_dir(os.path.dirname(os.path.abspath(self.save_dir)))
                removed = remove_stale_temp_dirs(self.save_dir)
                if removed:
                    logger.info("async_ckpt: removed %d temporary checkpoint(s) of an interrupted run", len(removed))
            except OSError as exc:
                setup_error = exc
        if self._distributed:
            # Two gloo groups, created in the same order on every rank: DCP's upload thread uses one, the training
            # thread's error agreement the other, so that collectives of different threads never share a group.
            self._dcp_group = dist.new_group(backend="gloo", timeout=timeout)
            self._ctl_group = dist.new_group(backend="gloo", timeout=timeout)
            shared: list[Any] = [token, repr(setup_error) if setup_error is not None else None]
            dist.broadcast_object_list(shared, src=0, group=self._ctl_group)
            token, remote_error = shared
            if remote_error is not None and setup_error is None:
                raise OSError(f"rank 0 could not prepare save_dir={self.save_dir!r}: {remote_error}")
        if setup_error is not None:
            raise setup_error
        self._token = token
        if resume:
            self._saved = self._existing_checkpoints()

    # -- public API ------------------------------------------------------------------------------------------------
    @property
    def saved(self) -> list[str]:
        """Paths of this saver's published checkpoints, oldest first (authoritative on rank 0)."""
        return list(self._saved)

    @property
    def last_checkpoint(self) -> str | None:
        return self._saved[-1] if self._saved else None

    def checkpoint_name(self, step: int) -> str:
        unit = "epoch" if self.epoch_level else "iteration"
        prefix = f"{self.file_prefix}_" if self.file_prefix else ""
        return f"{prefix}checkpoint_{unit}={step}"

    def attach(self, engine: Engine) -> None:
        """Save every ``save_interval`` epochs/iterations, publish finished saves after each iteration, flush and
        agree on errors at ``COMPLETED``. Every rank must attach the saver to its trainer."""
        if self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self._interval_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._poll)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def save(self, name: str) -> None:
        """Start writing a checkpoint named ``name`` (a collective: every rank calls it with the same name).

        Waits for the previous save to finish uploading, copies the state into the staging buffers, agrees with
        every rank that nothing failed, and starts the upload. Returns when the state may be modified again.

        Raises:
            CheckpointWriteError: an earlier save failed on some rank (raised on every rank; the rank that failed
                has the original as ``__cause__``).
            SnapshotError: this rank could not copy its state (the other ranks raise ``CheckpointWriteError``).
        """
        self._check_usable()
        if os.sep in name or is_temp_name(name) or name in ("", ".", ".."):
            raise ValueError(f"invalid checkpoint name {name!r}")
        self._settle(timeout=None)
        error: BaseException | None = self._take_error()
        staged: StateDict | None = None
        if error is None:
            try:
                staged = self._stage()
            except Exception as exc:
                error = SnapshotError(f"could not copy the state for checkpoint {name!r} on rank {self.rank}: {exc!r}")
                error.__cause__ = exc
        self._agree(error, what=name)
        assert staged is not None
        self._launch(name, staged)

    def wait(self) -> None:
        """Wait for the save in flight, publish it, and raise any failure on every rank (a collective)."""
        self._check_usable()
        self._settle(timeout=None)
        self._agree(self._take_error(), what="the last checkpoint")

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
        self.save(self.checkpoint_name(step))

    def _poll(self, engine: Engine) -> None:
        self._settle(timeout=0.0)

    def _completed(self, engine: Engine) -> None:
        self.wait()

    def _exception_raised(self, engine: Engine, e: BaseException) -> None:
        # No collective here: the other ranks may not have raised. Publish what is already durable, then re-raise.
        try:
            self._settle(timeout=self.exception_timeout)
        except Exception:  # pragma: no cover - _settle latches errors instead of raising
            logger.exception("async_ckpt: could not settle the checkpoint in flight")
        raise e

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointWriteError("this ShardedCheckpointSaver was closed; create a new one.", path="")

    def _stage(self) -> StateDict:
        state = {key: item.state_dict() if not isinstance(item, dict) else item for key, item in self._items.items()}
        staged = self._stager.stage(state)
        if isinstance(staged, Future):
            staged = staged.result()
        return staged

    def _launch(self, name: str, staged: StateDict) -> None:
        final = os.path.join(self.save_dir, name)
        tmp = f"{final}{TMP_MARKER}{self._token}.{self._counter}"
        self._counter += 1
        writer = DurableFileSystemWriter(tmp, self.storage, sync_files=self.fsync, thread_count=self.thread_count)
        try:
            result = async_save(
                staged,
                storage_writer=writer,
                process_group=self._dcp_group,
                async_stager=_AlreadyStaged(),
                planner=DefaultSavePlanner(dedup_save_to_lowest_rank=self.replicas_from_rank0),
                no_dist=not self._distributed,
            )
        except Exception as exc:  # raised here, it surfaces on every rank at the next save or wait()
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            result = failed
        future = result.upload_completion if isinstance(result, AsyncSaveResponse) else result
        self._in_flight = _InFlight(name, final, tmp, future)

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
            self._latched.append(_Latched(job.final, exc, "write"))
            if self.rank == 0:  # every rank's upload has resolved: nobody writes into it any more
                with contextlib.suppress(OSError):  # if not, the stale-temp cleanup of the next run removes it
                    _remove_tree(job.tmp)
            return
        self._in_flight = None
        self._publish(job)

    def _publish(self, job: _InFlight) -> None:
        if self.rank == 0:
            try:
                self._rename_into_place(job.tmp, job.final)
            except OSError as exc:
                self._latched.append(_Latched(job.final, exc, "publish"))
                return
            logger.info("async_ckpt: sharded checkpoint %s is durable and visible", job.final)
        if job.final in self._saved:
            self._saved.remove(job.final)
        self._saved.append(job.final)
        while self.n_saved is not None and len(self._saved) > self.n_saved:
            old = self._saved.pop(0)
            if self.rank == 0:
                try:
                    self._remove_checkpoint(old)
                except OSError as exc:
                    self._latched.append(_Latched(old, exc, "remove"))

    def _rename_into_place(self, tmp: str, final: str) -> None:
        if os.path.lexists(final):
            if not _rename_exchange(tmp, final):  # no atomic swap here: a short window without ``final``
                aside = f"{final}{TMP_MARKER}{self._token}.old{self._counter}"
                self.storage._replace(final, aside)
                self.storage._replace(tmp, final)
                tmp = aside
            self.storage.sync_dir(self.save_dir)
            _remove_tree(tmp)  # the replaced checkpoint, now under a temporary name
            return
        self.storage._replace(tmp, final)
        self.storage.sync_dir(self.save_dir)

    def _remove_checkpoint(self, path: str) -> None:
        aside = f"{path}{TMP_MARKER}{self._token}.del{self._counter}"
        try:
            self.storage._replace(path, aside)
        except FileNotFoundError:
            return
        self.storage.sync_dir(self.save_dir)
        _remove_tree(aside)

    def _take_error(self) -> CheckpointWriteError | None:
        latched, self._latched = self._latched, []
        if not latched:
            return None
        first = latched[0]
        verb = {"publish": "publish", "remove": "remove the old checkpoint"}.get(first.stage, "write")
        more = len(latched) - 1
        extra = f" ({more} more failure(s) after it)" if more else ""
        err = CheckpointWriteError(
            f"async_ckpt could not {verb} sharded checkpoint {first.path!r} (rank {self.rank}): "
            f"{_describe(first.error)}{extra}. Earlier checkpoints are intact.",
            path=first.path,
            more=more,
        )
        err.__cause__ = first.error
        return err

    def _agree(self, error: BaseException | None, what: str) -> None:
        """All ranks learn whether any of them failed; every rank raises together (the failing ones their own)."""
        failed = 0
        if self._ctl_group is not None:
            flag = torch.tensor([int(error is not None)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self._ctl_group)
            failed = int(flag.item())
        if error is not None:
            raise error
        if failed:
            raise CheckpointWriteError(
                f"async_ckpt: {failed} other rank(s) could not write {what} (rank {self.rank} stops with them); "
                "see their CheckpointWriteError for the cause.",
                path="",
            )

    def _existing_checkpoints(self) -> list[str]:
        unit = "epoch" if self.epoch_level else "iteration"
        prefix = f"{self.file_prefix}_" if self.file_prefix else ""
        pattern = re.compile(rf"^{re.escape(prefix)}checkpoint_{unit}=(\d+)$")
        found: list[tuple[int, str]] = []
        try:
            names = os.listdir(self.save_dir)
        except FileNotFoundError:  # not shared with rank 0: nothing to adopt (rank 0's list is what counts)
            names = []
        for name in names:
            m = pattern.match(name)
            path = os.path.join(self.save_dir, name)
            if m is not None and os.path.isfile(os.path.join(path, METADATA_NAME)):
                found.append((int(m.group(1)), path))
        return [path for _, path in sorted(found)]
