"""Durable write throughput of async_ckpt's writer against a raw sequential write + fsync of the same bytes.

    python -m benchmarks.writer                 # 512 MiB and 2 GiB states, 5 interleaved rounds (about a minute)
    python -m benchmarks.writer --sizes 128     # a quick look

No training runs here: this isolates the file path (``torch.save`` into a temporary file, fsync, rename, directory
fsync, and the manifest update) from CPU contention with a training step, which ``benchmarks.stall`` measures.
Each round writes the same state with every variant, in alternating order, into the same directory:

- raw: ``os.write`` of the same number of bytes from memory in 64 MiB chunks, fsync of file and directory;
- torch.save(path): what MONAI's saver does, plus an fsync of the file so the comparison is fair;
- async_ckpt: ``FileStorage.write_atomic`` with ``torch.save`` into it (what the writer thread runs per save),
  and the manifest update that follows.
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

from async_ckpt.integrity import entry_for, update_manifest
from async_ckpt.serialize import serialize
from async_ckpt.storage import FileStorage
from benchmarks.common import describe_machine, disk_write_probe, fsync_dir, machine_info, median

MiB = 2**20


def _state(mib: int) -> dict[str, torch.Tensor]:
    n = 16
    return {f"w{i}": torch.randn(mib * MiB // 4 // n) for i in range(n)}


def _torch_save_path(state: dict[str, torch.Tensor], directory: str) -> float:
    path = os.path.join(directory, "plain.pt")
    t0 = time.perf_counter()
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_dir(directory)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def _ours(state: dict[str, torch.Tensor], directory: str, storage: FileStorage) -> dict[str, float]:
    path = os.path.join(directory, "ours.pt")
    t0 = time.perf_counter()
    times = storage.write_atomic(path, lambda f: serialize(state, f))
    t1 = time.perf_counter()
    update_manifest(storage, directory, {"ours.pt": entry_for(path, {"reason": "bench"})}, [])
    t2 = time.perf_counter()
    os.unlink(path)
    return {"file_s": t1 - t0, "with_manifest_s": t2 - t0, "serialize_s": times.serialize_s, "fsync_s": times.fsync_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 2048], help="state sizes in MiB")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="writer-", dir=args.out)
    info = machine_info(directory)
    print("# Durable write throughput\n")
    print(describe_machine(info))
    storage = FileStorage(fsync=True)
    rows: list[dict[str, Any]] = []
    try:
        for mib in args.sizes:
            state = _state(mib)
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            res: dict[str, list[float]] = {"raw": [], "torch_save_path": [], "ours": [], "ours_manifest": []}
            for r in range(args.rounds + 1):  # round 0 warms the page cache and the allocator, and is dropped
                order = ["raw", "torch", "ours"] if r % 2 else ["ours", "torch", "raw"]
                for variant in order:
                    if variant == "raw":
                        value = disk_write_probe(directory, nbytes)["total_s"]
                        if r:
                            res["raw"].append(value)
                    elif variant == "torch":
                        value = _torch_save_path(state, directory)
                        if r:
                            res["torch_save_path"].append(value)
                    else:
                        got = _ours(state, directory, storage)
                        if r:
                            res["ours"].append(got["file_s"])
                            res["ours_manifest"].append(got["with_manifest_s"])
            row = {"mib": nbytes / MiB, **{f"{k}_s": median(v) for k, v in res.items()}}
            for k in ("raw", "torch_save_path", "ours", "ours_manifest"):
                row[f"{k}_mib_s"] = nbytes / MiB / row[f"{k}_s"]
            rows.append(row)
            del state
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        "\n| state MiB | raw write+fsync MiB/s | torch.save(path)+fsync MiB/s | async_ckpt file MiB/s | "
        "+ manifest MiB/s | async_ckpt / raw |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mib']:.0f} | {r['raw_mib_s']:.0f} | {r['torch_save_path_mib_s']:.0f} | {r['ours_mib_s']:.0f} | "
            f"{r['ours_manifest_mib_s']:.0f} | {r['ours_manifest_mib_s'] / r['raw_mib_s']:.2f} |"
        )
    print("\nTarget (same run): durable write >= 90% of raw write+fsync for states >= 512 MiB:")
    for r in rows:
        ratio = r["ours_manifest_mib_s"] / r["raw_mib_s"]
        verdict = "PASS" if ratio >= 0.9 else "FAIL"
        print(f"- {r['mib']:.0f} MiB: {ratio:.2f} of raw (with the manifest update): {verdict}")
    path = os.path.join(args.out, "writer.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": rows, "rounds": args.rounds}, f, indent=1)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
