"""Every change the sharded saver makes to ``save_dir``, and its publish protocol, through one storage object.

:class:`ShardedStorage` extends the core's :class:`~async_ckpt.pipeline.storage.FileStorage` with the directory
operations of sharded checkpoints: creating, publishing (a temporary directory renamed onto its final name, by an
atomic swap where the file system has one, else by two renames with the old one set aside) and removing whole
checkpoint directories, so that no directory is ever seen half-written or half-deleted under a checkpoint name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import sys

from async_ckpt.pipeline.storage import FileStorage

__all__ = ["AsideNotRestoredError", "ShardedStorage", "sharded_storage"]


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


def sharded_storage(storage: FileStorage | None, fsync: bool) -> ShardedStorage:
    """``storage`` as a :class:`ShardedStorage` (a new one for ``None``; a plain ``FileStorage`` wrapped)."""
    if storage is None:
        return ShardedStorage(fsync=fsync)
    return storage if isinstance(storage, ShardedStorage) else _Delegating(storage)
