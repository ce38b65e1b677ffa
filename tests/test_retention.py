"""Retention rules: keep-last-N and keep-best-N, decided before writing, undone after a failed write, restored from
a manifest. ignite's ``Checkpoint`` is the oracle for what keep-best keeps."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint

from async_ckpt.core.retention import Entry, Retention, entries_from_manifest

PATTERN = re.compile(r"step_(\d+)\.pt")


def _path(step: int) -> str:
    return f"step_{step}.pt"


class _Recorder(BaseSaveHandler):  # type: ignore[misc]
    """A save handler that only records what ignite's ``Checkpoint`` writes and removes."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.written: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        self.files.add(filename)
        self.written.append(filename)

    def remove(self, filename: str) -> None:
        self.files.discard(filename)


class _Stateless:
    def state_dict(self) -> dict[str, Any]:
        return {}


def _ignite_run(scores: list[float], n_saved: int) -> tuple[list[bool], list[float]]:
    """Feed ``scores`` to ignite's ``Checkpoint(n_saved=...)``: which were written, and the kept scores."""
    recorder = _Recorder()
    engine = Engine(lambda e, b: None)
    checkpoint = Checkpoint(
        {"m": _Stateless()},
        recorder,
        score_function=lambda e: e.state.metrics["m"],
        score_name="m",
        n_saved=n_saved,
        global_step_transform=lambda e, _: e.state.iteration,
    )
    written = []
    for i, score in enumerate(scores):
        engine.state.iteration = i
        engine.state.metrics["m"] = score
        before = len(recorder.written)
        checkpoint(engine)
        written.append(len(recorder.written) > before)
    kept = sorted(float(f.split("=")[-1][: -len(".pt")]) for f in recorder.files)
    return written, kept


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.integers(min_value=0, max_value=5).map(float), min_size=1, max_size=25),
    n=st.integers(min_value=1, max_value=4),
)
def test_keep_best_matches_ignite(scores: list[float], n: int) -> None:
    """keep_best writes exactly the checkpoints ignite's Checkpoint writes and keeps the same scores (ties included)."""
    written, kept = _ignite_run(scores, n)
    retention = Retention(keep_best=n, metric="m")
    ours = []
    for i, score in enumerate(scores):
        decision = retention.offer(_path(i), i, {"m": score})
        ours.append(decision.keep)
    assert ours == written
    assert sorted(e.metrics["m"] for e in retention.entries) == kept


@settings(max_examples=40, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=False, width=16), min_size=1, max_size=20), n=st.integers(1, 4))
def test_min_mode_is_max_of_negated(scores: list[float], n: int) -> None:
    """mode="min" keeps the same checkpoints as mode="max" on the negated metric."""
    low = Retention(keep_best=n, metric="loss", mode="min")
    high = Retention(keep_best=n, metric="loss", mode="max")
    for i, score in enumerate(scores):
        assert low.offer(_path(i), i, {"loss": score}).keep == high.offer(_path(i), i, {"loss": -score}).keep
    assert [e.step for e in low.entries] == [e.step for e in high.entries]


def test_tie_keeps_the_older_checkpoint() -> None:
    """A new checkpoint that only equals the worst kept one is not written (the older one wins the tie)."""
    retention = Retention(keep_best=1, metric="acc")
    assert retention.offer("a.pt", 1, {"acc": 0.5}).keep
    decision = retention.offer("b.pt", 2, {"acc": 0.5})
    assert not decision.keep
    assert [e.path for e in retention.entries] == ["a.pt"]


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 30), n=st.integers(1, 5))
def test_keep_last_keeps_the_newest_and_evicts_in_order(steps: int, n: int) -> None:
    """keep_last writes every checkpoint and evicts the oldest one once more than N are kept."""
    retention = Retention(keep_last=n)
    evicted: list[int] = []
    for i in range(steps):
        decision = retention.offer(_path(i), i, None)
        assert decision.keep
        evicted += [e.step for e in decision.evict]
    assert [e.step for e in retention.entries] == list(range(max(0, steps - n), steps))
    assert evicted == list(range(max(0, steps - n)))


def test_keep_last_and_best_keep_the_union() -> None:
    """With both rules a checkpoint stays while either keeps it; one neither keeps is never written."""
    retention = Retention(keep_last=1, keep_best=1, metric="acc")
    retention.offer("s1.pt", 1, {"acc": 0.9})
    retention.offer("s2.pt", 2, {"acc": 0.1})
    decision = retention.offer("s3.pt", 3, {"acc": 0.2})
    assert [e.path for e in decision.evict] == ["s2.pt"]
    assert [e.path for e in retention.entries] == ["s1.pt", "s3.pt"]
    assert not decision.best and retention.plan("s4.pt", 4, {"acc": 0.95}).best
    only_best = Retention(keep_best=1, metric="acc")
    only_best.offer("s1.pt", 1, {"acc": 0.9})
    assert not only_best.offer("s2.pt", 2, {"acc": 0.1}).keep


def test_nan_metric_ranks_last() -> None:
    """A NaN metric never displaces a real one and is the first evicted by a real one."""
    retention = Retention(keep_best=1, metric="acc")
    retention.offer("a.pt", 1, {"acc": math.nan})
    decision = retention.offer("b.pt", 2, {"acc": -1.0})
    assert decision.keep and [e.path for e in decision.evict] == ["a.pt"]
    assert not retention.offer("c.pt", 3, {"acc": math.nan}).keep


def test_same_path_replaces_without_eviction() -> None:
    """Saving a path that is already kept replaces its entry and never lists it for removal."""
    retention = Retention(keep_last=2)
    retention.offer("a.pt", 1)
    decision = retention.offer("a.pt", 1)
    assert decision.keep and decision.evict == () and decision.replaced is not None
    assert [e.path for e in retention.entries] == ["a.pt"]


def test_undo_brings_back_evicted_and_replaced() -> None:
    """Undoing a failed write restores the kept list it changed, for files still on disk."""
    retention = Retention(keep_last=2)
    retention.offer("a.pt", 1)
    retention.offer("b.pt", 2)
    before = retention.entries
    failed = retention.offer("c.pt", 3)
    assert [e.path for e in failed.evict] == ["a.pt"]
    retention.undo(failed, present=lambda p: True)
    assert retention.entries == before
    replaced = retention.offer("b.pt", 2)
    retention.undo(replaced, present=lambda p: p != "b.pt")
    assert [e.path for e in retention.entries] == ["a.pt"]


def test_undo_after_later_saves_lets_the_next_save_evict_the_surplus() -> None:
    """After a failed write undone behind a later save, the list can exceed N until the next save evicts it."""
    retention = Retention(keep_last=1)
    retention.offer("a.pt", 1)
    failed = retention.offer("b.pt", 2)  # evicts a
    retention.offer("c.pt", 3)  # evicts b (the failed one)
    retention.undo(failed, present=lambda p: p == "a.pt")
    assert [e.path for e in retention.entries] == ["a.pt", "c.pt"]
    decision = retention.offer("d.pt", 4)
    assert {e.path for e in decision.evict} == {"a.pt", "c.pt"}


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last": 0}, {"keep_best": 2}, {"keep_best": 1, "metric": "m", "mode": "up"}, {"keep_last": True}],
)
def test_bad_arguments_say_what_to_pass(kwargs: dict[str, Any]) -> None:
    """Bad counts, keep_best without a metric, or an unknown mode raise ValueError at construction."""
    with pytest.raises(ValueError):
        Retention(**kwargs)


def test_entries_from_manifest_orders_by_save_time(tmp_path: Path) -> None:
    """Manifest entries come back oldest save first with their metrics; unlisted matching files are included."""
    for name in ("step_5.pt", "step_1.pt", "step_9.pt", "other.pt", "step_3.pt.async_ckpt-tmp-h.1.x"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / "step_9.pt", (3000.0, 3000.0))
    files = {
        "step_5.pt": {"reason": "checkpointer", "saved_at": 1000.0, "metrics": {"acc": 0.5}},
        "step_1.pt": {"reason": "checkpointer", "saved_at": 2000.0, "metrics": {"acc": 0.7}},
        "gone.pt": {"reason": "checkpointer", "saved_at": 500.0},
    }
    entries = entries_from_manifest(str(tmp_path), files, PATTERN, reason="checkpointer")
    assert [(Path(e.path).name, e.step, dict(e.metrics)) for e in entries] == [
        ("step_5.pt", 5, {"acc": 0.5}),
        ("step_1.pt", 1, {"acc": 0.7}),
        ("step_9.pt", 9, {}),
    ]
    retention = Retention(keep_last=2)
    retention.restore(entries)
    assert [e.seq for e in retention.entries] == [0, 1, 2]
    assert [Path(e.path).name for e in retention.offer(str(tmp_path / "step_10.pt"), 10).evict] == [
        "step_5.pt",
        "step_1.pt",
    ]
    assert isinstance(retention.entries[0], Entry)
