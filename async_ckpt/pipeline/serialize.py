"""The on-disk format: exactly what ``torch.save`` writes, so ``torch.load(weights_only=True)`` reads it.

``torch.save`` computes the CRC-32 of each record and then writes it, one after the other on one thread; for large
states that serial CRC is a third of the time to a fast disk. Where the file is a real file this module writes the
same zip with torch's own writer (same records, same alignment, same pickle) but with its CRC turned off, computes
each record's CRC-32 on a helper thread while the bytes go to the file, and patches the CRCs into the local and
central headers before the caller's ``fsync``. The result is the file ``torch.save`` would have written, CRCs
included (``zipfile.testzip`` and :func:`async_ckpt.pipeline.integrity.verify` check them). Elsewhere, or with a torch
whose writer does not take these options, it is plain ``torch.save``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import os
import pickle
import struct
import threading
import zipfile
import zlib
from typing import Any, BinaryIO

import torch

__all__ = ["serialize"]

_PIECE = 8 << 20  # CRC work unit: large writes are split into pieces of this size, shared by the threads
_READ = 16 << 20  # fallback CRC reads
try:
    # zlib-ng's CRC-32 (same polynomial and values as zlib's) uses carry-less multiplication: measured 33 GiB/s on one
    # core against 6.6 GiB/s for the standard library's zlib 1.2.13, so on the writer thread alone it costs a
    # checkpoint a few percent of what its disk write takes, and no helper thread is needed. That took the machine
    # CPU of a direct-I/O write from 0.17-0.18 to 0.04-0.05 CPU-seconds per GiB (benchmarks.writer).
    from zlib_ng.zlib_ng import crc32 as _crc32

    _CRC_HELPERS = 0
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a platform without its wheel still works
    _crc32 = zlib.crc32
    # One helper: with the writer thread taking pieces too, CRCs run at about twice zlib's single-thread speed
    # (1.9 GiB/s measured on one machine), above most disks. More helpers compete with training for cores: on a
    # 16-core machine training on 15 threads, with four helpers the steps after each checkpoint ran 40-80 ms slower.
    _CRC_HELPERS = 1
CRC_THREAD_NAME = "async_ckpt-crc"


def serialize(obj: Any, f: BinaryIO) -> None:
    """Write ``obj`` to the open binary file ``f`` in PyTorch's zip checkpoint format.

    Args:
        obj: a tree of dicts, lists, tuples, tensors and plain Python values.
        f: a writable binary file object. When it has a ``fileno()`` open for reading and writing (as the files of
            ``FileStorage`` are), CRCs are computed beside the writes; otherwise this is
            ``torch.save(obj, f)``. When it has a nonzero ``direct_alignment`` (a storage that can write with
            O_DIRECT), records start at multiples of it, so the storage can write each record's aligned span
            straight from the tensor's memory; the file is still one ``torch.load`` reads.

    Raises:
        pickle.PicklingError: or another exception when ``obj`` holds something that cannot be pickled.
    """
    fd = _pread_pwrite_fd(f)
    tap = _CrcTap(f)
    writer = _writer_without_crc(tap, getattr(f, "direct_alignment", 0)) if fd is not None else None
    if fd is None or writer is None:
        torch.save(obj, f)
        return
    tap.helpers = _CRC_HELPERS
    save = torch.serialization._save
    try:
        save(obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)  # type: ignore[no-untyped-call]
    except BaseException:
        # Finish the writer now, as torch.save does: left to the garbage collector, it would write its end
        # records into a file that is closed by then, and an error raised in a C++ destructor aborts.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()
    f.flush()
    _patch_crcs(fd, tap.crcs, tap.offset)


def _pread_pwrite_fd(f: BinaryIO) -> int | None:
    """The file descriptor behind ``f`` if it can be read and written at offsets, else ``None``."""
    try:
        fd = f.fileno()
        os.pread(fd, 0, 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd


def _fast_path_available() -> bool:
    save = getattr(torch.serialization, "_save", None)
    if save is None or not hasattr(torch.serialization, "_get_storage_alignment"):
        return False
    try:
        params = list(inspect.signature(save).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]


_FAST = _fast_path_available()


def _writer_without_crc(sink: Any, alignment: int = 0) -> Any:
    """torch's zip writer over ``sink`` with CRC computation off, or ``None`` where this torch cannot make one.

    Args:
        sink: the file object the writer writes to.
        alignment: where record data starts in the file: a multiple of this many bytes (the storage's direct I/O
            block, so the records can be written with O_DIRECT); 0 for torch's own alignment (what ``torch.save``
            writes). ``torch.load`` reads either: it takes each record's offset from its header.
    """
    if not _FAST:
        return None
    try:
        return torch._C.PyTorchFileWriter(sink, False, alignment or torch.serialization._get_storage_alignment())
    except TypeError:
        return None


class _CrcTap:
    """The file object torch's zip writer writes to: passes every write on, and logs the CRC-32 of each one.

    Writes of at least two pieces are split into pieces whose CRCs ``helpers`` threads compute while this thread
    writes the bytes (both release the GIL), then combined. Every write waits for its CRCs before it returns,
    because the memory torch hands over is only valid during the call.

    The helpers are plain threads (``async_ckpt-crc``) started for one large write and joined before it returns,
    not an executor: ``concurrent.futures`` refuses new work once interpreter shutdown has begun, which is before
    the ``atexit`` drain of :mod:`async_ckpt.pipeline.writer` writes the checkpoints still queued. A thread start costs
    tens of microseconds, nothing beside a write of 16 MiB or more.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.helpers = 0  # helper threads per large write (0: this thread computes every CRC)
        self.offset = 0
        self.crcs: dict[tuple[int, int], int] = {}  # (file offset, length) of each write -> its CRC-32

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n >= 2 * _PIECE and self.helpers:
            first = n % _PIECE or _PIECE  # every later piece is exactly _PIECE long: one combine operator for all
            bounds = [0, *range(first, n + 1, _PIECE)]
            pieces = _Pieces([view[a:b] for a, b in itertools.pairwise(bounds)])
            helpers = [threading.Thread(target=pieces.work, name=CRC_THREAD_NAME) for _ in range(self.helpers)]
            for t in helpers:
                t.start()
            try:
                self._f.write(view)
            finally:
                pieces.work()  # then help with what is left
                for t in helpers:
                    t.join()
            crc = pieces.result()
        else:
            crc = _crc32(view)
            self._f.write(view)
        self.crcs[(self.offset, n)] = crc
        self.offset += n
        return n

    def flush(self) -> None:
        self._f.flush()


class _Pieces:
    """CRC-32 work shared by several threads: each takes the next piece until none is left.

    A piece whose CRC could not be computed is never taken as 0: the error is kept and :meth:`result` raises it.
    """

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self.crcs = [0] * len(views)
        self._next = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def work(self) -> None:
        while True:
            with self._lock:
                i = self._next
                self._next += 1
            if i >= len(self._views):
                return
            try:
                self.crcs[i] = _crc32(self._views[i])
            except BaseException as exc:  # in a helper thread nobody would see it: hand it to result()
                with self._lock:
                    self._error = self._error or exc
                return

    def result(self) -> int:
        """The CRC-32 of all pieces together (call once every thread's ``work`` has returned)."""
        if self._error is not None:
            raise RuntimeError("computing a checkpoint record's CRC-32 failed") from self._error
        crc = self.crcs[0]
        for piece in self.crcs[1:]:
            crc = _combine_piece(crc) ^ piece
        return crc


# CRC-32 combination (as zlib's crc32_combine): crc(A + B) = Z(crc(A)) ^ crc(B), where Z is the linear map "feed
# len(B) zero bytes" on the CRC register, a 32x32 matrix over GF(2) held as 32 column words.
def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _zeros_operator(nbytes: int) -> list[int]:
    op = [0xEDB88320] + [1 << i for i in range(31)]  # one zero bit (reflected polynomial)
    for _ in range(3):  # square thrice: one zero byte
        op = [_gf2_times(op, col) for col in op]
    result = [1 << i for i in range(32)]  # identity
    while nbytes:
        if nbytes & 1:
            result = [_gf2_times(op, col) for col in result]
        nbytes >>= 1
        if nbytes:
            op = [_gf2_times(op, col) for col in op]
    return result


_PIECE_OPERATOR = _zeros_operator(_PIECE)


def _combine_piece(crc: int) -> int:
    """``crc`` advanced over one piece of zero bytes; XOR the piece's own CRC to get the CRC of both."""
    return _gf2_times(_PIECE_OPERATOR, crc)


class _PreadFile(io.RawIOBase):
    """A read-only view of a file descriptor by ``pread``: reading never moves the descriptor's own offset."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _crc_of_range(fd: int, offset: int, length: int) -> int:
    crc = 0
    while length > 0:
        chunk = os.pread(fd, min(length, _READ), offset)
        if not chunk:
            raise OSError(f"short read while computing a checkpoint record's CRC at offset {offset}")
        crc = _crc32(chunk, crc)
        offset += len(chunk)
        length -= len(chunk)
    return crc


def _patch_crcs(fd: int, crcs: dict[tuple[int, int], int], size: int) -> None:
    """Write each record's CRC-32 into its local header, data descriptor (if any) and central directory entry."""
    with zipfile.ZipFile(io.BufferedReader(_PreadFile(fd, size))) as archive:
        entries = archive.infolist()
        cd_pos = archive.start_dir
    for info in entries:
        cd_fixed = os.pread(fd, 46, cd_pos)
        name_len, extra_len, comment_len = struct.unpack_from("<3H", cd_fixed, 28)
        local = os.pread(fd, 30, info.header_offset)
        data_at = info.header_offset + 30 + sum(struct.unpack_from("<2H", local, 26))
        crc = crcs.get((data_at, info.compress_size))
        if crc is None:  # the record reached the file in several writes (or none): read it back
            crc = _crc_of_range(fd, data_at, info.compress_size)
        packed = struct.pack("<I", crc)
        os.pwrite(fd, packed, info.header_offset + 14)
        os.pwrite(fd, packed, cd_pos + 16)
        if info.flag_bits & 0x08:  # a data descriptor follows the data, with an optional signature
            end = data_at + info.compress_size
            at = end + 4 if os.pread(fd, 4, end) == b"PK\x07\x08" else end
            os.pwrite(fd, packed, at)
        cd_pos += 46 + name_len + extra_len + comment_len
