"""Nested ``save_dict`` values (``{"nets": [gen, disc]}``) through every part of the saver that walks ``save_dict``.

File names and contents are compared to MONAI in ``test_parity.py``; here: prewarm, overlap mode's optimizer guard and
resume find the objects inside lists and dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from conftest import Training, checkpoint_names, clone_tree, make_training, trees_equal
from conftest import load_checkpoint as _load
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver


def nested(t: Training) -> dict[str, Any]:
    return {"nets": [t.net], "optims": {"adam": t.opt}}


def test_prewarm_allocates_for_a_nested_save_dict(tmp_path: Path) -> None:
    """With prewarm=True and nested values, the buffers exist after attach and no save allocates again."""
    t = make_training()
    t.opt.zero_grad()
    t.net(torch.randn(4, 4)).pow(2).mean().backward()
    t.opt.step()  # the optimizer state exists, so the layout is final at attach
    with AsyncCheckpointSaver(str(tmp_path), nested(t), save_interval=1, prewarm=True) as saver:
        saver.attach(t.engine)
        assert saver._pipeline.stager.join_prewarm(timeout=60)  # prewarm runs in the background
        assert saver._pipeline.stager.allocations == 2
        t.engine.run(t.data, max_epochs=3)
    assert saver._pipeline.stager.allocations == 2
    assert len(checkpoint_names(tmp_path)) == 3


def test_overlap_mode_guards_an_optimizer_nested_in_a_list(tmp_path: Path) -> None:
    """In overlap mode an optimizer inside a nested value is found: its state's copy is deferred to its next step(),
    and the file still holds the state at the event."""
    t = make_training(batches=2)
    expected: dict[int, Any] = {}
    deferred: dict[int, bool] = {}

    @t.engine.on(Events.ITERATION_COMPLETED)
    def _reference(engine: Engine) -> None:  # registered before the saver: runs first
        expected[engine.state.iteration] = clone_tree(
            {"nets": [t.net.state_dict()], "optims": {"adam": t.opt.state_dict()}}
        )

    saver = AsyncCheckpointSaver(str(tmp_path), nested(t), save_interval=1, epoch_level=False, snapshot_mode="overlap")
    saver.attach(t.engine)

    @t.engine.on(Events.ITERATION_COMPLETED)
    def _after_save(engine: Engine) -> None:
        deferred[engine.state.iteration] = bool(saver._pipeline._deferred)

    with saver:
        t.engine.run(t.data, max_epochs=2)
    assert deferred and all(deferred.values()), deferred
    for it, state in expected.items():
        assert trees_equal(_load(os.path.join(tmp_path, f"checkpoint_iteration={it}.pt")), state), it


def test_resume_prunes_the_files_of_a_nested_single_key_save_dict(tmp_path: Path) -> None:
    """``resume=True`` finds the files a single-key nested ``save_dict`` named after its key, and keeps pruning them."""
    first = make_training(seed=0, batches=1)
    with AsyncCheckpointSaver(str(tmp_path), {"nets": [first.net, first.opt]}, save_interval=1, n_saved=2) as saver:
        saver.attach(first.engine)
        first.engine.run(first.data, max_epochs=4)
    assert checkpoint_names(tmp_path) == ["nets_epoch=3.pt", "nets_epoch=4.pt"]
    second = make_training(seed=1, batches=1)
    second.engine.state.epoch = 4  # resumed at epoch 4 (as a trainer loaded from the checkpoint is)
    second.engine.state.iteration = 4
    second.engine.state.max_epochs = 4
    with AsyncCheckpointSaver(
        str(tmp_path), {"nets": [second.net, second.opt]}, save_interval=1, n_saved=2, resume=True
    ) as saver:
        saver.attach(second.engine)
        second.engine.run(second.data, max_epochs=6)
    assert checkpoint_names(tmp_path) == ["nets_epoch=5.pt", "nets_epoch=6.pt"]
    state = _load(tmp_path / "nets_epoch=6.pt")
    assert isinstance(state, list) and trees_equal(state[0], second.net.state_dict())
