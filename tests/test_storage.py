"""Durable file operations: temp name, fsync, atomic replace, permissions, failure leaves nothing partial."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

import pytest

from async_ckpt.storage import TMP_MARKER, FileStorage, is_temp_name


class CountingStorage(FileStorage):
    """Records the order of system calls, to pin the commit protocol."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.calls: list[str] = []

    def _fsync_fd(self, fd: int) -> None:
        self.calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self.calls.append("replace")
        super()._replace(src, dst)


def test_commit_protocol_order(tmp_path: os.PathLike[str]) -> None:
    """The file is fsynced before the rename, and the directory after it."""
    storage = CountingStorage()
    path = os.path.join(tmp_path, "a.pt")
    times = storage.write_atomic(path, lambda f: f.write(b"x" * 1000))
    assert storage.calls == ["fsync-file", "replace", "fsync-dir"]
    assert open(path, "rb").read() == b"x" * 1000 and times.nbytes == 1000


def test_file_is_group_and_other_readable(tmp_path: os.PathLike[str]) -> None:
    """A written checkpoint is readable by group and others (MONAI's non-atomic torch.save gives the same)."""
    old = os.umask(0o077)
    try:
        path = os.path.join(tmp_path, "a.pt")
        FileStorage().write_atomic(path, lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    mode = os.stat(path).st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: os.PathLike[str]) -> None:
    """If producing the bytes fails, the previous file is untouched and no temporary file remains."""
    path = os.path.join(tmp_path, "a.pt")
    FileStorage().write_atomic(path, lambda f: f.write(b"good"))

    def half(f: BinaryIO) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        FileStorage().write_atomic(path, half)
    assert open(path, "rb").read() == b"good"
    assert os.listdir(tmp_path) == ["a.pt"]


def test_temp_names_are_never_checkpoint_names(tmp_path: os.PathLike[str]) -> None:
    """Temporary names sit beside the target, carry the marker and do not end in .pt."""
    tmp = FileStorage.temp_path(os.path.join(tmp_path, "model.pt"))
    assert os.path.dirname(tmp) == str(tmp_path) and TMP_MARKER in tmp and not tmp.endswith(".pt")
    assert is_temp_name(tmp) and not is_temp_name("checkpoint_iteration=3.pt")


def test_link_and_remove(tmp_path: os.PathLike[str]) -> None:
    """A link is a second complete name; removing it leaves the first; removing a missing file is not an error."""
    storage = FileStorage()
    a, b = os.path.join(tmp_path, "a.pt"), os.path.join(tmp_path, "b.pt")
    storage.write_atomic(a, lambda f: f.write(b"data"))
    storage.link_atomic(a, b)
    assert open(b, "rb").read() == b"data"
    assert storage.remove(b) and open(a, "rb").read() == b"data"
    assert storage.remove(b) is False


class NoLinks(FileStorage):
    def _link(self, src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "hard links not supported")


def test_link_falls_back_to_copy(tmp_path: os.PathLike[str]) -> None:
    """On a file system without hard links, the second name is a durable copy."""
    a, b = os.path.join(tmp_path, "a.pt"), os.path.join(tmp_path, "b.pt")
    storage = NoLinks()
    storage.write_atomic(a, lambda f: f.write(b"data" * 100))
    storage.link_atomic(a, b)
    assert open(b, "rb").read() == b"data" * 100 and os.stat(a).st_ino != os.stat(b).st_ino


def test_link_of_missing_source_fails_cleanly(tmp_path: os.PathLike[str]) -> None:
    """Linking from a file that is gone raises and creates nothing."""
    with pytest.raises(FileNotFoundError):
        FileStorage().link_atomic(os.path.join(tmp_path, "gone.pt"), os.path.join(tmp_path, "b.pt"))
    assert os.listdir(tmp_path) == []
