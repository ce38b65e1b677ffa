"""Checkpointing a plain PyTorch loop and a Lightning Trainer: synchronous and async anchors against async_ckpt.

Run ``python -m benchmarks.integrations --help``. Two suites train the same MLP + fused Adam (parameters + Adam
state of about the requested size, a compute-bound step) and checkpoint it every K steps:

- ``loop``: a hand-written loop. ``torch.save`` of the state dicts in the loop (``torch-save``, no fsync, what most
  loops do; ``torch-save-fsync``, the same plus flush, fsync, rename and a directory fsync: the durability
  ``Checkpointer`` gives) against ``async_ckpt.Checkpointer`` (``checkpointer``: eager; ``checkpointer-overlap``).
- ``lightning``: a CPU ``lightning.Trainer`` with ``ModelCheckpoint(every_n_train_steps=K, save_top_k=-1)`` and
  Lightning's default ``TorchCheckpointIO`` (``lightning-default``), Lightning's ``AsyncCheckpointIO``
  (``lightning-async``), or ``async_ckpt.lightning.AsyncCheckpointIO`` (``async-ckpt``).

Each suite also runs ``none`` (no checkpoint), the baseline of the throughput overhead. All variants of all suites
run in one process, in interleaved rounds (A B C, then C B A, ...), so that a shared machine's drift cancels out
of the ratios. Per variant the report gives the stall per save, the time until the file is durable, the throughput
overhead against ``none`` and how many files were verified; then the ratios of ours against each anchor.

This module is the command line; the work is in ``benchmarks.workloads`` (model, step, Lightning module),
``benchmarks.integrations_savers`` (plain-loop adapters), ``benchmarks.integrations_lightning`` (timed plugins and
callbacks), ``benchmarks.integrations_runner`` (the runs and their verification) and
``benchmarks.integrations_report`` (tables and ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from typing import Any

from benchmarks.common import describe_machine, write_json
from benchmarks.integrations_report import NOTES, aggregate, format_ratios, ratios, report_tables
from benchmarks.integrations_runner import plan_runs, run_size
from benchmarks.integrations_savers import LIGHTNING_VARIANTS, LOOP_VARIANTS
from benchmarks.workloads import prepare_run

SUITES = {"loop": LOOP_VARIANTS, "lightning": LIGHTNING_VARIANTS}
MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "sizes": [128.0],
        "rounds": 2,
        "checkpoints": 3,
        "variants": {
            "loop": ["none", "torch-save-fsync", "checkpointer"],
            "lightning": list(LIGHTNING_VARIANTS),
        },
    },
    "full": {
        "sizes": [128.0, 512.0],
        "rounds": 3,
        "checkpoints": 4,
        "variants": {suite: list(names) for suite, names in SUITES.items()},
    },
}

EPILOG = """variants:
  loop       none | torch-save (torch.save in the loop, no fsync) | torch-save-fsync (torch.save to a temporary
             file, fsync, rename, fsync of the directory) | checkpointer (async_ckpt.Checkpointer, eager) |
             checkpointer-overlap (snapshot_mode="overlap")
  lightning  none | lightning-default (TorchCheckpointIO) | lightning-async (lightning.pytorch.plugins.io.
             AsyncCheckpointIO) | async-ckpt (async_ckpt.lightning.AsyncCheckpointIO)
  --quick runs loop: none, torch-save-fsync, checkpointer and every lightning variant at 128 MiB, 2 rounds
  (about 2-3 minutes on two idle cores); --full runs every variant at 128 and 512 MiB, 3 rounds.

columns:
  stall       time inside the save call (loop) or Lightning's checkpoint callback on a checkpoint step
  durable     from the start of the save until the file is complete (fsynced and renamed where the variant
              does that; 'no fsync' variants only reached the page cache)
  overhead    mean step time of the run against the suite's 'none' runs in the same rounds
  verified    files that torch.load reads back and that match the state at their save, bit for bit

Writes OUT/integrations.md and OUT/integrations.json (or --json PATH); exit status 1 if a run failed or a file
did not verify.

examples:
  python -m benchmarks.integrations --quick
  python -m benchmarks.integrations --suite lightning --sizes 512 --rounds 3
  python -m benchmarks.integrations --sizes 16 --every 5 --checkpoints 2 --rounds 1 --compute-iters 1  # smoke
"""


def _float_list(text: str) -> list[float]:
    """``'64,512'`` -> ``[64.0, 512.0]``."""
    return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def _names(text: str) -> list[str]:
    return [x for x in re.split(r"[,\s]+", text.strip()) if x]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.integrations``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.integrations",
        description="Stall per save, time to durable, throughput overhead and verified files of checkpointing in a "
        "plain PyTorch loop (torch.save vs async_ckpt.Checkpointer) and in a Lightning Trainer (TorchCheckpointIO, "
        "Lightning's AsyncCheckpointIO, async_ckpt.lightning.AsyncCheckpointIO), measured side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="128 MiB, 2 rounds (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="128 and 512 MiB, every variant")
    p.set_defaults(mode="quick")
    p.add_argument("--suite", default="loop,lightning", help="comma list of loop, lightning (default: both)")
    p.add_argument(
        "--variants", help="comma list of variant names (applied to every suite that has them), or 'all'; see below"
    )
    p.add_argument("--sizes", type=_float_list, help="state sizes in MiB, e.g. '128,512' (default: by mode)")
    p.add_argument("--every", type=int, default=20, help="checkpoint every K steps (default 20)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: quick 2, full 3)")
    p.add_argument("--checkpoints", type=int, help="checkpoints per run; a run is N*K + K-1 steps (quick 3, full 4)")
    p.add_argument("--compute-ms", type=float, default=30.0, help="fixed compute per step, calibrated (default 30)")
    p.add_argument("--compute-iters", type=int, help="fixed matmuls per step (overrides --compute-ms calibration)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench-results", help="results directory (default bench-results/)")
    p.add_argument("--ckpt-dir", help="where checkpoints are written (default: OUT/ckpt-tmp)")
    p.add_argument("--json", metavar="PATH", help="where the JSON goes (default OUT/integrations.json)")
    return p


def _select(args: argparse.Namespace, defaults: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(suite, variant)`` pairs to run, in report order; exits with a message on an unknown name."""
    suites = _names(args.suite)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise SystemExit(f"--suite: unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    wanted = _names(args.variants) if args.variants else None
    if wanted is not None and wanted != ["all"]:
        known = {n for s in suites for n in SUITES[s]}
        bad = [n for n in wanted if n not in known]
        if bad:
            choices = "; ".join(f"{s}: {', '.join(SUITES[s])}" for s in suites)
            raise SystemExit(f"--variants: unknown name(s) {bad} for suite(s) {suites} (choose from {choices})")
    pairs = []
    for suite in suites:
        if wanted == ["all"]:
            names = list(SUITES[suite])
        elif wanted is not None:
            names = [n for n in SUITES[suite] if n in wanted]
        else:
            names = defaults["variants"][suite]
        pairs.extend((suite, n) for n in names)
    return pairs


def _quiet(lightning: bool) -> None:
    """Keep Lightning's info lines and the libraries' advice warnings out of the report.

    Lightning sets its loggers' levels when it is imported, so it is imported first.
    """
    if lightning:
        import lightning.pytorch

        del lightning
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    """Run the selected suites; 1 if any run failed or any file did not verify."""
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    defaults = MODES[args.mode]
    pairs = _select(args, defaults)
    sizes = args.sizes or defaults["sizes"]
    rounds = args.rounds or defaults["rounds"]
    every = args.every
    if every < 1:
        raise SystemExit("--every must be >= 1")
    steps = (args.checkpoints or defaults["checkpoints"]) * every + every - 1
    _quiet(any(suite == "lightning" for suite, _ in pairs))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out, ckpt_root, info, compute_iters, per = prepare_run(args, "integrations")
    variants = ", ".join(f"{s}/{n}" for s, n in pairs)
    print(
        f"\nMode {args.mode}: sizes {', '.join(f'{s:g}' for s in sizes)} MiB; {variants}; {rounds} interleaved "
        f"round(s); K={every} ({steps} steps/run); {compute_iters} fixed matmuls/step"
        + ("" if math.isnan(per) else f" ({per * 1e3:.2f} ms each)")
        + "; one process",
        flush=True,
    )

    runs = plan_runs(pairs, rounds)
    raw = []
    try:
        for size in sizes:
            ckpt_dir = os.path.join(ckpt_root, f"{size:g}MiB")
            raw.append(run_size(size, runs, compute_iters=compute_iters, every=every, steps=steps, ckpt_dir=ckpt_dir))
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        if not args.ckpt_dir:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(ckpt_root))

    agg = aggregate(raw)
    compared = ratios(agg)
    elapsed = time.perf_counter() - t_start
    text = (
        "\n## Results\n\n"
        + report_tables(agg, every)
        + "\n## Ratios (measured side by side in this run)\n\n"
        + format_ratios(compared)
        + "\n\n"
        + NOTES
        + f"\nLoad average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; total time {elapsed:.0f} s.\n"
    )
    print(text)
    config = {
        "mode": args.mode,
        "sizes_mib": sizes,
        "variants": [f"{s}/{n}" for s, n in pairs],
        "rounds": rounds,
        "every": every,
        "steps": steps,
        "compute_iters": compute_iters,
        "threads": torch.get_num_threads(),
    }
    payload = {"machine": info, "config": config, "summary": agg, "ratios": compared, "raw": raw, "elapsed_s": elapsed}
    json_path = os.path.abspath(args.json) if args.json else os.path.join(out, "integrations.json")
    write_json(json_path, payload)
    md_path = os.path.join(out, "integrations.md")
    with open(md_path, "w") as f:
        f.write("## Machine\n\n" + describe_machine(info) + "\n" + text)
    print(f"Wrote {json_path}, {md_path}")
    failed = any("error" in r or r["verify_errors"] for res in raw for r in res["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
