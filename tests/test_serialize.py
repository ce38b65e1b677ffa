"""The serializer writes torch.save's zip, CRCs included, with the CRCs computed beside the writes."""

from __future__ import annotations

import gc
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trees_equal

import async_ckpt.pipeline.serialize as serialize_mod
import async_ckpt.pipeline.storage as storage_mod
from async_ckpt.pipeline.integrity import verify
from async_ckpt.pipeline.serialize import serialize
from async_ckpt.pipeline.storage import FileStorage

P = serialize_mod._PIECE


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    big = torch.randn(3 * P // 4 + 1234)  # a record of several CRC pieces, not a multiple of the piece size
    tied = torch.randn(64, 64)
    return {
        "big": big,
        "tied_a": tied,
        "tied_b": tied,  # the same tensor twice: one record
        "view": tied[3:9, ::2],  # a strided view of the same storage
        "ints": torch.arange(1000, dtype=torch.int64),
        "mask": torch.rand(77) > 0.5,
        "half": torch.randn(333).bfloat16(),
        "empty": torch.empty(0),
        "nested": {"lst": [torch.ones(3), 2.5, "x"], "tup": (torch.zeros(2, 2).t(), None)},
    }


def _records(archive: zipfile.ZipFile) -> list[tuple[str, int, int, int, bytes]]:
    return [
        (i.filename.split("/", 1)[1], i.header_offset, i.CRC, i.file_size, archive.read(i))
        for i in archive.infolist()
        if not i.filename.endswith("serialization_id")  # a fresh random id per save
    ]


def test_file_equals_torch_save_record_for_record(tmp_path: Path) -> None:
    """On the buffered path, same records, offsets, contents and CRCs as torch.save; zipfile's CRC check and torch.load
    accept it (the direct path aligns records to 4 KiB instead: see test_direct_io.py)."""
    state = _state()
    path = str(tmp_path / "ckpt.pt")
    FileStorage(direct_io=False).write_atomic(path, lambda f: serialize(state, f))
    ref = io.BytesIO()
    torch.save(state, ref)
    ref.seek(0)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(ref) as theirs:
        assert ours.testzip() is None
        assert _records(ours) == _records(theirs)
    assert os.path.getsize(path) == len(ref.getvalue())
    loaded = torch.load(path, weights_only=True)
    assert trees_equal(loaded, state)
    assert loaded["tied_a"].untyped_storage().data_ptr() == loaded["tied_b"].untyped_storage().data_ptr()


def test_file_passes_integrity_record_check(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt.pt")
    FileStorage().write_atomic(path, lambda f: serialize(_state(), f))
    result = verify(path, records=True)
    assert "records" in result.checked and not result.problems


@pytest.mark.parametrize("n", [2 * P, 2 * P + 1, 3 * P - 1, 4 * P + 7])
def test_piecewise_crc_equals_zlib(n: int) -> None:
    """CRC pieces computed by several threads and combined equal the CRC of the whole write."""
    data = os.urandom(n)
    sink = io.BytesIO()
    tap = serialize_mod._CrcTap(sink)  # type: ignore[arg-type]
    tap.helpers = 2
    tap.write(b"head")
    tap.write(data)
    assert tap.crcs == {(0, 4): zlib.crc32(b"head"), (4, n): zlib.crc32(data)}
    assert sink.getvalue() == b"head" + data


def test_crcs_read_back_when_no_write_matches_a_record(tmp_path: Path) -> None:
    """A record that reached the file in several writes (no logged CRC) gets its CRC from the file itself."""
    path = tmp_path / "raw.pt"
    state = _state()
    with open(path, "w+b") as f:
        writer = serialize_mod._writer_without_crc(f)
        if writer is None:
            pytest.skip("this torch's zip writer cannot turn its CRC off")
        torch.serialization._save(state, writer, __import__("pickle"), 2, False)  # type: ignore[no-untyped-call]
        writer.write_end_of_file()
        f.flush()
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is not None  # CRCs are zero so far
        serialize_mod._patch_crcs(f.fileno(), {}, os.path.getsize(path))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    assert trees_equal(torch.load(path, weights_only=True), state)


def test_plain_torch_save_where_the_file_cannot_be_read_back(tmp_path: Path) -> None:
    """A file object without a readable descriptor (BytesIO, a write-only file) gets plain torch.save."""
    state = _state()
    buf = io.BytesIO()
    serialize(state, buf)
    buf.seek(0)
    assert trees_equal(torch.load(buf, weights_only=True), state)
    path = tmp_path / "wo.pt"
    with open(path, "wb") as f:
        serialize(state, f)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def test_torch_without_the_options_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serialize_mod, "_FAST", False)
    path = str(tmp_path / "ckpt.pt")
    FileStorage().write_atomic(path, lambda f: serialize(_state(), f))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def test_a_failing_write_is_raised_and_leaves_no_file(tmp_path: Path) -> None:
    """ENOSPC in the middle of a large record reaches the caller as OSError; the temporary file is removed."""

    class Full(FileStorage):
        def _open(self, path: str) -> Any:
            raw = super()._open(path)
            real = raw.write

            def write(data: Any) -> int:
                if memoryview(data).nbytes >= P:
                    raise OSError(28, "No space left on device")
                return real(data)

            raw.write = write  # type: ignore[method-assign]
            return raw

    path = tmp_path / "ckpt.pt"
    with pytest.raises(OSError) as info:
        # buffered: the direct path would take records whose memory happens to be page aligned past this double
        Full(direct_io=False).write_atomic(str(path), lambda f: serialize(_state(), f))
    assert info.value.errno == 28
    assert os.listdir(tmp_path) == []


def test_write_behind_only_when_fsyncing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dirty pages are handed to the disk early only on the durable path; a refusal turns it off, nothing else."""
    calls: list[tuple[int, int, int]] = []

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes, flags))
        return -1 if len(calls) > 1 else 0  # the second call "fails": write-behind stops, the write goes on

    monkeypatch.setattr(storage_mod, "_SYNC_FILE_RANGE", record)
    state = {"w": torch.randn(24 << 20)}  # 96 MiB
    FileStorage(fsync=False).write_atomic(str(tmp_path / "a.pt"), lambda f: serialize(state, f))
    assert calls == []
    FileStorage(fsync=True).write_atomic(str(tmp_path / "b.pt"), lambda f: serialize(state, f))
    # one 96 MiB record: the first kick comes after its first 32 MiB, not after the whole record
    behind = storage_mod._WRITE_BEHIND
    assert len(calls) == 2 and calls[0][0] == 0 and behind <= calls[0][1] < behind + (1 << 20)
    assert calls[1][0] == calls[0][1]
    assert all(flags == storage_mod._SYNC_FILE_RANGE_WRITE for _, _, flags in calls)
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["w"], state["w"])


def test_a_pickling_error_finishes_the_writer_before_the_file_closes(tmp_path: Path) -> None:
    """An unpicklable leaf fails the save cleanly; collecting the zip writer afterwards does not touch the file.

    (torch's writer writes its end records when it is destroyed; into a closed file that used to abort the process.)
    """
    state = {"t": torch.ones(3), "fn": lambda: 0}
    with pytest.raises(Exception, match=r"pickle|lambda"):
        FileStorage().write_atomic(str(tmp_path / "ckpt.pt"), lambda f: serialize(state, f))
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_crc32_is_zlib_ngs_and_equals_zlibs() -> None:
    """The installed dependency zlib-ng computes the CRC-32s (the fast path is not silently lost), with the same
    values as the standard library's zlib, including a running CRC continued over a second buffer."""
    import zlib

    import async_ckpt.pipeline.serialize as ser

    assert ser._crc32 is not zlib.crc32 and ser._CRC_HELPERS == 0
    data = os.urandom(1 << 20)
    assert ser._crc32(data) == zlib.crc32(data)
    assert ser._crc32(data[512:], ser._crc32(data[:512])) == zlib.crc32(data)
