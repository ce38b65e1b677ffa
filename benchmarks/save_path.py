"""Training-thread time of ``Checkpointer.save`` for a state of many small tensors, this checkout against another
revision, in alternating fresh processes.

    python -m benchmarks.save_path                       # this checkout only
    python -m benchmarks.save_path --against 24a9854     # and that revision (a temporary git worktree), A/B

The state is the per-tensor case of ``benchmarks.staging``: ``--tensors`` (2,739) small tensors, the
``state_dict()`` of an MLP of width 64 and its Adam state. Each process makes one ``Checkpointer`` (fsync off,
no manifest, files on ``/dev/shm`` when it exists, so the disk does not set the pace), saves ``--saves`` times
with a parameter update between saves, waits for each save to be written before the next (so the writer thread
does not compete with the measured call), and reports the median wall time of ``save()`` after two warm-up saves
(and checks that the last file holds the model as it was at its save):
everything the public API does on the training thread, from the tree walk and the plan check to the copy and the
hand-over to the writer, but not the ``state_dict()`` calls that every checkpointer pays before it sees the state.
Processes alternate between the revisions ``--pairs`` times, so that machine drift lands on both. With
``--train-ms``, each save follows that long of matrix products on torch's threads, as a save follows a step.

It prints microseconds per tensor for each revision and process, their medians, and the ratio; JSON goes to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.common import describe_machine, machine_info

# Runs in the child with the revision's package first on sys.path; it imports nothing from this checkout.
_CHILD = r"""
import json, os, statistics, sys, tempfile, time
import torch
import async_ckpt
from async_ckpt import Checkpointer
tensors, saves, train_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
a = torch.randn(256, 256)


def train():  # matrix products on torch's threads for ``train_ms``, ending right before the save, like a step
    end = time.perf_counter() + train_ms / 1e3
    while time.perf_counter() < end:
        a @ a


layers = max(1, round((tensors - 11) / 8))
net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(layers)], torch.nn.BatchNorm1d(64))
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
net(torch.randn(8, 64)).sum().backward()
opt.step()
root = "/dev/shm" if os.path.isdir("/dev/shm") else None
with tempfile.TemporaryDirectory(dir=root) as d:
    ck = Checkpointer(d, keep_last=2, fsync=False, manifest=False)
    times = []
    for step in range(saves + 2):
        train()
        state = {"model": net.state_dict(), "opt": opt.state_dict()}
        t0 = time.perf_counter()
        ck.save(step, state)
        t1 = time.perf_counter()
        ck.wait()
        expected = {k: v.clone() for k, v in state["model"].items()}
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-3)
        if step >= 2:
            times.append(t1 - t0)
    ck.close()
    last = torch.load(ck.path_for(step), weights_only=True)["model"]
    verified = last.keys() == expected.keys() and all(torch.equal(last[k], v) for k, v in expected.items())
n = len(state["model"]) + sum(len(s) for s in state["opt"]["state"].values())
out = {"package": async_ckpt.__file__, "tensors": n, "save_s": statistics.median(times), "verified": verified}
print(json.dumps(out))
"""


def _run(package_root: str, tensors: int, saves: int, train_ms: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": package_root}
    with tempfile.TemporaryDirectory() as cwd:  # an empty working directory: nothing shadows the package
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tensors), str(saves), str(train_ms)],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if not result["package"].startswith(os.path.realpath(package_root)):
        raise RuntimeError(f"the child imported {result['package']}, not the package under {package_root}")
    if not result["verified"]:
        raise RuntimeError(f"the last checkpoint of {package_root} does not hold the state at its save")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="a git revision to compare with (checked out in a temporary worktree)")
    p.add_argument("--tensors", type=int, default=2739)
    p.add_argument("--saves", type=int, default=40, help="timed saves per process")
    p.add_argument("--pairs", type=int, default=3, help="processes per revision, alternating")
    p.add_argument(
        "--train-ms",
        type=float,
        default=0.0,
        help="before each save, this long of matrix products on torch's threads (a training step: its OpenMP "
        "workers are still spinning at the save, as they are after a real step)",
    )
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)

    here = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    roots = {"this checkout": here}
    worktree = None
    if args.against:
        worktree = tempfile.mkdtemp(prefix="async_ckpt-ab-")
        subprocess.run(["git", "-C", here, "worktree", "add", "--detach", worktree, args.against], check=True)
        roots = {args.against: worktree, **roots}
    info = machine_info("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    print(describe_machine(info))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    try:
        for _ in range(args.pairs):
            for name, root in roots.items():
                r = _run(root, args.tensors, args.saves, args.train_ms)
                runs[name].append(r)
                print(f"- {name}: save() {r['save_s'] / r['tensors'] * 1e6:.2f} us per tensor ({r['tensors']} tensors)")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", worktree], check=False)
    medians = {name: statistics.median(r["save_s"] / r["tensors"] * 1e6 for r in rs) for name, rs in runs.items()}
    print("\nMedian over processes, us per tensor: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    if args.against:
        ratio = medians["this checkout"] / medians[args.against]
        print(f"this checkout / {args.against}: {ratio:.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "save_path.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "args": vars(args), "runs": runs, "medians_us": medians}, f, indent=1)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
