"""Per-save measurements: how long training stalled, and how long until the file was durable."""

from __future__ import annotations

import collections
import statistics
import threading
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SaveStats", "Telemetry"]


@dataclass(frozen=True)
class SaveStats:
    """One checkpoint, from the event to the durable file.

    Attributes:
        path: the final file name.
        reason: ``"interval"``, ``"key_metric"`` or ``"final"``.
        ok: whether the file became durable.
        blocking_s: time the training thread spent in the save (snapshot + enqueue + backpressure).
        backpressure_s: part of ``blocking_s`` spent waiting for a free buffer set.
        snapshot_s: part of ``blocking_s`` spent copying tensors into the buffers.
        nbytes: bytes written (0 for a hard link).
        serialize_s: time spent pickling and building the zip records (excluding the write calls).
        write_s: time spent inside ``write`` calls and the final flush.
        fsync_s: time spent in fsync of the file and its directory.
        durable_s: time from the event until the file was durable.
        linked: the file is a hard link of an identical checkpoint written at the same event.
        reused_snapshot: the tensors were not copied again because an identical snapshot was in flight.
        io_path: ``"direct"`` when the large records went to the disk with O_DIRECT (bypassing the page cache),
            ``"buffered"`` when every byte went through it (``direct_io=False``, a file system that refuses
            O_DIRECT, staging memory not 4 KiB aligned, or a hard link).
    """

    path: str
    reason: str
    ok: bool
    blocking_s: float
    backpressure_s: float
    snapshot_s: float
    nbytes: int
    serialize_s: float
    write_s: float
    fsync_s: float
    durable_s: float
    linked: bool
    reused_snapshot: bool
    io_path: str = "buffered"

    @property
    def throughput_mib_s(self) -> float:
        """Bytes written per second of serialize + write + fsync, in MiB/s (0 for links)."""
        busy = self.serialize_s + self.write_s + self.fsync_s
        return self.nbytes / busy / 2**20 if busy > 0 and self.nbytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_mib_s"] = self.throughput_mib_s
        return d


class Telemetry:
    """The most recent saves of one saver (thread-safe; appended to by the writer thread).

    Args:
        maxlen: how many saves to keep.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._saves: collections.deque[SaveStats] = collections.deque(maxlen=maxlen)
        self.skipped = 0

    def record(self, stats: SaveStats) -> None:
        with self._lock:
            self._saves.append(stats)

    @property
    def saves(self) -> list[SaveStats]:
        """A copy of the recorded saves, oldest first."""
        with self._lock:
            return list(self._saves)

    def summary(self) -> dict[str, float]:
        """Count, median and maximum blocking time, mean durable time and bytes of the recorded saves."""
        saves = self.saves
        if not saves:
            return {"saves": 0, "skipped": self.skipped}
        blocking = [s.blocking_s for s in saves]
        return {
            "saves": len(saves),
            "failed": sum(not s.ok for s in saves),
            "skipped": self.skipped,
            "blocking_p50_s": statistics.median(blocking),
            "blocking_max_s": max(blocking),
            "durable_mean_s": statistics.fmean(s.durable_s for s in saves),
            "bytes": sum(s.nbytes for s in saves),
        }
