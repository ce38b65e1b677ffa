"""What a durable checkpoint write costs the machine: time, CPU seconds per GiB and page-cache growth.

    python -m benchmarks.writer                 # 512 MiB and 2 GiB states, 3 interleaved rounds
    python -m benchmarks.writer --sizes 128     # a quick look

No training runs here: this isolates the file path (serialization into a temporary file, fsync, rename, directory
fsync, and the manifest update) from a training step, which ``benchmarks.stall`` measures, so that every CPU
cycle the machine spends while a write runs is the write's. Each round writes the same staged state (copied into
async_ckpt's staging buffers first, as the writer thread always sees it) with every variant, in alternating
order, into the same directory:

- raw: ``os.write`` of the same number of bytes from memory in 64 MiB chunks, fsync of file and directory;
- torch.save(path): what MONAI's saver does, plus an fsync of the file so the comparison is fair;
- buffered: async_ckpt's writer with ``direct_io=False``: torch's zip writer through the page cache, CRCs beside
  the writes, write-behind every 32 MiB, fsync, rename, directory fsync, then the manifest update;
- direct: the same with ``direct_io=True``: the aligned spans of each record go from the staging buffers straight
  to the disk (``O_DIRECT``), only headers, record tails and the zip directory through the page cache.

For each it reports the durable time, the CPU seconds the whole machine spent while it ran (``/proc/stat``: every
core's non-idle time, so kernel writeback threads count too) per GiB written, the process's own CPU seconds, and
how much the page cache grew (``/proc/meminfo`` Cached + Dirty, read right after the write is durable and before
the file is deleted). Run it on an otherwise idle machine: system-wide CPU counts everyone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from async_ckpt.pipeline.integrity import entry_for, update_manifest
from async_ckpt.pipeline.serialize import serialize
from async_ckpt.pipeline.snapshot import Stager, flatten, unflatten
from async_ckpt.pipeline.storage import FileStorage
from benchmarks.common import describe_machine, disk_write_probe, fsync_dir, machine_info, median

MiB = 2**20
_VARIANTS = ("raw", "torch_save_path", "buffered", "direct")
_LABELS = {
    "raw": "raw write+fsync",
    "torch_save_path": "torch.save(path)+fsync",
    "buffered": "async_ckpt buffered",
    "direct": "async_ckpt direct I/O",
}


def _state(mib: int) -> dict[str, torch.Tensor]:
    n = 16
    return {f"w{i}": torch.randn(mib * MiB // 4 // n) for i in range(n)}


def _busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cached_bytes() -> int:
    """Page cache in use: Cached + Dirty from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            if key in ("Cached", "Dirty"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get("Cached", 0) + values.get("Dirty", 0)


def _measured(write: Callable[[], str]) -> dict[str, float]:
    """Run ``write`` (which leaves its durable file and returns its path); time, CPU and page cache it cost."""
    os.sync()
    cache0, busy0, own0 = _cached_bytes(), _busy_cpu_s(), _own_cpu_s()
    t0 = time.perf_counter()
    path = write()
    wall = time.perf_counter() - t0
    busy, own, cache = _busy_cpu_s() - busy0, _own_cpu_s() - own0, _cached_bytes() - cache0
    os.unlink(path)
    return {"s": wall, "busy_cpu_s": busy, "own_cpu_s": own, "cache_growth_bytes": float(cache)}


def _torch_save_path(state: Any, directory: str) -> str:
    path = os.path.join(directory, "plain.pt")
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_dir(directory)
    return path


def _raw(directory: str, nbytes: int) -> str:
    path = os.path.join(directory, "raw.bin")
    buf = memoryview(torch.ones(64 * MiB, dtype=torch.uint8).numpy())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    return path


def _ours(state: Any, directory: str, storage: FileStorage) -> str:
    path = os.path.join(directory, "ours.pt")
    storage.write_atomic(path, lambda f: serialize(state, f))
    update_manifest(storage, directory, {"ours.pt": entry_for(path, {"reason": "bench"})}, [])
    return path


def _measure(mib: int, directory: str, rounds: int) -> dict[str, Any]:
    source = _state(mib)
    flat = flatten(source)
    stager = Stager(max_pending=1)
    staged = stager.stage(flat.tensors, reuse=False)
    assert staged is not None
    staged.wait_ready()
    state = unflatten(flat.skeleton, staged.views)
    del source
    nbytes = staged.nbytes
    res: dict[str, list[dict[str, float]]] = {k: [] for k in _VARIANTS}
    storages = {"buffered": FileStorage(fsync=True, direct_io=False), "direct": FileStorage(fsync=True, direct_io=True)}
    variants: dict[str, Callable[[], str]] = {
        "raw": lambda: _raw(directory, nbytes),
        "torch_save_path": lambda: _torch_save_path(state, directory),
        "buffered": lambda: _ours(state, directory, storages["buffered"]),
        "direct": lambda: _ours(state, directory, storages["direct"]),
    }
    for r in range(rounds + 1):  # round 0 warms the allocator and the disk, and is dropped
        for name in list(variants) if r % 2 else list(reversed(variants)):
            got = _measured(variants[name])
            if r:
                res[name].append(got)
    staged.release()
    row: dict[str, Any] = {"mib": nbytes / MiB, "rounds": rounds}
    gib = nbytes / 2**30
    for name, runs in res.items():
        for key in ("s", "busy_cpu_s", "own_cpu_s", "cache_growth_bytes"):
            row[f"{name}_{key}"] = median([x[key] for x in runs])
        row[f"{name}_mib_s"] = nbytes / MiB / row[f"{name}_s"]
        row[f"{name}_cpu_s_per_gib"] = row[f"{name}_busy_cpu_s"] / gib
        row[f"{name}_runs"] = runs
    return row


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        size = f"{r['mib']:.0f} MiB"
        cpu = r["direct_cpu_s_per_gib"] / r["torch_save_path_cpu_s_per_gib"]
        lines.append(
            f"- {size}: CPU per GiB, direct / torch.save(path)+fsync = {cpu:.2f} (target <= 0.25): {_ok(cpu <= 0.25)}"
        )
        grow = r["direct_cache_growth_bytes"] / MiB * 512 / r["mib"]
        lines.append(
            f"- {size}: page-cache growth of the direct path, per 512 MiB written = {grow:.1f} MiB (target <= 64): "
            f"{_ok(grow <= 64)}"
        )
        dur = r["direct_s"] / r["buffered_s"]
        lines.append(f"- {size}: durable time, direct / buffered = {dur:.2f} (target <= 1): {_ok(dur <= 1.0)}")
    return lines


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 2048], help="state sizes in MiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--dir", help="where the files are written (default: a fresh directory under --out)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="writer-", dir=args.dir or args.out)
    info = machine_info(directory)
    print("# Durable write: time, CPU and page cache\n")
    print(describe_machine(info))
    rows: list[dict[str, Any]] = []
    try:
        disk_write_probe(directory, 64 * MiB)  # wake the disk up
        for mib in args.sizes:
            rows.append(_measure(mib, directory, args.rounds))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("\n| state MiB | variant | durable s | MiB/s | machine CPU s / GiB | process CPU s | page cache growth MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for name in _VARIANTS:
            print(
                f"| {r['mib']:.0f} | {_LABELS[name]} | {r[f'{name}_s']:.3f} | {r[f'{name}_mib_s']:.0f} | "
                f"{r[f'{name}_cpu_s_per_gib']:.3f} | {r[f'{name}_own_cpu_s']:.3f} | "
                f"{r[f'{name}_cache_growth_bytes'] / MiB:.0f} |"
            )
    print("\nTargets (same run, medians of the rounds):")
    print("\n".join(_targets(rows)))
    path = os.path.join(args.out, "writer.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": rows, "rounds": args.rounds}, f, indent=1)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
