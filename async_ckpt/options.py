"""Keyword-only options that control the asynchronous behaviour of a saver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from async_ckpt.pipeline.storage import DirectIO

OverflowPolicy = Literal["block", "skip"]
SnapshotMode = Literal["eager", "overlap"]


@dataclass(frozen=True)
class AsyncOptions:
    """How a saver stages and writes in the background.

    Args:
        max_pending: snapshots that may be in flight at once (one being written, the rest waiting). Each one owns
            a set of reusable CPU buffers as large as the state, so this bounds the extra host memory.
        overflow: what to do when ``max_pending`` snapshots are in flight and another save is due. ``"block"``
            waits for the writer (the time waited is recorded); ``"skip"`` drops *interval* saves with a warning.
            Best-metric and final saves are never dropped.
        fsync: flush files and their directory to stable storage before a checkpoint counts as durable. Turning
            it off trades the crash guarantee for speed and is meant for tests on tmpfs.
        snapshot_mode: ``"eager"`` copies every tensor before the event handler returns. ``"overlap"`` copies
            module parameters and optimizer state while the next step runs; the optimizer's ``step()`` waits
            for the copy (see docs/design.md).
        dedup: when several of the saver's checkpoints are due for the same unchanged state (final, key metric,
            interval), stage and serialize it once and hard-link the other names.
        manifest: record each durable file (size, checksum, step, score, reason) in the directory's
            ``.async_ckpt_manifest.json`` so it can be verified and resumed from.
        sync_errors: in a distributed run, agree across ranks (small all-reduces on a gloo group of the saver's
            own) at every checkpoint event, at ``COMPLETED`` and, with a preemption signal, at every iteration end,
            so that every rank raises on a failure, skips with ``overflow="skip"`` and acts on a preemption signal
            together instead of leaving the others in a collective. ``False`` turns all of it off.
        exit_timeout: seconds the interpreter-exit hook waits for pending writes before it reports the ones it
            could not finish (``None``: wait as long as it takes).
        direct_io: write the large records of a checkpoint with ``O_DIRECT``, straight from the staging buffers,
            bypassing the page cache (less CPU, and the checkpoint does not evict other cached data). ``"auto"``
            falls back to buffered writes, with one INFO line per directory, where the file system refuses it
            (tmpfs on older kernels, some network and FUSE file systems); ``True`` makes that refusal a write
            error instead; ``False`` always writes through the page cache. Records start on 4 KiB boundaries
            unless it is ``False`` (``torch.load`` reads both layouts). ``SaveStats.io_path`` says which path a save
            took.
    """

    max_pending: int = 2
    overflow: OverflowPolicy = "block"
    fsync: bool = True
    snapshot_mode: SnapshotMode = "eager"
    dedup: bool = True
    manifest: bool = True
    sync_errors: bool = True
    exit_timeout: float | None = 600.0
    direct_io: DirectIO = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.max_pending, int) or isinstance(self.max_pending, bool) or self.max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1 (snapshots in flight), got {self.max_pending!r}.")
        if self.overflow not in ("block", "skip"):
            raise ValueError(f"overflow must be 'block' or 'skip', got {self.overflow!r}.")
        if self.snapshot_mode not in ("eager", "overlap"):
            raise ValueError(f"snapshot_mode must be 'eager' or 'overlap', got {self.snapshot_mode!r}.")
        if self.direct_io not in ("auto", True, False) or not isinstance(self.direct_io, (str, bool)):
            raise ValueError(f"direct_io must be 'auto', True or False, got {self.direct_io!r}.")
        if self.exit_timeout is not None and self.exit_timeout <= 0:
            raise ValueError(f"exit_timeout must be > 0 seconds or None, got {self.exit_timeout!r}.")
