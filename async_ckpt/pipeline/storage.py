"""Durable files: bytes go to a temporary name, are fsynced, and only then appear under their final name.

Invariant: a path that does not contain :data:`TMP_MARKER` is either absent or a complete file. Every write goes
to ``<final>.async_ckpt-tmp-<host>.<pid>.<token>`` in the same directory (so ``os.replace`` is an atomic rename on
the same file system, and the name never ends in ``.pt``), created with the permissions ``torch.save(path)`` would
give it (``0o666`` less the umask: group/other readable under the usual umask, unlike ``tempfile``'s ``0o600``),
flushed and fsynced, renamed onto the final name, and then the directory is fsynced so the rename itself survives a
power cut.

Direct I/O: large, 4 KiB-aligned spans of a write whose source memory is 4 KiB aligned go to the disk through a
second descriptor of the same temporary file opened with ``O_DIRECT`` (no copy into the page cache, no writeback
later); everything else (zip headers, the pickle, record tails, small files) goes through the ordinary buffered
descriptor, which is flushed before each direct write so the two never share a page. The commit protocol is the
same (``O_DIRECT`` does not replace fsync). A directory whose file system refuses ``O_DIRECT`` (``EINVAL`` at open
or at the first write) is remembered and written buffered from then on (``direct_io="auto"``).

This module knows nothing about queues, tensors or ignite.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

__all__ = [
    "DIRECT_ALIGNMENT",
    "TMP_MARKER",
    "DirectIO",
    "FileStorage",
    "WriteTimes",
    "check_local_dir",
    "is_temp_name",
    "temp_owner",
]

logger = logging.getLogger("async_ckpt")

DirectIO = Literal["auto", True, False]
DIRECT_ALIGNMENT = 4096  # file offset, length and memory address of every O_DIRECT write: safe for 512 B and 4 KiB
_O_DIRECT: int | None = getattr(os, "O_DIRECT", None)
_DIRECT_MIN = 256 << 10  # smaller aligned spans go buffered: a flush and a seek per record cost more than the copy
_DIRECT_CHUNK = 64 << 20  # bytes per O_DIRECT pwrite (bounds the pages pinned at once)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)  # how file systems say "no O_DIRECT here"

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


def check_local_dir(directory: str, argument: str) -> None:
    """Refuse a URL where a local directory is needed, instead of creating a directory named ``s3:``.

    Raises:
        ValueError: ``directory`` looks like ``scheme://...``.
    """
    scheme, sep, _ = directory.partition("://")
    if sep and scheme and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(
            f"{argument}={directory!r} is a URL; this argument needs a local (or mounted) directory. For object "
            "stores, pass the URL as the directory of a Checkpointer (it stages locally and uploads: docs/remote.md)."
        )


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
    direct_bytes: int = 0  # part of ``nbytes`` written with O_DIRECT

    @property
    def io_path(self) -> str:
        """``"direct"`` if any bytes bypassed the page cache (O_DIRECT), else ``"buffered"``."""
        return "direct" if self.direct_bytes else "buffered"


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


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable layout), to read the address of a possibly read-only buffer."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _address(view: memoryview) -> int:
    """The memory address of the first byte of the contiguous buffer ``view``."""
    buf = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(buf), 0)
    try:
        return buf.buf or 0
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(buf))


class _DirectSink:
    """The ``O_DIRECT`` descriptor of one temporary file, opened on the first large aligned write.

    Args:
        storage: whose primitives open and write (``_open_direct``, ``_pwrite_direct``) and which remembers a
            refusal for the directory.
        path: the temporary file, already open on the buffered descriptor.
    """

    def __init__(self, storage: FileStorage, path: str) -> None:
        self._storage = storage
        self._path = path
        self._fd: int | None = None
        self.disabled = False
        self.nbytes = 0

    def write(self, view: memoryview, offset: int) -> int:
        """Write the aligned ``view`` at ``offset`` with O_DIRECT; return the bytes written (0: refused).

        On a refusal (``EINVAL`` and the like) nothing of ``view`` was written: the caller writes it buffered, and
        this file (and, with ``direct_io="auto"``, its directory) is written buffered from then on.

        Raises:
            OSError: a real write error (no space, I/O error), or a refusal with ``direct_io=True``.
        """
        if self.disabled:
            return 0
        done = 0
        try:
            if self._fd is None:
                self._fd = self._storage._open_direct(self._path)
            while done < view.nbytes:
                n = self._storage._pwrite_direct(self._fd, view[done : done + _DIRECT_CHUNK], offset + done)
                if n <= 0:
                    raise OSError(
                        errno.EIO, f"O_DIRECT write of {self._path!r} wrote nothing at offset {offset + done}"
                    )
                done += n
                if n % DIRECT_ALIGNMENT:  # a short, unaligned write: let the buffered descriptor do the rest
                    break
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            self.disabled = True
            self._storage._direct_refused(self._path, exc)
        self.nbytes += done
        return done

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class _TimedFile:
    """A write-only file object that counts bytes and the time spent inside ``write``.

    With ``write_behind``, every 32 MiB it asks the kernel to start writing the new dirty pages to disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the disk works while the serializer is
    still producing bytes and the final ``fsync`` only waits for the tail. Durability still comes from that
    ``fsync``; this only moves disk work earlier.

    With ``direct``, the 4 KiB-aligned span of a large write whose memory is 4 KiB aligned goes to the file with
    O_DIRECT straight from that memory; the buffered file is flushed first and repositioned after, so bytes before
    and after the span (in other pages) go through the page cache in file order. ``direct_alignment`` tells the
    serializer to lay records out on 4 KiB boundaries (0 when there is no direct path).
    """

    def __init__(self, raw: BinaryIO, write_behind: bool = False, direct: _DirectSink | None = None) -> None:
        self._raw = raw
        self.nbytes = 0
        self.write_s = 0.0
        self.error: OSError | None = None
        self._behind = _SYNC_FILE_RANGE if write_behind else None
        self._kicked = 0  # bytes already handed to write-behind
        self._direct = direct
        self.direct_alignment = DIRECT_ALIGNMENT if direct is not None else 0
        self._pos = raw.tell() if direct is not None else 0  # file offset of the next byte (direct path only)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        t0 = time.perf_counter()
        view = memoryview(data).cast("B")
        try:
            if self._direct is not None and not self._direct.disabled and view.nbytes >= _DIRECT_MIN:
                self._write_direct(view)
            else:
                self._write_buffered(view)
        except OSError as exc:  # torch.save would re-raise it as an opaque RuntimeError: keep the real cause
            self.error = exc
            raise
        finally:
            self.write_s += time.perf_counter() - t0
        return view.nbytes

    def _write_buffered(self, view: memoryview) -> None:
        step = _WRITE_BEHIND if self._behind is not None else max(view.nbytes, 1)
        for start in range(0, view.nbytes, step):  # slices, so write-behind starts inside one large record
            part = view[start : start + step]
            n = self._raw.write(part)
            self.nbytes += n if n is not None else part.nbytes
            self._write_behind()
        self._pos += view.nbytes

    def _write_direct(self, view: memoryview) -> None:
        assert self._direct is not None
        head = -self._pos % DIRECT_ALIGNMENT  # bytes up to the next aligned file offset
        span = (view.nbytes - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        if span < _DIRECT_MIN or _address(view[head:]) % DIRECT_ALIGNMENT:
            self._write_buffered(view)  # unaligned memory: this write goes buffered, never through a copy
            return
        if head:
            self._write_buffered(view[:head])
        self._raw.flush()  # every byte before the span is in the page cache, in pages the span does not touch
        done = self._direct.write(view[head : head + span], self._pos)
        if done:
            self._pos += done
            self.nbytes += done
            self._raw.seek(self._pos)
        if head + done < view.nbytes:
            self._write_buffered(view[head + done :])

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
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class FileStorage:
    """Writes, links and removes files durably on a local (POSIX) file system.

    Subclass it to inject faults or delays in tests: every system call goes through a small overridable method.

    Thread-safety: one instance may be used by several threads; the only shared state is the set of directories
    that refused ``O_DIRECT``, updated under a lock.

    Args:
        fsync: fsync files and directories; without it a crash can lose a checkpoint that was reported durable.
        direct_io: write the large aligned spans of checkpoints with ``O_DIRECT`` (see the module docstring).
            ``"auto"`` (default) falls back to buffered writes, once per directory with an INFO log line, where the
            file system refuses it; ``True`` raises instead (for a setup that must not fill the page cache);
            ``False`` never uses it. Either way a record whose memory is not 4 KiB aligned, or smaller than 256
            KiB, is written buffered (never copied into an aligned buffer): that is not a refusal.

    Raises:
        ValueError: ``direct_io`` is not one of the three values, or is ``True`` on a platform without
            ``O_DIRECT``.
    """

    def __init__(self, fsync: bool = True, direct_io: DirectIO = "auto") -> None:
        if direct_io not in ("auto", True, False) or not isinstance(direct_io, (str, bool)):
            raise ValueError(f"direct_io must be 'auto', True or False, got {direct_io!r}.")
        if direct_io is True and _O_DIRECT is None:
            raise ValueError("direct_io=True, but this platform has no O_DIRECT; use direct_io='auto' or False.")
        self.fsync = fsync
        self.direct_io: DirectIO = direct_io
        self._direct_lock = threading.Lock()
        self._no_direct: set[str] = set()  # directories whose file system refused O_DIRECT

    # -- overridable primitives --------------------------------------------------------------------------------
    def _fsync_fd(self, fd: int) -> None:
        os.fsync(fd)

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def _unlink(self, path: str) -> None:
        os.unlink(path)

    def _mkdir(self, path: str) -> None:
        os.mkdir(path, 0o777)

    def _open(self, path: str) -> BinaryIO:
        # 0o666 & ~umask: the mode torch.save(path) gives MONAI's files (not tempfile's 0o600).
        # read-write: the serializer reads the zip directory back to patch in CRCs (see async_ckpt.pipeline.serialize)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        return os.fdopen(fd, "wb", buffering=1 << 20)

    def _open_direct(self, path: str) -> int:
        """Open the existing file ``path`` (already open through :meth:`_open`) a second time, write-only with
        ``O_DIRECT``, and return the descriptor (the caller closes it).

        Raises:
            OSError: ``EINVAL`` (or ``EOPNOTSUPP``) where the file system refuses O_DIRECT: the write falls back to
                the buffered descriptor; any other error fails the write.
        """
        assert _O_DIRECT is not None  # write_atomic never asks for a direct descriptor without it
        return os.open(path, os.O_WRONLY | _O_DIRECT)

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        """Write ``view`` at ``offset`` of the O_DIRECT descriptor ``fd``; return the bytes written.

        ``offset``, ``len(view)`` and the address of ``view`` are multiples of :data:`DIRECT_ALIGNMENT`. The bytes
        skip the page cache: they are on the device (maybe in its volatile cache) when this returns, and the file's
        fsync still makes them and the file's size durable.

        Raises:
            OSError: ``EINVAL`` where the file system refuses O_DIRECT writes (nothing was written: the bytes go
                buffered instead); any other error fails the write.
        """
        return os.pwrite(fd, view, offset)

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

    def make_dirs(self, path: str) -> list[str]:
        """Create the directory ``path`` and its missing parents so that they survive a power cut.

        A new directory exists for good only once its entry is fsynced in its parent; without that a crash could
        take a fresh ``save_dir`` away together with every checkpoint already reported durable inside it.

        Returns:
            The directories this call created, outermost first.

        Raises:
            OSError: a level could not be created (``NotADirectoryError`` where a file holds the name).
        """
        missing: list[str] = []
        level = os.path.abspath(path)
        while not os.path.isdir(level):
            missing.append(level)
            parent = os.path.dirname(level)
            if parent == level:
                break
            level = parent
        created: list[str] = []
        for directory in reversed(missing):
            try:
                self._mkdir(directory)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise NotADirectoryError(
                        errno.ENOTDIR, "exists but is not a directory; pass a directory path", directory
                    ) from None
                continue  # made by someone else meanwhile (another rank): its creator makes it durable
            created.append(directory)
            self.sync_dir(os.path.dirname(directory))
        return created

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
        direct = _DirectSink(self, tmp) if self._direct_allowed(os.path.dirname(path)) else None
        try:
            with self._open(tmp) as raw:
                f = _TimedFile(raw, write_behind=self.fsync, direct=direct)
                try:
                    produce(f)  # type: ignore[arg-type]
                except Exception as exc:
                    if f.error is not None and f.error is not exc:
                        raise f.error from exc
                    raise
                finally:
                    if direct is not None:
                        direct.close()
                t1 = time.perf_counter()
                raw.flush()
                times.write_s = f.write_s + (time.perf_counter() - t1)
                times.nbytes = f.nbytes
                times.direct_bytes = direct.nbytes if direct is not None else 0
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

    def _direct_allowed(self, directory: str) -> bool:
        if self.direct_io is False or _O_DIRECT is None:
            return False
        with self._direct_lock:
            return os.path.abspath(directory) not in self._no_direct

    def _direct_refused(self, path: str, exc: OSError) -> None:
        """The file system of ``path`` refused O_DIRECT: remember its directory (``"auto"``) or raise (``True``)."""
        directory = os.path.abspath(os.path.dirname(path))
        if self.direct_io is True:
            raise OSError(
                exc.errno,
                f"direct_io=True, but the file system of {directory!r} refuses O_DIRECT ({exc.strerror}); "
                "use direct_io='auto' to fall back to buffered writes there, or write to a local disk",
            ) from exc
        with self._direct_lock:
            first = directory not in self._no_direct
            self._no_direct.add(directory)
        if first:
            logger.info(
                "async_ckpt: the file system of %s refuses O_DIRECT (%s); writing checkpoints there through the "
                "page cache",
                directory,
                exc.strerror,
            )

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
