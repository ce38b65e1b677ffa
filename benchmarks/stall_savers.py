"""Saver adapters of ``benchmarks.stall``: every saver under test behind one small interface on an ignite ``Engine``.

Each adapter attaches its saver's handler(s) to ``ITERATION_COMPLETED(every=K)``, finishes it after the run
(``close()`` for the async ones), reports per-save records (durable time, bytes, write rate; async_ckpt's own
telemetry where there is one), and lists and loads the files it wrote so that the runner can verify them.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from benchmarks.common import MiB, dir_bytes
from benchmarks.workloads import Workload

SAVERS = ("none", "monai", "ignite", "dcp", "dcp-cached", "async-eager", "async-overlap")
SYNC_SAVERS = ("monai", "ignite")
ASYNC_SAVERS = ("dcp", "dcp-cached", "async-eager", "async-overlap")
SAVER_LABELS = {
    "none": "none (no checkpoint)",
    "monai": "MONAI CheckpointSaver",
    "ignite": "ignite Checkpoint+DiskSaver",
    "dcp": "torch DCP async_save",
    "dcp-cached": "torch DCP async_save, cached stager",
    "async-eager": "async_ckpt eager",
    "async-overlap": "async_ckpt overlap",
}
METADATA_FILES = {".async_ckpt_manifest.json"}  # async_ckpt's per-directory manifest (async_ckpt.pipeline.integrity)
_ITER_RE = re.compile(r"(\d+)(?:\.pt)?$")


def _iteration_of(path: str) -> int | None:
    m = _ITER_RE.search(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


class Saver:
    """Adapter: attach a saver's handler(s) to ``ITERATION_COMPLETED(every=K)``, finish, list and load files."""

    name = "none"

    def __init__(self, wl: Workload, save_dir: str, every: int) -> None:
        self.wl, self.save_dir, self.every = wl, save_dir, every

    def attach(self, engine: Any) -> None:
        pass

    def finish(self) -> None:
        pass

    def save_records(self, handler_s: dict[int, float]) -> dict[int, dict[str, float]]:
        """Per checkpoint iteration: ``durable_s``, ``nbytes``, ``write_mib_s`` (and ``blocking_s``, ...)."""
        return {}

    def files(self) -> dict[int, str]:
        out = {}
        for name in os.listdir(self.save_dir):
            it = _iteration_of(name)
            if it is not None and name.endswith(".pt"):
                out[it] = os.path.join(self.save_dir, name)
        return out

    def load(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return obj["model"], obj["optimizer"]


class _SyncSaver(Saver):
    def save_records(self, handler_s: dict[int, float]) -> dict[int, dict[str, float]]:
        out = {}
        for it, path in self.files().items():
            nbytes = os.path.getsize(path)
            h = handler_s.get(it, float("nan"))
            out[it] = {"durable_s": h, "nbytes": nbytes, "write_mib_s": nbytes / MiB / h if h > 0 else float("nan")}
        return out


class MonaiSaver(_SyncSaver):
    name = "monai"

    def attach(self, engine: Any) -> None:
        from monai.handlers import CheckpointSaver

        self.saver = CheckpointSaver(
            save_dir=self.save_dir, save_dict=self.wl.save_dict(), save_interval=self.every, epoch_level=False
        )
        self.saver.attach(engine)


class IgniteSaver(_SyncSaver):
    name = "ignite"

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events
        from ignite.handlers import Checkpoint, DiskSaver

        handler = DiskSaver(self.save_dir, atomic=True, require_empty=False, create_dir=True)
        self.checkpoint = Checkpoint(self.wl.save_dict(), handler, n_saved=None)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.checkpoint)


class DcpSaver(Saver):
    """``torch.distributed.checkpoint.async_save`` with ``no_dist=True`` (no process group needed).

    Waits for the previous save before staging the next one, as DCP's documentation asks (a cached stager reuses
    its buffers); that wait is part of the stall. ``cached`` keeps one ``DefaultStager`` across saves so its
    CPU storages are reused; the default stages into fresh memory at every save.
    """

    def __init__(self, wl: Workload, save_dir: str, every: int, cached: bool) -> None:
        super().__init__(wl, save_dir, every)
        self.name = "dcp-cached" if cached else "dcp"
        self.cached = cached
        self.stager: Any = None
        self.future: Any = None
        self.events: dict[int, dict[str, float]] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.cached:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(StagingOptions(False, False, False, False))
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._save)

    def _save(self, engine: Any) -> None:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        if self.future is not None:
            self.future.result()
        t1 = time.perf_counter()
        it = engine.state.iteration
        rec = {"t0": t0, "backpressure_s": t1 - t0, "done": float("nan")}
        self.events[it] = rec
        model_sd, optim_sd = self.wl.state_dicts()
        kwargs = {"async_stager": self.stager} if self.stager is not None else {}
        fut = dcp.async_save(
            {"model": model_sd, "optimizer": optim_sd},
            checkpoint_id=os.path.join(self.save_dir, f"dcp-iter-{it}"),
            no_dist=True,
            **kwargs,
        )
        fut.add_done_callback(lambda _f: rec.__setitem__("done", time.perf_counter()))
        self.future = fut

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()
        if self.stager is not None:
            self.stager.close()

    def files(self) -> dict[int, str]:
        out = {}
        for name in os.listdir(self.save_dir):
            if name.startswith("dcp-iter-"):
                out[int(name.rsplit("-", 1)[1])] = os.path.join(self.save_dir, name)
        return out

    def save_records(self, handler_s: dict[int, float]) -> dict[int, dict[str, float]]:
        files = self.files()
        out = {}
        for it, rec in self.events.items():
            nbytes = dir_bytes(files[it]) if it in files else 0
            durable = rec["done"] - rec["t0"]
            busy = durable - handler_s.get(it, 0.0)
            out[it] = {
                "durable_s": durable,
                "nbytes": nbytes,
                "backpressure_s": rec["backpressure_s"],
                "write_mib_s": nbytes / MiB / busy if busy > 0 else float("nan"),
            }
        return out

    def load(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch
        import torch.distributed.checkpoint as dcp

        def empty(node: Any) -> Any:
            if isinstance(node, torch.Tensor):
                return torch.empty_like(node)
            if isinstance(node, dict):
                return {k: empty(v) for k, v in node.items()}
            if isinstance(node, list):
                return [empty(v) for v in node]
            return node

        model_sd, optim_sd = self.wl.state_dicts()
        template = {"model": empty(model_sd), "optimizer": empty(optim_sd)}
        dcp.load(template, checkpoint_id=path, no_dist=True)
        return template["model"], template["optimizer"]


class AsyncSaver(Saver):
    """``async_ckpt.AsyncCheckpointSaver`` with MONAI's arguments, ``snapshot_mode`` eager or overlap."""

    def __init__(self, wl: Workload, save_dir: str, every: int, mode: str) -> None:
        super().__init__(wl, save_dir, every)
        self.name = f"async-{mode}"
        self.mode = mode
        self.saver: Any = None

    def attach(self, engine: Any) -> None:
        from async_ckpt import AsyncCheckpointSaver

        self.saver = AsyncCheckpointSaver(
            save_dir=self.save_dir,
            save_dict=self.wl.save_dict(),
            save_interval=self.every,
            epoch_level=False,
            snapshot_mode=self.mode,  # type: ignore[arg-type]
        )
        self.saver.attach(engine)

    def finish(self) -> None:
        if self.saver is not None:
            self.saver.close()

    def save_records(self, handler_s: dict[int, float]) -> dict[int, dict[str, float]]:
        out = {}
        for s in self.saver.stats.saves:
            it = _iteration_of(s.path)
            if it is None:
                continue
            out[it] = {
                "durable_s": s.durable_s,
                "nbytes": s.nbytes,
                "write_mib_s": s.throughput_mib_s,
                "blocking_s": s.blocking_s,
                "backpressure_s": s.backpressure_s,
                "snapshot_s": s.snapshot_s,
                "serialize_s": s.serialize_s,
                "write_s": s.write_s,
                "fsync_s": s.fsync_s,
                "ok": float(s.ok),
            }
        return out


def make_saver(name: str, wl: Workload, save_dir: str, every: int) -> Saver:
    """The adapter of saver ``name`` (one of :data:`SAVERS`) for ``wl``, writing to ``save_dir`` every ``every``."""
    if name == "none":
        return Saver(wl, save_dir, every)
    if name == "monai":
        return MonaiSaver(wl, save_dir, every)
    if name == "ignite":
        return IgniteSaver(wl, save_dir, every)
    if name in ("dcp", "dcp-cached"):
        return DcpSaver(wl, save_dir, every, cached=name == "dcp-cached")
    if name in ("async-eager", "async-overlap"):
        return AsyncSaver(wl, save_dir, every, mode=name.split("-", 1)[1])
    raise ValueError(f"unknown saver {name!r}; choose from {', '.join(SAVERS)}")


def preimport(savers: set[str]) -> None:
    """Import every saver's modules up front, so no run's time or peak RSS pays for an import."""
    import ignite.engine
    import ignite.handlers

    del ignite
    if "monai" in savers:
        import monai.handlers

        del monai
    if savers & {"dcp", "dcp-cached"}:
        import torch.distributed.checkpoint
        import torch.distributed.checkpoint.staging

        del torch
    if savers & {"async-eager", "async-overlap"}:
        import async_ckpt

        del async_ckpt
