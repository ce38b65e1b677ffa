"""``async-ckpt``: read-only inspection of checkpoint directories, and the benchmark entry point."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

from async_ckpt._version import __version__
from async_ckpt.integrity import read_manifest, verify
from async_ckpt.resume import latest_checkpoint
from async_ckpt.storage import is_temp_name

__all__ = ["main"]


def _rows(directory: str, check: bool) -> list[dict[str, Any]]:
    files = read_manifest(directory)["files"]
    names = sorted(n for n in os.listdir(directory) if n.endswith(".pt") or n in files)
    rows = []
    for name in names:
        path = os.path.join(directory, name)
        if is_temp_name(name) or not os.path.isfile(path):
            continue
        entry = files.get(name, {})
        row = {
            "name": name,
            "reason": entry.get("reason"),
            "iteration": entry.get("iteration"),
            "epoch": entry.get("epoch"),
            "score": entry.get("score"),
            "size": os.path.getsize(path),
            "age_s": round(time.time() - os.path.getmtime(path), 1),
            "in_manifest": bool(entry),
        }
        if check:
            result = verify(path)
            row["verified"] = result.ok
            row["problems"] = result.problems
        rows.append(row)
    return rows


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else _human(r[c]) if c == "size" else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cmd_ls(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        print(f"async-ckpt: {args.dir!r} is not a directory", file=sys.stderr)
        return 2
    rows = _rows(args.dir, check=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        cols = ["name", "reason", "iteration", "epoch", "score", "size", "age_s"]
        _print_table(rows, cols + ([] if args.no_verify else ["verified"]))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if os.path.isdir(args.path):
        paths = [os.path.join(args.path, r["name"]) for r in _rows(args.path, check=False)]
    else:
        paths = [args.path]
    results = [verify(p) for p in paths]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    else:
        for r in results:
            status = "ok  " if r.ok else "FAIL"
            print(f"{status} {r.path} [{', '.join(r.checked)}]" + (f": {'; '.join(r.problems)}" if r.problems else ""))
        print(f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed")
    return 0 if results and all(r.ok for r in results) else 1


def _cmd_latest(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        print(f"async-ckpt: {args.dir!r} is not a directory", file=sys.stderr)
        return 2
    path = latest_checkpoint(args.dir, reason=args.reason, full_check=args.full)
    if path is None:
        print(f"no complete checkpoint in {args.dir}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_bench(rest: list[str]) -> int:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        stall = importlib.import_module("benchmarks.stall")
    except ImportError:
        print("async-ckpt bench runs benchmarks/stall.py from a source checkout: cd into it first.", file=sys.stderr)
        return 2
    return int(stall.main(rest))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``async-ckpt`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(
        prog="async-ckpt", description="Inspect and verify checkpoint directories written by async_ckpt (read-only)."
    )
    parser.add_argument("--version", action="version", version=f"async-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("ls", help="list checkpoints: name, step, score, size, age, verified")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC check of every file")
    p.set_defaults(func=_cmd_ls)
    p = sub.add_parser("verify", help="check files against the manifest and their CRCs; exit 1 if any fails")
    p.add_argument("path", help="a checkpoint file or a directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("latest", help="print the newest complete checkpoint of a directory")
    p.add_argument("dir")
    p.add_argument("--reason", choices=["interval", "key_metric", "final"])
    p.add_argument("--full", action="store_true", help="re-read every record of the candidate")
    p.set_defaults(func=_cmd_latest)
    sub.add_parser("bench", help="run the stall benchmark (benchmarks/stall.py; pass its options after 'bench')")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))
