"""``ShardedCheckpointSaver`` (DCP): round trip, atomic visibility, pruning, errors on every rank, resharding on load.

The multi-process tests start two fresh processes that run one ``sharded_*`` scenario of ``_dist_worker.py`` (see
its docstring) over gloo; ``launch`` bounds each in time and fails it with every rank's output instead of hanging.
The single-process tests run the same saver without a process group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_worker import launch
from conftest import trees_equal
from ignite.engine import Engine

from async_ckpt import CheckpointWriteError
from async_ckpt.sharded import (
    ModelOptimizerState,
    ShardedCheckpointSaver,
    is_complete,
    latest_sharded_checkpoint,
    load,
)
from async_ckpt.storage import TMP_MARKER

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
    # DCP says so once per process when it saves or loads without a process group.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

TIMEOUT_S = 90.0


def small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


# -- two processes -----------------------------------------------------------------------------------------------------
def test_two_process_round_trip_pruning_and_reshard_on_load(tmp_path: Path) -> None:
    """DDP model + Adam + a row-sharded DTensor + the trainer, saved every epoch with ``n_saved=2``; loaded into
    fresh objects on both ranks, and then in a single process (world size 2 -> 1)."""
    rank0, rank1 = launch("sharded_roundtrip", tmp_path, timeout=TIMEOUT_S)
    for r in (rank0, rank1):
        assert r["saved"] == ["checkpoint_epoch=3", "checkpoint_epoch=4"], r
        assert r["model_equal"] and r["optimizer_equal"] and r["table_equal"], r
        assert r["trainer"] == [4, 12], r

    save_dir = tmp_path / "sharded"
    assert sorted(os.listdir(save_dir)) == ["checkpoint_epoch=3", "checkpoint_epoch=4"], "pruning or a temp dir left"
    last = save_dir / "checkpoint_epoch=4"
    assert is_complete(last)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(last)), "a rank's shard is missing"
    assert latest_sharded_checkpoint(save_dir) == str(last)

    # Resharding on load: the row-sharded table comes back whole into a plain tensor in one process, the model and
    # optimizer into plain (unwrapped) objects.
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    net = small_net(seed=99)
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    table = {"t": torch.zeros(8, 2)}
    trainer = Engine(lambda e, b: None)
    load(last, {"train": ModelOptimizerState(net, opt), "table": table, "trainer": trainer})
    assert torch.equal(table["t"], expected["table"])
    assert trees_equal(net.state_dict(), expected["net"])
    assert trees_equal(opt.state_dict(), expected["opt"])
    assert (trainer.state.epoch, trainer.state.iteration) == (4, 12)


def test_two_process_atomic_visibility_and_replacement(tmp_path: Path) -> None:
    """No final-named directory exists before every rank's shard and the metadata are durable; every final name is
    complete at all times; temp dirs carry the marker; a dead writer's temp dir is removed at start; saving under
    an existing name replaces it."""
    rank0, rank1 = launch("sharded_visibility", tmp_path, timeout=TIMEOUT_S)
    assert rank0["problems"] == [], rank0["problems"]
    assert rank0["stale_removed"] and rank1["stale_removed"]
    assert rank0["in_flight_seen"] > 0, "no save was ever observed in flight: the test observed nothing"
    assert rank0["observed_writes"] > 0
    for r in (rank0, rank1):
        assert r["after_run"] == ["checkpoint_iteration=10", "checkpoint_iteration=12"], r
        assert r["final_listing"] == ["checkpoint_iteration=10", "checkpoint_iteration=12"], r
        assert r["saved"] == ["checkpoint_iteration=10", "checkpoint_iteration=12"], r
        assert r["replaced_value"] == [-7.0, -7.0, -7.0], "the replacement's content was not loaded"
    assert not [n for n in os.listdir(tmp_path / "sharded") if TMP_MARKER in n]


def test_two_process_injected_failures_surface_on_every_rank(tmp_path: Path) -> None:
    """A shard write failing on rank 1, a publish (rename) failing on rank 0, and a state copy failing on rank 1:
    each raises on both ranks, at the same point, without a hang; nothing incomplete becomes visible."""
    rank0, rank1 = launch("sharded_fail", tmp_path, timeout=TIMEOUT_S)

    w0, w1 = rank0["write"], rank1["write"]
    for w in (w0, w1):
        assert w["error"] is not None and w["error"]["is_write_error"], w
        assert w["error"]["cause_type"] == "CheckpointException", w
        assert "rank 1: OSError(28" in w["error"]["message"], w
        assert w["listing"] == [], "a failed checkpoint became visible or its temp dir was left"
    assert w0["iteration"] == w1["iteration"] == 2, "the ranks did not stop at the same save"

    p0, p1 = rank0["publish"], rank1["publish"]
    assert p0["error"]["is_write_error"] and p0["error"]["cause_type"] == "PermissionError", p0
    assert p1["error"]["is_write_error"] and p1["error"]["cause_type"] is None, p1
    assert "manual" not in p0["listing"], p0

    s0, s1 = rank0["stage"], rank1["stage"]
    assert s1["error"]["type"] == "SnapshotError" and s1["error"]["cause_type"] == "RuntimeError", s1
    assert s0["error"]["type"] == "CheckpointWriteError", s0
    assert s0["listing"] == [], "a save was started although a rank could not copy its state"


# -- one process (no process group) ----------------------------------------------------------------------------------
def test_single_process_round_trip_and_pruning(tmp_path: Path) -> None:
    net = small_net(seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = [torch.randn(4, 4) for _ in range(4)]

    def step(engine: Engine, batch: torch.Tensor) -> None:
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()

    trainer = Engine(step)
    extra: dict[str, Any] = {"note": "hello", "t": torch.arange(3.0)}
    saver = ShardedCheckpointSaver(
        tmp_path,
        {"train": ModelOptimizerState(net, opt), "trainer": trainer, "extra": extra},
        save_interval=2,
        epoch_level=False,
        n_saved=2,
        file_prefix="run",
    )
    saver.attach(trainer)
    trainer.run(data, max_epochs=2)  # saves at iterations 2, 4, 6, 8 (the last one)
    assert [os.path.basename(p) for p in saver.saved] == ["run_checkpoint_iteration=6", "run_checkpoint_iteration=8"]
    assert sorted(os.listdir(tmp_path)) == ["run_checkpoint_iteration=6", "run_checkpoint_iteration=8"]
    saver.close()
    saver.close()  # idempotent

    net2 = small_net(seed=5)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.3)
    trainer2 = Engine(step)
    extra2: dict[str, Any] = {"note": "", "t": torch.zeros(3)}
    load(saver.saved[-1], {"train": ModelOptimizerState(net2, opt2), "trainer": trainer2, "extra": extra2})
    assert trees_equal(net.state_dict(), net2.state_dict())
    assert trees_equal(opt.state_dict(), opt2.state_dict())
    assert trainer2.state.iteration == 8
    assert extra2["note"] == "hello" and torch.equal(extra2["t"], extra["t"])

    # A new saver with resume=True continues the pruning of the checkpoints already there.
    resumed = ShardedCheckpointSaver(
        tmp_path, {"extra": extra}, epoch_level=False, n_saved=2, file_prefix="run", resume=True
    )
    assert [os.path.basename(p) for p in resumed.saved] == ["run_checkpoint_iteration=6", "run_checkpoint_iteration=8"]
    resumed.save(resumed.checkpoint_name(10))
    resumed.close()
    assert sorted(os.listdir(tmp_path)) == ["run_checkpoint_iteration=10", "run_checkpoint_iteration=8"]


def test_single_process_write_failure_is_raised_at_wait(tmp_path: Path) -> None:
    from async_ckpt import FileStorage

    class BrokenDisk(FileStorage):
        def sync_dir(self, directory: str) -> None:
            if TMP_MARKER in directory:
                raise OSError(5, "Input/output error", directory)
            super().sync_dir(directory)

    saver = ShardedCheckpointSaver(tmp_path, {"extra": {"t": torch.ones(2)}}, storage=BrokenDisk())
    saver.save("a")
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        saver.wait()
    saver.wait()  # reported once
    saver.close()
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path: Path) -> None:
    net = small_net(seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ModelOptimizerState"):
        ShardedCheckpointSaver(tmp_path, {"net": net, "opt": opt})
    with pytest.raises(ValueError, match="n_saved"):
        ShardedCheckpointSaver(tmp_path, {"net": net}, n_saved=0)
    with pytest.raises(ValueError, match="save_dict"):
        ShardedCheckpointSaver(tmp_path, {})
    saver = ShardedCheckpointSaver(tmp_path, {"net": net})
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        saver.save(f"x{TMP_MARKER}1")
    saver.close()
    with pytest.raises(CheckpointWriteError, match="closed"):
        saver.save("late")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_saving_under_an_existing_name_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    import async_ckpt.sharded as sharded

    if not exchange:  # a file system without an atomic swap: the old directory is moved aside first
        monkeypatch.setattr(sharded, "_rename_exchange", lambda a, b: False)
    state = {"t": torch.zeros(4)}
    saver = ShardedCheckpointSaver(tmp_path, {"extra": state})
    saver.save("same")
    state["t"].fill_(3.0)
    saver.save("same")
    saver.close()
    assert os.listdir(tmp_path) == ["same"]
    assert saver.saved == [str(tmp_path / "same")]
    loaded = {"t": torch.zeros(4)}
    load(tmp_path / "same", {"extra": loaded})
    assert torch.equal(loaded["t"], torch.full((4,), 3.0))
