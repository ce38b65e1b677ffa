"""Rank agreement: every rank learns whether any rank raised a flag, with one small all-reduce.

Integrations call it at points every rank reaches in the same order (a checkpoint event, a flush), so that a
failure or a skip decided on one rank is acted on by all of them instead of leaving the others in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RankAgreement"]


class RankAgreement:
    """Every rank learns whether any rank raised a flag, at a point that every rank reaches in the same order.

    One mechanism for everything that can fail or be skipped on one rank at a checkpoint event (a write failure, a
    skip for lack of a free slot, an exception while staging, a preemption signal): the flags are a small integer
    tensor, all-reduced with ``MAX``. In a ``torch.distributed`` run the all-reduce goes through a process group of
    its own on the gloo backend, created once, when the saver is built (a collective: every rank builds its saver
    at the same point). Gloo reduces a CPU tensor on the calling thread, so the agreement never queues behind the
    eager device-to-host copy of the state on a CUDA stream, as an all-reduce on NCCL's default group would.

    Thread-safety: training thread only.

    Args:
        enabled: agree at all (the saver's ``sync_errors``); with ``False``, or in a single process, every call
            returns its own flags without communicating.
        world_size: the number of ranks; ``None`` asks ``torch.distributed`` (1 when it is not initialized).
        all_reduce: a ``MAX`` all-reduce of an int32 CPU tensor for a distributed backend other than
            ``torch.distributed`` (ignite passes its own for XLA or Horovod); unused when ``torch.distributed`` is
            initialized.
    """

    def __init__(
        self,
        enabled: bool,
        world_size: int | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if initialized else 1
        self.world_size = world_size if enabled else 1
        self._group: Any = None
        self._all_reduce = all_reduce
        if self.world_size > 1 and initialized:
            self._group = torch.distributed.new_group(backend="gloo")
        elif self.world_size > 1 and all_reduce is None:
            raise ValueError(
                f"RankAgreement: {self.world_size} ranks but torch.distributed is not initialized and no all_reduce "
                "was given; initialize the process group first, or pass the backend's all-reduce."
            )

    @property
    def active(self) -> bool:
        """Whether calls communicate (a distributed run with agreement enabled)."""
        return self.world_size > 1

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is set on any rank (every rank must call this with as many flags)."""
        if not self.active:
            return flags
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        if self._group is not None:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=self._group)
        else:
            assert self._all_reduce is not None
            values = self._all_reduce(values)
        return tuple(bool(v) for v in values.tolist())
