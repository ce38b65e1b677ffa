"""Overlap mode through a real ignite Engine: the optimizer's step pre-hook, not the writer, makes a deferred copy
when the writer is held back, so the file still holds the state at the event."""

from __future__ import annotations

import os
from typing import Any

import pytest
from _doubles import GATE_TIMEOUT, GatedStorage
from conftest import clone_tree, iteration_saver, load_checkpoint, make_training, trees_equal
from ignite.engine import Engine, Events

from async_ckpt import CheckpointWriteError, SnapshotError


def test_step_pre_hook_copies_while_the_writer_is_held_back(tmp_path: os.PathLike[str]) -> None:
    """With the writer stuck on an earlier file, the next optimizer step makes the deferred copy of the pending
    snapshot before it updates the parameters, so that snapshot's file equals the state at its event."""
    tr = make_training(batches=3)
    storage = GatedStorage()
    expected: dict[int, Any] = {}
    steps_before_release: list[int] = []

    @tr.engine.on(Events.ITERATION_COMPLETED)
    def _reference(engine: Engine) -> None:  # registered before the saver: runs first
        it = engine.state.iteration
        expected[it] = clone_tree({"net": tr.net.state_dict(), "opt": tr.opt.state_dict()})
        if it == 2:  # the writer holds iteration 1's file at the gate: it cannot copy iteration 2's snapshot
            assert storage.entered.wait(GATE_TIMEOUT), "the writer never reached the gate"
        if it == 3:  # iteration 3's step ran while the writer was still held: only the pre-hook could copy
            steps_before_release.append(it)
            storage.open_all()

    with iteration_saver(tmp_path, tr, snapshot_mode="overlap", storage=storage, max_pending=2) as saver:
        saver.attach(tr.engine)
        tr.engine.run(tr.data, max_epochs=1)
    assert steps_before_release == [3]
    assert not trees_equal(expected[2]["net"], expected[3]["net"])  # the step did change the parameters
    for it in (1, 2, 3):
        loaded = load_checkpoint(os.path.join(tmp_path, f"checkpoint_iteration={it}.pt"))
        assert trees_equal(loaded, expected[it]), it


def test_parameter_resized_before_its_deferred_copy_fails_only_that_save(tmp_path: os.PathLike[str]) -> None:
    """A parameter whose storage is resized in place between a checkpoint event and its deferred copy fails that
    save with a CheckpointWriteError caused by a SnapshotError naming the tensor; the saves before and after it are
    written with their events' states and training runs to the end."""
    tr = make_training(batches=3)
    storage = GatedStorage()
    expected: dict[int, Any] = {}

    @tr.engine.on(Events.ITERATION_COMPLETED)
    def _reference(engine: Engine) -> None:  # registered before the saver: runs first
        it = engine.state.iteration
        expected[it] = clone_tree({"net": tr.net.state_dict(), "opt": tr.opt.state_dict()})
        if it == 2:
            assert storage.entered.wait(GATE_TIMEOUT), "the writer never reached the gate"
        if it == 3:
            storage.open_all()

    saver = iteration_saver(tmp_path, tr, snapshot_mode="overlap", storage=storage, max_pending=2)
    saver.attach(tr.engine)

    @tr.engine.on(Events.ITERATION_COMPLETED(once=2))
    def _resize(engine: Engine) -> None:  # right after iteration 2's event, before its deferred copy can run
        weight = tr.net[0].weight
        weight.data.resize_(2 * weight.numel())  # same shape, a storage twice as large in new memory

    with pytest.raises(CheckpointWriteError) as info:
        try:
            tr.engine.run(tr.data, max_epochs=1)
        finally:
            saver.close()
    assert isinstance(info.value.__cause__, SnapshotError) and "resized in place" in str(info.value.__cause__)
    assert "checkpoint_iteration=2.pt" in str(info.value)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint_iteration=2.pt"))
    assert trees_equal(load_checkpoint(os.path.join(tmp_path, "checkpoint_iteration=1.pt")), expected[1])
    assert tr.engine.state.iteration == 3
    assert trees_equal(load_checkpoint(os.path.join(tmp_path, "checkpoint_iteration=3.pt")), expected[3])
