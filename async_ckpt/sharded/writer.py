"""DCP's file-system writer made durable, and the glue that hands it state already staged.

:class:`DurableFileSystemWriter` is DCP's ``FileSystemWriter`` with every file change made through a
:class:`~async_ckpt.sharded.storage.ShardedStorage` and the directory fsynced after each rank's shards, so that
when DCP's last step has gathered every rank's result, every shard is durable. :class:`_AlreadyStaged` is the
stager ``async_save`` gets: the saver copies the state itself, on the training thread, before the call.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Generator
from typing import Any

import torch
from torch.futures import Future as TorchFuture

from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.sharded._dcp import (
    AsyncStager,
    FileSystem,
    FileSystemWriter,
    Metadata,
    SavePlan,
    SavePlanner,
    StagingOptions,
    WriteResult,
)
from async_ckpt.sharded.storage import ShardedStorage, sharded_storage

__all__ = ["DurableFileSystemWriter", "StateDict", "default_staging"]

StateDict = dict[str, Any]


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
        self.storage = sharded_storage(storage, fsync=sync_files)
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


def default_staging() -> StagingOptions:
    """The staging of a save: a synchronous copy into buffers cached from one save to the next."""
    cuda = torch.cuda.is_available()
    # Synchronous copy (training-safe when ``save`` returns) into cached buffers, pinned where a GPU can use them.
    return StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
    )
