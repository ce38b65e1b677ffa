"""Process exit and shutdown: pending checkpoints are drained at interpreter exit, ``close()`` ends the writer
thread, and staging memory stays bounded.

The subprocess scenarios live in ``_crash_worker.py``; their slow disks sleep inside ``fsync`` to simulate device
latency, never to order threads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from _doubles import GatedStorage
from conftest import checkpoint_names as _names
from conftest import iteration_saver, make_training
from conftest import load_checkpoint as _load
from conftest import temp_names as _temps
from ignite.engine import Events

from async_ckpt import WriterClosedError
from async_ckpt.pipeline.writer import THREAD_NAME, _worker, worker_alive

WORKER = Path(__file__).with_name("_crash_worker.py")
TIMEOUT = 30.0
PROCESS_TIMEOUT = 120
INTERVAL = re.compile(r"^checkpoint_iteration=(\d+)\.pt$")


def _run_worker(mode: str, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(WORKER), mode, str(directory), *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=env,
    )


def _assert_holds_iteration(path: Path, iteration: int) -> None:
    state = _load(path)
    assert state["tag"]["iteration"] == iteration, f"{path.name} holds iteration {state['tag']['iteration']}"
    assert torch.equal(state["tag"]["fill"], torch.full_like(state["tag"]["fill"], float(iteration)))
    assert {float(s["step"]) for s in state["opt"]["state"].values()} == {float(iteration)}


# -- interpreter exit ----------------------------------------------------------------------------------------------
def test_script_ending_with_queued_checkpoints_exits_zero_with_all_files_complete(tmp_path: Path) -> None:
    """A script that queues checkpoints on a slow disk and ends without wait()/close() exits 0, and the exit hook
    has written every queued checkpoint completely and run the evictions (n_saved=2)."""
    proc = _run_worker("exit-pending", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pending = json.loads(proc.stdout.strip().splitlines()[-1])["pending"]
    assert pending >= 1, "nothing was pending when the script ended: the exit hook was not exercised"
    assert "NOT written" not in proc.stderr
    assert _temps(tmp_path) == []
    assert _names(tmp_path) == ["checkpoint_iteration=5.pt", "checkpoint_iteration=6.pt"]
    for name in _names(tmp_path):
        _assert_holds_iteration(tmp_path / name, int(INTERVAL.match(name).group(1)))  # type: ignore[union-attr]


def test_training_exception_with_save_final_exits_nonzero_with_final_checkpoint(tmp_path: Path) -> None:
    """A script whose training raises, with save_final=True, exits non-zero with the original error, and the final
    checkpoint (the state after the last completed step) is complete on disk."""
    proc = _run_worker("exit-raise", tmp_path)
    assert proc.returncode == 1, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "boom: injected training failure" in proc.stderr
    assert _temps(tmp_path) == []
    assert "final.pt" in _names(tmp_path)
    _assert_holds_iteration(tmp_path / "final.pt", 3)  # iteration 4 raised before its step
    for name in _names(tmp_path):
        if m := INTERVAL.match(name):
            _assert_holds_iteration(tmp_path / name, int(m.group(1)))


def test_exit_drain_writes_records_above_every_size_threshold(tmp_path: Path) -> None:
    """A 40 MiB record (above the CRC piece split and the write-behind step) queued when a handler calls sys.exit(0)
    without close() is written completely by the exit drain, started after interpreter shutdown began."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    proc = _run_worker("exit-large", directory, str(tmp_path / "expected.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at interpreter exit" not in proc.stderr and "NOT written" not in proc.stderr, proc.stderr[-3000:]
    assert _temps(directory) == []
    assert _names(directory) == ["net_iteration=1.pt"]
    got = _load(directory / "net_iteration=1.pt")
    expected = _load(tmp_path / "expected.pt")
    assert got.keys() == expected.keys()  # one object in save_dict: ignite saves its state_dict unwrapped
    assert torch.equal(got["weight"], expected["weight"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_exits_without_waiting_for_the_parents_writes(tmp_path: Path) -> None:
    """A child forked while the parent has a checkpoint queued exits promptly: the parent's pending writes are not
    the child's to wait for at its exit (exit_timeout is 10 s in the script)."""
    proc = _run_worker("fork", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["child_status"] == 0
    assert result["child_exit_s"] < 5.0, (
        f"the forked child took {result['child_exit_s']:.1f}s to exit: its exit hook waited for the parent's jobs"
    )
    assert _names(tmp_path) == ["checkpoint_iteration=1.pt"]  # the parent's write itself completed


# -- close() -------------------------------------------------------------------------------------------------------
def test_close_stops_the_writer_thread_and_is_idempotent(tmp_path: Path) -> None:
    """After close() no async_ckpt-writer thread is alive, a second close() is a silent no-op, and a save after
    close() raises WriterClosedError."""
    t = make_training(batches=3)
    saver = iteration_saver(tmp_path, t, fsync=False)
    saver.attach(t.engine)
    t.engine.run(t.data, max_epochs=1)
    saver.close()
    assert not worker_alive()
    assert not [th for th in threading.enumerate() if th.name == THREAD_NAME]
    assert saver.close() is None
    t.engine.state.iteration = 4
    with pytest.raises(WriterClosedError):
        saver.interval_completed(t.engine)
    assert _names(tmp_path) == [f"checkpoint_iteration={i}.pt" for i in (1, 2, 3)]


class _PausedExit:
    """Wraps the writer's lock; when the writer thread releases it on its way out (it has already cleared its own
    slot), the thread pauses there, so the test sees the moment a preempted thread would be in."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.resume = threading.Event()
        self.paused = threading.Event()

    def __enter__(self) -> _PausedExit:
        self.inner.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()
        if threading.current_thread().name == THREAD_NAME and _worker._thread is None:
            self.paused.set()
            self.resume.wait(1.0)  # bounded: a close() that joins the thread waits this long at most


def test_close_joins_a_writer_thread_that_is_already_on_its_way_out(tmp_path: Path) -> None:
    """close() returns only once the writer thread has ended, even when that thread had already left its loop
    (and cleared its slot) but not yet finished when close() looked at it."""
    t = make_training(batches=1)
    saver = iteration_saver(tmp_path, t, fsync=False)
    original = _worker._lock
    hook = _PausedExit(original)
    _worker._lock = hook  # type: ignore[assignment]
    try:
        t.engine.state.iteration, t.engine.state.epoch = 1, 1
        saver.interval_completed(t.engine)
        saver.close()
        alive_after_close = worker_alive()
    finally:
        hook.resume.set()
        _worker._lock = original
        for th in threading.enumerate():
            if th.name == THREAD_NAME:
                th.join(TIMEOUT)
    assert hook.paused.is_set(), "the writer never reached its exit path: the test proved nothing"
    assert not alive_after_close, "close() returned while the async_ckpt-writer thread was still alive"


# -- staging memory ------------------------------------------------------------------------------------------------
def test_staging_memory_does_not_grow_over_100_saves(tmp_path: Path) -> None:
    """Over 100 saves the stager allocates max_pending buffer sets once (the first two saves) and then reuses them:
    memory_bytes() and allocations stay constant."""
    t = make_training(batches=100)
    storage = GatedStorage()  # holds the writes until iteration 2, so the second save needs a second set of buffers
    saver = iteration_saver(tmp_path, t, n_saved=2, max_pending=2, storage=storage, prewarm=False)
    saver.attach(t.engine)
    stager = saver._pipeline.stager
    seen: list[tuple[int, int]] = []

    @t.engine.on(Events.ITERATION_COMPLETED)
    def _record(engine: Any) -> None:  # runs after the saver's handler
        seen.append((stager.allocations, stager.memory_bytes()))
        if engine.state.iteration == 2:
            storage.open_all()

    try:
        t.engine.run(t.data, max_epochs=1)
    finally:
        storage.open_all()
    saver.close()
    assert len(seen) == 100 and len(saver.stats.saves) == 100
    one_set = seen[0][1]
    assert seen[0] == (1, one_set) and one_set > 0
    assert seen[1] == (2, 2 * one_set), "the second save did not need a second buffer set"
    assert set(seen[1:]) == {(2, 2 * one_set)}, f"staging grew: {sorted(set(seen))}"


def test_a_closed_unbounded_saver_does_not_make_later_exits_unbounded(tmp_path: Path) -> None:
    """After a saver with exit_timeout=None is closed, the exit hook waits only as long as the savers that still have
    work allow (here 1 s), then reports the checkpoint it could not finish instead of waiting for it."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _doubles import GatedStorage
from conftest import make_training
from async_ckpt import AsyncCheckpointSaver

t = make_training(batches=1)
AsyncCheckpointSaver({str(tmp_path)!r}, t.save_dict, exit_timeout=None).close()
saver = AsyncCheckpointSaver({str(tmp_path)!r}, t.save_dict, save_interval=1, exit_timeout=1.0, storage=GatedStorage())
saver.interval_completed(t.engine)  # held at the gate, which never opens; the script ends without close()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after waiting 1.0s" in proc.stderr and "NOT written" in proc.stderr, proc.stderr[-3000:]
    assert _names(tmp_path) == []


def test_a_failure_during_the_exit_drain_is_reported_on_stderr(tmp_path: Path) -> None:
    """A queued write that fails while the interpreter exits (nobody left to raise it) is logged, never lost."""
    script = f"""
import errno, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_training
from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.storage import FileStorage

class Full(FileStorage):
    def _fsync_fd(self, fd):
        raise OSError(errno.ENOSPC, "No space left on device")

t = make_training(batches=1)
saver = AsyncCheckpointSaver({str(tmp_path)!r}, t.save_dict, save_interval=1, storage=Full())
saver.interval_completed(t.engine)  # queued; the script ends without wait() or close()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "at interpreter exit" in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
    assert _names(tmp_path) == []
