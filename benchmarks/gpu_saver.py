"""End-to-end stall per save of the savers attached to an ignite engine that trains on a GPU.

    python -m benchmarks.gpu_saver                    # 4 GiB state (parameters + Adam), 2 saves per saver
    python -m benchmarks.gpu_saver --mib 1024 --device cpu --saves 2   # the same on CPU, for a dry run

Unlike ``benchmarks.staging`` (which times the snapshot alone), this times whole training iterations: the
saver's handler, ``state_dict()`` of every object, flattening, staging, and in overlap mode the optimizer step
that waits for the deferred copy one iteration later. Each iteration ends with ``torch.cuda.synchronize()``, so
GPU work that a save makes the compute stream wait for is charged to the iteration that waits. The stall of one
save is the extra time of the saving iteration and of the one after it, over the median plain iteration.

Savers: MONAI's ``CheckpointSaver`` (synchronous ``torch.save`` of GPU tensors), and ``AsyncCheckpointSaver`` in
eager and overlap modes (``prewarm=True``: pinned buffers allocated at attach). Between saves the script waits
for the background writes outside the timed iterations, so every save starts with a free buffer set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver
from benchmarks.common import describe_machine, machine_info, median

MiB = 2**20


def _model(mib: int, width: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(mib * MiB / 3 / 4 / (width * width)))
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width, device=device) for _ in range(layers)])
    return net, torch.optim.Adam(net.parameters(), lr=1e-6)


def run(kind: str, mib: int, width: int, device: str, saves: int, gap: int, save_dir: str) -> dict[str, Any]:
    """Train ``saves * gap`` iterations with one saver; return per-iteration times and the saves' stalls."""
    torch.manual_seed(0)
    net, opt = _model(mib, width, device)
    x = torch.randn(64, width, device=device)

    def step(engine: Engine, batch: Any) -> None:
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        opt.step()

    engine = Engine(step)
    started: list[float] = []
    times: list[float] = []
    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(time.perf_counter()))
    saver: Any = None
    objects = {"net": net, "opt": opt}
    if kind == "monai":
        from monai.handlers import CheckpointSaver

        saver = CheckpointSaver(save_dir, objects, save_interval=gap, epoch_level=False, n_saved=1)
    elif kind != "none":
        saver = AsyncCheckpointSaver(
            save_dir, objects, save_interval=gap, epoch_level=False, n_saved=1, snapshot_mode=kind, prewarm=True
        )
    if saver is not None:
        saver.attach(engine)

    def finish(e: Engine) -> None:  # after the saver's handler: its cost lands in this iteration
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started[-1])
        if kind in ("eager", "overlap") and e.state.iteration % gap == 2:  # the save and the one after are timed
            saver.wait()  # not timed: the next iteration starts a new clock

    engine.add_event_handler(Events.ITERATION_COMPLETED, finish)
    engine.run(range(saves * gap), max_epochs=1)
    if kind in ("eager", "overlap"):
        saver.close()
    save_iters = [i for i in range(len(times)) if (i + 1) % gap == 0]
    plain = [t for i, t in enumerate(times) if (i + 1) % gap not in (0, 1, 2, 3) and i > 2]
    base = median(plain)
    stalls = [
        max(0.0, times[i] - base) + (max(0.0, times[i + 1] - base) if i + 1 < len(times) else 0.0) for i in save_iters
    ]
    nbytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "saver": kind,
        "mib": nbytes / MiB,
        "step_s": base,
        "stalls_s": stalls,
        "stall_s": median(stalls),
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=4096, help="state size (parameters + Adam state)")
    p.add_argument("--width", type=int, default=4096, help="layer width (sets the tensor count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--saves", type=int, default=2)
    p.add_argument("--gap", type=int, default=12, help="iterations between saves")
    p.add_argument("--savers", nargs="*", default=["monai", "eager", "overlap"])
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="gpu-saver-", dir=args.out)
    info = machine_info(root)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print("# Stall per save, whole training iterations\n")
    print(describe_machine(info) + f"\n- device: {info.get('gpu', args.device)}")
    rows = []
    try:
        for kind in args.savers:
            d = os.path.join(root, kind)
            os.makedirs(d)
            rows.append(run(kind, args.mib, args.width, args.device, args.saves, args.gap, d))
            if args.device == "cuda":
                torch.cuda.empty_cache()
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    monai = next((r["stall_s"] for r in rows if r["saver"] == "monai"), None)
    print("\n| saver | state MiB | plain step ms | stall per save ms (median) | each save ms | MONAI / this |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        ratio = f"{monai / r['stall_s']:.0f}" if monai and r["stall_s"] > 0 else "-"
        each = ", ".join(f"{s * 1e3:.1f}" for s in r["stalls_s"])
        print(
            f"| {r['saver']} | {r['mib']:.0f} | {r['step_s'] * 1e3:.1f} | {r['stall_s'] * 1e3:.1f} | {each} | {ratio} |"
        )
    path = os.path.join(args.out, "gpu_saver.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": rows, "args": vars(args)}, f, indent=1)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
