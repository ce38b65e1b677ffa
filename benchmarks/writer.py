"""Durable write throughput of async_ckpt's writer against a raw sequential write + fsync of the same bytes.

    python -m benchmarks.writer                 # 512 MiB and 2 GiB states, 5 interleaved rounds (about a minute)
    python -m benchmarks.writer --sizes 128     # a quick look

No training runs here: this isolates the file path (serialization into a temporary file, fsync, rename, directory
fsync, and the manifest update) from CPU contention with a training step, which ``benchmarks.stall`` measures.
Each round writes the same state with every variant, in alternating order, into the same directory:

- raw: ``os.write`` of the same number of bytes from memory in 64 MiB chunks, fsync of file and directory;
- torch.save(path): what MONAI's saver does, plus an fsync of the file so the comparison is fair;
- before: the writer before the fast serializer (``torch.save`` into ``FileStorage.write_atomic``, no
  write-behind), with the manifest update;
- async_ckpt: ``FileStorage.write_atomic`` with :func:`async_ckpt.serialize.serialize` (torch's zip writer with
  CRCs computed on helper threads beside the writes, write-behind every 32 MiB): what the writer thread runs per
  save; and the same with the manifest update that follows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import torch

import async_ckpt.storage as storage_mod
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


def _ours(
    state: dict[str, torch.Tensor], directory: str, storage: FileStorage, produce: Callable[[BinaryIO], object]
) -> dict[str, float]:
    path = os.path.join(directory, "ours.pt")
    t0 = time.perf_counter()
    storage.write_atomic(path, produce)
    t1 = time.perf_counter()
    update_manifest(storage, directory, {"ours.pt": entry_for(path, {"reason": "bench"})}, [])
    t2 = time.perf_counter()
    os.unlink(path)
    return {"file_s": t1 - t0, "with_manifest_s": t2 - t0}


@contextlib.contextmanager
def _no_write_behind() -> Iterator[None]:
    saved = storage_mod._SYNC_FILE_RANGE
    storage_mod._SYNC_FILE_RANGE = None
    try:
        yield
    finally:
        storage_mod._SYNC_FILE_RANGE = saved


_KEYS = ("raw", "torch_save_path", "before", "ours", "ours_manifest")


def _measure(mib: int, directory: str, storage: FileStorage, rounds: int) -> dict[str, Any]:
    state = _state(mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    res: dict[str, list[float]] = {k: [] for k in _KEYS}

    def before() -> float:
        with _no_write_behind():
            return _ours(state, directory, storage, lambda f: torch.save(state, f))["with_manifest_s"]

    def ours() -> float:
        got = _ours(state, directory, storage, lambda f: serialize(state, f))
        res["ours_manifest"].append(got["with_manifest_s"])
        return got["file_s"]

    variants: dict[str, Callable[[], float]] = {
        "raw": lambda: disk_write_probe(directory, nbytes)["total_s"],
        "torch_save_path": lambda: _torch_save_path(state, directory),
        "before": before,
        "ours": ours,
    }
    for r in range(rounds + 1):  # round 0 warms the page cache and the allocator, and is dropped
        for name in list(variants) if r % 2 else list(reversed(variants)):
            res[name].append(variants[name]())
        if r == 0:
            for v in res.values():
                v.clear()
    row: dict[str, Any] = {"mib": nbytes / MiB, **{f"{k}_s": median(v) for k, v in res.items()}}
    for k in _KEYS:
        row[f"{k}_mib_s"] = nbytes / MiB / row[f"{k}_s"]
    return row


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
            rows.append(_measure(mib, directory, storage, args.rounds))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        "\n| state MiB | raw write+fsync MiB/s | torch.save(path)+fsync MiB/s | before (torch.save in our commit) "
        "MiB/s | async_ckpt file MiB/s | + manifest MiB/s | async_ckpt / raw | before / raw |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mib']:.0f} | {r['raw_mib_s']:.0f} | {r['torch_save_path_mib_s']:.0f} | {r['before_mib_s']:.0f} | "
            f"{r['ours_mib_s']:.0f} | {r['ours_manifest_mib_s']:.0f} | "
            f"{r['ours_manifest_mib_s'] / r['raw_mib_s']:.2f} | {r['before_mib_s'] / r['raw_mib_s']:.2f} |"
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
