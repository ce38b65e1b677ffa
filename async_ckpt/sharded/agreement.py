"""Errors on every rank: what failed in the background is latched, and raised on every rank together.

A sharded save fails on one rank (a shard it could not write, a state it could not copy) or on rank 0 alone (the
publish, a prune). Each rank keeps what failed on it, and at the next save or ``wait()`` every rank contributes a
flag (and, for a scored save, its score and decision) to one small all-gather on a gloo group of the saver's own,
issued from the training thread: if any rank failed, every rank raises, so none is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from async_ckpt.errors import CheckpointWriteError
from async_ckpt.sharded.kept import KeptCheckpoints
from async_ckpt.sharded.storage import AsideNotRestoredError

__all__ = ["ErrorAgreement", "Latched", "describe"]


@dataclass
class Latched:
    """A failure of the background, kept until the next agreement."""

    path: str
    error: BaseException
    stage: str  # "write", "stage", "publish" or "remove"


def describe(error: BaseException) -> str:
    """``repr`` of an error; for DCP's ``CheckpointException``, the original error of each rank that failed."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            original = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            parts.append(f"rank {rank}: {original!r}")
        return f"{type(error).__name__} in DCP's {error.args[0] if error.args else 'save'} step ({'; '.join(parts)})"
    return repr(error)


class ErrorAgreement:
    """This rank's latched failures, and the agreement that raises them on every rank.

    Thread-safety: the training thread only (the saver latches a failure when it settles a save, on that thread).

    Args:
        rank: this process's rank.
        world_size: the number of ranks.
        group: the gloo group of the agreement (``None`` in a single process: nothing is communicated).
        kept: the saver's lists; when some rank failed, rank 0's replace the others' before the raise.
    """

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None, kept: KeptCheckpoints) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.kept = kept
        self.latched: list[Latched] = []
        self.last_error: BaseException | None = None  # what the last failed agreement raised on this rank

    def latch(self, path: str, error: BaseException, stage: str) -> None:
        """Keep a failure of ``stage`` on the checkpoint ``path`` until the next agreement."""
        self.latched.append(Latched(path, error, stage))

    def take_error(self) -> CheckpointWriteError | None:
        """The latched failures as one error (``None`` if there are none), and forget them."""
        latched, self.latched = self.latched, []
        if not latched:
            return None
        first = latched[0]
        verb = {"publish": "publish", "remove": "remove the old checkpoint"}.get(first.stage, "write")
        more = len(latched) - 1
        extra = f" ({more} more failure(s) after it)" if more else ""
        intact = "Earlier checkpoints are intact."
        if isinstance(first.error, AsideNotRestoredError):
            intact = f"Until the next start, the earlier checkpoint under that name is at {first.error.aside!r}."
        err = CheckpointWriteError(
            f"async_ckpt could not {verb} sharded checkpoint {first.path!r} (rank {self.rank}): "
            f"{describe(first.error)}{extra}. {intact}",
            path=first.path,
            more=more,
        )
        err.__cause__ = first.error
        return err

    def agree(self, error: BaseException | None, what: str, values: Sequence[float] = ()) -> list[list[float]]:
        """All ranks learn whether any of them failed; every rank raises together (the failing ones their own).

        ``values`` (as many on every rank) travel with the flag: returns each rank's ``[flag, *values]``, by rank.
        When some rank failed, rank 0's lists replace the others' before the raise: a publish fails on rank 0
        alone, after the other ranks had entered the checkpoint into their lists.
        """
        rows = [[float(error is not None), *map(float, values)]]
        if self.group is not None:
            mine = torch.tensor(rows[0], dtype=torch.float64)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine, group=self.group)
            rows = [t.tolist() for t in gathered]
        failed = sum(1 for row in rows if row[0])
        if failed and self.group is not None:
            lists: list[Any] = [self.kept.lists()]
            dist.broadcast_object_list(lists, src=0, group=self.group)
            self.kept.set_lists(lists[0])
        if failed:
            self.last_error = (
                error
                if error is not None
                else CheckpointWriteError(
                    f"async_ckpt: {failed} other rank(s) failed at {what} (rank {self.rank} stops with them); "
                    "see their error for the cause.",
                    path="",
                )
            )
            raise self.last_error
        return rows
