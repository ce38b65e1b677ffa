"""Plain-loop adapters of ``benchmarks.integrations``: ``torch.save`` in the loop, and ``async_ckpt.Checkpointer``.

Each adapter takes the same ``{"model": model, "optim": optimizer}`` state at a step and writes one file per
save; the runner times its :meth:`LoopSaver.save` call (the stall), and the adapter records when each file became
durable (``durable_at``, a ``time.perf_counter()`` value) so that the time to durable is measured from the same
clock for every variant. Every variant writes ``step_<8 digits>.pt`` in ``torch.save``'s format, so one loader
reads them all.

Variants (``LOOP_VARIANTS``):

- ``none``: no checkpoint, the baseline of the throughput overhead.
- ``torch-save``: ``torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)``, what most loops
  do. It neither fsyncs nor renames, so "durable" is only "returned" (the bytes may still be in the page cache).
- ``torch-save-fsync``: the same ``torch.save`` into a temporary file, then ``flush``, ``fsync``, ``os.replace``
  and an fsync of the directory: the guarantee ``Checkpointer`` gives (atomic, durable), paid on the training
  thread. This is the fair synchronous anchor.
- ``checkpointer`` / ``checkpointer-overlap``: ``async_ckpt.Checkpointer(dir, snapshot_mode="eager" | "overlap")``,
  no retention rule (every file is kept, so every file can be verified); durable when its ``on_durable`` callback
  runs (after the fsynced rename).
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

from benchmarks.common import fsync_dir
from benchmarks.workloads import Workload

LOOP_VARIANTS = ("none", "torch-save", "torch-save-fsync", "checkpointer", "checkpointer-overlap")
LOOP_LABELS = {
    "none": "no checkpoint",
    "torch-save": "torch.save in the loop (no fsync)",
    "torch-save-fsync": "torch.save + fsync + rename in the loop",
    "checkpointer": "async_ckpt Checkpointer (eager)",
    "checkpointer-overlap": "async_ckpt Checkpointer (overlap)",
}
# The Lightning variants (their adapters are in benchmarks.integrations_lightning, which imports Lightning).
LIGHTNING_VARIANTS = ("none", "lightning-default", "lightning-async", "async-ckpt")
LIGHTNING_LABELS = {
    "none": "no checkpoint",
    "lightning-default": "Lightning TorchCheckpointIO (default)",
    "lightning-async": "Lightning AsyncCheckpointIO",
    "async-ckpt": "async_ckpt.lightning.AsyncCheckpointIO",
}
LIGHTNING_FSYNCS = {"none": False, "lightning-default": False, "lightning-async": False, "async-ckpt": True}
LOOP_METADATA = {".async_ckpt_manifest.json"}  # Checkpointer's manifest, next to the checkpoints
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def telemetry_of(stats: Any) -> dict[str, float]:
    """The figures of an ``async_ckpt.SaveStats`` that the report keeps (seconds, bytes, MiB/s)."""
    return {
        "blocking_s": stats.blocking_s,
        "backpressure_s": stats.backpressure_s,
        "snapshot_s": stats.snapshot_s,
        "durable_s": stats.durable_s,
        "nbytes": float(stats.nbytes),
        "write_mib_s": stats.throughput_mib_s,
    }


def step_of(path: str) -> int | None:
    """The step in a ``step_<N>.pt`` file name, or ``None``."""
    m = _STEP_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else None


class LoopSaver:
    """One way of checkpointing a plain loop; this base class is ``none`` (it never writes).

    Attributes:
        durable_at: per step, the ``perf_counter()`` time at which the file was complete (and, where the variant
            fsyncs, durable).
        fsyncs: whether ``durable_at`` includes an fsync of the file and its directory.
    """

    name = "none"
    fsyncs = False

    def __init__(self, wl: Workload, save_dir: str) -> None:
        self.wl, self.save_dir = wl, save_dir
        self.durable_at: dict[int, float] = {}
        self.telemetry: dict[int, dict[str, float]] = {}

    def save(self, step: int) -> None:
        """Checkpoint the workload's state as of now, as step ``step``."""

    def finish(self) -> None:
        """Wait until every file is durable and stop any background work (raises its failure)."""

    def path_for(self, step: int) -> str:
        """The file of ``step``."""
        return os.path.join(self.save_dir, f"step_{step:08d}.pt")

    def files(self) -> dict[int, str]:
        """The checkpoint files in the directory, by step."""
        out = {}
        for name in os.listdir(self.save_dir):
            step = step_of(name)
            if step is not None:
                out[step] = os.path.join(self.save_dir, name)
        return out

    @staticmethod
    def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (model, optimizer) state dicts of a file, for the correctness check."""
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return obj["model"], obj["optim"]


class TorchSave(LoopSaver):
    """``torch.save`` of the state dicts on the training thread; with ``fsync``, atomic and durable as ours."""

    def __init__(self, wl: Workload, save_dir: str, fsync: bool) -> None:
        super().__init__(wl, save_dir)
        self.fsyncs = fsync
        self.name = "torch-save-fsync" if fsync else "torch-save"

    def save(self, step: int) -> None:
        import torch

        state = {"model": self.wl.model.state_dict(), "optim": self.wl.optimizer.state_dict()}
        path = self.path_for(step)
        if not self.fsyncs:
            torch.save(state, path)
        else:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.save_dir)
        self.durable_at[step] = time.perf_counter()


class CheckpointerSaver(LoopSaver):
    """``async_ckpt.Checkpointer`` with every file kept, ``snapshot_mode`` eager or overlap."""

    fsyncs = True

    def __init__(self, wl: Workload, save_dir: str, mode: str) -> None:
        super().__init__(wl, save_dir)
        from async_ckpt import Checkpointer

        self.name = "checkpointer" if mode == "eager" else f"checkpointer-{mode}"
        self._lock = threading.Lock()
        self.ckpt = Checkpointer(save_dir, snapshot_mode=mode, on_durable=self._durable)  # type: ignore[arg-type]

    def _durable(self, stats: Any) -> None:  # on the writer thread
        t = time.perf_counter()
        step = step_of(stats.path)
        if step is None:
            return
        with self._lock:
            self.durable_at[step] = t
            self.telemetry[step] = telemetry_of(stats)

    def save(self, step: int) -> None:
        self.ckpt.save(step, {"model": self.wl.model, "optim": self.wl.optimizer})

    def finish(self) -> None:
        self.ckpt.close()


def make_loop_saver(name: str, wl: Workload, save_dir: str) -> LoopSaver:
    """The adapter of plain-loop variant ``name`` (one of :data:`LOOP_VARIANTS`), writing to ``save_dir``."""
    if name == "none":
        return LoopSaver(wl, save_dir)
    if name in ("torch-save", "torch-save-fsync"):
        return TorchSave(wl, save_dir, fsync=name == "torch-save-fsync")
    if name == "checkpointer":
        return CheckpointerSaver(wl, save_dir, "eager")
    if name == "checkpointer-overlap":
        return CheckpointerSaver(wl, save_dir, "overlap")
    raise ValueError(f"unknown plain-loop variant {name!r}; choose from {', '.join(LOOP_VARIANTS)}")
