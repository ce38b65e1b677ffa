"""Training-thread stall of one snapshot, eager and overlap, against the raw copy floor, on CPU and GPU.

    python -m benchmarks.staging             # CPU: ~64 and 512 MiB states (about a minute on two cores)
    python -m benchmarks.staging --full      # CPU: 64 MiB, 512 MiB, 2 GiB; GPU (if present): 1, 4, 16 GiB

For each state (an MLP's parameters + Adam ``exp_avg``/``exp_avg_sq``, plus a BatchNorm) this measures, in one run
and interleaved so machine drift cancels:

- floor: one ``copy_`` of the same number of bytes into preallocated, already-touched memory (CPU), or the pinned
  device-to-host bandwidth of one copy (GPU);
- eager: ``Stager.stage`` time on the training thread (every tensor copied before it returns; on GPU the copy is
  issued on a side stream and the compute stream waits for it) and, on GPU, the time until the copy is complete;
- overlap: ``Stager.stage`` with optimizer-owned tensors deferred (the CPU copy runs on a background thread, the GPU
  copy does not hold back the compute stream);
- MONAI: the synchronous ``torch.save`` of the same state to a file, which is what MONAI's saver costs per save;
- per tensor: a state of ``--tensors`` small tensors (2,739 by default), where the copy is small and the
  per-tensor work on the training thread is what shows. Besides ``Stager.stage`` alone it times the saver's whole
  training-thread path, as ``SavePipeline.save`` runs it in eager mode with dedup on: ``flatten`` of the state
  (one pickle pass that yields the tensors and the skeleton, which is also the fingerprint) and ``stage`` (with a
  new step, so nothing is reused; it checks the cached plan and the version counters, and copies); the target
  applies to that path. The ``unflatten`` onto the copies runs on the writer thread and is not counted. The
  ``state_dict()`` calls that build the state are timed apart: every checkpointer (``torch.save``, MONAI's) pays
  them before it sees the state.

It prints a markdown table and the issue's target ratios, and writes JSON to ``--out``.
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

from async_ckpt.pipeline.snapshot import Stager, flatten, unflatten
from benchmarks.common import describe_machine, machine_info, median

MiB = 2**20


def _state(
    mib: int, device: str, width: int, layers: int | None = None
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose parameters + Adam state take about ``mib`` MiB (parameters are a third of it).

    ``width`` sets the tensor count: square ``width x width`` layers, so 1024 gives 4 MiB weights (hundreds of
    tensors per GiB, the hard case for per-tensor costs) and 4096 gives 64 MiB weights (closer to a large
    transformer's matrices). ``layers`` fixes the layer count instead (and so the tensor count: 8 per layer with
    Adam's state, plus 11 for the BatchNorm), whatever the size.
    """
    if layers is None:
        layers = max(1, round(mib * MiB / 3 / 4 / (width * width)))
    net = torch.nn.Sequential(
        *[torch.nn.Linear(width, width, device=device) for _ in range(layers)],
        torch.nn.BatchNorm1d(width, device=device),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.randn(8, width, device=device)).sum().backward()
    opt.step()
    return net, opt


def _defer(net: torch.nn.Module, opt: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> list[bool]:
    owned = {p.untyped_storage().data_ptr() for p in net.parameters()}
    owned |= {v.untyped_storage().data_ptr() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
    return [t.untyped_storage().data_ptr() in owned for t in tensors]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _layers_for(tensors: int) -> int:
    """Linear layers whose state_dicts (model + Adam) hold ``tensors`` tensors (8 per layer, 11 for the BatchNorm)."""
    return max(1, round((tensors - 11) / 8))


def _save_path(stager: Stager, state: dict[str, Any], step: int) -> tuple[float, float]:
    """Seconds of the training thread's part of one eager save, as ``SavePipeline.save`` runs it (dedup on), and of
    the copy within it; the ``unflatten`` onto the copies that the writer thread runs is checked, not timed."""
    t0 = time.perf_counter()
    flat = flatten(state)
    staged = stager.stage(flat.tensors, reuse=True, step=step)
    assert staged is not None
    flat.fingerprint()
    elapsed = time.perf_counter() - t0
    unflatten(flat.skeleton, staged.views)
    staged.release()
    return elapsed, staged.copy_s


def measure(
    mib: int,
    device: str,
    rounds: int,
    save_dir: str,
    width: int,
    monai_rounds: int,
    layers: int | None = None,
    save_path: bool = False,
) -> dict[str, Any]:
    net, opt = _state(mib, device, width, layers)
    state = {"net": net.state_dict(), "opt": opt.state_dict()}
    flat = flatten(state)
    nbytes = sum(
        t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in flat.tensors}.values()
    )
    defer = _defer(net, opt, flat.tensors)
    stager = Stager(max_pending=1)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    dst.fill_(0)
    keys = ("floor", "eager", "eager_done", "overlap", "overlap_done", "monai", "path", "path_copy", "state_dict")
    res: dict[str, list[float]] = {k: [] for k in keys}
    path = os.path.join(save_dir, "monai.pt")
    for r in range(rounds + 1):  # round 0 warms up (allocates the reused buffers) and is dropped
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=False)
        _sync(device)
        floor = time.perf_counter() - t0
        for mode in ("eager", "overlap"):
            _sync(device)
            t0 = time.perf_counter()
            staged = stager.stage(flat.tensors, reuse=False, defer=defer if mode == "overlap" else None)
            t1 = time.perf_counter()
            assert staged is not None
            staged.guard()
            staged.wait_ready()
            t2 = time.perf_counter()
            staged.release()
            if r:
                res[mode].append(t1 - t0)
                res[f"{mode}_done"].append(t2 - t0)
        if save_path:
            _sync(device)
            t0 = time.perf_counter()
            state = {"net": net.state_dict(), "opt": opt.state_dict()}
            t1 = time.perf_counter()
            path_s, copy_s = _save_path(stager, state, r)
            if r:
                res["state_dict"].append(t1 - t0)
                res["path"].append(path_s)
                res["path_copy"].append(copy_s)
        if 1 <= r <= monai_rounds:  # seconds per round for GiB states: a few rounds say enough
            _sync(device)
            t0 = time.perf_counter()
            torch.save(state, path)
            res["monai"].append(time.perf_counter() - t0)
        if r:
            res["floor"].append(floor)
    if os.path.exists(path):
        os.unlink(path)
    out: dict[str, Any] = {
        "device": device,
        "mib": nbytes / MiB,
        "tensors": len(flat.tensors),
        "storages": len({t.untyped_storage().data_ptr() for t in flat.tensors}),
        "width": width,
        "rounds": rounds,
        "monai_rounds": len(res["monai"]),
    }
    out.update({f"{k}_s": median(v) if v else float("nan") for k, v in res.items()})
    out["floor_gib_s"] = nbytes / 2**30 / out["floor_s"]
    out["eager_done_gib_s"] = nbytes / 2**30 / out["eager_done_s"]
    del net, opt, state, flat, src, dst, stager
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        tag = f"{r['device']} {r['mib']:.0f} MiB, {r['tensors']} tensors"
        if r.get("per_tensor_case"):
            us = _per_tensor_us(r, "path")
            if r["device"] == "cpu":
                n = r["tensors"]
                copy_us = (r["path_copy_s"] - r["floor_s"]) / n * 1e6
                work_us = (r["path_s"] - r["path_copy_s"]) / n * 1e6
                lines.append(
                    f"- {tag}: training-thread staging cost beyond the copy floor (the saver's save path) = {us:.2f} "
                    f"us per tensor (target <= 1 us): {_ok(us <= 1.0)}. Of it, {copy_us:.2f} us is the copy "
                    f"itself beyond the floor: gathering {r['storages']} separately allocated storages took "
                    f"{r['path_copy_s'] * 1e3:.2f} ms against {r['floor_s'] * 1e3:.2f} ms for one contiguous copy "
                    f"of the same bytes (memory traffic, not per-tensor work), and {work_us:.2f} us is the "
                    f"per-tensor work (flatten, the plan check, the version counters; <= 1 us: {_ok(work_us <= 1.0)})"
                )
            else:
                ms = r["overlap_s"] * 1e3
                lines.append(f"- {tag}: overlap stall = {ms:.2f} ms (target <= 5 ms): {_ok(ms <= 5)}")
            continue
        if r["device"] == "cpu":
            ratio = r["eager_s"] / r["floor_s"]
            lines.append(f"- {tag}: eager stall / copy floor = {ratio:.2f} (target <= 1.2): {_ok(ratio <= 1.2)}")
        else:
            frac = r["eager_done_gib_s"] / r["floor_gib_s"]
            lines.append(f"- {tag}: eager D2H / pinned bandwidth = {frac:.2f} (target >= 0.8): {_ok(frac >= 0.8)}")
            if 3500 <= r["mib"] <= 4600:
                ms = r["overlap_s"] * 1e3
                lines.append(f"- {tag}: overlap stall = {ms:.2f} ms (target <= 5 ms): {_ok(ms <= 5)}")
        if r["device"] == "cpu":  # on GPU, eager already returns before the copy runs: the ratio means nothing
            ov = r["overlap_s"] / r["eager_s"]
            lines.append(f"- {tag}: overlap stall / eager stall = {ov:.3f} (target <= 0.10): {_ok(ov <= 0.10)}")
    return lines


def _per_tensor_us(r: dict[str, Any], what: str = "eager") -> float:
    """Microseconds per tensor that eager staging (``what="eager"``: ``Stager.stage`` alone; ``"path"``: the
    saver's whole training-thread path) spends beyond copying the bytes."""
    return float((r[f"{what}_s"] - r["floor_s"]) / r["tensors"] * 1e6)


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="CPU 64/512/2048 MiB and GPU 1/4/16 GiB")
    p.add_argument("--cpu-sizes", type=int, nargs="*", help="CPU state sizes in MiB")
    p.add_argument("--gpu-sizes", type=int, nargs="*", help="GPU state sizes in MiB")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--monai-rounds", type=int, default=2, help="rounds that also time MONAI's torch.save")
    p.add_argument("--cpu-width", type=int, default=1024, help="layer width of the CPU states (sets tensor count)")
    p.add_argument("--gpu-width", type=int, default=4096, help="layer width of the GPU states (sets tensor count)")
    p.add_argument(
        "--tensors",
        type=int,
        default=2739,
        help="also stage a state of this many small tensors (width --tensor-width) to time the per-tensor cost "
        "(default 2739, the tensor count of a 4 GiB 1024-wide state; 0: off)",
    )
    p.add_argument("--tensor-width", type=int, default=64, help="layer width of the many-tensors state")
    p.add_argument(
        "--tensor-rounds",
        type=int,
        default=0,
        help="rounds of the many-tensors case (default: max(20, 4 x --rounds); a round takes milliseconds, and on a "
        "busy machine the median of five is noise)",
    )
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    cpu_sizes = args.cpu_sizes if args.cpu_sizes is not None else ([64, 512, 2048] if args.full else [64, 512])
    gpu_sizes = args.gpu_sizes if args.gpu_sizes is not None else ([1024, 4096, 16384] if args.full else [1024, 4096])
    if not torch.cuda.is_available():
        gpu_sizes = []
    os.makedirs(args.out, exist_ok=True)
    save_dir = tempfile.mkdtemp(prefix="staging-", dir=args.out)
    info = machine_info(save_dir)
    if gpu_sizes:
        info["gpu"] = torch.cuda.get_device_name()
    print("# Snapshot stall per save\n")
    print(describe_machine(info) + (f"\n- GPU: {info['gpu']}" if gpu_sizes else "\n- GPU: none"))
    rows = []
    try:
        for device, sizes in (("cpu", cpu_sizes), ("cuda", gpu_sizes)):
            for mib in sizes:
                width = args.cpu_width if device == "cpu" else args.gpu_width
                rows.append(measure(mib, device, args.rounds, save_dir, width, min(args.monai_rounds, args.rounds)))
            if args.tensors and (device == "cpu" or gpu_sizes):
                row = measure(
                    0,
                    device,
                    args.tensor_rounds or max(20, 4 * args.rounds),
                    save_dir,
                    args.tensor_width,
                    0,
                    layers=_layers_for(args.tensors),
                    save_path=True,
                )
                row["per_tensor_case"] = True
                rows.append(row)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    print(
        "\n| device | state MiB | tensors | copy floor ms | eager stall ms | eager done ms | overlap stall ms | "
        "MONAI torch.save ms | eager / floor | overlap / eager | MONAI / eager |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['device']} | {r['mib']:.0f} | {r['tensors']} | {r['floor_s'] * 1e3:.1f} | "
            f"{r['eager_s'] * 1e3:.1f} | "
            f"{r['eager_done_s'] * 1e3:.1f} | {r['overlap_s'] * 1e3:.2f} | {r['monai_s'] * 1e3:.0f} | "
            f"{r['eager_s'] / r['floor_s']:.2f} | {r['overlap_s'] / r['eager_s']:.3f} | "
            f"{r['monai_s'] / r['eager_s']:.1f} |"
        )
    for r in rows:
        if r.get("per_tensor_case"):
            n = r["tensors"]
            print(
                f"\nPer-tensor cost ({r['device']}, {n} tensors, {r['mib']:.1f} MiB, medians of {r['rounds']} rounds, "
                f"copy floor {r['floor_s'] * 1e3:.2f} ms): Stager.stage eager stall {r['eager_s'] / n * 1e6:.2f} "
                f"us/tensor, of which {_per_tensor_us(r):.2f} us beyond the copy floor; overlap stall "
                f"{r['overlap_s'] / n * 1e6:.2f} us/tensor; the saver's save path (flatten + stage) "
                f"{r['path_s'] / n * 1e6:.2f} us/tensor, of which {_per_tensor_us(r, 'path'):.2f} us "
                f"beyond the copy floor; the state_dict() calls before it (torch's, paid by every checkpointer) "
                f"{r['state_dict_s'] / n * 1e6:.2f} us/tensor."
            )
    print("\nTargets (same run):")
    print("\n".join(_targets(rows)))
    path = os.path.join(args.out, "staging.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
