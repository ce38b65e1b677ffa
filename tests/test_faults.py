"""Injected file-system faults and backpressure: errors surface once on the training thread, files stay intact.

Faults come from :class:`FaultyStorage`, a ``FileStorage`` whose primitives raise ``OSError`` for chosen files.
Backpressure comes from :class:`GatedStorage` (shared, in ``_doubles``), whose checkpoint writes wait for permits
the test hands out; the test hands them out exactly when the training thread starts to wait for the writer (a
``threading.Condition`` whose ``wait`` releases a permit first), so no sleep is ever used to order the threads and
every wait is bounded.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from _doubles import GatedStorage, SlowStorage
from conftest import Training, clone_tree, iteration_saver, make_training, trees_equal
from conftest import checkpoint_names as _names
from conftest import load_checkpoint as _load
from conftest import temp_names as _temps
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver, CheckpointWriteError, FileStorage, SnapshotError

TIMEOUT = 30.0
FIRST = "checkpoint_iteration=1.pt"
SECOND = "checkpoint_iteration=2.pt"
THIRD = "checkpoint_iteration=3.pt"


# -- doubles -------------------------------------------------------------------------------------------------------
class _FullDisk:
    """A file object that accepts ``budget`` bytes and then fails every write with ENOSPC."""

    def __init__(self, raw: BinaryIO, budget: int) -> None:
        self._raw = raw
        self._budget = budget

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self._budget:
            self._raw.write(view[: self._budget])
            self._budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= len(view)
        return self._raw.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


class FaultyStorage(FileStorage):
    """Fails one kind of operation on files whose name contains ``match``.

    Args:
        op: ``"open"``, ``"write"`` (ENOSPC-style, after 4 KiB), ``"fsync"`` (the file), ``"fsync_dir"`` (the
            directory, right after the matching file was renamed into place), ``"replace"``, ``"unlink"`` or
            ``"link"``.
        err: the errno of the injected ``OSError``.
        match: a substring of the final file name.
        times: how many faults to inject (``None``: every matching call).
        gate: if given, a matching call waits (bounded) for it before failing.
    """

    def __init__(
        self,
        op: str,
        err: int,
        match: str,
        times: int | None = 1,
        gate: threading.Event | None = None,
        fsync: bool = True,
    ) -> None:
        super().__init__(fsync=fsync)
        self.op, self.err, self.match, self.times, self.gate = op, err, match, times, gate
        self.injected = 0
        self._renamed = ""

    def _fires(self, op: str, path: str) -> bool:
        """Whether this call gets a fault (counted); waits for the gate first, if there is one."""
        if op != self.op or self.match not in os.path.basename(path):
            return False
        if self.times is not None and self.injected >= self.times:
            return False
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT), "test gate never opened"
        self.injected += 1
        return True

    def _hit(self, op: str, path: str) -> None:
        if self._fires(op, path):
            raise OSError(self.err, os.strerror(self.err), path)

    def _open(self, path: str) -> BinaryIO:
        self._hit("open", path)
        raw = super()._open(path)
        if self._fires("write", path):
            return _FullDisk(raw, 4096)  # type: ignore[return-value]
        return raw

    def _fsync_fd(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            renamed, self._renamed = self._renamed, ""
            self._hit("fsync_dir", renamed)
        else:
            self._hit("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self._hit("replace", dst)
        super()._replace(src, dst)
        self._renamed = dst

    def _unlink(self, path: str) -> None:
        self._hit("unlink", path)
        super()._unlink(path)

    def _link(self, src: str, dst: str) -> None:
        self._hit("link", dst)
        super()._link(src, dst)


class _OnWait(threading.Condition):
    """A condition whose ``wait`` first calls ``before_wait`` and never blocks longer than the test timeout."""

    def __init__(self, before_wait: Callable[[], None]) -> None:
        super().__init__()
        self.before_wait = before_wait
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.before_wait()
        notified = super().wait(TIMEOUT if timeout is None else min(timeout, TIMEOUT))
        if not notified and timeout is None:
            raise TimeoutError("the writer never made progress")
        return notified


# -- helpers -------------------------------------------------------------------------------------------------------


def _state(save_dict: dict[str, Any]) -> dict[str, Any]:
    return clone_tree({k: v.state_dict() for k, v in save_dict.items()})


def _saved(saver: AsyncCheckpointSaver, which: str = "_interval_checkpoint") -> list[str]:
    return [item.filename for item in getattr(saver, which)._saved]


def _at_iteration(engine: Engine, iteration: int, fn: Callable[[], None]) -> None:
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda _: fn())


def _assert_cause(error: CheckpointWriteError, err: int) -> None:
    """``error`` is chained to the injected ``OSError``, with errno ``err``."""
    cause = error.__cause__
    assert isinstance(cause, OSError) and cause.errno == err, f"cause is {cause!r}, not the injected OSError"


def _run_expecting_write_error(t: Training, err: int) -> CheckpointWriteError:
    """Run one epoch, which must raise CheckpointWriteError chained to the injected ``OSError`` with errno ``err``."""
    with pytest.raises(CheckpointWriteError) as info:
        t.engine.run(t.data, max_epochs=1)
    _assert_cause(info.value, err)
    return info.value


# -- errors surface once, on the training thread ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("op", "err"),
    [("open", errno.EACCES), ("write", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EIO)],
)
def test_failed_write_raises_at_next_event_and_keeps_previous_file(tmp_path: Path, op: str, err: int) -> None:
    """A write failing at ``op`` raises CheckpointWriteError (``__cause__`` the OSError) out of engine.run at the
    next checkpoint event, leaves neither a partial nor a temporary file, stays out of the top-N list, and with
    n_saved=1 the previous good checkpoint survives, unchanged."""
    t = make_training(batches=4)
    storage = FaultyStorage(op, err, match=SECOND)
    saver = iteration_saver(tmp_path, t, n_saved=1, storage=storage)
    # Registered before attach, so it runs before the saver's handler: the failed write has finished by then.
    _at_iteration(t.engine, 3, lambda: saver._pipeline.wait(TIMEOUT))
    saver.attach(t.engine)
    reference: dict[str, Any] = {}
    _at_iteration(t.engine, 1, lambda: reference.update(_state(t.save_dict)))

    error = _run_expecting_write_error(t, err)

    assert t.engine.state.iteration == 3, "not raised at the first checkpoint event after the failure"
    assert storage.injected == 1
    assert error.path.endswith(SECOND)
    assert _temps(tmp_path) == []
    assert _names(tmp_path) == [FIRST]
    assert trees_equal(_load(tmp_path / FIRST), reference)
    assert _saved(saver) == [FIRST]
    saver.wait(timeout=TIMEOUT)  # reported once: nothing left to raise
    saver.close()


def test_failure_is_raised_by_wait_once(tmp_path: Path) -> None:
    """A failed background write is raised by the next wait(), chained to the OSError, and only once."""
    t = make_training()
    saver = iteration_saver(tmp_path, t, storage=FaultyStorage("fsync", errno.EIO, match=FIRST))
    t.engine.state.iteration, t.engine.state.epoch = 1, 1
    saver.interval_completed(t.engine)
    with pytest.raises(CheckpointWriteError) as info:
        saver.wait(timeout=TIMEOUT)
    _assert_cause(info.value, errno.EIO)
    saver.wait(timeout=TIMEOUT)
    saver.close()
    assert _names(tmp_path) == [] and _temps(tmp_path) == []
    assert _saved(saver) == []


def test_failures_are_raised_by_close_once(tmp_path: Path) -> None:
    """close() raises the first of two failed writes (``more`` counts the other) and a second close() is silent."""
    t = make_training()
    gate = threading.Event()
    storage = FaultyStorage("open", errno.ENOSPC, match="checkpoint_iteration", times=None, gate=gate)
    saver = iteration_saver(tmp_path, t, storage=storage)
    try:
        for i in (1, 2):  # both queued before either fails
            t.engine.state.iteration, t.engine.state.epoch = i, 1
            saver.interval_completed(t.engine)
    finally:
        gate.set()
    with pytest.raises(CheckpointWriteError) as info:
        saver.close()
    assert info.value.path.endswith(FIRST) and info.value.more == 1
    _assert_cause(info.value, errno.ENOSPC)
    saver.close()
    assert _names(tmp_path) == [] and _temps(tmp_path) == []


def test_failure_of_last_save_is_raised_at_completed_once(tmp_path: Path) -> None:
    """A failure of the last checkpoint of a run is raised out of engine.run at COMPLETED, then never again; the
    previous checkpoint survives (n_saved=1) and stays the only one in the top-N list."""
    t = make_training(batches=3)
    saver = iteration_saver(tmp_path, t, n_saved=1, storage=FaultyStorage("replace", errno.EIO, match=THIRD))
    completed = []
    t.engine.add_event_handler(Events.COMPLETED, lambda _: completed.append(True))
    saver.attach(t.engine)
    error = _run_expecting_write_error(t, errno.EIO)
    assert completed == [True], "raised before COMPLETED"
    assert error.path.endswith(THIRD)
    saver.wait(timeout=TIMEOUT)
    saver.close()
    assert _names(tmp_path) == [SECOND] and _temps(tmp_path) == []
    assert _saved(saver) == [SECOND]


def test_directory_fsync_failure_is_reported_and_leaves_only_complete_files(tmp_path: Path) -> None:
    """A failing directory fsync after the rename is reported as CheckpointWriteError; every file left under a
    final name is complete, the renamed file stays in the top-N list (it is on disk), and the eviction it carried
    waits for the next durable save instead of being forgotten."""
    t = make_training(batches=3)
    saver = iteration_saver(tmp_path, t, n_saved=1, storage=FaultyStorage("fsync_dir", errno.EIO, match=THIRD))
    saver.attach(t.engine)
    _run_expecting_write_error(t, errno.EIO)
    saver.close()
    assert _temps(tmp_path) == []
    for name in _names(tmp_path):
        _load(tmp_path / name)
    assert _names(tmp_path) == sorted([SECOND, THIRD])
    assert _saved(saver) == [THIRD]
    handler = saver._handlers[id(saver._interval_checkpoint)]
    assert handler.pending_removes() == [str(tmp_path / SECOND)]


def test_unlink_failure_is_reported_and_the_new_checkpoint_is_kept(tmp_path: Path) -> None:
    """When evicting an old file fails, the error is raised (``__cause__`` the OSError) but the new checkpoint,
    which is durable, stays on disk and in the top-N list."""
    t = make_training(batches=2)
    saver = iteration_saver(tmp_path, t, n_saved=1, storage=FaultyStorage("unlink", errno.EACCES, match=FIRST))
    saver.attach(t.engine)
    _run_expecting_write_error(t, errno.EACCES)
    saver.close()
    assert SECOND in _names(tmp_path)
    _load(tmp_path / SECOND)
    assert _saved(saver) == [SECOND]


def test_link_failure_falls_back_to_a_full_copy(tmp_path: Path) -> None:
    """If hard-linking an identical checkpoint fails, the file is written as a copy: no error, both complete."""
    t = make_training(batches=2, metrics=(0.5,))
    storage = FaultyStorage("link", errno.EIO, match="best.pt", times=None)
    saver = iteration_saver(
        tmp_path, t, save_key_metric=True, key_metric_name="acc", key_metric_filename="best.pt", storage=storage
    )
    saver.attach(t.engine)
    t.engine.run(t.data, max_epochs=1)  # the best model is the state of the last interval save: a link candidate
    saver.close()
    assert storage.injected >= 1, "no hard link was attempted: the fallback was not exercised"
    assert trees_equal(_load(tmp_path / "best.pt"), _load(tmp_path / SECOND))
    assert trees_equal(_load(tmp_path / "best.pt"), _state(t.save_dict))
    assert _temps(tmp_path) == []


# -- top-N bookkeeping never loses a good file --------------------------------------------------------------------
def test_failed_save_with_a_later_save_in_flight_keeps_top_n_bounded(tmp_path: Path) -> None:
    """When a save fails while a later one is already queued, the failed name leaves the top-N list, no good file
    is pruned early, and afterwards the list and the directory hold at most n_saved interval checkpoints."""
    t = make_training(batches=5)
    gate = threading.Event()
    saver = iteration_saver(
        tmp_path, t, n_saved=1, storage=FaultyStorage("open", errno.ENOSPC, match=SECOND, gate=gate)
    )
    saver.attach(t.engine)

    def after_third_queued() -> None:  # runs after the saver's handler: iteration 3 is queued behind the failure
        gate.set()
        assert saver._pipeline.wait(TIMEOUT)

    _at_iteration(t.engine, 3, after_third_queued)
    try:
        with pytest.raises(CheckpointWriteError) as info:
            t.engine.run(t.data, max_epochs=1)
    finally:
        gate.set()
    assert info.value.path.endswith(SECOND) and t.engine.state.iteration == 4
    assert SECOND not in _saved(saver)
    assert THIRD in _names(tmp_path) and THIRD in _saved(saver)
    assert len(_saved(saver)) <= 1, f"top-N list {_saved(saver)} is longer than n_saved=1"
    for i in (5, 6):  # training resumes
        t.engine.state.iteration = i
        saver.interval_completed(t.engine)
    saver.wait(timeout=TIMEOUT)
    saver.close()
    assert _names(tmp_path) == ["checkpoint_iteration=6.pt"], f"n_saved=1 but {_names(tmp_path)} are kept"


def test_failed_best_model_save_never_lets_a_worse_model_replace_the_best(tmp_path: Path) -> None:
    """If a best-model save fails while a better one is already queued, the best file keeps the better model: a
    later, worse metric must not overwrite it."""
    net = torch.nn.Linear(1, 1, bias=False)
    gate = threading.Event()
    storage = FaultyStorage("open", errno.ENOSPC, match="best.pt", gate=gate)
    storage.times = 0  # armed below, for the second write only
    saver = AsyncCheckpointSaver(
        str(tmp_path),
        {"net": net},
        save_key_metric=True,
        key_metric_name="acc",
        key_metric_filename="best.pt",
        storage=storage,
    )
    engine = Engine(lambda e, b: None)

    def epoch(n: int, acc: float) -> None:
        engine.state.epoch, engine.state.iteration = n, n
        engine.state.metrics["acc"] = acc
        with torch.no_grad():
            net.weight.fill_(acc)
        saver.metrics_completed(engine)

    try:
        epoch(1, 0.5)
        saver._pipeline.wait(TIMEOUT)
        storage.times = 1  # the next best-model write waits for the gate, then fails
        epoch(2, 0.7)
        epoch(3, 0.9)  # queued behind the failing one
    finally:
        gate.set()
    saver._pipeline.wait(TIMEOUT)
    with pytest.raises(CheckpointWriteError):
        epoch(4, 0.8)  # the failure is reported here; nothing is saved at this event
    best = float(_load(tmp_path / "best.pt")["weight"])
    assert best == pytest.approx(0.9)
    epoch(5, 0.6)  # worse than the 0.9 on disk
    saver.wait(timeout=TIMEOUT)
    saver.close()
    best = float(_load(tmp_path / "best.pt")["weight"])
    assert best == pytest.approx(0.9), (
        f"best.pt now holds the 0.6 model, not the 0.9 one ({_saved(saver, '_key_metric_checkpoint')})"
    )


# -- what cannot be serialized ---------------------------------------------------------------------------------------
class _WithLambda:
    def state_dict(self) -> dict[str, Any]:
        return {"w": torch.ones(3), "fn": lambda: 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_unpicklable_state_fails_at_its_event(tmp_path: Path) -> None:
    """A lambda in a state_dict fails the checkpoint at its event, where MONAI's synchronous torch.save fails: a
    SnapshotError carrying the pickling error out of engine.run, nothing queued, no file and no temporary file."""
    t = make_training(batches=2)
    saver = AsyncCheckpointSaver(
        str(tmp_path), {**t.save_dict, "extra": _WithLambda()}, epoch_level=False, save_interval=1
    )
    saver.attach(t.engine)
    with pytest.raises(SnapshotError, match="could not be pickled") as info:
        t.engine.run(t.data, max_epochs=1)
    assert info.value.__cause__ is not None and "lambda" in repr(info.value.__cause__)
    assert t.engine.state.iteration == 1  # the first event raised
    saver.close()
    assert _names(tmp_path) == [] and _temps(tmp_path) == []
    assert _saved(saver) == []


# -- the final checkpoint on a training exception --------------------------------------------------------------------
def test_final_checkpoint_is_durable_before_training_exception_leaves_run(tmp_path: Path) -> None:
    """With save_final, an exception in training still writes the final checkpoint completely, and it is on disk
    (and recorded as durable) by the time the original exception leaves engine.run, on a slow disk."""
    t = make_training(batches=5, fail_at_iteration=4)
    saver = iteration_saver(
        tmp_path, t, save_final=True, final_filename="final.pt", n_saved=2, storage=SlowStorage(0.05)
    )
    saver.attach(t.engine)
    with pytest.raises(RuntimeError, match="boom") as info:
        t.engine.run(t.data, max_epochs=1)
    # Checked before wait()/close(): the handler itself must have made it durable.
    assert not isinstance(info.value, CheckpointWriteError)
    assert (tmp_path / "final.pt").exists(), "final checkpoint not on disk when the exception left engine.run"
    assert any(s.reason == "final" and s.ok for s in saver.stats.saves)
    assert trees_equal(_load(tmp_path / "final.pt"), _state(t.save_dict))
    saver.close()
    assert _temps(tmp_path) == []


# -- backpressure -----------------------------------------------------------------------------------------------------
def _run_gated(
    tmp_path: Path, overflow: str
) -> tuple[Training, AsyncCheckpointSaver, _OnWait, list[warnings.WarningMessage]]:
    """Train 2 epochs of 4 iterations, saving every iteration, the best model and the final state with max_pending=1
    on a gated disk; return the training, the closed saver, the stager's condition and the "skipped" warnings."""
    t = make_training(batches=4, metrics=(0.5, 0.7))
    storage = GatedStorage()
    saver = iteration_saver(
        tmp_path,
        t,
        save_final=True,
        save_key_metric=True,
        key_metric_name="acc",
        max_pending=1,
        overflow=overflow,
        storage=storage,
    )
    # The training thread waits for a free snapshot slot -> let exactly one checkpoint write through;
    # it waits for the writer to drain (COMPLETED, wait, close) -> let everything through.
    stager_cond = _OnWait(storage.release_one)
    saver._pipeline.stager._cond = stager_cond
    saver._pipeline.client._cond = _OnWait(storage.open_all)
    saver.attach(t.engine)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.engine.run(t.data, max_epochs=2)
    finally:
        storage.open_all()
    saver.close()
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)]
    return t, saver, stager_cond, skipped


def test_skip_overflow_drops_only_interval_saves(tmp_path: Path) -> None:
    """With max_pending=1 and overflow="skip", interval saves due while the writer is busy are dropped with a
    RuntimeWarning and counted in stats.skipped, while key-metric and final saves wait and are all written."""
    t, saver, stager_cond, skipped = _run_gated(tmp_path, "skip")
    # Iteration 1 takes the only slot and its write is held until the key-metric save at the end of epoch 1 needs
    # the slot; from then on a key-metric save holds it. So iterations 2-8 are all due while the writer is busy.
    assert saver.stats.skipped == 7
    assert len(skipped) == 7
    reasons = [s.reason for s in saver.stats.saves if s.ok]
    assert reasons.count("interval") == 1
    assert reasons.count("key_metric") == 2, "a key-metric save was dropped"
    assert reasons.count("final") == 1, "the final save was dropped"
    assert stager_cond.waits >= 2, "the key-metric saves did not have to wait: the test proved nothing"
    assert _names(tmp_path) == sorted(
        ["checkpoint_iteration=1.pt", "checkpoint_key_metric=0.7000.pt", "checkpoint_final_iteration=8.pt"]
    )
    assert trees_equal(_load(tmp_path / "checkpoint_final_iteration=8.pt"), _state(t.save_dict))


def test_block_overflow_drops_nothing(tmp_path: Path) -> None:
    """With max_pending=1 and overflow="block", every interval save waits for the writer instead of being dropped:
    no warning, nothing skipped, every checkpoint written."""
    _, saver, stager_cond, skipped = _run_gated(tmp_path, "block")
    assert not skipped
    assert saver.stats.skipped == 0
    reasons = [s.reason for s in saver.stats.saves if s.ok]
    assert reasons.count("interval") == 8
    assert reasons.count("key_metric") == 2 and reasons.count("final") == 1
    assert stager_cond.waits >= 7, "interval saves did not wait for the writer: the test proved nothing"
    assert [n for n in _names(tmp_path) if "iteration=" in n and "final" not in n] == sorted(
        f"checkpoint_iteration={i}.pt" for i in range(1, 9)
    )


def test_state_larger_than_host_memory_is_a_clear_error_at_the_event(tmp_path: Path, monkeypatch: Any) -> None:
    """When the staging buffers cannot be allocated, the event raises SnapshotError saying what to change, the slot
    is given back (no hang), nothing is queued, and the previous checkpoint stays."""
    from async_ckpt.pipeline import snapshot

    t = make_training(batches=1)
    saver = iteration_saver(tmp_path, t, n_saved=1)
    saver.attach(t.engine)
    t.engine.run(t.data, max_epochs=1)
    before = _names(tmp_path)

    class NoMemory(snapshot._BufferSet):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 TiB")

    monkeypatch.setattr(snapshot, "_BufferSet", NoMemory)
    saver._pipeline.stager._free.clear()  # the next save needs a fresh allocation
    with torch.no_grad():
        t.net[0].weight.add_(1)
    for _ in range(3):  # the slot is returned each time: repeated failures never block
        t.engine.state.iteration += 1
        with pytest.raises(SnapshotError, match="max_pending") as info:
            saver.interval_completed(t.engine)
        assert isinstance(info.value.__cause__, RuntimeError)
    saver.close()
    assert _names(tmp_path) == before
