"""Multi-process CPU tests (gloo): MONAI parity under DDP, rank-0-only I/O, and failures reaching every rank.

Each test starts two fresh processes that run one scenario of ``_dist_worker.py`` (see its docstring) and join a
gloo process group through a rendezvous file. ``launch`` bounds every test in time: a rank that is still running
after the timeout has its thread stacks dumped and is killed, and the test fails with every rank's output instead of
hanging.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_worker import launch
from conftest import trees_equal

from async_ckpt.pipeline.integrity import MANIFEST_NAME

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

TIMEOUT_S = 90.0


def checkpoints(directory: Path) -> dict[str, Any]:
    """The ``*.pt`` files of ``directory`` by name, loaded."""
    return {p.name: torch.load(p, weights_only=True) for p in sorted(directory.glob("*.pt"))}


def keys_without_module_prefix(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(not str(k).startswith("module.") and keys_without_module_prefix(v) for k, v in tree.items())
    return True


def test_ddp_parity_with_monai_and_only_rank0_writes(tmp_path: Path) -> None:
    """(a) same *.pt files and contents as MONAI's saver under DDP; (b) rank 1 stages nothing and touches no file."""
    rank0, rank1 = launch("parity", tmp_path, timeout=TIMEOUT_S)
    assert rank0["iteration"] == rank1["iteration"] == 12

    monai, ours = checkpoints(tmp_path / "monai"), checkpoints(tmp_path / "ours")
    assert monai, "MONAI's saver wrote nothing: the scenario is broken"
    assert sorted(ours) == sorted(monai)
    assert any(name.startswith("checkpoint_iteration=") for name in monai)
    assert any(name.startswith("checkpoint_key_metric=") for name in monai)
    assert any(name.startswith("checkpoint_final_iteration=") for name in monai)
    for name, ref in monai.items():
        assert trees_equal(ref, ours[name]), f"{name}: contents differ from MONAI's"
        assert set(ref) == {"net", "opt", "trainer"}
        assert keys_without_module_prefix(ours[name]["net"]), f"{name}: DDP's 'module.' prefix was not removed"
        assert "0.weight" in ours[name]["net"]
    extra = {n for n in os.listdir(tmp_path / "ours") if not n.endswith(".pt")}
    assert extra == {MANIFEST_NAME}

    assert rank0["saves"] > 0
    assert rank1["storage_calls"] == [], "rank 1 touched the file system"
    assert rank1["saves"] == 0, "rank 1 staged a checkpoint"


@pytest.mark.parametrize("save_final", [False, True], ids=["interval", "interval+final"])
def test_write_failure_on_rank0_stops_every_rank(tmp_path: Path, save_final: bool) -> None:
    """(c) ENOSPC in rank 0's writer: both ranks leave ``engine.run`` with ``CheckpointWriteError``, none hangs."""
    rank0, rank1 = launch("fail_event_final" if save_final else "fail_event", tmp_path, timeout=TIMEOUT_S)
    err0, err1 = rank0["error"], rank1["error"]
    assert err0 is not None and err0["is_write_error"], rank0
    assert err0["cause_type"] == "OSError" and err0["cause_errno"] == errno.ENOSPC
    assert err1 is not None and err1["is_write_error"], rank1
    # The ranks stopped at the same event: neither went on into a DDP all-reduce the other never joins.
    assert rank0["iteration"] == rank1["iteration"]
    assert rank1["saves"] == 0
    assert not list((tmp_path / "ours").glob("*.pt")), "a checkpoint name appeared although every write failed"


def test_wait_with_barrier_propagates_rank0_failure(tmp_path: Path) -> None:
    """(d) ``wait(barrier=True)`` on every rank raises rank 0's write failure on rank 1 too."""
    rank0, rank1 = launch("fail_wait", tmp_path, timeout=TIMEOUT_S)
    assert rank1["local_wait_error"] is None, "a plain wait() on rank 1 has nothing to report"
    err0, err1 = rank0["error"], rank1["error"]
    assert err0 is not None and err0["is_write_error"] and err0["cause_errno"] == errno.ENOSPC, rank0
    assert err1 is not None and err1["is_write_error"] and err1["cause_type"] is None, rank1


def test_write_failure_of_evaluator_saver_reaches_every_rank(tmp_path: Path) -> None:
    """A best-model saver attached to an evaluator: its last write is flushed at the trainer's ``COMPLETED``.

    That flush must agree across ranks like the trainer's own one (``wait(barrier=True)``), or rank 0 raises while
    rank 1 returns normally from ``trainer.run`` and walks into its next collective alone.
    """
    rank0, rank1 = launch("fail_evaluator", tmp_path, timeout=TIMEOUT_S)
    err0, err1 = rank0["error"], rank1["error"]
    assert err0 is not None and err0["is_write_error"] and err0["cause_errno"] == errno.ENOSPC, rank0
    assert err1 is not None and err1["is_write_error"], f"rank 1 returned normally while rank 0 raised: {rank1}"


# -- one agreement for everything that can fail or be skipped on one rank ---------------------------------------------
def test_skip_for_lack_of_a_slot_is_agreed_by_every_rank(tmp_path: Path) -> None:
    """``overflow="skip"``: when rank 0 has no free slot every rank skips that checkpoint, none hangs or desyncs."""
    rank0, rank1 = launch("skip", tmp_path, timeout=TIMEOUT_S)
    assert rank0["iteration"] == rank1["iteration"] == 6
    # Iteration 1's write is held until COMPLETED: every later interval checkpoint finds no free slot.
    assert rank0["skipped"] == rank1["skipped"] == 5
    assert rank0["saved_list"] == rank1["saved_list"] == ["checkpoint_iteration=1.pt"]
    assert rank0["files"] == ["checkpoint_iteration=1.pt"]


def test_preemption_signal_seen_by_one_rank_is_acted_on_by_every_rank(tmp_path: Path) -> None:
    """SIGTERM reaching rank 1 only: both ranks write the final checkpoint at the same iteration and hand it on."""
    rank0, rank1 = launch("preempt_one_rank", tmp_path, timeout=TIMEOUT_S)
    assert rank0["preempted_at"] == rank1["preempted_at"] == 2, (rank0, rank1)
    assert rank0["files"] == ["checkpoint_final_iteration=2.pt"]


def test_failure_at_completed_is_raised_on_every_rank(tmp_path: Path) -> None:
    """A ``SnapshotError`` in rank 0's final save at ``COMPLETED`` ends ``engine.run`` with an error on every rank."""
    rank0, rank1 = launch("fail_completed", tmp_path, timeout=TIMEOUT_S)
    err0, err1 = rank0["error"], rank1["error"]
    assert err0 is not None and err0["type"] == "SnapshotError", rank0
    assert err1 is not None and err1["type"] == "SnapshotError" and "another rank" in err1["message"], rank1
    assert rank0["iteration"] == rank1["iteration"] == 6


def test_any_staging_exception_on_rank0_is_raised_on_every_rank(tmp_path: Path) -> None:
    """A ``RuntimeError`` (not a ``SnapshotError``) from rank 0's ``state_dict`` at an event stops every rank there."""
    rank0, rank1 = launch("fail_staging", tmp_path, timeout=TIMEOUT_S)
    err0, err1 = rank0["error"], rank1["error"]
    assert err0 is not None and err0["type"] == "RuntimeError" and "injected" in err0["message"], rank0
    assert err1 is not None and err1["type"] == "SnapshotError", rank1
    assert rank0["iteration"] == rank1["iteration"] == 2
