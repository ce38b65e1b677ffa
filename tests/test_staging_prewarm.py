"""Background prewarm of staging buffers: off the training thread, within max_pending, joined on close, and a
failure that is logged and left for the save to retry."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import torch

from async_ckpt.pipeline import snapshot
from async_ckpt.pipeline.snapshot import PREWARM_THREAD_NAME, Stager

TIMEOUT = 30.0


def _state() -> list[torch.Tensor]:
    return [torch.randn(5000), torch.randn(64, 64), torch.zeros(3, dtype=torch.int64)]


def _prewarm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREWARM_THREAD_NAME and t.is_alive()]


def test_first_save_after_background_prewarm_allocates_nothing() -> None:
    """prewarm_async returns at once, fills the pool to max_pending on its own named thread, and the saves after it
    allocate nothing; close joins the thread."""
    stager = Stager(max_pending=2)
    src = _state()
    stager.prewarm_async(src)
    assert stager.join_prewarm(TIMEOUT)
    assert stager.allocations == 2 and stager.memory_bytes() == 2 * sum(t.untyped_storage().nbytes() for t in src)
    stager.prewarm_async(src)  # already full: nothing more
    assert stager.join_prewarm(TIMEOUT) and stager.allocations == 2
    a = stager.stage(src)
    src[0].add_(1)
    b = stager.stage(src)
    assert a is not None and b is not None and stager.allocations == 2 and a.alloc_s == 0.0 == b.alloc_s
    assert torch.equal(b.views[0], src[0])
    a.release()
    b.release()
    stager.close()
    assert not _prewarm_threads()


class _GatedBufferSet(snapshot._BufferSet):
    """A buffer set whose construction on the prewarm thread waits until the test opens the gate."""

    gate = threading.Event()
    entered = threading.Event()
    made: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _GatedBufferSet.made.append(threading.current_thread().name)
        if threading.current_thread().name == PREWARM_THREAD_NAME:
            _GatedBufferSet.entered.set()
            assert _GatedBufferSet.gate.wait(TIMEOUT), "test gate never opened"
        super().__init__(*args, **kwargs)


class _WaitSignalling(threading.Condition):
    """The stager's condition, which tells the test when a thread starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(TIMEOUT if timeout is None else timeout)


def test_save_during_prewarm_waits_for_it_instead_of_allocating_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that comes while the prewarm thread is still making the only set (max_pending=1) waits for that set
    and uses it: one allocation in all, made by the prewarm thread."""
    monkeypatch.setattr(snapshot, "_BufferSet", _GatedBufferSet)
    _GatedBufferSet.gate.clear()
    _GatedBufferSet.entered.clear()
    _GatedBufferSet.made.clear()
    stager = Stager(max_pending=1)
    cond = _WaitSignalling()
    stager._cond = cond
    src = _state()
    stager.prewarm_async(src)
    assert _GatedBufferSet.entered.wait(TIMEOUT)
    got: list[Any] = []
    saver = threading.Thread(target=lambda: got.append(stager.stage(src)), name="test-save")
    saver.start()
    try:
        assert cond.waiting.wait(TIMEOUT), "the save never waited"
    finally:
        _GatedBufferSet.gate.set()
        saver.join(TIMEOUT)
    assert got and got[0] is not None and torch.equal(got[0].views[0], src[0])
    assert _GatedBufferSet.made == [PREWARM_THREAD_NAME] and stager.allocations == 1
    got[0].release()
    stager.close()
    assert not _prewarm_threads()


class _FailingBufferSet(snapshot._BufferSet):
    """Background allocations fail (host memory exhausted); allocations by a save succeed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == PREWARM_THREAD_NAME:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        super().__init__(*args, **kwargs)


def test_failed_background_allocation_is_logged_and_the_save_allocates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prewarm whose allocation fails logs a warning with the cause, keeps the error, and the next save allocates
    its buffers itself and stages exact values."""
    monkeypatch.setattr(snapshot, "_BufferSet", _FailingBufferSet)
    stager = Stager(max_pending=1)
    src = _state()
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        stager.prewarm_async(src)
        assert stager.join_prewarm(TIMEOUT)
    assert any("in the background failed" in r.getMessage() for r in caplog.records)
    assert isinstance(stager.prewarm_error, RuntimeError) and stager.allocations == 0
    staged = stager.stage(src)
    assert staged is not None and stager.allocations == 1
    assert all(torch.equal(v, t) for v, t in zip(staged.views, src, strict=True))
    staged.release()
    stager.close()


def test_prewarm_for_a_grown_state_replaces_the_earlier_sets() -> None:
    """A second prewarm after the state grew (an optimizer created its state) drops the free sets of the old layout
    and the pool still holds at most max_pending sets."""
    stager = Stager(max_pending=2)
    small = [torch.randn(100)]
    stager.prewarm_async(small)
    assert stager.join_prewarm(TIMEOUT)
    grown = [*small, torch.randn(4096), torch.randn(4096)]
    stager.prewarm_async(grown)
    assert stager.join_prewarm(TIMEOUT)
    assert stager.memory_bytes() == 2 * sum(t.untyped_storage().nbytes() for t in grown)
    before = stager.allocations
    staged = stager.stage(grown)
    assert staged is not None and stager.allocations == before
    staged.release()
    stager.close()
