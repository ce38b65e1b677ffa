"""``ShardedCheckpointSaver`` (DCP): round trip, atomic visibility, keep-last-N and top-N pruning, final checkpoints,
errors on every rank, resharding on load.

The multi-process tests start two fresh processes that run one ``sharded_*`` scenario of ``_dist_worker.py`` or
``_sharded_worker.py`` (see their docstrings) over gloo; ``launch`` bounds each in time and fails it with every
rank's output instead of hanging. The single-process tests run the same saver without a process group.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_worker import launch
from _sharded_worker import launch as launch_sharded
from conftest import METRICS, Training, clone_tree, make_training, trees_equal
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler

from async_ckpt import CheckpointWriteError
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER, is_temp_name
from async_ckpt.sharded import (
    ModelOptimizerState,
    ShardedCheckpointSaver,
    ShardedStorage,
    is_complete,
    latest_sharded_checkpoint,
    load,
)
from async_ckpt.sharded.kept import ScoreRanking

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
    fresh objects on both ranks, and then in a single process (world size 2 -> 1). Then the best two by a scripted
    ``acc`` and the final checkpoint: both ranks keep the same list, and exactly those directories are on disk,
    each holding the state of its event. Then the final checkpoint when both ranks raise."""
    rank0, rank1 = launch_sharded("sharded_roundtrip_top_n", tmp_path, timeout=TIMEOUT_S)
    for r in (rank0, rank1):
        assert r["saved"] == ["checkpoint_epoch=3", "checkpoint_epoch=4"], r
        assert r["model_equal"] and r["optimizer_equal"] and r["table_equal"], r
        assert r["trainer"] == [4, 12], r

    # acc by epoch: 0.5 0.7 0.7 0.6 0.9 0.9 0.3 0.95 -> 0.9 (epoch 6 replaced epoch 5 under the same name) and 0.95.
    best = [[0.9, "checkpoint_acc=0.9000"], [0.95, "checkpoint_acc=0.9500"]]
    expected = {"checkpoint_acc=0.9000": 18, "checkpoint_acc=0.9500": 24, "checkpoint_final_iteration=24": 24}
    for r in (rank0, rank1):
        top_n = r["top_n"]
        assert top_n["best"] == best, top_n
        assert top_n["final"] == "checkpoint_final_iteration=24", top_n
        assert top_n["listing"] == sorted(expected), "a displaced checkpoint or a temporary directory was left"
        assert {name: got["iteration"] for name, got in top_n["loaded"].items()} == expected, top_n["loaded"]
        for name, got in top_n["loaded"].items():
            assert got["net_equal"] and got["table_equal"], (name, got)

        final = r["exception_final"]
        assert final["error"]["type"] == "RuntimeError", final
        assert final["listing"] == ["checkpoint_final_iteration=5"], "not published before the exception propagated"
        assert final["iteration"] == 5 and final["net_equal"], final

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
    each raises on both ranks, at the same point, without a hang; nothing incomplete becomes visible. A score that
    differs between the ranks is refused on both; after rank 0 fails to publish a scored checkpoint, both ranks
    hold rank 0's best-N list and go on saving."""
    rank0, rank1 = launch_sharded("sharded_fail_top_n", tmp_path, timeout=TIMEOUT_S)

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

    for r in (rank0, rank1):
        m = r["score_mismatch"]
        assert m["error"]["type"] == "ValueError" and "different scores" in m["error"]["message"], m
        assert "rank 0: 0.5, rank 1: 1.5" in m["error"]["message"], m
        assert m["listing"] == [], "a checkpoint was written with a score that differs between ranks"

    d0, d1 = rank0["publish_denied"], rank1["publish_denied"]
    assert d0["error_at"] == d1["error_at"] == 2, "the ranks did not raise at the same scored save"
    assert d0["error"]["is_write_error"] and d0["error"]["cause_type"] == "PermissionError", d0
    assert d1["error"]["is_write_error"] and d1["error"]["cause_type"] is None, d1
    for d in (d0, d1):
        assert d["best_after_error"] == [[0.5, "checkpoint_acc=0.5000"]], "rank 0's list did not replace the others'"
        assert d["best"] == [[0.6, "checkpoint_acc=0.6000"]], d
        assert d["listing"] == ["checkpoint_acc=0.6000"], d


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
    with pytest.raises(RuntimeError, match="needs a score_function"):
        saver.save_best(Engine(lambda e, b: None))
    with pytest.raises(ValueError, match="pass a score_function too"):
        saver.attach(Engine(lambda e, b: None), score_engine=Engine(lambda e, b: None))
    saver.close()
    with pytest.raises(CheckpointWriteError, match="closed"):
        saver.save("late")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_best": 0, "score_function": lambda e: 1.0}, ValueError, "n_best=0 must be None or >= 1"),
        ({"score_name": "acc"}, ValueError, r"score_function=Checkpoint.get_default_score_fn\('acc'\)"),
        ({"greater_or_equal": True}, ValueError, "pass a score_function"),
        ({"score_function": "acc"}, TypeError, "score_function must be a callable"),
        ({"score_function": lambda e: 1.0, "score_name": "val/acc"}, ValueError, "remove '/'"),
        ({"score_function": lambda e: 1.0, "score_name": ""}, ValueError, "pass a name or None"),
        ({"file_prefix": "runs/a"}, ValueError, "file_prefix='runs/a' cannot be part of a directory name"),
        ({"exception_timeout": -1.0}, ValueError, "exception_timeout=-1.0 must be >= 0"),
    ],
    ids=[
        "n_best",
        "score_name-alone",
        "greater_or_equal-alone",
        "score_function-type",
        "score_name-slash",
        "score_name-empty",
        "file_prefix-slash",
        "exception_timeout",
    ],
)
def test_bad_scoring_arguments_raise_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ShardedCheckpointSaver(tmp_path, {"extra": {"t": torch.zeros(1)}}, **kwargs)
    assert os.listdir(tmp_path) == [], "a refused saver touched save_dir"


class NoExchange(ShardedStorage):
    """A file system without ``renameat2(RENAME_EXCHANGE)`` (NFS, for one): a replacement is two renames."""

    def _exchange(self, a: str, b: str) -> bool:
        return False


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_saving_under_an_existing_name_replaces_it(tmp_path: Path, exchange: bool) -> None:
    """A second save under a name replaces the first, with an atomic swap or (without one) two renames."""
    state = {"t": torch.zeros(4)}
    saver = ShardedCheckpointSaver(tmp_path, {"extra": state}, storage=ShardedStorage() if exchange else NoExchange())
    saver.save("same")
    state["t"].fill_(3.0)
    saver.save("same")
    saver.close()
    assert os.listdir(tmp_path) == ["same"]
    assert saver.saved == [str(tmp_path / "same")]
    loaded = {"t": torch.zeros(4)}
    load(tmp_path / "same", {"extra": loaded})
    assert torch.equal(loaded["t"], torch.full((4,), 3.0))


class SecondRenameFails(NoExchange):
    """Without an atomic swap, once ``armed``: the rename of a finished directory onto the final name ``name`` fails
    once (after the old directory under that name was renamed aside); with ``put_back_fails``, so does the rename
    of the old directory back onto ``name``."""

    def __init__(self, name: str, put_back_fails: bool = False) -> None:
        super().__init__(fsync=True)
        self.name, self.put_back_fails, self.armed = name, put_back_fails, False

    def _replace(self, src: str, dst: str) -> None:
        if self.armed and is_temp_name(src) and os.path.basename(dst) == self.name:
            self.armed = self.put_back_fails
            raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
        super()._replace(src, dst)


def value_of(path: str | os.PathLike[str]) -> float:
    """The value of ``t`` in a checkpoint of ``{"extra": {"t": <4 equal values>}}``."""
    loaded = {"t": torch.zeros(4)}
    load(path, {"extra": loaded})
    return float(loaded["t"][0])


def test_failed_second_rename_puts_the_old_checkpoint_back(tmp_path: Path) -> None:
    """Without an atomic swap, when renaming the new directory onto an existing name fails, the old directory is
    back under that name (and loads) when the error is raised, as the error message says."""
    disk = SecondRenameFails("same")
    state = {"t": torch.full((4,), 1.0)}
    saver = ShardedCheckpointSaver(tmp_path, {"extra": state}, storage=disk)
    saver.save("same")
    saver.wait()
    disk.armed = True
    state["t"].fill_(2.0)
    saver.save("same")
    with pytest.raises(CheckpointWriteError, match="Earlier checkpoints are intact") as caught:
        saver.wait()
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.EIO
    assert listing(tmp_path) == ["same"], "the old checkpoint is not back under its name"
    assert is_complete(tmp_path / "same") and value_of(tmp_path / "same") == 1.0
    assert saver.saved == [str(tmp_path / "same")]
    saver.close()
    assert os.listdir(tmp_path) == ["same"], "the unpublished directory or the aside copy was left behind"


def test_failed_second_rename_and_put_back_says_where_the_old_checkpoint_is(tmp_path: Path) -> None:
    """When the old directory cannot be renamed back either, the error does not claim that it is intact: it names
    the temporary path where it is."""
    disk = SecondRenameFails("same", put_back_fails=True)
    state = {"t": torch.full((4,), 1.0)}
    saver = ShardedCheckpointSaver(tmp_path, {"extra": state}, storage=disk)
    saver.save("same")
    saver.wait()
    disk.armed = True
    saver.save("same")
    with pytest.raises(CheckpointWriteError, match="the earlier checkpoint under that name is at") as caught:
        saver.wait()
    assert "intact" not in str(caught.value)
    (aside,) = os.listdir(tmp_path)
    assert f"{TMP_MARKER}" in aside and ".old" in aside and aside in str(caught.value)
    assert value_of(tmp_path / aside) == 1.0
    disk.armed = False
    saver.close()


def dead_pid() -> int:
    """The id of a process that has exited (the owner that a crashed run leaves in its temporary names)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_start_restores_the_aside_copy_of_a_crash_between_the_two_renames(tmp_path: Path) -> None:
    """A crash between the two renames of a replacement leaves the old checkpoint under a temporary name and no
    directory under its final name: the next saver puts it back, and deletes only the true leftovers (the
    unpublished new directory, an aside copy whose final name exists, a pruned checkpoint, an unfinished one)."""
    save_dir, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    state = {"t": torch.zeros(4)}
    for directory, names in ((save_dir, ("same", "kept", "pruned", "older")), (elsewhere, ("same",))):
        saver = ShardedCheckpointSaver(directory, {"extra": state})
        for name in names:
            state["t"].fill_(len(name) + (10.0 if directory == elsewhere else 0.0))
            saver.save(name)
        saver.close()

    # The state the crash leaves: dead owner, "same" renamed aside but the new one not yet renamed onto it; from
    # earlier crashes, "kept" renamed aside after its replacement was renamed onto it (here: a copy beside it), a
    # pruned checkpoint renamed aside before its removal, and a directory DCP had just created.
    token = f"{TMP_MARKER}{_HOST}.{dead_pid()}.0123abcd"
    os.rename(save_dir / "same", save_dir / f"same{token}.old3")
    os.rename(elsewhere / "same", save_dir / f"same{token}.3")
    shutil.copytree(save_dir / "kept", save_dir / f"kept{token}.old1")
    os.rename(save_dir / "pruned", save_dir / f"pruned{token}.del0")
    os.rename(save_dir / "older", save_dir / f"older{token}.old2")
    os.rename(save_dir / f"older{token}.old2", save_dir / "older")  # its final name exists: only a copy is stale
    shutil.copytree(save_dir / "older", save_dir / f"older{token}.old2")
    os.mkdir(save_dir / f"fresh{token}.4")

    restarted = ShardedCheckpointSaver(save_dir, {"extra": state})
    restarted.close()
    assert sorted(os.listdir(save_dir)) == ["kept", "older", "same"], "a checkpoint was lost or a leftover was kept"
    assert value_of(save_dir / "same") == len("same"), "the restored directory is not the old checkpoint"
    assert value_of(save_dir / "kept") == len("kept") and value_of(save_dir / "older") == len("older")


# -- scored (top-N) and final checkpoints, one process ---------------------------------------------------------------
def listing(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names in ``directory`` that are not temporary."""
    return sorted(n for n in os.listdir(directory) if not is_temp_name(n))


def record_states(training: Training) -> dict[int, Any]:
    """The model's state at the end of every epoch, by iteration (the state a save at that event holds)."""
    states: dict[int, Any] = {}

    @training.engine.on(Events.EPOCH_COMPLETED)
    def _record(engine: Engine) -> None:
        states[engine.state.iteration] = clone_tree(training.net.state_dict())

    return states


def loaded_state(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """(trainer iteration, model state) of a checkpoint saved from ``{"net": ..., "trainer": ...}``."""
    net = make_training(seed=7).net
    trainer = Engine(lambda e, b: None)
    load(path, {"net": net, "trainer": trainer})
    return trainer.state.iteration, net.state_dict()


class FaultyDisk(ShardedStorage):
    """Fails one checkpoint by its final name: ``"write"`` fails the fsync of its temporary directory (so DCP's
    write fails), ``"publish"`` the rename onto its final name.

    Records the final name of every temporary directory written (fsynced), and every rename between a temporary
    and a final name, as ``("publish" | "aside", final name)``. Without ``exchange``, a replacement is two renames.
    """

    def __init__(self, fail: str | None = None, name: str = "", exchange: bool = True) -> None:
        super().__init__(fsync=True)
        self.fail, self.name, self.exchange = fail, name, exchange
        self.written: list[str] = []
        self._synced: set[str] = set()
        self.renames: list[tuple[str, str]] = []

    def sync_dir(self, directory: str) -> None:
        if is_temp_name(directory):
            final = os.path.basename(directory).split(TMP_MARKER)[0]
            if directory not in self._synced:  # DCP's write step and its finish step both fsync the directory
                self._synced.add(directory)
                self.written.append(final)
            if self.fail == "write" and final == self.name:
                raise OSError(errno.EIO, os.strerror(errno.EIO), directory)
        super().sync_dir(directory)

    def _exchange(self, a: str, b: str) -> bool:
        return self.exchange and super()._exchange(a, b)

    def _replace(self, src: str, dst: str) -> None:
        if self.fail == "publish" and os.path.basename(dst) == self.name:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), dst)
        super()._replace(src, dst)
        if is_temp_name(src) and not is_temp_name(dst):
            self.renames.append(("publish", os.path.basename(dst)))
        elif is_temp_name(dst) and not is_temp_name(src):
            self.renames.append(("aside", os.path.basename(src)))


def scored_saver(directory: Path, save_dict: Mapping[str, Any], **kwargs: Any) -> ShardedCheckpointSaver:
    """A saver of the best checkpoints by ``engine.state.metrics["acc"]`` and nothing else."""
    return ShardedCheckpointSaver(
        directory,
        save_dict,
        save_interval=0,
        score_function=Checkpoint.get_default_score_fn("acc"),
        score_name="acc",
        **kwargs,
    )


def test_single_process_top_n_by_score_prunes_after_publish_and_resumes(tmp_path: Path) -> None:
    training = make_training(metrics=METRICS)  # acc by epoch: 0.5 0.7 0.7 0.6 0.9 0.9 0.3 0.95
    states = record_states(training)
    disk = FaultyDisk(exchange=False)  # every replacement as two logged renames, so that the log shows all of them
    save_dict = {"net": training.net, "trainer": training.engine}
    saver = scored_saver(tmp_path, save_dict, n_best=2, file_prefix="run", storage=disk)
    saver.attach(training.engine)
    training.engine.run(training.data, max_epochs=len(METRICS))

    a5, a6, a7, a9, a95 = (f"run_checkpoint_acc={s}" for s in ("0.5000", "0.6000", "0.7000", "0.9000", "0.9500"))
    assert disk.renames == [
        ("publish", a5),
        ("publish", a7),
        ("aside", a7),  # epoch 3 ties a kept score that is not the worst: it replaces it (same name, as ignite)
        ("publish", a7),
        ("publish", a6),  # the list was full: the worst (0.5) is deleted, only after 0.6 is visible
        ("aside", a5),
        ("publish", a9),
        ("aside", a6),
        ("aside", a9),
        ("publish", a9),  # epoch 7 (0.3) does not enter; epoch 8 displaces 0.7
        ("publish", a95),
        ("aside", a7),
    ]
    assert disk.written == [a5, a7, a7, a6, a9, a9, a95], "a checkpoint was written that could not enter"
    assert saver.best == [(0.9, str(tmp_path / a9)), (0.95, str(tmp_path / a95))]
    assert saver.best_checkpoint == saver.last_checkpoint == str(tmp_path / a95)
    assert listing(tmp_path) == [a9, a95] and sorted(os.listdir(tmp_path)) == [a9, a95]
    for name, iteration in ((a9, 18), (a95, 24)):  # 0.9 of epoch 6 replaced that of epoch 5
        got_iteration, net_state = loaded_state(tmp_path / name)
        assert got_iteration == iteration
        assert trees_equal(net_state, states[iteration]), f"{name} does not hold the state of its event"
    saver.close()

    # resume=True reads the scores back from the names and continues the top-N.
    resumed = scored_saver(tmp_path, save_dict, n_best=2, file_prefix="run", resume=True)
    assert resumed.best == [(0.9, str(tmp_path / a9)), (0.95, str(tmp_path / a95))]
    training.engine.state.metrics["acc"] = 0.92
    assert resumed.save_best(training.engine) == "run_checkpoint_acc=0.9200"
    training.engine.state.metrics["acc"] = 0.91  # below the worst kept (0.92) now
    assert resumed.save_best(training.engine) is None
    resumed.close()
    assert listing(tmp_path) == ["run_checkpoint_acc=0.9200", a95]


def test_single_process_scores_an_evaluator(tmp_path: Path) -> None:
    """With ``score_engine``, the score is read from the evaluator at its ``EPOCH_COMPLETED``."""
    training = make_training(metrics=(0.0,))  # the trainer's own "acc" never enters: the evaluator's does
    evaluator = Engine(lambda e, b: None)
    val_acc = iter((0.4, 0.8, 0.6))

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = next(val_acc)

    training.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    states = record_states(training)
    saver = scored_saver(tmp_path, {"net": training.net, "trainer": training.engine}, n_best=1)
    saver.attach(training.engine, score_engine=evaluator)
    training.engine.run(training.data, max_epochs=3)
    saver.close()
    assert listing(tmp_path) == ["checkpoint_acc=0.8000"]
    iteration, net_state = loaded_state(tmp_path / "checkpoint_acc=0.8000")
    assert iteration == 6 and trees_equal(net_state, states[6])


@pytest.mark.parametrize("greater_or_equal", [False, True])
def test_single_process_tie_with_the_worst_kept_score(tmp_path: Path, greater_or_equal: bool) -> None:
    """0.5, 0.7, then 0.5 again with ``n_best=2``: the tie enters only with ``greater_or_equal`` (and then the
    later checkpoint is kept under the shared name)."""
    training = make_training(metrics=(0.5, 0.7, 0.5))
    states = record_states(training)
    saver = scored_saver(
        tmp_path, {"net": training.net, "trainer": training.engine}, n_best=2, greater_or_equal=greater_or_equal
    )
    saver.attach(training.engine)
    training.engine.run(training.data, max_epochs=3)
    saver.close()
    assert [score for score, _ in saver.best] == [0.5, 0.7]
    assert listing(tmp_path) == ["checkpoint_acc=0.5000", "checkpoint_acc=0.7000"]
    iteration, net_state = loaded_state(tmp_path / "checkpoint_acc=0.5000")
    assert iteration == (9 if greater_or_equal else 3)
    assert trees_equal(net_state, states[iteration])


class RecordingHandler(BaseSaveHandler):
    """An ignite save handler that keeps the names of the files ignite's ``Checkpoint`` would have on disk."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.saves = 0

    def __call__(self, checkpoint: Mapping[str, Any], filename: str, metadata: Mapping[str, Any] | None = None) -> None:
        self.saves += 1
        if filename not in self.files:
            self.files.append(filename)

    def remove(self, filename: str) -> None:
        self.files.remove(filename)


@pytest.mark.parametrize("n_best", [1, 2, 3, None])
@pytest.mark.parametrize("greater_or_equal", [False, True])
def test_score_ranking_decides_as_ignites_checkpoint(n_best: int | None, greater_or_equal: bool) -> None:
    """The saver's scored list (the core's Retention with ignite's entry rule) saves and evicts exactly what ignite's
    own ``Checkpoint`` does, score after score: ties with the worst kept, scores that print the same (a same-name
    replacement that may or may not beat the worst), and an integer and a float score that are equal."""
    scores: list[float] = [0.5, 0.7, 0.50001, 0.49999, 0.7, 1, 1.0, 0.3, 0.9, 0.2, 1, 0.9, 0.95, 0.5, 1.0, 1.5]
    rng = random.Random(13)
    sequences = [scores, [1, 1.0, 1.5], *([rng.choice(scores) for _ in range(25)] for _ in range(20))]
    for sequence in sequences:
        handler = RecordingHandler()
        engine = Engine(lambda e, b: None)
        reference = Checkpoint(
            {"net": torch.nn.Linear(1, 1)},
            handler,
            score_function=lambda e: e.state.metrics["acc"],
            score_name="acc",
            n_saved=n_best,
            greater_or_equal=greater_or_equal,
        )
        ranking = ScoreRanking(n_best, greater_or_equal)
        on_disk: list[str] = []
        for i, score in enumerate(sequence):
            engine.state.metrics["acc"] = score
            saves = handler.saves
            reference(engine)
            shown = f"{score}" if isinstance(score, int) else f"{score:.4f}"
            name = f"net_acc={shown}.pt"
            decision = ranking.plan(name, i, score)
            assert decision.keep == (handler.saves > saves), (sequence[: i + 1], handler.files)
            if decision.keep:
                ranking.apply(decision)
                on_disk = [p for p in on_disk if p not in {e.path for e in decision.evict} and p != name] + [name]
            assert sorted(on_disk) == sorted(handler.files), (sequence[: i + 1], on_disk, handler.files)
            assert sorted(e.path for e in ranking.entries) == sorted(handler.files)


@pytest.mark.parametrize("fail", ["write", "publish"])
def test_single_process_failed_scored_save_neither_enters_nor_prunes(tmp_path: Path, fail: str) -> None:
    disk = FaultyDisk(fail=fail, name="checkpoint_acc=0.9000")
    state = {"t": torch.zeros(2)}
    saver = scored_saver(tmp_path, {"extra": state}, n_best=1, storage=disk)
    engine = Engine(lambda e, b: None)

    def score(value: float) -> str | None:
        engine.state.metrics["acc"] = value
        state["t"].fill_(value)
        return saver.save_best(engine)

    assert score(0.5) == "checkpoint_acc=0.5000"
    saver.wait()
    assert score(0.9) == "checkpoint_acc=0.9000"
    with pytest.raises(CheckpointWriteError, match="Input/output error" if fail == "write" else "Permission denied"):
        saver.wait()
    assert saver.best == [(0.5, str(tmp_path / "checkpoint_acc=0.5000"))], "the failed checkpoint entered the list"
    assert listing(tmp_path) == ["checkpoint_acc=0.5000"]
    assert is_complete(tmp_path / "checkpoint_acc=0.5000"), "the good checkpoint was pruned or damaged"

    # 0.6 enters because the kept list still holds 0.5 only (it would not beat 0.9).
    assert score(0.6) == "checkpoint_acc=0.6000"
    saver.close()
    assert listing(tmp_path) == ["checkpoint_acc=0.6000"]
    loaded = {"t": torch.zeros(2)}
    load(tmp_path / "checkpoint_acc=0.6000", {"extra": loaded})
    assert torch.equal(loaded["t"], torch.full((2,), 0.6))


def test_single_process_score_that_is_not_a_number_or_nan(tmp_path: Path) -> None:
    value: list[Any] = ["high"]
    saver = ShardedCheckpointSaver(
        tmp_path, {"extra": {"t": torch.zeros(1)}}, save_interval=0, score_function=lambda e: value[0]
    )
    engine = Engine(lambda e, b: None)
    with pytest.raises(ValueError, match="must return a number"):
        saver.save_best(engine)
    value[0] = float("nan")
    assert saver.save_best(engine) is None
    value[0] = 3  # an integer is written as it is, as ignite does
    assert saver.save_best(engine) == "checkpoint_3"
    saver.close()
    assert listing(tmp_path) == ["checkpoint_3"]


def ignite_file_name(prefix: str, score_name: str | None, score: float) -> str:
    """The file name ignite's ``Checkpoint`` gives a checkpoint of two objects scored ``score``."""
    names: list[str] = []

    def record(checkpoint: Mapping[str, Any], filename: str, metadata: Any = None) -> None:
        names.append(filename)

    modules = {"a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1)}
    reference = Checkpoint(
        modules, record, filename_prefix=prefix, score_function=lambda e: score, score_name=score_name
    )
    reference(Engine(lambda e, b: None))
    (name,) = names
    return name


@pytest.mark.parametrize("prefix", ["", "run"])
@pytest.mark.parametrize("score_name", [None, "val_acc"])
def test_names_are_ignites_without_the_extension(tmp_path: Path, prefix: str, score_name: str | None) -> None:
    saver = ShardedCheckpointSaver(
        tmp_path,
        {"extra": {"t": torch.zeros(1)}},
        file_prefix=prefix,
        score_function=lambda e: 0.0,
        score_name=score_name,
    )
    for score in (0.912345, -0.5, 3):
        assert saver.best_name(score) + ".pt" == ignite_file_name(prefix, score_name, score)
    run = f"{prefix}_" if prefix else ""
    assert saver.checkpoint_name(3) == f"{run}checkpoint_epoch=3"  # MONAI's interval name
    assert saver.final_name(12) == f"{run}checkpoint_final_iteration=12"  # MONAI's final name
    saver.close()


def test_single_process_final_checkpoint_at_completed_replaces_the_previous_one(tmp_path: Path) -> None:
    training = make_training()
    saver = ShardedCheckpointSaver(
        tmp_path, {"net": training.net, "trainer": training.engine}, save_interval=0, save_final=True
    )
    saver.attach(training.engine)
    training.engine.run(training.data, max_epochs=2)
    assert listing(tmp_path) == ["checkpoint_final_iteration=6"]
    training.engine.run(training.data, max_epochs=3)  # the same trainer goes on to epoch 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_final_iteration=9"], "the previous final was not pruned"
    assert saver.final_checkpoint == str(tmp_path / "checkpoint_final_iteration=9")
    iteration, net_state = loaded_state(saver.final_checkpoint)
    assert iteration == 9 and trees_equal(net_state, training.net.state_dict())
    saver.close()


def test_single_process_final_checkpoint_on_exception_is_published_before_it_propagates(tmp_path: Path) -> None:
    training = make_training(fail_at_iteration=5)
    before_failure: list[Any] = []
    training.engine.add_event_handler(
        Events.ITERATION_COMPLETED(once=4), lambda e: before_failure.append(clone_tree(training.net.state_dict()))
    )
    saver = ShardedCheckpointSaver(
        tmp_path,
        {"net": training.net, "trainer": training.engine},
        save_interval=1,
        epoch_level=False,
        n_saved=1,
        save_final=True,
    )
    saver.attach(training.engine)
    with pytest.raises(RuntimeError, match="boom"):
        training.engine.run(training.data, max_epochs=3)
    # Nothing ran after the exception: whatever is visible was published by the handler before it re-raised.
    assert listing(tmp_path) == ["checkpoint_final_iteration=5", "checkpoint_iteration=4"]
    saver.close()
    iteration, net_state = loaded_state(tmp_path / "checkpoint_final_iteration=5")
    assert iteration == 5 and trees_equal(net_state, before_failure[0])


def test_single_process_no_final_checkpoint_after_the_savers_own_failure(tmp_path: Path) -> None:
    """When the exception comes from the saver's error agreement (here a failed write), the final checkpoint is not
    attempted: every rank raised there, and a rank that skipped it would leave the others waiting."""
    training = make_training()
    disk = FaultyDisk(fail="write", name="checkpoint_iteration=1")
    saver = ShardedCheckpointSaver(
        tmp_path, {"net": training.net}, save_interval=1, epoch_level=False, save_final=True, storage=disk
    )
    saver.attach(training.engine)
    with pytest.raises(CheckpointWriteError, match="checkpoint_iteration=1"):
        training.engine.run(training.data, max_epochs=1)
    saver.close()
    assert disk.written == ["checkpoint_iteration=1"], "a final checkpoint was attempted after the write failure"
    assert os.listdir(tmp_path) == []


# -- the torch and ignite APIs the module relies on --------------------------------------------------------------------
OLDER_TORCH = """
import sys
import torch
import torch.distributed.checkpoint.staging as staging
import torch.distributed.checkpoint.state_dict_saver as saver

torch.__version__ = "2.8.0"
default_stager, staging_options = staging.DefaultStager, staging.StagingOptions
del staging.DefaultStager, staging.StagingOptions  # torch 2.8's staging module has neither
try:
    import async_ckpt.sharded
except ImportError as exc:
    print("NO-STAGER", exc)
staging.DefaultStager, staging.StagingOptions = default_stager, staging_options

def async_save(state_dict, *, checkpoint_id=None, storage_writer=None, planner=None, process_group=None):
    raise AssertionError("never called")

saver.async_save = async_save  # the signature of torch 2.7's async_save
for name in [m for m in sys.modules if m == "async_ckpt.sharded" or m.startswith("async_ckpt.sharded.")]:
    sys.modules.pop(name)  # every module of the package runs its imports again
try:
    import async_ckpt.sharded
except ImportError as exc:
    print("OLD-ASYNC-SAVE", exc)
"""


def test_import_on_an_older_torch_says_which_torch_it_needs() -> None:
    """On a torch whose DCP lacks the staging API (2.8) or whose async_save lacks async_stager/no_dist, importing
    async_ckpt.sharded raises an ImportError naming the torch it needs and the one found."""
    done = subprocess.run(
        [sys.executable, "-c", OLDER_TORCH], capture_output=True, text=True, timeout=TIMEOUT_S, check=True
    )
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"NO-STAGER", "OLD-ASYNC-SAVE"}, done.stdout + done.stderr
    for message in lines.values():
        assert message.startswith("async_ckpt.sharded needs torch>=2.9 (found 2.8.0)"), message
    assert "DefaultStager" in lines["NO-STAGER"]
    assert "async_stager, no_dist" in lines["OLD-ASYNC-SAVE"]


def parameters(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_dcp_and_ignite_internals_have_the_shape_the_module_uses(tmp_path: Path) -> None:
    """The DCP staging classes, writer and planner arguments, and ignite's name pattern that the module relies on
    still exist and behave as it uses them on this torch/ignite; a change fails here, not as a silent slowdown."""
    import torch.distributed.checkpoint.filesystem as dcp_fs
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

    import async_ckpt.sharded._dcp as dcp
    import async_ckpt.sharded.writer as sharded

    assert tuple(int(p) for p in torch.__version__.split(".")[:2]) >= dcp.MIN_TORCH
    assert {"storage_writer", "planner", "process_group", "async_stager", "no_dist"} <= parameters(async_save)
    assert {"upload_completion", "staging_completion"} <= {f.name for f in dataclasses.fields(AsyncSaveResponse)}
    assert "dedup_save_to_lowest_rank" in parameters(DefaultSavePlanner)
    assert {"sync_files", "thread_count"} <= parameters(dcp_fs.FileSystemWriter)

    # AsyncStager: async_save skips synchronize_staging when _synchronize_after_execute is False (the state was
    # copied before the call); the protocol still has the methods the module overrides.
    assert sharded._AlreadyStaged().should_synchronize_after_execute is False
    assert {"stage", "synchronize_staging", "close", "should_synchronize_after_execute"} <= set(dir(AsyncStager))
    # StagingOptions/DefaultStager: a synchronous copy into buffers reused from one save to the next.
    fields = {f.name for f in dataclasses.fields(StagingOptions)}
    assert fields == {"use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy"}
    stager = DefaultStager(StagingOptions(False, False, False, False))
    state = {"extra": {"t": torch.arange(4.0)}}
    first = stager.stage(state)
    assert isinstance(first, dict), "DefaultStager returned a future for a synchronous copy"
    state["extra"]["t"].add_(1.0)
    second = stager.stage(state)
    assert isinstance(second, dict) and torch.equal(second["extra"]["t"], state["extra"]["t"])
    assert second["extra"]["t"].data_ptr() != state["extra"]["t"].data_ptr(), "staging did not copy"
    assert second["extra"]["t"].data_ptr() == first["extra"]["t"].data_ptr(), "staging buffers are not reused"
    stager.close()

    # FileSystemWriter makes every change through its ``fs`` (create_stream, mkdir, rename): the module's fsyncs
    # and the crash-state tests depend on it.
    calls: list[str] = []

    class Recording(ShardedStorage):
        def _mkdir(self, path: str) -> None:
            calls.append("mkdir")
            super()._mkdir(path)

        def _file_written(self, path: str, fd: int, sync: bool) -> None:
            calls.append(f"written {os.path.basename(path)} sync={sync}")
            super()._file_written(path, fd, sync)

        def _replace(self, src: str, dst: str) -> None:
            calls.append(f"rename {os.path.basename(src)} {os.path.basename(dst)}")
            super()._replace(src, dst)

    assert isinstance(sharded.DurableFileSystemWriter(tmp_path / "probe", Recording()).fs, dcp_fs.FileSystemBase)
    saver = ShardedCheckpointSaver(tmp_path / "ckpt", {"extra": {"t": torch.ones(2)}}, storage=Recording())
    saver.save("probe")
    saver.close()
    assert calls[:4] == [
        "mkdir",
        "written __0_0.distcp sync=True",
        "written .metadata.tmp sync=True",
        "rename .metadata.tmp .metadata",
    ], calls
    (publish,) = calls[4:]
    assert publish.startswith(f"rename probe{TMP_MARKER}") and publish.endswith(" probe"), calls

    # ignite's Checkpoint (public): the name pattern the module formats directory names with.
    pattern = Checkpoint.setup_filename_pattern(
        with_prefix=True, with_score=True, with_score_name=True, with_global_step=False
    )
    assert pattern == "{filename_prefix}_{name}_{score_name}={score}.{ext}"
