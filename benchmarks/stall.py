"""Training stall, throughput overhead, durability latency and memory of checkpoint savers on one ignite Engine.

Run ``python -m benchmarks.stall --help``; benchmarks/README.md explains every figure. In short: every saver runs
the same MLP (parameters + Adam state of about the requested size) through the same ignite ``Engine`` with the same
compute-bound step, checkpointing every K iterations. Each engine step is timed from an ``ITERATION_STARTED``
handler registered first to an ``ITERATION_COMPLETED`` handler registered last, so the savers' handlers are inside
the measured time. Savers run in interleaved rounds (A B C ... then ... C B A) in one worker process per state size
(or one per run with ``--isolate``) so that drift of a shared machine cancels out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MiB,
    describe_machine,
    dir_bytes,
    disk_write_probe,
    machine_info,
    median,
    memcpy_probe,
    peak_rss_bytes,
    percentile,
    reset_peak_rss,
    rss_bytes,
)

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
MODES = {
    "quick": {
        "sizes": [64.0, 512.0],
        "rounds": 2,
        "checkpoints": 2,
        "tight_checkpoints": 3,
        "savers": ["none", "monai", "async-eager", "async-overlap"],
    },
    "full": {
        "sizes": [64.0, 512.0, 2048.0],
        "rounds": 3,
        "checkpoints": 4,
        "tight_checkpoints": 6,
        "savers": list(SAVERS),
    },
}
TARGET_STALL_RATIO = 1 / 7
TARGET_STALL_MIN_MIB = 512.0
TARGET_OVERHEAD_PCT = 5.0  # and at most TARGET_OVERHEAD_OF_MONAI of MONAI's overhead in the same run
TARGET_OVERHEAD_OF_MONAI = 1 / 3
TARGET_FIRST_RATIO = 2.0  # the first checkpoint of a run (buffers prewarmed in the background) vs a later one
TARGET_FIRST_ABS_S = 0.005  # below this the ratio of two tiny stalls is noise
TARGET_EVERY = 20
# Shared worker only: a fixed mmap threshold returns freed tensors to the OS at once, so one run's freed memory
# (kept by glibc's heap otherwise) does not hide the next run's peak RSS. --isolate runs need no such help.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
WARMUP_STEPS = 2  # untimed steps before each run
MIN_PLAIN_STEPS = 5  # fewer plain steps than this in a run: its baseline is the same round's 'none' run
METADATA_FILES = {".async_ckpt_manifest.json"}  # async_ckpt's per-directory manifest (async_ckpt.pipeline.integrity)
_ITER_RE = re.compile(r"(\d+)(?:\.pt)?$")


# =================================================================================================================
# Workload
# =================================================================================================================
class Workload:
    """An MLP whose parameters plus Adam's ``exp_avg``/``exp_avg_sq`` hold about ``size_mib`` MiB, and its step.

    The step runs a fixed matmul loop (``compute_iters`` products of 256x1024 by 1024x1024, the same for every
    size) and a forward/backward of a batch of 8 through the big layers, then a fused ``Adam.step``.
    """

    def __init__(self, size_mib: float, compute_iters: int, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        target = size_mib * MiB
        width, layers = 256, 1
        for w in (256, 512, 1024, 2048, 4096):
            n = round(target / (12 * (w * w + w)))
            if n >= 4 or w == 256:
                width, layers = w, max(1, n)
        mods: list[torch.nn.Module] = []
        for i in range(layers):
            mods.append(torch.nn.Linear(width, width))
            if i < layers - 1:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        try:  # fused: one pass over the state, so the step stays compute-bound rather than optimizer-bound
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True)
            self.optimizer_kind = "fused Adam"
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
            self.optimizer_kind = "Adam"
        self.width, self.layers = width, layers
        self.x = torch.randn(8, width)
        self.compute_iters = compute_iters
        self._a = torch.randn(256, 1024)
        self._b = torch.randn(1024, 1024) / 32
        self._c = torch.empty(256, 1024)
        self.step()  # materialize Adam's state so every checkpoint has its full size
        self.state_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(self.state_dicts()))

    def step(self, engine: Any = None, batch: Any = None) -> float:
        import torch

        with torch.no_grad():
            for _ in range(self.compute_iters):
                torch.mm(self._a, self._b, out=self._c)
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.model(self.x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def save_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.model.state_dict(), self.optimizer.state_dict()

    def describe(self) -> str:
        return (
            f"MLP {self.layers}x{self.width}x{self.width}, batch 8, {self.optimizer_kind}, "
            f"{self.compute_iters} fixed matmuls/step"
        )


def calibrate_compute_iters(compute_ms: float) -> tuple[int, float]:
    """How many fixed 256x1024x1024 matmuls take about ``compute_ms`` on this machine now."""
    import torch

    a, b, c = torch.randn(256, 1024), torch.randn(1024, 1024), torch.empty(256, 1024)
    for _ in range(5):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b, out=c)
        times.append((time.perf_counter() - t0) / 5)
    per = median(times)
    return max(0, round(compute_ms / 1e3 / per)), per


# -- state sampling for the correctness check ---------------------------------------------------------------------
def _state_tensors(dicts: tuple[dict[str, Any], dict[str, Any]]) -> list[Any]:
    """The tensors of (model state_dict, optimizer state_dict) in a fixed order."""
    import torch

    model_sd, optim_sd = dicts
    out = [t for _, t in sorted(model_sd.items())]
    for idx in sorted(optim_sd["state"]):
        entry = optim_sd["state"][idx]
        out.extend(entry[k] for k in sorted(entry) if isinstance(entry[k], torch.Tensor))
    return out


def sample_state(dicts: tuple[dict[str, Any], dict[str, Any]], per_tensor: int = 2048) -> list[Any]:
    """A strided sample (about ``per_tensor`` elements) of every tensor, cloned: cheap, but a torn copy shows."""
    out = []
    for t in _state_tensors(dicts):
        flat = t.detach().reshape(-1)
        out.append(flat[:: max(1, flat.numel() // per_tensor)].clone())
    return out


def same_samples(expected: list[Any], got: list[Any]) -> bool:
    """Bitwise equality of two sample lists (NaN-safe)."""
    import torch

    if len(expected) != len(got):
        return False
    for a, b in zip(expected, got, strict=True):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            return False
    return True


# =================================================================================================================
# Savers under test
# =================================================================================================================
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


# =================================================================================================================
# One run: a saver, a state size, an interval
# =================================================================================================================
class StepClock:
    """Times every engine step; records the saver's handler time and the state at each checkpoint event.

    Registration order makes the measurement include the saver: ``start`` is the first ``ITERATION_STARTED``
    handler, ``before`` / ``after`` bracket the saver's ``ITERATION_COMPLETED`` handler(s), ``end`` is the last
    ``ITERATION_COMPLETED`` handler. The time ``after`` spends sampling the state is subtracted.
    """

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        self.steps: list[float] = []
        self.handler_s: dict[int, float] = {}
        self.samples: dict[int, list[Any]] = {}
        self.first: float | None = None
        self.last = 0.0
        self.own_total = 0.0
        self._t0 = 0.0
        self._pre = 0.0
        self._own = 0.0

    def start(self, engine: Any) -> None:
        self._t0 = time.perf_counter()
        if self.first is None:
            self.first = self._t0

    def before(self, engine: Any) -> None:
        self._pre = time.perf_counter()

    def after(self, engine: Any) -> None:
        t = time.perf_counter()
        it = engine.state.iteration
        self.handler_s[it] = t - self._pre
        self.samples[it] = sample_state(self.wl.state_dicts())
        self._own = time.perf_counter() - t

    def end(self, engine: Any) -> None:
        t = time.perf_counter()
        self.steps.append(t - self._t0 - self._own)
        self.own_total += self._own
        self._own = 0.0
        self.last = t

    @property
    def window_s(self) -> float:
        return self.last - (self.first or self.last) - self.own_total


def run_case(wl: Workload, saver_name: str, every: int, steps: int, save_dir: str) -> dict[str, Any]:
    """Train ``steps`` steps with ``saver_name`` checkpointing every ``every``; verify every file it wrote."""
    from ignite.engine import Engine, Events

    os.makedirs(save_dir, exist_ok=True)
    for _ in range(WARMUP_STEPS):  # untimed: caches are cold after the previous run's cleanup
        wl.step()
    gc.collect()
    per_case_peak = reset_peak_rss()
    rss_start = rss_bytes()
    engine = Engine(wl.step)
    clock = StepClock(wl)
    saver = make_saver(saver_name, wl, save_dir, every)
    engine.add_event_handler(Events.ITERATION_STARTED, clock.start)
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=every), clock.before)
    saver.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=every), clock.after)
    engine.add_event_handler(Events.ITERATION_COMPLETED, clock.end)
    t_run = time.perf_counter()
    try:
        engine.run(range(steps), max_epochs=1)
    finally:
        saver.finish()  # close() for async savers: waits for the last checkpoint, stops the writer
    t_done = time.perf_counter()
    flush_s = t_done - clock.last  # COMPLETED handlers (async_ckpt's flush) + finish()
    rss_peak = peak_rss_bytes()
    records = saver.save_records(clock.handler_s)

    # correctness: every checkpoint the saver wrote must hold the state sampled right after its handler ran
    expected = sorted(clock.samples) if saver_name != "none" else []
    files = saver.files() if saver_name != "none" else {}
    ok, errors = 0, []
    for it in expected:
        path = files.get(it)
        if path is None:
            errors.append(f"iteration {it}: no checkpoint file")
            continue
        try:
            got = sample_state(saver.load(path))
        except Exception as exc:
            errors.append(f"iteration {it}: cannot load {os.path.basename(path)}: {exc!r}")
            continue
        if same_samples(clock.samples[it], got):
            ok += 1
        else:
            errors.append(f"iteration {it}: {os.path.basename(path)} differs from the state at its event")
    extra = sorted(set(files) - set(expected))
    if extra:
        errors.append(f"unexpected checkpoint iterations {extra}")
    known = {os.path.basename(p) for p in files.values()} | METADATA_FILES
    stray = sorted(n for n in os.listdir(save_dir) if n not in known)
    if stray:  # e.g. a temporary file left behind after the saver finished
        errors.append(f"files other than checkpoints left in the directory: {stray[:5]}")
    del saver
    t_verified = time.perf_counter()
    gc.collect()
    shutil.rmtree(save_dir, ignore_errors=True)
    os.sync()  # nothing written by this run may still be in flight during the next one
    return {
        "saver": saver_name,
        "every": every,
        "n_steps": steps,
        "steps_s": clock.steps,
        "ckpt_iters": sorted(clock.handler_s),
        "handler_s": {str(k): v for k, v in clock.handler_s.items()},
        "saves": {str(k): v for k, v in records.items()},
        "window_s": clock.window_s,
        "flush_s": flush_s,
        "rss_start": rss_start,
        "rss_peak": rss_peak,
        "peak_per_case": per_case_peak,
        "verified_ok": ok,
        "verified_expected": len(expected),
        "verify_errors": errors,
        "timing_s": {
            "run": t_done - t_run,
            "verify": t_verified - t_done,
            "cleanup_sync": time.perf_counter() - t_verified,
        },
    }


def run_probe(wl: Workload, ckpt_dir: str) -> dict[str, Any]:
    """Raw disk bandwidth and the memcpy floor for this state's byte count, in the checkpoint directory."""
    os.makedirs(ckpt_dir, exist_ok=True)
    disk = disk_write_probe(ckpt_dir, wl.state_bytes)
    copy = memcpy_probe(wl.state_bytes)
    os.sync()
    return {"saver": "probe", "disk": disk, "memcpy": copy}


def _preimport(savers: set[str]) -> None:
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


def worker_main(spec_path: str, result_path: str) -> int:
    """Run the cases of ``spec_path`` in order in this process and write their results to ``result_path``."""
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=r".*Detected an existing checkpoint.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    _preimport({c["saver"] for c in spec["cases"]})
    t0 = time.perf_counter()
    wl = Workload(spec["size_mib"], spec["compute_iters"])
    for _ in range(3):
        wl.step()
    out: dict[str, Any] = {
        "size_mib": spec["size_mib"],
        "state_bytes": wl.state_bytes,
        "workload": wl.describe(),
        "setup_s": time.perf_counter() - t0,
        "cases": [],
    }
    label = f"[{spec['size_mib']:g} MiB]"
    for case in spec["cases"]:
        tc = time.perf_counter()
        try:
            if case["saver"] == "probe":
                res = run_probe(wl, spec["ckpt_dir"])
                msg = f"disk {res['disk']['mib_s']:.0f} MiB/s, memcpy {res['memcpy']['copy_s'] * 1e3:.1f} ms"
            else:
                save_dir = os.path.join(spec["ckpt_dir"], f"{case['saver']}-k{case['every']}-r{case['round']}")
                res = run_case(wl, case["saver"], case["every"], case["steps"], save_dir)
                ck = set(res["ckpt_iters"])
                ck_steps = [s for i, s in enumerate(res["steps_s"], 1) if i in ck]
                msg = (
                    f"K={case['every']:<3d} step p50 {median(res['steps_s']) * 1e3:7.1f} ms, checkpoint step p50 "
                    f"{median(ck_steps) * 1e3:8.1f} ms, verified {res['verified_ok']}/{res['verified_expected']}"
                )
        except Exception as exc:  # one broken saver must not hide the others' numbers
            res = {"saver": case["saver"], "every": case.get("every"), "error": repr(exc)}
            msg = f"ERROR {exc!r}"
        res["round"] = case["round"]
        res["case_s"] = time.perf_counter() - tc
        out["cases"].append(res)
        print(f"  {label} round {case['round']} {case['saver']:<13s} {msg} ({res['case_s']:.1f}s)", file=sys.stderr)
        with open(result_path, "w") as f:
            json.dump(out, f)
    return 0


# =================================================================================================================
# Orchestration
# =================================================================================================================
def _plan_cases(savers: list[str], rounds: int, every: int, steps: int, tight_every: int, tight_steps: int) -> list:
    """Interleaved rounds: probe, then the savers in order (reversed every other round), then the tight case."""
    cases = []
    for r in range(rounds):
        order = savers if r % 2 == 0 else savers[::-1]
        cases.append({"saver": "probe", "round": r})
        cases.extend({"saver": s, "every": every, "steps": steps, "round": r} for s in order)
        if tight_every > 0:
            cases.extend(
                {"saver": s, "every": tight_every, "steps": tight_steps, "round": r} for s in order if s in ASYNC_SAVERS
            )
    return cases


def _run_worker(spec: dict[str, Any], workdir: str, tag: str, env_extra: dict[str, str]) -> dict[str, Any]:
    spec_path = os.path.join(workdir, f"spec-{tag}.json")
    result_path = os.path.join(workdir, f"result-{tag}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, **env_extra}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.stall", "--_worker", spec_path, result_path]
    proc = subprocess.run(cmd, env=env, cwd=root, check=False)
    if not os.path.exists(result_path):
        return {"size_mib": spec["size_mib"], "cases": [], "error": f"worker exited with {proc.returncode}"}
    with open(result_path) as f:
        result: dict[str, Any] = json.load(f)
    if proc.returncode != 0:
        result["error"] = f"worker exited with {proc.returncode}"
    return result


def _plain_steps(case: dict[str, Any]) -> list[float]:
    """Steps of a run that are neither a checkpoint step nor the step right after one."""
    ck = set(case["ckpt_iters"]) if case["saver"] != "none" else set()
    return [s for i, s in enumerate(case["steps_s"], 1) if i not in ck and i - 1 not in ck]


def _pooled(cases: list[dict[str, Any]], none_base: dict[int, float]) -> dict[str, Any]:
    """Aggregate the rounds of one (size, interval, saver).

    ``none_base`` maps a round to the median step of its 'none' run, the baseline of a run with too few plain
    steps of its own (the tight case).
    """
    first, steady, first2, steady2, nexts, handler, durable, write, blocking, backpressure = ([] for _ in range(10))
    handler_first: list[float] = []
    blocking_first: list[float] = []
    plains: list[float] = []
    window = 0.0
    nsteps = 0
    ok = expected = 0
    peaks, extras, flushes = [], [], []
    errors: list[str] = []
    per_case_peak = True
    borrowed = False
    for c in cases:
        if "error" in c:
            errors.append(c["error"])
            continue
        steps = c["steps_s"]
        ck = sorted(c["ckpt_iters"]) if c["saver"] != "none" else []
        plain = _plain_steps(c)
        if len(plain) >= MIN_PLAIN_STEPS or c["saver"] == "none" or c["round"] not in none_base:
            base = median(plain) if plain else median(steps)
        else:
            base = none_base[c["round"]]
            borrowed = True
        plains.append(base)
        for n, it in enumerate(ck):
            extra = steps[it - 1] - base
            (first if n == 0 else steady).append(extra)
            nxt = steps[it] - base if it < len(steps) else float("nan")
            nexts.append(nxt)
            (first2 if n == 0 else steady2).append(extra + (0.0 if math.isnan(nxt) else nxt))
            (handler_first if n == 0 else handler).append(c["handler_s"][str(it)])
        for n, (_, rec) in enumerate(sorted(c["saves"].items(), key=lambda kv: int(kv[0]))):
            durable.append(rec["durable_s"])
            write.append(rec["write_mib_s"])
            if "blocking_s" in rec:  # the first save of a run also allocates the buffers: reported apart
                (blocking_first if n == 0 else blocking).append(rec["blocking_s"])
            if "backpressure_s" in rec:
                backpressure.append(rec["backpressure_s"])
        window += c["window_s"]
        nsteps += c["n_steps"]
        ok += c["verified_ok"]
        expected += c["verified_expected"]
        errors.extend(c["verify_errors"])
        peaks.append(c["rss_peak"])
        extras.append(c["rss_peak"] - c["rss_start"])
        flushes.append(c["flush_s"])
        per_case_peak = per_case_peak and c["peak_per_case"]
    nan = float("nan")
    only_first = not steady
    stalls = steady or first
    stalls2 = steady2 or first2
    return {
        "runs": len(cases),
        "checkpoints": len(first) + len(steady),
        "steady_checkpoints": len(steady),
        "stall_includes_first": only_first,
        "baseline_from_none": borrowed,
        "plain_step_p50_s": median(plains),
        "mean_step_s": window / nsteps if nsteps else nan,
        "first_stall_p50_s": percentile(first, 50),
        "stall_p50_s": percentile(stalls, 50),
        "stall_p95_s": percentile(stalls, 95),
        "stall_with_next_p50_s": percentile(stalls2, 50),
        "next_step_extra_p50_s": percentile(nexts, 50),
        "handler_p50_s": percentile(handler or handler_first, 50),
        "blocking_p50_s": percentile(blocking or blocking_first, 50),
        "first_blocking_p50_s": percentile(blocking_first, 50),
        "backpressure_p50_s": percentile(backpressure, 50),
        "durable_p50_s": percentile(durable, 50),
        "durable_p95_s": percentile(durable, 95),
        "write_mib_s_p50": percentile(write, 50),
        "flush_p50_s": percentile(flushes, 50),
        "rss_peak_bytes": max(peaks) if peaks else 0,
        "rss_extra_bytes": max(extras) if extras else 0,
        "peak_per_case": per_case_peak,
        "verified_ok": ok,
        "verified_expected": expected,
        "errors": errors,
        "first_stalls_s": first,
        "steady_stalls_s": steady,
    }


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per size: probes and, per interval and saver, the pooled figures."""
    sizes = []
    for res in results:
        probes = [c for c in res["cases"] if c.get("saver") == "probe" and "error" not in c]
        runs = [c for c in res["cases"] if c.get("saver") != "probe"]
        entry: dict[str, Any] = {
            "size_mib": res["size_mib"],
            "state_bytes": res.get("state_bytes", 0),
            "workload": res.get("workload", "?"),
            "error": res.get("error"),
            "disk_mib_s": median([p["disk"]["mib_s"] for p in probes]),
            "disk_total_s": median([p["disk"]["total_s"] for p in probes]),
            "memcpy_s": median([p["memcpy"]["copy_s"] for p in probes]),
            "memcpy_gib_s": median([p["memcpy"]["gib_s"] for p in probes]),
            "intervals": {},
        }
        none_runs = [c for c in runs if c["saver"] == "none" and "error" not in c]
        none_base = {c["round"]: median(c["steps_s"]) for c in none_runs}
        entry["none_mean_steps_s"] = [c["window_s"] / c["n_steps"] for c in none_runs if c["n_steps"]]
        none = _pooled(none_runs, none_base) if none_runs else None
        for every in sorted({c["every"] for c in runs if c.get("every")}, reverse=True):
            table = {}
            for name in SAVERS:
                mine = [c for c in runs if c["saver"] == name and c.get("every") == every]
                if not mine:
                    continue
                agg = _pooled(mine, none_base)
                base = none["mean_step_s"] if none else float("nan")
                agg["overhead_pct"] = (agg["mean_step_s"] / base - 1) * 100 if base and base > 0 else float("nan")
                interval = every * agg["plain_step_p50_s"]
                agg["durable_over_interval"] = agg["durable_p50_s"] / interval if interval > 0 else float("nan")
                table[name] = agg
            entry["intervals"][str(every)] = table
        sizes.append(entry)
    return sizes


# -- report --------------------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 1e3:.1f}"


def _num(x: float, fmt: str = "{:.0f}") -> str:
    return "n/a" if x is None or math.isnan(x) else fmt.format(x)


def report_tables(sizes: list[dict[str, Any]]) -> str:
    lines = []
    for s in sizes:
        state = s["state_bytes"] / MiB
        lines.append(
            f"### {s['size_mib']:g} MiB requested ({state:.1f} MiB of parameters + Adam state; {s['workload']})\n"
        )
        lines.append(
            f"Raw disk: {_num(s['disk_mib_s'])} MiB/s (write + fsync of {state:.0f} MiB in "
            f"{_num(s['disk_total_s'], '{:.2f}')} s). memcpy floor: {_ms(s['memcpy_s'])} ms "
            f"({_num(s['memcpy_gib_s'], '{:.1f}')} GiB/s).\n"
        )
        eager = s["intervals"].get(max(s["intervals"], key=int, default=""), {}).get("async-eager")
        if eager and s["memcpy_s"] > 0 and not math.isnan(eager["blocking_p50_s"]):
            lines.append(
                f"async_ckpt eager: training thread blocked {_ms(eager['blocking_p50_s'])} ms per save (its telemetry, "
                "p50 of the saves after each run's first) = "
                f"{eager['blocking_p50_s'] / s['memcpy_s']:.1f}x the memcpy floor; the first save of a run, which "
                f"also allocates the buffers: {_ms(eager['first_blocking_p50_s'])} ms.\n"
            )
        if s.get("error"):
            lines.append(f"**worker error: {s['error']}**\n")
        header = (
            "| K | saver | ckpts | plain step ms | first ckpt +ms | stall p50 ms | stall p95 ms | next step +ms "
            "| handler p50 ms "
            "| durable p50 ms | durable/interval | write MiB/s | of disk | overhead | peak RSS MiB | +RSS MiB "
            "| verified |"
        )
        lines.append(header)
        lines.append("|" + "---|" * (header.count("|") - 1))
        for every, table in s["intervals"].items():
            for name, a in table.items():
                of_disk = a["write_mib_s_p50"] / s["disk_mib_s"] * 100 if s["disk_mib_s"] > 0 else float("nan")
                verified = "n/a" if name == "none" else f"{a['verified_ok']}/{a['verified_expected']}"
                if a["errors"]:
                    verified += " FAIL"
                peak_note = "" if a["peak_per_case"] else "*"
                mark = ("†" if a["baseline_from_none"] else "") + ("‡" if a["stall_includes_first"] else "")
                cells = [
                    every,
                    name,
                    str(a["checkpoints"]),
                    _ms(a["plain_step_p50_s"]) + ("†" if a["baseline_from_none"] else ""),
                    "-" if name == "none" else _ms(a["first_stall_p50_s"]),
                    "-" if name == "none" else _ms(a["stall_p50_s"]) + mark,
                    "-" if name == "none" else _ms(a["stall_p95_s"]) + mark,
                    "-" if name == "none" else _ms(a["next_step_extra_p50_s"]),
                    "-" if name == "none" else _ms(a["handler_p50_s"]),
                    "-" if name == "none" else _ms(a["durable_p50_s"]),
                    "-" if name == "none" else _num(a["durable_over_interval"], "{:.2f}"),
                    "-" if name == "none" else _num(a["write_mib_s_p50"]),
                    "-" if name == "none" else _num(of_disk, "{:.0f}%"),
                    _num(a["overhead_pct"], "{:+.1f}%"),
                    f"{a['rss_peak_bytes'] / MiB:.0f}{peak_note}",
                    f"{a['rss_extra_bytes'] / MiB:.0f}{peak_note}",
                    verified,
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        errs = [
            f"- {every}/{name}: {e}"
            for every, t in s["intervals"].items()
            for name, a in t.items()
            for e in a["errors"]
        ]
        if errs:
            lines.append("Errors:\n" + "\n".join(errs[:20]) + "\n")
    return "\n".join(lines)


def _noise_pct(entry: dict[str, Any]) -> float:
    """How far apart the 'none' runs of one size are (max/min of their mean step time, in %): the run's own noise."""
    means = entry.get("none_mean_steps_s") or []
    if len(means) < 2 or min(means) <= 0:
        return float("nan")
    return (max(means) / min(means) - 1) * 100


def evaluate_targets(sizes: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    """The project's targets, computed from the same run, each with PASS/FAIL (or SKIP when not measured).

    A throughput target that the run's own noise could hide (the 'none' runs of the size differ by more than the
    target's bound) is marked ``noisy`` with the reason, instead of a bare PASS or FAIL.
    """
    out: list[dict[str, Any]] = []
    big = [s for s in sizes if s["size_mib"] >= TARGET_STALL_MIN_MIB]
    note = "" if every == TARGET_EVERY else f" (measured with K={every}, the target is defined for K={TARGET_EVERY})"
    for s in big:
        t = s["intervals"].get(str(every), {})
        monai, eager, overlap = t.get("monai"), t.get("async-eager"), t.get("async-overlap")
        size = f"{s['size_mib']:g} MiB"
        if monai and eager:
            ratio = eager["stall_p50_s"] / monai["stall_p50_s"] if monai["stall_p50_s"] > 0 else float("nan")
            out.append(
                {
                    "target": f"{size}: async eager stall p50 <= 1/7 of MONAI's",
                    "measured": f"{_ms(eager['stall_p50_s'])} ms vs {_ms(monai['stall_p50_s'])} ms = "
                    + ("n/a" if math.isnan(ratio) or ratio <= 0 else f"1/{1 / ratio:.1f}"),
                    "ok": (not math.isnan(ratio)) and ratio <= TARGET_STALL_RATIO,
                }
            )
        else:
            out.append({"target": f"{size}: eager stall vs MONAI", "measured": "needs monai and async-eager"})
        if eager and overlap:
            a, b = overlap["stall_p50_s"], eager["stall_p50_s"]
            a2, b2 = overlap["stall_with_next_p50_s"], eager["stall_with_next_p50_s"]
            out.append(
                {
                    "target": f"{size}: overlap stall p50 < eager (also counting the step after the checkpoint)",
                    "measured": f"{_ms(a)} vs {_ms(b)} ms; with next step {_ms(a2)} vs {_ms(b2)} ms",
                    "ok": a < b and (math.isnan(a2) or math.isnan(b2) or a2 < b2),
                }
            )
        if eager:
            first, later = eager["first_stall_p50_s"], eager["stall_p50_s"]
            if eager["stall_includes_first"]:
                out.append({"target": f"{size}: first eager checkpoint <= 2x a later one", "measured": "one per run"})
            else:
                out.append(
                    {
                        "target": f"{size}: first eager checkpoint of a run <= {TARGET_FIRST_RATIO:g}x the stall of a "
                        "later one",
                        "measured": f"{_ms(first)} ms vs {_ms(later)} ms",
                        "ok": first <= TARGET_FIRST_RATIO * max(later, 0.0) or first <= TARGET_FIRST_ABS_S,
                    }
                )
        noise = _noise_pct(s)
        for name in ("async-eager", "async-overlap"):
            if name not in t:
                continue
            o = t[name]["overhead_pct"]
            mo = monai["overhead_pct"] if monai else float("nan")
            bound = TARGET_OVERHEAD_PCT if math.isnan(mo) else min(TARGET_OVERHEAD_PCT, mo * TARGET_OVERHEAD_OF_MONAI)
            target = {
                "target": f"{size}, {name}: throughput overhead <= {TARGET_OVERHEAD_PCT:g}% and <= 1/3 of MONAI's"
                + note,
                "measured": f"{_num(o, '{:+.1f}%')} (MONAI {_num(mo, '{:+.1f}%')}, bound {bound:.1f}%; "
                f"'none' runs {_num(noise, '{:.1f}%')} apart)",
                "ok": (not math.isnan(o)) and o <= bound,
            }
            if not target["ok"] and not math.isnan(noise) and noise > bound:
                target["noisy"] = (
                    f"the plain runs of this size differ by {noise:.1f}% from round to round, more than the "
                    f"{bound:.1f}% bound: this machine was too busy to tell; rerun it idle (more --rounds help)"
                )
            out.append(target)
    if not big:
        out.append(
            {
                "target": f"stall and throughput targets at >= {TARGET_STALL_MIN_MIB:g} MiB",
                "measured": "no size >= 512 MiB in this run",
            }
        )
    return out


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        verdict = "SKIP" if "ok" not in t else ("PASS" if t["ok"] else "NOISY" if t.get("noisy") else "FAIL")
        why = f" ({t['noisy']})" if verdict == "NOISY" else ""
        lines.append(f"- **{verdict}** {t['target']}: {t['measured']}{why}")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------------------
def make_plots(sizes: list[dict[str, Any]], raw: list[dict[str, Any]], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    intervals = sorted({int(k) for s in sizes for k in s["intervals"]}, reverse=True)
    if intervals:
        fig, axes = plt.subplots(1, len(intervals), figsize=(6.5 * len(intervals), 4.5), squeeze=False)
        for ax, every in zip(axes[0], intervals, strict=True):
            for name in SAVERS:
                if name == "none":
                    continue
                xs, p50, p95 = [], [], []
                for s in sizes:
                    a = s["intervals"].get(str(every), {}).get(name)
                    if a and not math.isnan(a["stall_p50_s"]):
                        xs.append(s["state_bytes"] / MiB)
                        p50.append(max(a["stall_p50_s"] * 1e3, 1e-2))
                        p95.append(max(a["stall_p95_s"] * 1e3, 1e-2))
                if xs:
                    color = f"C{SAVERS.index(name)}"
                    ax.plot(xs, p50, marker="o", color=color, label=SAVER_LABELS[name])
                    ax.plot(xs, p95, marker="v", linestyle=":", color=color, alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("state size (MiB, parameters + Adam state)")
            ax.set_ylabel("stall per checkpoint (ms): p50 solid, p95 dotted")
            ax.set_title(f"checkpoint every {every} steps")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "stall_vs_size.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    for res in raw:
        runs = [c for c in res["cases"] if c.get("saver") != "probe" and "error" not in c and c.get("round") == 0]
        if not runs:
            continue
        columns = sorted({c["every"] for c in runs}, reverse=True)
        names = [n for n in SAVERS if any(c["saver"] == n for c in runs)]
        fig, axes = plt.subplots(
            len(names), len(columns), figsize=(7 * len(columns), 1.7 * len(names) + 1), squeeze=False, sharey="col"
        )
        for j, every in enumerate(columns):
            for i, name in enumerate(names):
                ax = axes[i][j]
                case = next((c for c in runs if c["saver"] == name and c["every"] == every), None)
                if case is None:
                    ax.set_visible(False)
                    continue
                ys = [t * 1e3 for t in case["steps_s"]]
                ax.plot(range(1, len(ys) + 1), ys, lw=0.9, color=f"C{SAVERS.index(name)}")
                if name != "none":
                    for it in case["ckpt_iters"]:
                        ax.axvline(it, color="red", alpha=0.35, lw=0.8)
                ax.set_yscale("log")
                ax.set_ylabel(name, fontsize=8)
                ax.grid(True, alpha=0.3)
                if i == 0:
                    ax.set_title(f"step time (ms) per iteration, checkpoint every {every} (red)", fontsize=9)
                if i == len(names) - 1:
                    ax.set_xlabel("iteration")
        fig.suptitle(f"{res['size_mib']:g} MiB state, round 0", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out, f"timeline_{res['size_mib']:g}MiB.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- CLI -------------------------------------------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def _saver_list(text: str) -> list[str]:
    names = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if names == ["all"]:
        return list(SAVERS)
    bad = [n for n in names if n not in SAVERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown saver(s) {bad}; choose from {', '.join(SAVERS)} or 'all'")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stall",
        description="Training stall, throughput overhead, time to durable, write throughput and peak RSS of "
        "checkpoint savers on one ignite Engine (see benchmarks/README.md).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="three to five minutes on two cores (default)"
    )
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="64 MiB, 512 MiB and 2 GiB")
    p.set_defaults(mode="quick")
    p.add_argument("--sizes", type=_float_list, help="state sizes in MiB, e.g. '64,512' (default: by mode)")
    p.add_argument("--every", type=int, default=TARGET_EVERY, help="checkpoint every K steps (default 20)")
    p.add_argument(
        "--tight-every",
        type=int,
        default=2,
        help="interval of the second case, where writing does not fit; async savers only (0 disables; default 2)",
    )
    p.add_argument("--savers", type=_saver_list, help=f"comma list of {', '.join(SAVERS)}, or 'all'")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default: quick 2, full 3)")
    p.add_argument("--checkpoints", type=int, help="checkpoints per run at --every (default: quick 2, full 4)")
    p.add_argument("--steps", type=int, help="steps per run at --every (overrides --checkpoints)")
    p.add_argument("--tight-checkpoints", type=int, help="checkpoints per run at --tight-every")
    p.add_argument("--compute-ms", type=float, default=30.0, help="fixed compute per step, calibrated (default 30)")
    p.add_argument("--compute-iters", type=int, help="fixed matmuls per step (overrides --compute-ms calibration)")
    p.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's choice)")
    p.add_argument("--out", default="bench-results", help="results directory (default bench-results/)")
    p.add_argument("--ckpt-dir", help="where checkpoints are written (default: OUT/ckpt-tmp); probed for bandwidth")
    p.add_argument("--isolate", action="store_true", help="a fresh process per run instead of one per size")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--_worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        return worker_main(*args._worker)
    t_start = time.perf_counter()
    defaults = MODES[args.mode]
    sizes = args.sizes or defaults["sizes"]
    savers = args.savers or defaults["savers"]
    rounds = args.rounds or defaults["rounds"]
    every = args.every
    if every < 1:
        raise SystemExit("--every must be >= 1")
    if args.steps:
        steps = args.steps
        if steps < every:
            raise SystemExit(f"--steps {steps} is shorter than --every {every}: no checkpoint would be taken")
    else:
        steps = (args.checkpoints or defaults["checkpoints"]) * every + every - 1
    tight_every = args.tight_every if args.tight_every != every else 0
    tight_steps = (args.tight_checkpoints or defaults["tight_checkpoints"]) * tight_every + max(tight_every - 1, 0)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ckpt_parent = os.path.abspath(args.ckpt_dir or os.path.join(out, "ckpt-tmp"))
    os.makedirs(ckpt_parent, exist_ok=True)
    ckpt_root = tempfile.mkdtemp(prefix="stall-", dir=ckpt_parent)  # ours alone: removed at the end

    info = machine_info(ckpt_root)
    print("## Machine\n")
    print(describe_machine(info), flush=True)
    if args.compute_iters is not None:
        compute_iters, per = args.compute_iters, float("nan")
    else:
        compute_iters, per = calibrate_compute_iters(args.compute_ms)
    print(
        f"\nMode {args.mode}: sizes {', '.join(f'{s:g}' for s in sizes)} MiB; savers {', '.join(savers)}; "
        f"{rounds} interleaved round(s); K={every} ({steps} steps/run)"
        + (f", tight K={tight_every} ({tight_steps} steps/run, async savers)" if tight_every > 0 else "")
        + f"; {compute_iters} fixed matmuls/step"
        + ("" if math.isnan(per) else f" ({per * 1e3:.2f} ms each)")
        + ("; a process per run" if args.isolate else "; a process per size"),
        flush=True,
    )

    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stall-", dir=out) as workdir:
        for size in sizes:
            cases = _plan_cases(savers, rounds, every, steps, tight_every, tight_steps)
            spec = {
                "size_mib": size,
                "compute_iters": compute_iters,
                "threads": args.threads,
                "ckpt_dir": os.path.join(ckpt_root, f"{size:g}MiB"),
            }
            if args.isolate:
                merged: dict[str, Any] = {"size_mib": size, "cases": []}
                for i, case in enumerate(cases):
                    part = _run_worker({**spec, "cases": [case]}, workdir, f"{size:g}-{i}", {})
                    merged["cases"].extend(part["cases"])
                    for key in ("state_bytes", "workload"):
                        merged.setdefault(key, part.get(key))
                    if part.get("error"):
                        merged["error"] = part["error"]
                raw.append(merged)
            else:
                raw.append(_run_worker({**spec, "cases": cases}, workdir, f"{size:g}", WORKER_ENV))
    shutil.rmtree(ckpt_root, ignore_errors=True)
    if not args.ckpt_dir:
        with contextlib.suppress(OSError):
            os.rmdir(ckpt_parent)

    agg = aggregate(raw)
    targets = evaluate_targets(agg, every)
    elapsed = time.perf_counter() - t_start
    tables = report_tables(agg)
    notes = _notes(agg)
    text = (
        "\n## Results\n\n"
        + tables
        + "\n## Targets (measured side by side in this run)\n\n"
        + format_targets(targets)
        + "\n\n"
        + notes
        + f"\nLoad average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; total time {elapsed:.0f} s.\n"
    )
    print(text)

    config = {
        "mode": args.mode,
        "sizes_mib": sizes,
        "savers": savers,
        "rounds": rounds,
        "every": every,
        "steps": steps,
        "tight_every": tight_every,
        "tight_steps": tight_steps,
        "compute_iters": compute_iters,
        "isolate": args.isolate,
        "worker_env": {} if args.isolate else WORKER_ENV,
    }
    payload = {
        "machine": info,
        "config": config,
        "summary": agg,
        "targets": targets,
        "raw": raw,
        "elapsed_s": elapsed,
    }
    json_path = os.path.join(out, "stall.json")
    with open(json_path, "w") as f:
        json.dump(_finite(payload), f, indent=1, default=str, allow_nan=False)
    with open(os.path.join(out, "stall.md"), "w") as f:
        f.write("## Machine\n\n" + describe_machine(info) + "\n" + text)
    written = [json_path, os.path.join(out, "stall.md")]
    if not args.no_plots:
        written += make_plots(agg, raw, out)
    print("Wrote " + ", ".join(written))

    failed = any(s.get("error") for s in agg) or any(
        a["errors"] for s in agg for t in s["intervals"].values() for a in t.values()
    )
    return 1 if failed else 0


def _notes(sizes: Iterable[dict[str, Any]]) -> str:
    per_case = all(a["peak_per_case"] for s in sizes for t in s["intervals"].values() for a in t.values())
    lines = [
        "Notes:",
        "- stall = wall time of a checkpointing step (its ITERATION_COMPLETED handlers included) minus the median "
        "plain step of the same run (steps that are neither a checkpoint step nor the one after it). 'first ckpt' "
        "is that excess for the first checkpoint of each run (buffer allocation, first file); stall p50/p95 are "
        "over the later checkpoints. 'next step +ms' is the excess of the step after a checkpoint (where overlap "
        "mode's deferred copy and the writer's CPU use show up). 'handler' is the time inside the saver's own "
        "handler. Overhead = mean step time over the whole run vs 'none' (interleaved runs of the same rounds), "
        "excluding the final flush after the last step.",
        "- † the run has too few plain steps (small K): its baseline is the median step of the same round's "
        "'none' run. ‡ every run had a single checkpoint, so p50/p95 include the first one.",
        "- durable: async_ckpt's own telemetry (event to fsynced rename); DCP: event to its future's completion; "
        "MONAI/ignite: their handler time, but they do not fsync, so their files may still be in the page cache.",
        "- DCP writes its own directory format; it is a stall reference, not a drop-in alternative.",
        "- The tight case checkpoints more often than the writer can keep up: the stall then is backpressure "
        "(waiting for a free buffer), by design.",
    ]
    if not per_case:
        lines.append(
            "- * peak RSS is the worker process's peak, not per run: this kernel refused to reset it "
            "(/proc/self/clear_refs); use --isolate for per-run peaks."
        )
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
