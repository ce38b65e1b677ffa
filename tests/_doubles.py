"""Storage doubles shared by the tests and by the subprocess workers (not a test module; no pytest needed).

The workers run as scripts from this directory, so ``from _doubles import ...`` finds this file there as it does
under pytest.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
import time
from typing import BinaryIO

from async_ckpt.pipeline.storage import TMP_MARKER, DirectIO, FileStorage

GATE_TIMEOUT = 30.0  # seconds a gated write waits before it fails instead of hanging the test


class CallOrderStorage(FileStorage):
    """Records the order of the commit protocol's system calls (file or directory fsync, rename)."""

    def __init__(self, direct_io: DirectIO = "auto") -> None:
        super().__init__(fsync=True, direct_io=direct_io)
        self.calls: list[str] = []

    def _fsync_fd(self, fd: int) -> None:
        self.calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self.calls.append("replace")
        super()._replace(src, dst)


class NoSpaceStorage(FileStorage):
    """A full disk: every fsync of a file's data fails with ``ENOSPC`` (directory fsyncs still work)."""

    def _fsync_fd(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            super()._fsync_fd(fd)
            return
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class SlowStorage(FileStorage):
    """A slow disk: every fsync takes ``delay`` seconds longer (simulated device latency, not synchronization)."""

    def __init__(self, delay: float) -> None:
        super().__init__(fsync=True)
        self.delay = delay

    def _fsync_fd(self, fd: int) -> None:
        if self.delay > 0:
            time.sleep(self.delay)
        super()._fsync_fd(fd)


class GatedStorage(FileStorage):
    """Each checkpoint write (not the manifest) waits, bounded, until the test lets it through: ``release_one`` lets
    one more through, ``open_all`` every one from then on. ``entered`` is set once a write has reached the gate, and
    ``order`` lists the names renamed into place, in order."""

    def __init__(self) -> None:
        super().__init__(fsync=False)
        self._cond = threading.Condition()
        self._permits = 0
        self._all_open = False
        self.entered = threading.Event()
        self.order: list[str] = []

    def release_one(self) -> None:
        with self._cond:
            self._permits += 1
            self._cond.notify_all()

    def open_all(self) -> None:
        with self._cond:
            self._all_open = True
            self._cond.notify_all()

    def _open(self, path: str) -> BinaryIO:
        if ".pt" + TMP_MARKER in os.path.basename(path):
            self.entered.set()
            with self._cond:
                if not self._cond.wait_for(lambda: self._all_open or self._permits > 0, GATE_TIMEOUT):
                    raise TimeoutError("test gate never opened")
                if not self._all_open:
                    self._permits -= 1
        return super()._open(path)

    def _replace(self, src: str, dst: str) -> None:
        super()._replace(src, dst)
        self.order.append(os.path.basename(dst))


def direct_io_refusal(directory: str | os.PathLike[str]) -> str | None:
    """Why the file system of ``directory`` refuses an aligned O_DIRECT write, or ``None`` if it takes one."""
    o_direct = getattr(os, "O_DIRECT", None)
    if o_direct is None:
        return "this platform has no O_DIRECT"
    path = os.path.join(directory, ".o_direct_probe")
    block = mmap.mmap(-1, 4096)  # page-aligned memory
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | o_direct, 0o600)
        try:
            os.pwrite(fd, block, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"the file system of {directory} refuses O_DIRECT ({exc.strerror})"
    finally:
        block.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return None
