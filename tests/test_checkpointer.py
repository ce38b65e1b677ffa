"""Checkpointer in a plain PyTorch loop: snapshot semantics, retention after commit, failures, restart, loading."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from _doubles import GatedStorage
from conftest import checkpoint_names, clone_tree, load_checkpoint, trees_equal

from async_ckpt.core.checkpointer import Checkpointer
from async_ckpt.errors import CheckpointWriteError, SnapshotError, WriterClosedError
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.telemetry import SaveStats

TIMEOUT = 30.0


class FailingStorage(FileStorage):
    """A disk that is full for files whose name contains one of ``names``."""

    def __init__(self, *names: str) -> None:
        super().__init__(fsync=False)
        self.names = set(names)

    def _open(self, path: str) -> BinaryIO:
        if any(n in os.path.basename(path) for n in self.names):
            raise OSError(errno.ENOSPC, "No space left on device (test double)")
        return super()._open(path)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    return net, opt


def _train_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    net(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step()


def _steps(directory: Path) -> list[str]:
    return checkpoint_names(directory)


def test_files_hold_the_state_at_save_time(tmp_path: Path) -> None:
    """A file holds the state as it was when save() returned, although every tensor is changed in place right after
    and the writer only runs once all of that is done."""
    net, opt = _model()
    storage = GatedStorage()
    expected = {}
    with Checkpointer(tmp_path, max_pending=4, storage=storage) as ckpt:
        for step in range(4):
            _train_step(net, opt)
            state = {"model": net, "optim": opt, "extra": {"step": step, "t": torch.full((3,), float(step))}}
            expected[step] = clone_tree({"model": net.state_dict(), "optim": opt.state_dict(), "extra": state["extra"]})
            ckpt.save(step, state)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(100.0)
                state["extra"]["t"].add_(100.0)
        storage.open_all()
    for step, want in expected.items():
        got = load_checkpoint(ckpt.path_for(step))
        assert trees_equal(got, want), step


def test_keep_last_evicts_only_after_the_replacement_is_durable(tmp_path: Path) -> None:
    """With keep_last=1 the previous file stays on disk (and listed) while its replacement is pending, and goes
    once the replacement is durable."""
    net, _ = _model()
    storage = GatedStorage()
    with Checkpointer(tmp_path, keep_last=1, storage=storage) as ckpt:
        storage.release_one()
        ckpt.save(1, {"model": net}).result(TIMEOUT)
        storage.entered.clear()
        pending = ckpt.save(2, {"model": net})
        assert storage.entered.wait(TIMEOUT)
        assert not pending.done()
        assert _steps(tmp_path) == ["step_00000001.pt"]
        assert [c.step for c in ckpt.checkpoints()] == [1]
        assert ckpt.latest() == ckpt.path_for(1)
        storage.release_one()
        stats = pending.result(TIMEOUT)
        assert isinstance(stats, SaveStats) and stats.path == ckpt.path_for(2) and stats.ok
        ckpt.wait()
        assert _steps(tmp_path) == ["step_00000002.pt"]
        assert [c.step for c in ckpt.checkpoints()] == [2]


def test_keep_best_keeps_the_best_and_skips_worse(tmp_path: Path) -> None:
    """keep_best=2 (mode="min") keeps the two lowest losses, evicts the worst, and does not write a worse one."""
    net, _ = _model()
    with Checkpointer(tmp_path, keep_best=2, metric="loss", mode="min", fsync=False) as ckpt:
        for step, loss in enumerate([0.9, 0.5, 0.7, 0.8, 0.2, 0.5]):
            handle = ckpt.save(step, {"model": net}, metrics={"loss": torch.tensor(loss)})
            if step == 3:
                assert handle.path is None and handle.done() and handle.result() is None
    assert _steps(tmp_path) == ["step_00000001.pt", "step_00000004.pt"]
    assert [(c.step, c.metrics["loss"]) for c in ckpt.checkpoints()] == [(1, 0.5), (4, pytest.approx(0.2))]


def test_keep_last_and_keep_best_together(tmp_path: Path) -> None:
    """A checkpoint stays while either rule keeps it: the best one survives keep_last=1."""
    net, _ = _model()
    with Checkpointer(tmp_path, keep_last=1, keep_best=1, metric="acc", fsync=False) as ckpt:
        for step, acc in enumerate([0.1, 0.9, 0.3, 0.2]):
            ckpt.save(step, {"model": net}, metrics={"acc": acc})
    assert _steps(tmp_path) == ["step_00000001.pt", "step_00000003.pt"]


def test_failure_is_raised_with_cause_and_retention_is_rolled_back(tmp_path: Path) -> None:
    """A failed write raises CheckpointWriteError (cause: the OSError) once, keeps the file it would have evicted,
    and the next save evicts as if the failed one never happened."""
    net, _ = _model()
    ckpt = Checkpointer(tmp_path, keep_last=1, storage=FailingStorage("step_00000002.pt"))
    ckpt.save(1, {"model": net}).result(TIMEOUT)
    ckpt.save(2, {"model": net})
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.wait()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert info.value.path == ckpt.path_for(2)
    ckpt.wait()  # raised once
    assert [c.step for c in ckpt.checkpoints()] == [1]
    assert _steps(tmp_path) == ["step_00000001.pt"]
    ckpt.save(3, {"model": net})
    ckpt.close()
    assert _steps(tmp_path) == ["step_00000003.pt"]


def test_failure_read_through_the_handle_is_not_raised_again(tmp_path: Path) -> None:
    """handle.result() raises the write failure; the checkpointer then does not raise it a second time."""
    net, _ = _model()
    ckpt = Checkpointer(tmp_path, storage=FailingStorage("step_00000007.pt"))
    handle = ckpt.save(7, {"model": net})
    with pytest.raises(CheckpointWriteError) as info:
        handle.result(TIMEOUT)
    assert isinstance(info.value.__cause__, OSError)
    assert handle.exception() is info.value
    ckpt.close()
    assert ckpt.checkpoints() == []


def test_snapshot_error_leaves_retention_unchanged(tmp_path: Path) -> None:
    """A state that cannot be copied raises SnapshotError at save() and evicts nothing."""
    net, _ = _model()
    with Checkpointer(tmp_path, keep_last=1, fsync=False) as ckpt:
        ckpt.save(1, {"model": net})
        with pytest.raises(SnapshotError):
            ckpt.save(2, {"model": net, "lock": threading.Lock()})
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [1]
    assert _steps(tmp_path) == ["step_00000001.pt"]


def test_restart_continues_retention_from_the_manifest(tmp_path: Path) -> None:
    """A new Checkpointer on the same directory lists the kept files with their metrics and keeps pruning them."""
    net, _ = _model()
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, metric="acc", fsync=False) as first:
        for step, acc in [(10, 0.9), (20, 0.1), (30, 0.2), (40, 0.3)]:
            first.save(step, {"model": net}, metrics={"acc": acc})
    assert _steps(tmp_path) == ["step_00000010.pt", "step_00000030.pt", "step_00000040.pt"]
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, metric="acc", fsync=False) as second:
        assert [(c.step, c.metrics) for c in second.checkpoints()] == [
            (10, {"acc": 0.9}),
            (30, {"acc": 0.2}),
            (40, {"acc": 0.3}),
        ]
        assert second.latest() == second.path_for(40)
        second.save(50, {"model": net}, metrics={"acc": 0.95})
    assert _steps(tmp_path) == ["step_00000040.pt", "step_00000050.pt"]


def test_load_into_objects(tmp_path: Path) -> None:
    """load() returns the saved state and loads it into the given objects; "latest", a step and a path all work,
    and a file still being written is waited for."""
    net, opt = _model()
    _train_step(net, opt)
    want = clone_tree({"model": net.state_dict(), "optim": opt.state_dict()})
    storage = GatedStorage()
    with Checkpointer(tmp_path, storage=storage) as ckpt:
        handle = ckpt.save(5, {"model": net, "optim": opt, "epoch": 3})
        storage.open_all()
        state = ckpt.load(5)
        assert handle.done() and state["epoch"] == 3
        _train_step(net, opt)
        assert not trees_equal(net.state_dict(), want["model"])
        ckpt.load("latest", into={"model": net, "optim": opt})
        assert trees_equal(net.state_dict(), want["model"])
        assert trees_equal(opt.state_dict(), want["optim"])
        assert trees_equal(ckpt.load(ckpt.path_for(5))["model"], want["model"])
        changed = clone_tree(net.state_dict())
        _train_step(net, opt)
        with pytest.raises(KeyError, match="no entry 'sched'"):
            ckpt.load(5, into={"model": net, "sched": net})
        assert not trees_equal(net.state_dict(), changed) and not trees_equal(net.state_dict(), want["model"])


def test_load_latest_without_checkpoints_says_so(tmp_path: Path) -> None:
    """load() on an empty directory raises FileNotFoundError naming it."""
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load()


def test_context_manager_keeps_the_training_exception(tmp_path: Path) -> None:
    """An exception leaving the with block is the one raised even when a checkpoint failed too."""
    net, _ = _model()
    with pytest.raises(KeyError, match="training bug"):  # noqa: SIM117
        with Checkpointer(tmp_path, storage=FailingStorage("step_00000001.pt")) as ckpt:
            ckpt.save(1, {"model": net})
            raise KeyError("training bug")
    with pytest.raises(WriterClosedError):
        ckpt.save(2, {"model": net})


def test_bad_arguments(tmp_path: Path) -> None:
    """Bad steps, states, metrics and rules raise at the call, naming what to pass."""
    net, _ = _model()
    with pytest.raises(ValueError, match="metric"):
        Checkpointer(tmp_path, keep_best=1)
    with Checkpointer(tmp_path, keep_best=1, metric="acc") as ckpt:
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, {"model": net}, metrics={"acc": 1.0})
        with pytest.raises(ValueError, match="acc"):
            ckpt.save(1, {"model": net})
        with pytest.raises(TypeError, match="metrics"):
            ckpt.save(1, {"model": net}, metrics={"acc": "high"})
        with pytest.raises(TypeError, match="mapping"):
            ckpt.save(1, net)  # type: ignore[arg-type]


def test_file_prefix_names_and_plain_state(tmp_path: Path) -> None:
    """file_prefix names files <prefix>_step_<8 digits>.pt; plain tensors and numbers are saved as given."""
    state: dict[str, Any] = {"w": torch.arange(4.0), "n": 7}
    with Checkpointer(tmp_path, file_prefix="run", fsync=False) as ckpt:
        ckpt.save(12, state)
    assert _steps(tmp_path) == ["run_step_00000012.pt"]
    assert trees_equal(load_checkpoint(tmp_path / "run_step_00000012.pt"), state)


def test_overlap_mode_file_holds_the_state_at_save(tmp_path: Path) -> None:
    """With snapshot_mode="overlap" the optimizer's next step() waits for the copy: the file holds the state at save."""
    net, opt = _model()
    _train_step(net, opt)
    want = clone_tree({"model": net.state_dict(), "optim": opt.state_dict()})
    durable: list[SaveStats] = []
    with Checkpointer(tmp_path, snapshot_mode="overlap", fsync=False, on_durable=durable.append) as ckpt:
        ckpt.save(1, {"model": net, "optim": opt})
        _train_step(net, opt)
    assert trees_equal(load_checkpoint(ckpt.path_for(1)), want)
    assert [s.path for s in durable] == [ckpt.path_for(1)]


def test_interpreter_exit_flushes_unclosed_saves(tmp_path: Path) -> None:
    """A script that saves and exits without close() still leaves its checkpoints durable (and pruned)."""
    script = (
        "import sys, torch\n"
        "from async_ckpt.core.checkpointer import Checkpointer\n"
        "ckpt = Checkpointer(sys.argv[1], keep_last=2)\n"
        "for step in range(4):\n"
        "    ckpt.save(step, {'w': torch.full((1000,), float(step))})\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["step_00000002.pt", "step_00000003.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "step_00000003.pt")["w"], torch.full((1000,), 3.0))


def test_overflow_skip_drops_a_save_while_the_writer_is_busy(tmp_path: Path) -> None:
    """With overflow="skip" a save due while max_pending snapshots are in flight is dropped with a warning."""
    net, _ = _model()
    storage = GatedStorage()
    with Checkpointer(tmp_path, max_pending=1, overflow="skip", storage=storage) as ckpt:
        first = ckpt.save(1, {"model": net})
        assert storage.entered.wait(TIMEOUT)
        with pytest.warns(RuntimeWarning, match="skipped the checkpoint of step 2"):
            second = ckpt.save(2, {"model": net})
        assert second.path is None and second.not_written is not None and second.done()
        storage.open_all()
        assert first.result(TIMEOUT) is not None
    assert _steps(tmp_path) == ["step_00000001.pt"] and ckpt.stats.skipped == 1


def test_a_save_that_allocates_has_the_other_buffer_sets_made_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first save of a Checkpointer allocates its buffers on the caller's thread (nothing saw the state before);
    the other max_pending - 1 sets are then made on the prewarm thread, so a save that comes while the first is
    still being written allocates nothing on the caller's thread."""
    from async_ckpt.pipeline import snapshot

    made_on: list[str] = []

    class Recorded(snapshot._BufferSet):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made_on.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(snapshot, "_BufferSet", Recorded)
    storage = GatedStorage()
    ckpt = Checkpointer(tmp_path, keep_last=3, max_pending=2, storage=storage)
    state = {"w": torch.randn(1000)}
    ckpt.save(1, state)
    assert ckpt._pipeline.stager.join_prewarm(30)
    assert storage.entered.wait(30)  # the first write is held at the gate: its buffers are in use
    state["w"].add_(1)
    ckpt.save(2, state)
    storage.open_all()
    ckpt.close()
    caller = threading.current_thread().name
    assert made_on == [caller, snapshot.PREWARM_THREAD_NAME]
    assert torch.equal(load_checkpoint(ckpt.path_for(2))["w"], state["w"])
