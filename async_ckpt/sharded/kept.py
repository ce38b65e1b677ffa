"""The checkpoints a :class:`~async_ckpt.sharded.ShardedCheckpointSaver` keeps, decided by the core's retention.

Three lists, each a :class:`~async_ckpt.core.retention.Retention` and each pruned only after a new checkpoint of its
kind has been published: interval and manual saves (the latest ``n_saved``), scored saves (the best ``n_best``, by
the rules of ignite's ``Checkpoint``) and the final checkpoint (the latest one). A decision is planned when a save is
started and applied when it is published, so a save that fails changes no list. No file is touched here: the saver
removes the paths :meth:`KeptCheckpoints.record` returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from async_ckpt.core.retention import Decision, Entry, Retention

__all__ = ["KeptCheckpoints", "Kind", "Lists", "ScoreRanking"]

Kind = Literal["interval", "best", "final"]
# The lists as one picklable value (sent from rank 0 to the other ranks): the entries of the interval, scored and
# final lists, each oldest save first, and the path published last.
Lists = tuple[list[Entry], list[Entry], list[Entry], str | None]

SCORE = "score"
"""The metric name under which a scored checkpoint's score is kept."""


class ScoreRanking:
    """The best ``n_best`` scored checkpoints: a :class:`Retention` by score (larger is better), entered by the rule
    of ignite's ``Checkpoint``.

    ignite decides whether a score enters before it looks at file names: while fewer than ``n_best`` are kept, or
    when the score beats the worst one kept (or equals it, with ``greater_or_equal``). Then the kept checkpoint with
    the same name leaves the list (the new one replaces it), else the worst one (the older of equal scores).
    ``Retention`` agrees except in three cases, decided here: it replaces a same-name checkpoint even when the score
    does not beat the worst kept, it has no ``greater_or_equal``, and of two kept checkpoints with equal scores (an
    integer and a float score print differently) it evicts the newer one.

    Args:
        n_best: how many to keep (``None``: all).
        greater_or_equal: a score equal to the worst one kept enters too.
    """

    def __init__(self, n_best: int | None, greater_or_equal: bool) -> None:
        self.n_best = n_best
        self.greater_or_equal = greater_or_equal
        self._retention = Retention(keep_best=n_best, metric=SCORE, mode="max")

    @property
    def entries(self) -> list[Entry]:
        """The kept checkpoints, oldest save first."""
        return self._retention.entries

    @property
    def ranked(self) -> list[Entry]:
        """The kept checkpoints, worst score first, the older first among equal scores (ignite's order)."""
        return sorted(self._retention.entries, key=self._retention.score)

    def plan(self, path: str, step: int, score: float) -> Decision:
        """Decide for a checkpoint scored ``score`` under ``path``, without changing the list."""
        decision = self._retention.plan(path, step, {SCORE: score})
        ranked = self.ranked
        if self.n_best is None or len(ranked) < self.n_best:
            return decision  # ignite: enters while fewer are kept; Retention keeps it too
        worst = ranked[0]
        worst_score = worst.metrics[SCORE]
        if not (score >= worst_score if self.greater_or_equal else score > worst_score):
            return Decision(decision.entry, keep=False)
        return dataclasses.replace(decision, keep=True, evict=() if decision.replaced else (worst,), best=True)

    def apply(self, decision: Decision) -> None:
        """Record a planned decision whose checkpoint has been published."""
        self._retention.apply(decision)

    def restore(self, entries: Iterable[Entry]) -> None:
        """Replace the list with ``entries``, oldest save first."""
        self._retention.restore(entries)


class KeptCheckpoints:
    """The interval, scored and final checkpoints kept, and the one published last.

    Not thread-safe: the saver's training thread owns it.

    Args:
        n_saved: keep the latest N interval and manual checkpoints (``None``: all).
        n_best: keep the best N scored checkpoints (``None``: all).
        greater_or_equal: a score equal to the worst one kept enters too.
        scored: whether there are scored checkpoints at all (a ``score_function``).
    """

    def __init__(self, n_saved: int | None, n_best: int | None, greater_or_equal: bool, scored: bool) -> None:
        self.interval = Retention(keep_last=n_saved)
        self.best = ScoreRanking(n_best, greater_or_equal) if scored else None
        self.finals = Retention(keep_last=1)
        self.last: str | None = None

    def plan(self, kind: Kind, path: str, step: int, score: float) -> Decision:
        """Decide for a new checkpoint of ``kind`` (``score`` only counts for ``"best"``)."""
        if kind == "best":
            assert self.best is not None
            return self.best.plan(path, step, score)
        return (self.finals if kind == "final" else self.interval).plan(path, step)

    def record(self, kind: Kind, decision: Decision) -> list[str]:
        """Enter a published checkpoint into its list; return the paths that left every list (to delete)."""
        if kind == "best":
            assert self.best is not None
            self.best.apply(decision)
        else:
            (self.finals if kind == "final" else self.interval).apply(decision)
        self.last = decision.entry.path
        return [entry.path for entry in decision.evict if not self.holds(entry.path)]

    def holds(self, path: str) -> bool:
        """Whether some list keeps ``path``."""
        best = self.best.entries if self.best is not None else []
        return any(entry.path == path for entry in (*self.interval.entries, *best, *self.finals.entries))

    def lists(self) -> Lists:
        """The lists as one picklable value."""
        best = self.best.entries if self.best is not None else []
        return self.interval.entries, best, self.finals.entries, self.last

    def set_lists(self, lists: Lists) -> None:
        """Replace the lists with those of :meth:`lists` (rank 0's, or those read back from ``save_dir``)."""
        interval, best, finals, last = lists
        self.interval.restore(interval)
        if self.best is not None:
            self.best.restore(best)
        self.finals.restore(finals)
        self.last = last
