"""The runner of ``benchmarks.integrations``: one timed run of a plain loop or a Lightning ``fit``, verified.

Both kinds of run produce the same record: every step's time, and per checkpoint the stall (time inside the
save call, or inside Lightning's checkpoint callback), the time until the file was complete (``durable_s``,
measured from the start of that call on the same clock), and whether the file on disk holds the state sampled
right after the save. Runs happen in this process, in the interleaved order of :func:`plan_runs`; each run gets
a fresh directory that is deleted (and ``sync``-ed) afterwards, so one run's dirty pages do not slow the next.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import median
from benchmarks.integrations_savers import LIGHTNING_FSYNCS, LOOP_METADATA, make_loop_saver
from benchmarks.workloads import Workload, index_loader, lightning_module, same_samples, sample_state

WARMUP_STEPS = 2  # untimed steps before each run
_CKPT_RE = re.compile(r"step-(\d+)\.ckpt$")


def plan_runs(variants: list[tuple[str, str]], rounds: int) -> list[dict[str, Any]]:
    """Interleaved rounds of ``(suite, variant)``: in order in even rounds, reversed in odd ones."""
    runs = []
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        runs.extend({"suite": suite, "variant": name, "round": r} for suite, name in order)
    return runs


def verify_files(
    samples: dict[int, list[Any]],
    files: dict[int, str],
    load: Callable[[str], tuple[dict[str, Any], dict[str, Any]]],
    save_dir: str,
    metadata: set[str],
) -> tuple[int, list[str]]:
    """Load every checkpoint and compare it with the state sampled at its save; (files that match, errors).

    A missing, extra, unreadable or different file is an error, and so is anything else left in ``save_dir``
    (a temporary file, say) other than the ``metadata`` files.
    """
    ok, errors = 0, []
    for step in sorted(samples):
        path = files.get(step)
        if path is None:
            errors.append(f"step {step}: no checkpoint file")
            continue
        try:
            got = sample_state(load(path))
        except Exception as exc:  # reported, not raised: the other files still get checked
            errors.append(f"step {step}: cannot load {os.path.basename(path)}: {exc!r}")
            continue
        if same_samples(samples[step], got):
            ok += 1
        else:
            errors.append(f"step {step}: {os.path.basename(path)} differs from the state at its save")
    extra = sorted(set(files) - set(samples))
    if extra:
        errors.append(f"unexpected checkpoint steps {extra}")
    known = {os.path.basename(p) for p in files.values()} | metadata
    stray = sorted(n for n in os.listdir(save_dir) if n not in known) if os.path.isdir(save_dir) else []
    if stray:
        errors.append(f"files other than checkpoints left in the directory: {stray[:5]}")
    return ok, errors


def _cleanup(save_dir: str) -> None:
    gc.collect()
    shutil.rmtree(save_dir, ignore_errors=True)
    os.sync()  # nothing written by this run may still be in flight during the next one


def run_loop(wl: Workload, variant: str, every: int, steps: int, save_dir: str) -> dict[str, Any]:
    """Train ``steps`` steps of a plain loop, checkpointing every ``every`` with ``variant``; verify every file."""
    os.makedirs(save_dir, exist_ok=True)
    for _ in range(WARMUP_STEPS):
        wl.step()
    gc.collect()
    saver = make_loop_saver(variant, wl, save_dir)
    steps_s: list[float] = []
    stall: dict[int, float] = {}
    t_event: dict[int, float] = {}
    samples: dict[int, list[Any]] = {}
    first = last = time.perf_counter()
    own_total = 0.0
    t_run = time.perf_counter()
    try:
        for i in range(1, steps + 1):
            t0 = time.perf_counter()
            if i == 1:
                first = t0
            wl.step()
            own = 0.0
            if variant != "none" and i % every == 0:
                t1 = time.perf_counter()
                saver.save(i)
                t2 = time.perf_counter()
                t_event[i], stall[i] = t1, t2 - t1
                samples[i] = sample_state(wl.state_dicts())
                own = time.perf_counter() - t2
            last = time.perf_counter()
            steps_s.append(last - t0 - own)
            own_total += own
    finally:
        saver.finish()  # Checkpointer.close(): every file durable, failures raised
    t_done = time.perf_counter()
    durable = {i: saver.durable_at[i] - t for i, t in t_event.items() if i in saver.durable_at}
    ok, errors = verify_files(samples, saver.files(), saver.load, save_dir, LOOP_METADATA)
    record = _record(
        "loop", variant, every, steps_s, stall, {}, durable, saver.fsyncs, saver.telemetry, ok, samples, errors
    )
    record.update(window_s=last - first - own_total, flush_s=t_done - last, run_s=t_done - t_run)
    del saver
    _cleanup(save_dir)
    return record


def run_lightning(wl: Workload, variant: str, every: int, steps: int, save_dir: str) -> dict[str, Any]:
    """``Trainer.fit`` for ``steps`` steps with ``variant``'s plugin and a ``ModelCheckpoint`` every ``every``."""
    import lightning.pytorch as pl

    from benchmarks import integrations_lightning as il

    os.makedirs(save_dir, exist_ok=True)
    for _ in range(WARMUP_STEPS):
        wl.step()
    gc.collect()
    log, clock = il.SaveLog(), il.StepClock()
    module = lightning_module(wl)
    module.on_batch_end = clock.end
    callbacks: list[Any] = [il.StepTimer(clock)]
    ckpt = None
    if variant != "none":
        ckpt = il.TimedModelCheckpoint(
            log,
            clock,
            dirpath=save_dir,
            filename="step-{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=-1,
            enable_version_counter=False,
        )
        callbacks.append(ckpt)
    plugin = il.make_plugin(variant, log)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt is not None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        plugins=[plugin] if plugin is not None else None,
        default_root_dir=save_dir,
    )
    t_run = time.perf_counter()
    trainer.fit(module, index_loader(steps))  # its end runs the plugin's teardown: the flush
    t_done = time.perf_counter()
    events = ckpt.events if ckpt is not None else {}
    stall = {s: e["t1"] - e["t0"] for s, e in events.items()}
    in_plugin = {s: log.calls[e["path"]][1] - log.calls[e["path"]][0] for s, e in events.items() if e["path"]}
    durable = {s: log.done[e["path"]] - e["t0"] for s, e in events.items() if e["path"] in log.done}
    telemetry = {s: log.telemetry[e["path"]] for s, e in events.items() if e["path"] in log.telemetry}
    files = {}
    for name in os.listdir(save_dir):
        m = _CKPT_RE.search(name)
        if m:
            files[int(m.group(1))] = os.path.join(save_dir, name)
    samples = ckpt.samples if ckpt is not None else {}
    ok, errors = verify_files(samples, files, il.load_lightning, save_dir, il.LIGHTNING_METADATA)
    fsyncs = LIGHTNING_FSYNCS[variant]
    record = _record(
        "lightning", variant, every, clock.steps, stall, in_plugin, durable, fsyncs, telemetry, ok, samples, errors
    )
    record.update(window_s=clock.window_s, flush_s=t_done - clock.last, run_s=t_done - t_run)
    del trainer, module, plugin, ckpt
    _cleanup(save_dir)
    return record


def _record(
    suite: str,
    variant: str,
    every: int,
    steps_s: list[float],
    stall: dict[int, float],
    in_plugin: dict[int, float],
    durable: dict[int, float],
    fsyncs: bool,
    telemetry: dict[int, dict[str, float]],
    ok: int,
    samples: dict[int, list[Any]],
    errors: list[str],
) -> dict[str, Any]:
    return {
        "suite": suite,
        "variant": variant,
        "every": every,
        "n_steps": len(steps_s),
        "steps_s": steps_s,
        "ckpt_steps": sorted(stall),
        "stall_s": {str(k): v for k, v in stall.items()},
        "in_plugin_s": {str(k): v for k, v in in_plugin.items()},
        "durable_s": {str(k): v for k, v in durable.items()},
        "fsyncs": fsyncs,
        "telemetry": {str(k): v for k, v in telemetry.items()},
        "verified_ok": ok,
        "verified_expected": len(samples),
        "verify_errors": errors,
    }


RUNNERS = {"loop": run_loop, "lightning": run_lightning}


def run_size(
    size_mib: float, runs: list[dict[str, Any]], *, compute_iters: int, every: int, steps: int, ckpt_dir: str
) -> dict[str, Any]:
    """Build the workload of ``size_mib`` once and run ``runs`` (from :func:`plan_runs`) on it, in order.

    One failing run is recorded with its ``error`` and does not stop the others.
    """
    t0 = time.perf_counter()
    wl = Workload(size_mib, compute_iters)
    for _ in range(3):
        wl.step()
    out: dict[str, Any] = {
        "size_mib": size_mib,
        "state_bytes": wl.state_bytes,
        "workload": wl.describe(),
        "runs": [],
    }
    if any(r["suite"] == "lightning" for r in runs):  # Lightning's first fit pays for its setup: untimed
        run_lightning(wl, "none", every, min(steps, 3), os.path.join(ckpt_dir, "warmup"))
    out["setup_s"] = time.perf_counter() - t0
    label = f"[{size_mib:g} MiB]"
    for run in runs:
        tc = time.perf_counter()
        save_dir = os.path.join(ckpt_dir, f"{run['suite']}-{run['variant']}-r{run['round']}")
        try:
            res = RUNNERS[run["suite"]](wl, run["variant"], every, steps, save_dir)
            stalls = list(res["stall_s"].values())
            msg = f"step p50 {median(res['steps_s']) * 1e3:7.1f} ms" + (
                f", stall p50 {median(stalls) * 1e3:8.1f} ms, durable p50 "
                f"{median(list(res['durable_s'].values())) * 1e3:8.1f} ms, "
                f"verified {res['verified_ok']}/{res['verified_expected']}"
                if stalls
                else ""
            )
            if res["verify_errors"]:
                msg += f" ERRORS {res['verify_errors'][:2]}"
        except Exception as exc:  # one broken variant must not hide the others' numbers
            res = {"suite": run["suite"], "variant": run["variant"], "error": repr(exc)}
            msg = f"ERROR {exc!r}"
            shutil.rmtree(save_dir, ignore_errors=True)
        res["round"] = run["round"]
        res["case_s"] = time.perf_counter() - tc
        out["runs"].append(res)
        print(
            f"  {label} round {run['round']} {run['suite']:<9s} {run['variant']:<20s} {msg} ({res['case_s']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    return out
