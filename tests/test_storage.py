"""Durable file operations: temp name, fsync, atomic replace, permissions, failure leaves nothing partial."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest
from _doubles import CallOrderStorage

from async_ckpt.pipeline.storage import TMP_MARKER, FileStorage, is_temp_name


def test_commit_protocol_order(tmp_path: os.PathLike[str]) -> None:
    """The file is fsynced before the rename, and the directory after it."""
    storage = CallOrderStorage()
    path = os.path.join(tmp_path, "a.pt")
    times = storage.write_atomic(path, lambda f: f.write(b"x" * 1000))
    assert storage.calls == ["fsync-file", "replace", "fsync-dir"]
    assert Path(path).read_bytes() == b"x" * 1000 and times.nbytes == 1000


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_file_mode_is_what_torch_save_gives(tmp_path: os.PathLike[str], umask: int) -> None:
    """A checkpoint gets 0o666 less the umask, as MONAI's torch.save(path) files do (not tempfile's 0o600)."""
    old = os.umask(umask)
    try:
        path = os.path.join(tmp_path, "a.pt")
        FileStorage().write_atomic(path, lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: os.PathLike[str]) -> None:
    """If producing the bytes fails, the previous file is untouched and no temporary file remains."""
    path = os.path.join(tmp_path, "a.pt")
    FileStorage().write_atomic(path, lambda f: f.write(b"good"))

    def half(f: BinaryIO) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        FileStorage().write_atomic(path, half)
    assert Path(path).read_bytes() == b"good"
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
    assert Path(b).read_bytes() == b"data"
    assert storage.remove(b) and Path(a).read_bytes() == b"data"
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
    assert Path(b).read_bytes() == b"data" * 100 and os.stat(a).st_ino != os.stat(b).st_ino


def test_link_of_missing_source_fails_cleanly(tmp_path: os.PathLike[str]) -> None:
    """Linking from a file that is gone raises and creates nothing."""
    with pytest.raises(FileNotFoundError):
        FileStorage().link_atomic(os.path.join(tmp_path, "gone.pt"), os.path.join(tmp_path, "b.pt"))
    assert os.listdir(tmp_path) == []


def test_make_dirs_fsyncs_each_new_directory_in_its_parent(tmp_path: Path) -> None:
    """make_dirs creates the missing levels outermost first and fsyncs each one's parent, so a power cut cannot
    take a new save_dir (and the checkpoints in it) away; existing levels are left alone."""
    synced: list[str] = []

    class Watching(FileStorage):
        def sync_dir(self, directory: str) -> None:
            synced.append(directory)
            super().sync_dir(directory)

    target = tmp_path / "a" / "b" / "c"
    created = Watching().make_dirs(str(target))
    assert created == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(target)]
    assert target.is_dir()
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert Watching().make_dirs(str(target)) == []


def test_make_dirs_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    """A file where a directory level should be is an error, not silently accepted."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        FileStorage().make_dirs(str(tmp_path / "f"))
    with pytest.raises(OSError):
        FileStorage().make_dirs(str(tmp_path / "f" / "sub"))
