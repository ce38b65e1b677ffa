"""The runner of ``benchmarks.stall``: one timed run, the raw probes, the worker process, the interleaved rounds.

The orchestrating process (:func:`run_sizes`) starts one worker process per state size (or one per run with
``isolate``); a worker (:func:`worker_main`, reached through ``python -m benchmarks.stall --_worker``) builds the
workload once and runs its cases in the planned order, writing its results after every case so that a crash loses
only the case it happened in.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import (
    disk_write_probe,
    median,
    memcpy_probe,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from benchmarks.stall_savers import ASYNC_SAVERS, METADATA_FILES, make_saver, preimport
from benchmarks.workloads import Workload, same_samples, sample_state

# Shared worker only: a fixed mmap threshold returns freed tensors to the OS at once, so one run's freed memory
# (kept by glibc's heap otherwise) does not hide the next run's peak RSS. --isolate runs need no such help.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
WARMUP_STEPS = 2  # untimed steps before each run


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
    preimport({c["saver"] for c in spec["cases"]})
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


def plan_cases(
    savers: list[str], rounds: int, every: int, steps: int, tight_every: int, tight_steps: int
) -> list[dict[str, Any]]:
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


def run_worker(spec: dict[str, Any], workdir: str, tag: str, env_extra: dict[str, str]) -> dict[str, Any]:
    """Run one worker process on ``spec`` and return what it wrote (with ``error`` set if it did not exit cleanly)."""
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


def run_sizes(
    sizes: list[float],
    cases: list[dict[str, Any]],
    *,
    compute_iters: int,
    threads: int | None,
    ckpt_root: str,
    out: str,
    isolate: bool,
) -> list[dict[str, Any]]:
    """Run ``cases`` (from :func:`plan_cases`) for every size in worker processes; their raw results, by size."""
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stall-", dir=out) as workdir:
        for size in sizes:
            spec = {
                "size_mib": size,
                "compute_iters": compute_iters,
                "threads": threads,
                "ckpt_dir": os.path.join(ckpt_root, f"{size:g}MiB"),
            }
            if isolate:
                merged: dict[str, Any] = {"size_mib": size, "cases": []}
                for i, case in enumerate(cases):
                    part = run_worker({**spec, "cases": [case]}, workdir, f"{size:g}-{i}", {})
                    merged["cases"].extend(part["cases"])
                    for key in ("state_bytes", "workload"):
                        merged.setdefault(key, part.get(key))
                    if part.get("error"):
                        merged["error"] = part["error"]
                raw.append(merged)
            else:
                raw.append(run_worker({**spec, "cases": cases}, workdir, f"{size:g}", WORKER_ENV))
    return raw
