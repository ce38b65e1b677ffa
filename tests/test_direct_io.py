"""The O_DIRECT writer: records aligned to 4 KiB, their aligned spans written straight from page-aligned memory, and a
buffered fallback (never a failure with ``direct_io="auto"``) where the file system or the memory does not allow it.
"""

from __future__ import annotations

import errno
import io
import logging
import mmap
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _doubles import CallOrderStorage, direct_io_refusal
from conftest import trees_equal

import async_ckpt.pipeline.storage as storage_mod
from async_ckpt import AsyncOptions
from async_ckpt.pipeline.integrity import verify
from async_ckpt.pipeline.serialize import serialize
from async_ckpt.pipeline.storage import DIRECT_ALIGNMENT, FileStorage, WriteTimes

A = DIRECT_ALIGNMENT
BIG = 300 * 1024 + 1000  # bytes of the large records: several aligned blocks and a tail that goes buffered


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system takes O_DIRECT writes: the test's tmp dir, else one beside the repository."""
    if direct_io_refusal(tmp_path) is None:
        yield tmp_path
        return
    reasons = [direct_io_refusal(tmp_path)]
    for base in (Path(__file__).resolve().parents[2], Path.home()):
        try:
            candidate = Path(tempfile.mkdtemp(prefix="async_ckpt-direct-", dir=base))
        except OSError as exc:
            reasons.append(f"{base}: {exc.strerror}")
            continue
        why = direct_io_refusal(candidate)
        if why is None:
            try:
                yield candidate
            finally:
                shutil.rmtree(candidate, ignore_errors=True)
            return
        reasons.append(why)
        shutil.rmtree(candidate, ignore_errors=True)
    pytest.skip("no directory here takes O_DIRECT writes: " + "; ".join(str(r) for r in reasons))


def _aligned(numel: int, dtype: torch.dtype, area: mmap.mmap, offset: int) -> torch.Tensor:
    """A tensor over ``area`` (page-aligned anonymous memory) at byte ``offset``: its own storage, like a slice of
    the staging arena."""
    return torch.frombuffer(area, dtype=dtype, count=numel, offset=offset)


def _state(area: mmap.mmap, misaligned: bool = False) -> dict[str, Any]:
    """Large records over aligned memory (one starting 64 bytes off a page when ``misaligned``), plus small and
    unaligned ones that always go buffered."""
    torch.manual_seed(0)
    big = _aligned(BIG // 4, torch.float32, area, 0)
    big.copy_(torch.randn(big.numel()))
    second = _aligned(BIG // 8, torch.float64, area, 80 * A + (64 if misaligned else 0))
    second.copy_(torch.randn(second.numel(), dtype=torch.float64))
    return {
        "big": big,
        "second": second,
        "view": big[5:1005],  # a view of the same storage: no second record
        "heap": torch.randn(50_000),  # malloc'd memory, below the direct path's minimum (may be page-aligned by chance)
        "small": torch.arange(10, dtype=torch.int64),
        "nested": {"x": [torch.ones(3), 1.5, "s"]},
    }


def _write(storage: FileStorage, path: Path, state: dict[str, Any]) -> WriteTimes:
    return storage.write_atomic(str(path), lambda f: serialize(state, f))


def _data_offsets(path: Path) -> dict[str, int]:
    """File offset of each record's data, from its local header."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<2H", f.read(30)[26:30])
            out[info.filename.split("/", 1)[1]] = info.header_offset + 30 + name_len + extra_len
    return out


def _records(path: Path | io.BytesIO) -> dict[str, tuple[int, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return {
            i.filename.split("/", 1)[1]: (i.CRC, archive.read(i))
            for i in archive.infolist()
            if not i.filename.endswith("serialization_id")
        }


def test_direct_file_is_torch_saves_records_aligned_to_4k(direct_dir: Path) -> None:
    """A checkpoint written on the direct path loads equal with weights_only and with mmap, passes testzip and
    verify, holds torch.save's record contents and CRCs, and starts every record on a 4 KiB boundary."""
    area = mmap.mmap(-1, 200 * A)
    state = _state(area)
    path = direct_dir / "ckpt.pt"
    times = _write(FileStorage(direct_io=True), path, state)
    assert times.io_path == "direct"
    # Both large aligned records went direct, their tails (the part after the last full block) buffered.
    assert times.direct_bytes == 2 * (BIG // A * A)
    assert trees_equal(torch.load(path, weights_only=True), state)
    assert trees_equal(torch.load(path, weights_only=True, mmap=True), state)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    result = verify(str(path), records=True)
    assert not result.problems
    ref = io.BytesIO()
    torch.save(state, ref)
    ref.seek(0)
    assert _records(path) == _records(ref)
    offsets = {name: at for name, at in _data_offsets(path).items() if name.startswith("data/")}
    assert offsets and all(at % A == 0 for at in offsets.values()), offsets


def test_unaligned_memory_goes_buffered_for_that_record_only(direct_dir: Path) -> None:
    """A large record whose memory does not start on a 4 KiB boundary is written through the page cache (never
    copied into an aligned buffer), while the aligned one still goes direct; the file loads equal."""
    area = mmap.mmap(-1, 200 * A)
    state = _state(area, misaligned=True)
    path = direct_dir / "ckpt.pt"
    times = _write(FileStorage(direct_io=True), path, state)
    assert times.direct_bytes == BIG // A * A  # only "big"
    assert trees_equal(torch.load(path, weights_only=True), state)


class CheckedDirect(CallOrderStorage):
    """Checks, at each O_DIRECT write, what the kernel requires and what keeps the two descriptors apart."""

    def __init__(self) -> None:
        super().__init__(direct_io=True)
        self.spans: list[tuple[int, int]] = []

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        assert offset % A == 0 and view.nbytes % A == 0 and storage_mod._address(view) % A == 0
        # Every buffered byte before the span is flushed, and none lies at or after it: no shared dirty page.
        assert os.fstat(fd).st_size == offset
        self.spans.append((offset, view.nbytes))
        self.calls.append("pwrite-direct")
        return super()._pwrite_direct(fd, view, offset)


def test_direct_writes_are_aligned_and_follow_flushed_buffered_bytes(direct_dir: Path) -> None:
    """Each O_DIRECT write has an aligned offset, length and address, and starts exactly where the flushed buffered
    bytes end, so a page written directly is never one the buffered descriptor has dirty in the page cache; the
    commit protocol is unchanged (the file is fsynced after the direct writes, then renamed, then the directory)."""
    area = mmap.mmap(-1, 200 * A)
    state = _state(area)
    storage = CheckedDirect()
    path = direct_dir / "ckpt.pt"
    _write(storage, path, state)
    offsets = _data_offsets(path)
    assert sorted(at for at, _ in storage.spans) == sorted(at for n, at in offsets.items() if n in ("data/0", "data/1"))
    assert trees_equal(torch.load(path, weights_only=True), state)
    assert storage.calls == ["pwrite-direct"] * len(storage.spans) + ["fsync-file", "replace", "fsync-dir"]


class RefuseOpen(FileStorage):
    """A file system that refuses O_DIRECT at open, as tmpfs and some FUSE file systems do."""

    def __init__(self, direct_io: Any = "auto") -> None:
        super().__init__(fsync=True, direct_io=direct_io)
        self.opens = 0

    def _open_direct(self, path: str) -> int:
        self.opens += 1
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class RefuseWrite(FileStorage):
    """A file system that opens with O_DIRECT but refuses the first direct write (EINVAL)."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.writes = 0

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        self.writes += 1
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


@pytest.mark.parametrize("storage_cls", [RefuseOpen, RefuseWrite])
def test_refused_o_direct_falls_back_to_buffered_once_per_directory(
    tmp_path: Path, storage_cls: type[FileStorage], caplog: pytest.LogCaptureFixture
) -> None:
    """Where the file system refuses O_DIRECT (at open or at the first write), the checkpoint is written buffered
    and loads equal, the fallback is logged once at INFO, and later writes there do not try O_DIRECT again."""
    area = mmap.mmap(-1, 200 * A)
    state = _state(area)
    storage = storage_cls()
    with caplog.at_level(logging.INFO, logger="async_ckpt"):
        first = _write(storage, tmp_path / "a.pt", state)
        second = _write(storage, tmp_path / "b.pt", state)
    assert first.io_path == second.io_path == "buffered"
    for name in ("a.pt", "b.pt"):
        assert trees_equal(torch.load(tmp_path / name, weights_only=True), state)
        with zipfile.ZipFile(tmp_path / name) as archive:
            assert archive.testzip() is None
    attempts = storage.opens if isinstance(storage, RefuseOpen) else storage.writes  # type: ignore[attr-defined]
    assert attempts == 1
    refusals = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]


def test_direct_io_true_fails_loudly_where_refused(tmp_path: Path) -> None:
    """With direct_io=True a file system that refuses O_DIRECT fails the write with an error that says what to
    change, and leaves neither the file nor a temporary file."""
    area = mmap.mmap(-1, 200 * A)
    with pytest.raises(OSError, match="direct_io='auto'"):
        _write(RefuseOpen(direct_io=True), tmp_path / "a.pt", _state(area))
    assert os.listdir(tmp_path) == []


class FullOnDirect(FileStorage):
    """A disk that fills up during a direct write (a real error, not a refusal)."""

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_real_error_in_a_direct_write_fails_the_write(tmp_path: Path) -> None:
    """An I/O error other than a refusal is not hidden by a fallback: the write fails with it and leaves nothing."""
    area = mmap.mmap(-1, 200 * A)
    with pytest.raises(OSError) as info:
        _write(FullOnDirect(), tmp_path / "a.pt", _state(area))
    assert info.value.errno == errno.ENOSPC or isinstance(info.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []


class CountingDirect(FileStorage):
    """Counts the O_DIRECT opens."""

    def __init__(self, direct_io: Any) -> None:
        super().__init__(fsync=False, direct_io=direct_io)
        self.opens = 0

    def _open_direct(self, path: str) -> int:
        self.opens += 1
        return super()._open_direct(path)


def test_direct_io_false_and_small_files_never_open_o_direct(tmp_path: Path) -> None:
    """direct_io=False never opens an O_DIRECT descriptor, and neither does a small file (a manifest) on "auto"."""
    area = mmap.mmap(-1, 200 * A)
    off = CountingDirect(direct_io=False)
    assert _write(off, tmp_path / "a.pt", _state(area)).io_path == "buffered"
    auto = CountingDirect(direct_io="auto")
    auto.write_atomic(str(tmp_path / "m.json"), lambda f: f.write(b"{}" * 1000))
    assert off.opens == 0 and auto.opens == 0


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_direct_io_values_are_refused(value: Any) -> None:
    """direct_io accepts only "auto", True and False, in FileStorage and AsyncOptions alike."""
    with pytest.raises(ValueError, match="direct_io"):
        FileStorage(direct_io=value)
    with pytest.raises(ValueError, match="direct_io"):
        AsyncOptions(direct_io=value)
    assert AsyncOptions().direct_io == "auto"
