"""Retention: which checkpoints to keep (the last N saved, the best N by a metric), decided without I/O.

:class:`Retention` holds the kept checkpoints and answers, for each new one, whether it is worth writing and which
kept ones it evicts. It never touches a file: the caller writes the new checkpoint and removes the evicted ones
only after the new one is durable (the writer's FIFO does that), and calls :meth:`Retention.undo` when the write
fails, so the kept list matches the disk again.

Rules:

* ``keep_last=N`` keeps the N most recently saved checkpoints (by save order, not by step number).
* ``keep_best=N`` keeps the N best by ``metric`` (``mode="max"``: larger is better; ``"min"``: smaller). Ties go to
  the **older** checkpoint: a new one must be strictly better than the worst kept one to replace it, as ignite's
  ``Checkpoint`` decides (``greater_or_equal=False``). A NaN or missing metric ranks below every number.
* With both, a checkpoint is kept while either rule keeps it; with neither, every checkpoint is kept.
* A new checkpoint that no rule would keep is not written at all.

The state is plain data, so it can be rebuilt after a restart from the directory's manifest
(:func:`entries_from_manifest`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Decision", "Entry", "Retention", "entries_from_manifest"]

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class Entry:
    """One checkpoint known to retention.

    Attributes:
        path: the file.
        step: the training step it was saved at.
        metrics: the metrics given with it (numbers).
        seq: save order; a larger ``seq`` is a newer save.
    """

    path: str
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True)
class Decision:
    """What retention decided for one new checkpoint.

    Attributes:
        entry: the new checkpoint.
        keep: whether it is worth writing (some rule keeps it).
        evict: kept checkpoints to remove once the new one is durable (oldest first).
        replaced: the kept checkpoint with the same path, which the new file replaces in place (never removed).
        best: ``keep_best`` keeps it (a caller that may drop saves under load should not drop this one).
    """

    entry: Entry
    keep: bool
    evict: tuple[Entry, ...] = ()
    replaced: Entry | None = None
    best: bool = False


class Retention:
    """Keep-last-N and keep-best-N bookkeeping (not thread-safe: one owner calls it).

    Args:
        keep_last: keep the N most recent checkpoints (``None``: no such rule).
        keep_best: keep the N best checkpoints by ``metric`` (``None``: no such rule).
        metric: the metric ``keep_best`` ranks by.
        mode: ``"max"`` if a larger metric is better, ``"min"`` if a smaller one is.

    Raises:
        ValueError: a count below 1, ``keep_best`` without ``metric``, or a bad ``mode``.
    """

    def __init__(
        self,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: Mode = "max",
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (keep all), got {value!r}.")
        if keep_best is not None and not metric:
            raise ValueError(f"keep_best={keep_best} ranks checkpoints by a metric: pass metric='<name>' too.")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (larger is better) or 'min', got {mode!r}.")
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self._entries: list[Entry] = []
        self._next_seq = 0

    @property
    def entries(self) -> list[Entry]:
        """The kept checkpoints, oldest save first."""
        return list(self._entries)

    def score(self, entry: Entry) -> float:
        """The value ``keep_best`` ranks ``entry`` by (larger is better; ``-inf`` for a NaN or missing metric)."""
        value = entry.metrics.get(self.metric, math.nan) if self.metric else math.nan
        if math.isnan(value):
            return -math.inf
        return value if self.mode == "max" else -value

    def _kept(self, candidates: list[Entry]) -> tuple[set[int], set[int]]:
        """The ``seq`` of every candidate some rule keeps, and of those ``keep_best`` keeps (candidates are oldest
        first)."""
        if self.keep_last is None and self.keep_best is None:
            return {e.seq for e in candidates}, set()
        kept: set[int] = set()
        best: set[int] = set()
        if self.keep_last is not None:
            kept.update(e.seq for e in candidates[-self.keep_last :])
        if self.keep_best is not None:
            # Best first; among equal scores the older save ranks higher (ignite's strict comparison).
            ranked = sorted(candidates, key=lambda e: (-self.score(e), e.seq))
            best.update(e.seq for e in ranked[: self.keep_best])
        return kept | best, best

    def plan(self, path: str, step: int, metrics: Mapping[str, float] | None = None) -> Decision:
        """Decide for a new checkpoint without changing anything (see :meth:`apply`)."""
        entry = Entry(path, step, dict(metrics or {}), self._next_seq)
        replaced = next((e for e in self._entries if e.path == path), None)
        candidates = [e for e in self._entries if e is not replaced] + [entry]
        kept, best = self._kept(candidates)
        if entry.seq not in kept:
            return Decision(entry, keep=False)
        evict = tuple(e for e in candidates if e.seq not in kept)
        return Decision(entry, keep=True, evict=evict, replaced=replaced, best=entry.seq in best)

    def apply(self, decision: Decision) -> None:
        """Record a decision from :meth:`plan` whose checkpoint is being written (no-op if it is not kept)."""
        if not decision.keep:
            return
        gone = {e.seq for e in decision.evict}
        if decision.replaced is not None:
            gone.add(decision.replaced.seq)
        self._entries = [e for e in self._entries if e.seq not in gone] + [decision.entry]
        self._next_seq = max(self._next_seq, decision.entry.seq + 1)

    def offer(self, path: str, step: int, metrics: Mapping[str, float] | None = None) -> Decision:
        """:meth:`plan` and :meth:`apply` in one call."""
        decision = self.plan(path, step, metrics)
        self.apply(decision)
        return decision

    def undo(self, decision: Decision, present: Callable[[str], bool] = os.path.exists) -> None:
        """The write of ``decision``'s checkpoint failed: forget it and take back what it evicted or replaced.

        Only files still ``present`` come back, and never onto a path a kept checkpoint owns now (a later save of
        the same path). Later decisions may have assumed the failed checkpoint existed, so the list can exceed the
        rules for a while: the next :meth:`plan` evicts the surplus.
        """
        if not decision.keep:
            return
        self._entries = [e for e in self._entries if e.seq != decision.entry.seq]
        taken = {e.path for e in self._entries}
        back = [*decision.evict, *([decision.replaced] if decision.replaced is not None else [])]
        for e in back:
            if e.path not in taken and present(e.path):
                self._entries.append(e)
                taken.add(e.path)
        self._entries.sort(key=lambda e: e.seq)

    def restore(self, entries: Iterable[Entry]) -> None:
        """Replace the kept list with ``entries`` (e.g. from a manifest), renumbered in their order, oldest first.

        Nothing is evicted here, even if there are more entries than the rules keep: the next save evicts them,
        after it is durable.
        """
        self._entries = [Entry(e.path, e.step, dict(e.metrics), i) for i, e in enumerate(entries)]
        self._next_seq = len(self._entries)


def entries_from_manifest(
    directory: str, files: Mapping[str, Any], name_pattern: re.Pattern[str], reason: str | None = None
) -> list[Entry]:
    """The checkpoints of ``directory`` whose file name matches ``name_pattern``, oldest save first.

    Args:
        directory: the checkpoint directory.
        files: the manifest's ``files`` mapping (``read_manifest(directory)["files"]``).
        name_pattern: a file name pattern whose first group is the step number.
        reason: only manifest entries recorded with this reason.

    Files that are on disk and match the pattern but are missing from the manifest (written with the manifest
    off, or by a process killed between the rename and the manifest update) are included with no metrics, ordered
    by modification time among the others. Temporary files never match a ``.pt``-anchored pattern.
    """
    found: list[tuple[float, int, str, dict[str, float]]] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = name_pattern.fullmatch(name)
        path = os.path.join(directory, name)
        if match is None or not os.path.isfile(path):
            continue
        step = int(match.group(1))
        info = files.get(name)
        if isinstance(info, Mapping) and (reason is None or info.get("reason") == reason):
            raw = info.get("metrics") or {}
            metrics = {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}
            found.append((float(info.get("saved_at", 0.0)), step, path, metrics))
        elif info is None:
            found.append((os.path.getmtime(path), step, path, {}))
    found.sort(key=lambda it: (it[0], it[1]))
    return [Entry(path, step, metrics) for _, step, path, metrics in found]
