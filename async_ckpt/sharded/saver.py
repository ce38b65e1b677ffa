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

The module needs torch>=2.9 (:data:`MIN_TORCH`: DCP's ``DefaultStager``, ``StagingOptions``,
``AsyncSaveResponse`` and ``async_save(async_stager=..., no_dist=...)``); on an older torch, importing it raises
an ``ImportError`` that says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import inspect
import io
import logging
import math
import numbers
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from torch.futures import Future as TorchFuture

from async_ckpt.core.resume import _pid_alive
from async_ckpt.core.retention import Decision, Entry
from async_ckpt.errors import CheckpointWriteError, SnapshotError
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER, FileStorage, is_temp_name, temp_owner
from async_ckpt.sharded.kept import SCORE, KeptCheckpoints, Kind, Lists

try:  # torch 2.9 brought DefaultStager, StagingOptions, AsyncSaveResponse and async_save(async_stager=, no_dist=)
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter
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
except ImportError as exc:
    if not dist.is_available():
        raise ImportError(
            f"async_ckpt.sharded needs torch.distributed, which this build of torch ({torch.__version__}) lacks: "
            "install a torch build with distributed support, or save with AsyncCheckpointSaver."
        ) from exc
    raise ImportError(
        f"async_ckpt.sharded needs torch>=2.9 (found {torch.__version__}): {exc}. Upgrade torch "
        "(pip install 'torch>=2.9'), or save with AsyncCheckpointSaver, which works with torch>=2.3."
    ) from exc

MIN_TORCH = (2, 9)
"""The oldest torch release that has every DCP API this module uses."""

_MISSING = {"async_stager", "no_dist", "planner", "process_group", "storage_writer"} - set(
    inspect.signature(async_save).parameters
)
if _MISSING:
    raise ImportError(
        f"async_ckpt.sharded needs torch>=2.9 (found {torch.__version__}): torch.distributed.checkpoint.async_save "
        f"has no argument {', '.join(sorted(_MISSING))}. Upgrade torch (pip install 'torch>=2.9'), or save with "
        "AsyncCheckpointSaver, which works with torch>=2.3."
    )

__all__ = [
    "DurableFileSystemWriter",
    "ModelOptimizerState",
    "ShardedCheckpointSaver",
    "ShardedStorage",
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


# -- storage: every change to save_dir through one overridable method ----------------------------------------------
class ShardedStorage(FileStorage):
    """A :class:`~async_ckpt.pipeline.storage.FileStorage` with the directory operations of the sharded saver.

    Every file-system call by which the saver, and DCP's writer inside :class:`DurableFileSystemWriter`, changes
    ``save_dir`` goes through one small overridable method: ``_replace``, ``_unlink``, ``_fsync_fd`` and
    ``sync_dir`` (inherited), and ``_mkdir``, ``_rmdir``, ``_exchange``, ``_open_new`` and ``_file_written`` here.
    Tests subclass it to record or fail them; a file system without ``renameat2(RENAME_EXCHANGE)`` is one whose
    ``_exchange`` returns ``False``. Not thread-safe beyond what the file system gives: DCP's writer threads each
    write their own files through it.
    """

    # -- overridable primitives --------------------------------------------------------------------------------
    def _mkdir(self, path: str) -> None:
        os.mkdir(path)

    def _rmdir(self, path: str) -> None:
        os.rmdir(path)

    def _exchange(self, a: str, b: str) -> bool:
        """Swap two existing paths atomically; ``False`` where the file system cannot (then nothing changed)."""
        return _rename_exchange(a, b)

    def _open_new(self, path: str) -> io.FileIO:
        """Create (or truncate) a file of a checkpoint directory for writing."""
        return io.FileIO(path, "w")

    def _file_written(self, path: str, fd: int, sync: bool) -> None:
        """A file of a checkpoint directory is complete (flushed, not yet closed): fsync it with ``sync``."""
        if sync:
            self._fsync_fd(fd)

    # -- operations --------------------------------------------------------------------------------------------
    def remove_tree(self, path: str) -> None:
        """Delete a directory tree, or a file; a path that is already gone is fine."""
        if not os.path.isdir(path) or os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                self._unlink(path)
            return
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    self._unlink(os.path.join(root, name))
            for name in dirs:
                child = os.path.join(root, name)
                if os.path.islink(child):  # os.walk lists a link to a directory among the directories
                    self._unlink(child)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        self._rmdir(child)
        with contextlib.suppress(FileNotFoundError):
            self._rmdir(path)

    def publish_dir(self, tmp: str, final: str, aside: str) -> None:
        """Rename the complete directory ``tmp`` onto ``final`` durably, replacing a directory already there.

        Where the file system cannot swap two names atomically, the old ``final`` is first renamed to ``aside`` (a
        temporary name), so for a moment neither name is ``final``. If the second rename fails, the old directory
        is renamed back before the error propagates; after a crash between the two, :func:`remove_stale_temp_dirs`
        puts it back. A ``tmp`` that could not be renamed is deleted (it was never published).

        Raises:
            OSError: ``tmp`` is not published; the old ``final`` is still there (:class:`AsideNotRestoredError` if
                it could not be renamed back: it is at ``aside`` then).
        """
        if not os.path.lexists(final):
            self._rename_or_discard(tmp, final)
            self.sync_dir(os.path.dirname(final))
            return
        if not self._exchange(tmp, final):
            self._replace(final, aside)
            try:
                self._rename_or_discard(tmp, final)
            except OSError as exc:
                try:
                    self._replace(aside, final)
                except OSError as again:
                    raise AsideNotRestoredError(final, aside, exc, again) from exc
                raise
            tmp = aside
        self.sync_dir(os.path.dirname(final))
        self.remove_tree(tmp)  # the replaced checkpoint, now under a temporary name

    def _rename_or_discard(self, tmp: str, final: str) -> None:
        try:
            self._replace(tmp, final)
        except OSError:
            with contextlib.suppress(OSError):  # if it stays, the next start's stale-temp cleanup deletes it
                self.remove_tree(tmp)
            raise

    def remove_dir(self, path: str, aside: str) -> None:
        """Delete the checkpoint directory ``path``: renamed to the temporary ``aside`` first (durably), so it is
        never seen half-deleted under a checkpoint name. A ``path`` that is gone already is fine."""
        try:
            self._replace(path, aside)
        except FileNotFoundError:
            return
        self.sync_dir(os.path.dirname(path))
        self.remove_tree(aside)


class AsideNotRestoredError(OSError):
    """A replacement failed between its two renames, and the old checkpoint could not be renamed back either: it
    is under a temporary name (``aside``), which the next start of a sharded saver on the directory renames back."""

    def __init__(self, final: str, aside: str, error: OSError, again: OSError) -> None:
        super().__init__(
            error.errno,
            f"{error.strerror or error!r}; the previous checkpoint could not be renamed back ({again!r}): it is at "
            f"{aside!r}, and the next start of a ShardedCheckpointSaver on this directory puts it back",
        )
        self.final, self.aside = final, aside


class _Delegating(ShardedStorage):
    """A plain :class:`FileStorage` given as ``storage``: its primitives, and the defaults for the others."""

    def __init__(self, inner: FileStorage) -> None:
        super().__init__(fsync=inner.fsync)
        self.inner = inner

    def _fsync_fd(self, fd: int) -> None:
        self.inner._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self.inner._replace(src, dst)

    def _unlink(self, path: str) -> None:
        self.inner._unlink(path)

    def sync_dir(self, directory: str) -> None:
        self.inner.sync_dir(directory)


def _sharded_storage(storage: FileStorage | None, fsync: bool) -> ShardedStorage:
    if storage is None:
        return ShardedStorage(fsync=fsync)
    return storage if isinstance(storage, ShardedStorage) else _Delegating(storage)


# -- durable DCP writer ----------------------------------------------------------------------------------------------
class _DurableStream(io.BufferedWriter):
    """A file of a checkpoint directory; on close it is flushed and handed to the storage (which fsyncs it)."""

    def __init__(self, storage: ShardedStorage, path: str, sync: bool) -> None:
        super().__init__(storage._open_new(path), buffer_size=1 << 20)
        self._storage, self._path, self._sync = storage, path, sync

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
            self._storage._file_written(self._path, self.fileno(), self._sync)
        finally:
            super().close()


class _StorageFileSystem(FileSystem):
    """DCP's local file system, with every change made through a :class:`ShardedStorage`."""

    def __init__(self, storage: ShardedStorage, sync: bool) -> None:
        super().__init__()
        self.storage, self.sync = storage, sync

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if mode != "wb":  # reading: DCP's writer never does, but keep the base behaviour
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = _DurableStream(self.storage, os.fspath(path), self.sync)
        try:
            yield stream
        finally:
            stream.close()  # DCP closes it itself; closing twice is a no-op

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        self.storage._replace(os.fspath(path), os.fspath(new_path))

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        # Every rank asks for the (new) checkpoint directory: one of them creates it.
        if not os.path.isdir(path):
            try:
                self.storage._mkdir(os.fspath(path))
            except FileExistsError:
                if not os.path.isdir(path):
                    raise

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.storage._unlink(os.fspath(path))


class DurableFileSystemWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that also fsyncs the checkpoint directory, and changes files only through a
    :class:`ShardedStorage`.

    DCP fsyncs every file it writes (``sync_files``) but not the directory that holds them, so after a power cut a
    complete-looking checkpoint could miss a shard's directory entry. Each rank fsyncs the directory after its
    shard files (inside DCP's write step, before rank 0 gathers the results), and rank 0 again after it renamed
    ``.metadata`` into place. Files are created, fsynced (with ``sync_files``), renamed and removed by the storage,
    so that a test can see every operation.

    Args:
        path: the (temporary) checkpoint directory.
        storage: makes every change (and is where tests inject faults); a plain ``FileStorage`` is used for the
            operations it has.
        kwargs: passed to ``FileSystemWriter``; ``sync_files`` (default ``True``) is done by ``storage``.
    """

    def __init__(self, path: str | os.PathLike[str], storage: FileStorage, **kwargs: Any) -> None:
        sync_files = bool(kwargs.pop("sync_files", True))
        super().__init__(path, sync_files=False, **kwargs)  # the storage fsyncs each file, before it is closed
        self.storage = _sharded_storage(storage, fsync=sync_files)
        self.fs = _StorageFileSystem(self.storage, sync=sync_files)

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


def remove_stale_temp_dirs(save_dir: str, storage: ShardedStorage | None = None) -> list[str]:
    """Recover from a sharded saver of a finished or crashed run: put back what a replacement left aside, and
    delete the temporary checkpoint directories it left behind.

    A replacement without an atomic swap renames the old checkpoint aside (``<final><marker>...old<n>``) before it
    renames the new one onto ``<final>``; after a crash between the two, ``<final>`` is missing and the aside copy,
    if complete, is renamed back (the new one was never published). Every other temporary name is deleted. Only
    names written on this host by a process that no longer runs are touched (the process is rank 0's); those of a
    live process or of another host sharing the directory are left alone.

    Returns:
        The paths deleted.
    """
    storage = storage if storage is not None else ShardedStorage()
    try:
        names = sorted(os.listdir(save_dir))
    except FileNotFoundError:
        return []
    stale: list[str] = []
    for name in names:
        owner = temp_owner(name, fields=4)
        if owner is not None and owner[0] == _HOST and not _pid_alive(owner[1]):
            stale.append(name)
    for name in list(stale):
        final_name, _, owner_fields = name.rpartition(TMP_MARKER)
        final, path = os.path.join(save_dir, final_name), os.path.join(save_dir, name)
        if not owner_fields.rsplit(".", 1)[-1].startswith("old") or os.path.lexists(final):
            continue
        if not _holds_checkpoint(path):
            continue
        try:
            storage._replace(path, final)
            storage.sync_dir(save_dir)
        except OSError as exc:
            logger.warning("async_ckpt: could not put %s back under its name %s: %r", path, final, exc)
            stale.remove(name)  # not deleted either: it may be the only copy of that checkpoint
            continue
        stale.remove(name)
        logger.warning(
            "async_ckpt: %s is back: a replacement of it was interrupted between its two renames (the new checkpoint "
            "under that name was never published)",
            final,
        )
    removed: list[str] = []
    for name in stale:
        path = os.path.join(save_dir, name)
        try:
            storage.remove_tree(path)
        except OSError as exc:
            logger.warning("async_ckpt: could not remove the stale temporary %s: %r", path, exc)
            continue
        removed.append(path)
    return removed


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete DCP checkpoint: not a temporary name, ``.metadata`` readable, every file
    it refers to present and long enough."""
    path = os.fspath(path)
    return not is_temp_name(path) and _holds_checkpoint(path)


def _holds_checkpoint(path: str) -> bool:
    """Whether the directory ``path`` (whatever its name) holds a complete DCP checkpoint."""
    if not os.path.isfile(os.path.join(path, METADATA_NAME)):
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
    kind: Kind
    decision: Decision  # which list it enters, and what it evicts, once published


@dataclass
class _Latched:
    path: str
    error: BaseException
    stage: str  # "write", "stage", "publish" or "remove"


def _format_score(score: float) -> str:
    """A score as ignite's ``Checkpoint`` writes it into a name: integers as they are, other numbers to 4 decimals."""
    return f"{score}" if isinstance(score, numbers.Integral) else f"{score:.4f}"


def _parse_score(text: str) -> float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def _same_score(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


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
        if exception_timeout < 0:
            raise ValueError(f"exception_timeout={exception_timeout} must be >= 0 (seconds).")
        self.save_dir = os.fspath(save_dir)
        self.save_dict = dict(save_dict)
        self._items = _items(self.save_dict)
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
        self.storage = _sharded_storage(storage, fsync=fsync)
        self._stager = DefaultStager(staging if staging is not None else _default_staging())
        self._in_flight: _InFlight | None = None
        self._latched: list[_Latched] = []
        # The lists change only when a checkpoint has been published.
        self._kept = KeptCheckpoints(n_saved, n_best, greater_or_equal, scored=score_function is not None)
        self._counter = 0
        self._asides = 0
        self._agreement_error: BaseException | None = None  # what the last failed agreement raised on this rank
        self._closed = False

        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1
        self._dcp_group: dist.ProcessGroup | None = None
        self._ctl_group: dist.ProcessGroup | None = None
        self._exc_group: dist.ProcessGroup | None = None
        setup_error: BaseException | None = None
        adopted: Lists | None = None
        token = f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if self.rank == 0:
            try:
                os.makedirs(self.save_dir, exist_ok=True)
                self.storage.sync_dir(os.path.dirname(os.path.abspath(self.save_dir)))
                removed = remove_stale_temp_dirs(self.save_dir, self.storage)
                if removed:
                    logger.info("async_ckpt: removed %d temporary checkpoint(s) of an interrupted run", len(removed))
                if resume:
                    adopted = self._adopt()
            except OSError as exc:
                setup_error = exc
        if self._distributed:
            # Gloo groups, created in the same order on every rank: DCP's upload thread uses one, the training
            # thread's error agreement the other, so that collectives of different threads never share a group.
            self._dcp_group = dist.new_group(backend="gloo", timeout=timeout)
            self._ctl_group = dist.new_group(backend="gloo", timeout=timeout)
            if save_final:
                # DCP's collectives for the final checkpoint on EXCEPTION_RAISED, which a rank that did not raise
                # never joins: they give up after exception_timeout, and cannot pair with the other groups' calls.
                self._exc_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(exception_timeout, 1)))
            shared: list[Any] = [token, repr(setup_error) if setup_error is not None else None, adopted]
            dist.broadcast_object_list(shared, src=0, group=self._ctl_group)
            token, remote_error, adopted = shared
            if remote_error is not None and setup_error is None:
                raise OSError(f"rank 0 could not prepare save_dir={self.save_dir!r}: {remote_error}")
        if setup_error is not None:
            raise setup_error
        self._token = token
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
        return self._name("epoch" if self.epoch_level else "iteration", str(step))

    def best_name(self, score: float) -> str:
        """Name of the scored checkpoint with ``score``."""
        return self._name(self.score_name, _format_score(score))

    def final_name(self, iteration: int) -> str:
        """Name of the final checkpoint at ``iteration``."""
        return self._name("final_iteration", str(iteration))

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
        error: BaseException | None = self._take_error()
        score: float = math.nan
        if error is None:
            try:
                score = self._score(engine)
            except Exception as exc:
                error = exc
        step = engine.state.iteration
        enters = error is None and not math.isnan(score) and self._plan("best", self.best_name(score), step, score).keep
        rows = self._agree(error, what="the scored save", values=(score, float(enters)))
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
            if self.save_final and not self._closed and e is not self._agreement_error:
                self._save_final_on_exception(engine, deadline)
        except Exception:  # pragma: no cover - _settle latches errors instead of raising
            logger.exception("async_ckpt: could not settle the checkpoint in flight")
        raise e

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointWriteError("this ShardedCheckpointSaver was closed; create a new one.", path="")

    def _name(self, score_name: str | None, score: str) -> str:
        """ignite's default name for a checkpoint scored ``score`` (``Checkpoint.setup_filename_pattern``), without
        the extension."""
        pattern = Checkpoint.setup_filename_pattern(
            with_prefix=bool(self.file_prefix),
            with_score=True,
            with_score_name=score_name is not None,
            with_global_step=False,
        )
        return pattern.removesuffix(".{ext}").format(
            filename_prefix=self.file_prefix, name="checkpoint", score_name=score_name, score=score
        )

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
        error: BaseException | None = self._take_error()
        staged: StateDict | None = None
        if error is None:
            try:
                staged = self._stage()
            except Exception as exc:
                error = SnapshotError(f"could not copy the state for checkpoint {name!r} on rank {self.rank}: {exc!r}")
                error.__cause__ = exc
        self._agree(error, what=f"checkpoint {name!r}")
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
            self._latched.append(_Latched(job.final, exc, "write"))
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
                self._latched.append(_Latched(job.final, exc, "publish"))
                return
            logger.info("async_ckpt: sharded checkpoint %s is durable and visible", job.final)
        for old in self._kept.record(job.kind, job.decision):
            if self.rank == 0:
                try:
                    self._remove_checkpoint(old)
                except OSError as exc:
                    self._latched.append(_Latched(old, exc, "remove"))

    def _rename_into_place(self, tmp: str, final: str) -> None:
        self.storage.publish_dir(tmp, final, aside=f"{final}{TMP_MARKER}{self._token}.old{self._counter}")

    def _remove_checkpoint(self, path: str) -> None:
        aside = f"{path}{TMP_MARKER}{self._token}.del{self._asides}"
        self._asides += 1
        self.storage.remove_dir(path, aside)

    def _take_error(self) -> CheckpointWriteError | None:
        latched, self._latched = self._latched, []
        if not latched:
            return None
        first = latched[0]
        verb = {"publish": "publish", "remove": "remove the old checkpoint"}.get(first.stage, "write")
        more = len(latched) - 1
        extra = f" ({more} more failure(s) after it)" if more else ""
        intact = "Earlier checkpoints are intact."
        if isinstance(first.error, AsideNotRestoredError):
            intact = f"Until the next start, the earlier checkpoint under that name is at {first.error.aside!r}."
        err = CheckpointWriteError(
            f"async_ckpt could not {verb} sharded checkpoint {first.path!r} (rank {self.rank}): "
            f"{_describe(first.error)}{extra}. {intact}",
            path=first.path,
            more=more,
        )
        err.__cause__ = first.error
        return err

    def _agree(self, error: BaseException | None, what: str, values: Sequence[float] = ()) -> list[list[float]]:
        """All ranks learn whether any of them failed; every rank raises together (the failing ones their own).

        ``values`` (as many on every rank) travel with the flag: returns each rank's ``[flag, *values]``, by rank.
        When some rank failed, rank 0's lists replace the others' before the raise: a publish fails on rank 0
        alone, after the other ranks had entered the checkpoint into their lists.
        """
        rows = [[float(error is not None), *map(float, values)]]
        if self._ctl_group is not None:
            mine = torch.tensor(rows[0], dtype=torch.float64)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine, group=self._ctl_group)
            rows = [t.tolist() for t in gathered]
        failed = sum(1 for row in rows if row[0])
        if failed and self._ctl_group is not None:
            lists: list[Any] = [self._kept.lists()]
            dist.broadcast_object_list(lists, src=0, group=self._ctl_group)
            self._kept.set_lists(lists[0])
        if failed:
            self._agreement_error = (
                error
                if error is not None
                else CheckpointWriteError(
                    f"async_ckpt: {failed} other rank(s) failed at {what} (rank {self.rank} stops with them); "
                    "see their error for the cause.",
                    path="",
                )
            )
            raise self._agreement_error
        return rows

    def _adopt(self) -> Lists:
        """The lists of the checkpoints in ``save_dir`` whose names this saver would write (for ``resume``)."""
        try:
            names = [n for n in os.listdir(self.save_dir) if not is_temp_name(n)]
        except FileNotFoundError:
            names = []
        names = [n for n in names if os.path.isfile(os.path.join(self.save_dir, n, METADATA_NAME))]
        step_name = "epoch" if self.epoch_level else "iteration"
        interval = [Entry(path, int(step)) for step, path in self._matching(names, step_name, r"\d+")]
        finals = [Entry(path, int(step)) for step, path in self._matching(names, "final_iteration", r"\d+")]
        best: list[Entry] = []
        if self._kept.best is not None:
            scored = self._matching(names, self.score_name, r"[-+]?(?:\d+(?:\.\d*)?|inf)")
            if self.n_best is not None and len(scored) > self.n_best:
                logger.info(
                    "async_ckpt: resume keeps the best %d scored checkpoints; leaving %s alone",
                    self.n_best,
                    [path for _, path in scored[: -self.n_best]],
                )
                scored = scored[-self.n_best :]
            best = [Entry(path, 0, {SCORE: score}) for score, path in scored]
        return interval, best, finals, interval[-1].path if interval else None

    def _matching(self, names: Iterable[str], score_name: str | None, number: str) -> list[tuple[float, str]]:
        """``(score, path)`` of the ``names`` this saver would give a checkpoint scored under ``score_name``, by
        score (``number`` is the regular expression of a score)."""
        before, after = self._name(score_name, "\0").split("\0")
        pattern = re.compile(rf"{re.escape(before)}({number}){re.escape(after)}")
        found: list[tuple[float, str]] = []
        for name in names:
            m = pattern.fullmatch(name)
            if m is not None:
                found.append((_parse_score(m.group(1)), os.path.join(self.save_dir, name)))
        return sorted(found, key=lambda item: item[0])
