"""Overlap mode through a real ignite Engine: the optimizer's step pre-hook, not the writer, makes a deferred copy
when the writer is held back, so the file still holds the state at the event."""

from __future__ import annotations

import os
from typing import Any

from _doubles import GATE_TIMEOUT, GatedStorage
from conftest import clone_tree, iteration_saver, load_checkpoint, make_training, trees_equal
from ignite.engine import Engine, Events


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
