"""Training stall, throughput overhead, durability latency and memory of checkpoint savers on one ignite Engine.

Run ``python -m benchmarks.stall --help``; benchmarks/README.md explains every figure. In short: every saver runs
the same MLP (parameters + Adam state of about the requested size) through the same ignite ``Engine`` with the same
compute-bound step, checkpointing every K iterations. Each engine step is timed from an ``ITERATION_STARTED``
handler registered first to an ``ITERATION_COMPLETED`` handler registered last, so the savers' handlers are inside
the measured time. Savers run in interleaved rounds (A B C ... then ... C B A) in one worker process per state size
(or one per run with ``--isolate``) so that drift of a shared machine cancels out.

This module is the command line; the work is in ``benchmarks.workloads`` (model, step, state sampling),
``benchmarks.stall_savers`` (one adapter per saver), ``benchmarks.stall_runner`` (timing, interleaving, worker
processes), ``benchmarks.stall_report`` (pooled figures, tables, targets) and ``benchmarks.stall_plots``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import time

from benchmarks.common import describe_machine, write_json
from benchmarks.stall_plots import make_plots
from benchmarks.stall_report import TARGET_EVERY, aggregate, evaluate_targets, format_targets, notes, report_tables
from benchmarks.stall_runner import WORKER_ENV, plan_cases, run_sizes, worker_main
from benchmarks.stall_savers import SAVERS
from benchmarks.workloads import prepare_run

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


def _float_list(text: str) -> list[float]:
    """``'64,512'`` -> ``[64.0, 512.0]``."""
    return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def _saver_list(text: str) -> list[str]:
    """A comma list of saver names (or ``all``), checked against :data:`SAVERS`."""
    names = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if names == ["all"]:
        return list(SAVERS)
    bad = [n for n in names if n not in SAVERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown saver(s) {bad}; choose from {', '.join(SAVERS)} or 'all'")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.stall`` (also ``async-ckpt bench``)."""
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
    p.add_argument("--json", metavar="PATH", help="where the raw and summary JSON goes (default OUT/stall.json)")
    p.add_argument("--_worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--_worker``, one worker's cases); 1 if any run failed or a file mismatched."""
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
    out, ckpt_root, info, compute_iters, per = prepare_run(args, "stall")
    print(
        f"\nMode {args.mode}: sizes {', '.join(f'{s:g}' for s in sizes)} MiB; savers {', '.join(savers)}; "
        f"{rounds} interleaved round(s); K={every} ({steps} steps/run)"
        + (f", tight K={tight_every} ({tight_steps} steps/run, async savers)" if tight_every > 0 else "")
        + f"; {compute_iters} fixed matmuls/step"
        + ("" if math.isnan(per) else f" ({per * 1e3:.2f} ms each)")
        + ("; a process per run" if args.isolate else "; a process per size"),
        flush=True,
    )

    cases = plan_cases(savers, rounds, every, steps, tight_every, tight_steps)
    raw = run_sizes(
        sizes,
        cases,
        compute_iters=compute_iters,
        threads=args.threads,
        ckpt_root=ckpt_root,
        out=out,
        isolate=args.isolate,
    )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    if not args.ckpt_dir:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(ckpt_root))

    agg = aggregate(raw)
    targets = evaluate_targets(agg, every)
    elapsed = time.perf_counter() - t_start
    tables = report_tables(agg)
    text = (
        "\n## Results\n\n"
        + tables
        + "\n## Targets (measured side by side in this run)\n\n"
        + format_targets(targets)
        + "\n\n"
        + notes(agg)
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
    json_path = os.path.abspath(args.json) if args.json else os.path.join(out, "stall.json")
    write_json(json_path, payload)
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


if __name__ == "__main__":
    sys.exit(main())
