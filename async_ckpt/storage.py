"""Durable files: bytes go to a temporary name, are fsynced, and only then appear under their final name.

Invariant: a path that does not contain :data:`TMP_MARKER` is either absent or a complete file. Every write goes
to ``<final>.async_ckpt-tmp-<host>.<pid>.<token>`` in the same directory (so ``os.replace`` is an atomic rename on
the same file system, and the name never ends in ``.pt``), created with the permissions ``torch.save(path)`` would
give it (``0o666`` less the umask: group/other readable under the usual umask, unlike ``tempfile``'s ``0o600``),
flushed and fsynced, renamed onto the final name, and then the directory is fsynced so the rename itself survives a
power cut.

This module knows nothing about queues, tensors or ignite.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["TMP_MARKER", "FileStorage", "WriteTimes", "is_temp_name", "temp_owner"]

TMP_MARKER = ".async_ckpt-tmp-"
_HOST = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"


def temp_owner(name: str, fields: int = 3) -> tuple[str, int] | None:
    """(host, pid) of the process that created the temporary file ``name``, or ``None`` if it is not ours.

    Args:
        name: a file or directory name.
        fields: dot-separated fields after the marker: 3 for files (``<host>.<pid>.<token>``), 4 for the sharded
            saver's directories (``<host>.<pid>.<token>.<n>``), so neither cleanup takes the other's names.
    """
    if TMP_MARKER not in name:
        return None
    parts = name.rsplit(TMP_MARKER, 1)[1].split(".")
    if len(parts) != fields or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary files (and never a checkpoint)."""
    return TMP_MARKER in os.path.basename(name)


@dataclass
class WriteTimes:
    """Where the time of one durable write went, in seconds, and how many bytes were written."""

    nbytes: int = 0
    serialize_s: float = 0.0
    write_s: float = 0.0
    fsync_s: float = 0.0
    total_s: float = 0.0


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """glibc's ``sync_file_range`` (Linux), or ``None`` where it is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITE_BEHIND = 32 << 20


class _TimedFile:
    """A write-only file object that counts bytes and the time spent inside ``write``.

    With ``write_behind``, every 32 MiB it asks the kernel to start writing the new dirty pages to disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the disk works while the serializer is
    still producing bytes and the final ``fsync`` only waits for the tail. Durability still comes from that
    ``fsync``; this only moves disk work earlier.
    """

    def __init__(self, raw: BinaryIO, write_behind: bool = False) -> None:
        self._raw = raw
        self.nbytes = 0
        self.write_s = 0.0
        self.error: OSError | None = None
        self._behind = _SYNC_FILE_RANGE if write_behind else None
        self._kicked = 0  # bytes already handed to write-behind

    def write(self, data: bytes | bytearray | memoryview) -> int:
        t0 = time.perf_counter()
        view = memoryview(data).cast("B")
        step = _WRITE_BEHIND if self._behind is not None else max(view.nbytes, 1)
        try:
            for start in range(0, view.nbytes, step):  # slices, so write-behind starts inside one large record
                part = view[start : start + step]
                n = self._raw.write(part)
                self.nbytes += n if n is not None else part.nbytes
                self._write_behind()
        except OSError as exc:  # torch.save would re-raise it as an opaque RuntimeError: keep the real cause
            self.error = exc
            raise
        finally:
            self.write_s += time.perf_counter() - t0
        return view.nbytes

    def _write_behind(self) -> None:
        if self._behind is None or self.nbytes - self._kicked < _WRITE_BEHIND:
            return
        self._raw.flush()
        if self._behind(self._raw.fileno(), self._kicked, self.nbytes - self._kicked, _SYNC_FILE_RANGE_WRITE):
            self._behind = None  # refused here (e.g. some FUSE file systems): the final fsync does all the work
        self._kicked = self.nbytes

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class FileStorage:
    """Writes, links and removes files durably on a local (POSIX) file system.

    Subclass it to inject faults or delays in tests: every system call goes through a small overridable method.

    Args:
        fsync: fsync files and directories; without it a crash can lose a checkpoint that was reported durable.
    """

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync

    # -- overridable primitives --------------------------------------------------------------------------------
    def _fsync_fd(self, fd: int) -> None:
        os.fsync(fd)

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def _unlink(self, path: str) -> None:
        os.unlink(path)

    def _open(self, path: str) -> BinaryIO:
        # 0o666 & ~umask: the mode torch.save(path) gives MONAI's files (not tempfile's 0o600).
        # read-write: the serializer reads the zip directory back to patch in CRCs (see async_ckpt.serialize)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        return os.fdopen(fd, "wb", buffering=1 << 20)

    # -- operations --------------------------------------------------------------------------------------------
    @staticmethod
    def temp_path(final: str) -> str:
        """A fresh temporary path beside ``final`` that can never be mistaken for a checkpoint.

        The name carries the host and process id of the writer, so a cleanup after a crash can tell whose it is.
        """
        return f"{final}{TMP_MARKER}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"

    def sync_dir(self, directory: str) -> None:
        """fsync a directory so that renames and unlinks in it are durable."""
        if not self.fsync:
            return
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            self._fsync_fd(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: str, produce: Callable[[BinaryIO], object]) -> WriteTimes:
        """Create ``path`` with the bytes ``produce`` writes, atomically and durably.

        Args:
            path: the final file name.
            produce: writes the content into the file object it is given.

        Returns:
            Timings and size of the write.

        Raises:
            OSError: or whatever ``produce`` raises; the temporary file is removed and ``path`` is untouched.
        """
        t0 = time.perf_counter()
        tmp = self.temp_path(path)
        times = WriteTimes()
        try:
            with self._open(tmp) as raw:
                f = _TimedFile(raw, write_behind=self.fsync)
                try:
                    produce(f)  # type: ignore[arg-type]
                except Exception as exc:
                    if f.error is not None and f.error is not exc:
                        raise f.error from exc
                    raise
                t1 = time.perf_counter()
                raw.flush()
                times.write_s = f.write_s + (time.perf_counter() - t1)
                times.nbytes = f.nbytes
                times.serialize_s = (t1 - t0) - f.write_s
                t2 = time.perf_counter()
                if self.fsync:
                    self._fsync_fd(raw.fileno())
                times.fsync_s = time.perf_counter() - t2
            self._replace(tmp, path)
        except BaseException:
            self._discard(tmp)
            raise
        t3 = time.perf_counter()
        self._sync_committed(path)
        times.fsync_s += time.perf_counter() - t3
        times.total_s = time.perf_counter() - t0
        return times

    def link_atomic(self, src: str, dst: str) -> WriteTimes:
        """Make ``dst`` a durable second name of the complete file ``src`` (hard link, or a copy where links fail).

        Raises:
            OSError: ``src`` is missing or neither a link nor a copy could be made; ``dst`` is untouched.
        """
        t0 = time.perf_counter()
        tmp = self.temp_path(dst)
        try:
            self._link(src, tmp)
        except OSError:
            if not os.path.exists(src):
                raise
            return self.write_atomic(dst, lambda f: _copy_into(src, f))
        try:
            self._replace(tmp, dst)
        except BaseException:
            self._discard(tmp)
            raise
        self._sync_committed(dst)
        return WriteTimes(nbytes=0, total_s=time.perf_counter() - t0)

    def _sync_committed(self, path: str) -> None:
        """fsync the directory of a file just renamed into place.

        If that fails, the file is complete under its final name but the rename may not survive a power cut; the
        error is marked with ``committed_path`` so the caller can tell this from a write that left nothing.
        """
        try:
            self.sync_dir(os.path.dirname(path))
        except OSError as exc:
            exc.committed_path = path  # type: ignore[attr-defined]
            raise

    def remove(self, path: str) -> bool:
        """Remove ``path`` durably; a file that is already gone is not an error.

        Returns:
            Whether a file was removed.
        """
        try:
            self._unlink(path)
        except FileNotFoundError:
            return False
        self.sync_dir(os.path.dirname(path))
        return True

    def _discard(self, tmp: str) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:  # the original error matters more than a leftover temp file
            pass


def _copy_into(src: str, f: BinaryIO) -> None:
    with open(src, "rb") as r:
        while chunk := r.read(1 << 22):
            f.write(chunk)
