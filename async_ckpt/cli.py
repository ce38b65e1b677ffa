"""``async-ckpt``: read-only inspection of checkpoint directories, and the benchmark entry point.

Exit status of every inspection subcommand: 0 when it did its job, 1 for a checkpoint problem (a file that fails
verification, no checkpoint to verify or to resume from), 2 for a usage or path problem (an unknown option, a path
that does not exist, a file where a directory is needed). Messages go to stderr and start with ``async-ckpt
COMMAND:``; with ``--json``, stdout holds one JSON document whenever the status is 0 or 1, and nothing when it is 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from async_ckpt._version import __version__
from async_ckpt.core.resume import LatestSearch, find_latest
from async_ckpt.pipeline.integrity import VerifyResult, read_manifest, verify
from async_ckpt.pipeline.storage import is_temp_name

if TYPE_CHECKING:
    from async_ckpt.pipeline.remote import RemoteStore

__all__ = ["EXIT_CHECKPOINT", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_CHECKPOINT = 1
EXIT_USAGE = 2
_RESUME_HINT = "A file that fails may not load, or may load wrong values: resume from the newest one that passes"


class _UsageError(Exception):
    """A usage or path problem: the message says what is wrong with the argument and what to pass instead."""


@dataclass
class _Listing:
    """The checkpoint-related entries of a directory.

    Attributes:
        names: checkpoint files present (``.pt`` files and files the manifest lists), sorted.
        missing: names the manifest lists that are not there.
        temps: temporary files of unfinished writes.
        files: the manifest's entries.
    """

    names: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)


def _need_directory(path: str) -> None:
    """Raise :class:`_UsageError` unless ``path`` is a directory (``ls`` and ``latest`` take one)."""
    if not os.path.exists(path):
        raise _UsageError(f"{path} does not exist: pass the directory your saver writes to (its save_dir)")
    if not os.path.isdir(path):
        raise _UsageError(
            f"{path} is a file, not a directory: pass the saver's save_dir, or check that one file with: "
            f"async-ckpt verify {path}"
        )


def _list(directory: str) -> _Listing:
    try:
        entries = os.listdir(directory)
    except OSError as exc:
        raise _UsageError(f"cannot read the directory {directory}: {exc.strerror or exc}") from exc
    files: dict[str, Any] = read_manifest(directory)["files"]
    listing = _Listing(files=files)
    for name in sorted(entries):
        if is_temp_name(name):
            listing.temps.append(name)
        elif (name.endswith(".pt") or name in files) and os.path.isfile(os.path.join(directory, name)):
            listing.names.append(name)
    listing.missing = sorted(n for n in files if n not in listing.names and not is_temp_name(n))
    return listing


def _no_checkpoint(directory: str, listing: _Listing, consequence: str = "") -> str:
    """Why a directory without checkpoint files has none, in words (``consequence`` follows the first clause)."""
    n = len(listing.temps)
    head = f"no checkpoint in {directory}{consequence}"
    if n:
        what = "temporary file of an unfinished write" if n == 1 else "temporary files of unfinished writes"
        return (
            f"{head}: it holds only {n} {what} (a save still running, or one that a crash cut off; the next saver "
            "started on this directory removes a dead writer's)"
        )
    return f"{head}: it holds no .pt file and its manifest lists none. Is it your saver's save_dir?"


def _problems(result: VerifyResult) -> str:
    return "; ".join(result.problems)


def _rows(directory: str, listing: _Listing, check: bool) -> list[dict[str, Any]]:
    rows = []
    for name in listing.names:
        path = os.path.join(directory, name)
        entry = listing.files.get(name, {})
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


def _warn(command: str, message: str) -> None:
    print(f"async-ckpt {command}: {message}", file=sys.stderr)


# -- URLs (s3://bucket/prefix): only published checkpoints (object + manifest) count -------------------------------
def _is_url(path: str) -> bool:
    from async_ckpt.pipeline.remote import is_url

    return is_url(path)


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    """``--storage-option key=value`` pairs; a value is read as a Python literal where it is one (numbers,
    booleans, dicts), else kept as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"--storage-option {pair!r}: write it as key=value (e.g. anon=True)")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def _store(args: argparse.Namespace, url: str) -> RemoteStore:
    from async_ckpt.pipeline.remote import RemoteStore, RetryPolicy

    try:
        return RemoteStore(url, _storage_options(args.storage_option), retry=RetryPolicy(deadline_s=30.0))
    except ImportError as exc:
        raise _UsageError(str(exc)) from exc
    except ValueError as exc:
        raise _UsageError(f"{url}: {exc}") from exc


def _remote_listing(args: argparse.Namespace, url: str) -> tuple[RemoteStore, dict[str, dict[str, Any]], list[str]]:
    """The store, its published checkpoints (name -> manifest) and the objects without one."""
    store = _store(args, url)
    try:
        if not store.bucket_exists():
            raise _UsageError(
                f"{url}: no bucket {store.root.split('/', 1)[0]!r} (or no access to it with these credentials)"
            )
        published = store.manifests()
        names = store.names()
    except (FileNotFoundError, PermissionError) as exc:
        raise _UsageError(f"cannot list {url}: {exc}") from exc
    except OSError as exc:
        raise _UsageError(f"cannot list {url}: {exc!r}") from exc
    unpublished = [n for n in names if n.endswith(".pt") and n not in published]
    return store, published, unpublished


def _remote_rows(store: RemoteStore, published: dict[str, dict[str, Any]], check: bool) -> list[dict[str, Any]]:
    rows = []
    for name, entry in published.items():
        row = {
            "name": name,
            "reason": entry.get("reason"),
            "step": entry.get("step", entry.get("iteration")),
            "epoch": entry.get("epoch"),
            "score": entry.get("score"),
            "size": entry.get("size"),
            "age_s": round(time.time() - float(entry.get("published_at", time.time())), 1),
            "in_manifest": True,
        }
        if check:
            problem = store.check(name, entry)
            row["verified"] = not problem
            row["problems"] = [problem] if problem else []
        rows.append(row)
    return rows


def _warn_unpublished(command: str, url: str, unpublished: list[str]) -> None:
    if unpublished:
        _warn(
            command,
            f"{url} holds {len(unpublished)} object(s) without a manifest ({', '.join(unpublished)}): uploads in "
            "progress or cut off; they are not checkpoints (the next writer started on this URL removes them)",
        )


def _ls_url(args: argparse.Namespace) -> int:
    store, published, unpublished = _remote_listing(args, args.dir)
    rows = _remote_rows(store, published, check=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        cols = ["name", "reason", "step", "epoch", "score", "size", "age_s"]
        _print_table(rows, cols + ([] if args.no_verify else ["verified"]))
    if not rows:
        _warn("ls", f"no published checkpoint in {args.dir}")
    _warn_unpublished("ls", args.dir, unpublished)
    return EXIT_OK


def _verify_url(args: argparse.Namespace) -> int:
    url: str = args.path
    base, _, last = url.rstrip("/").rpartition("/")
    store, published, unpublished = _remote_listing(args, url)
    if not published and last.endswith(".pt") and "://" in base:
        store, published, unpublished = _remote_listing(args, base)  # one checkpoint object
        if last not in published:
            raise _UsageError(f"{url} is not a published checkpoint (no manifest for it under {base})")
        published = {last: published[last]}
    results = []
    for name, entry in published.items():
        problem = store.check(name, entry)
        results.append(
            VerifyResult(
                store.object_url(name), not problem, ["manifest", "crc32"], [problem] if problem else [], dict(entry)
            )
        )
    if not results:
        if args.json:
            print("[]")
        _warn("verify", f"no published checkpoint in {url}, nothing to verify")
        _warn_unpublished("verify", url, unpublished)
        return EXIT_CHECKPOINT
    return _report_verify(args, results, url)


def _latest_url(args: argparse.Namespace) -> int:
    store, published, unpublished = _remote_listing(args, args.dir)
    path, info, skipped = None, {}, []
    for name, entry in reversed(list(published.items())):
        if args.reason and entry.get("reason") != args.reason:
            continue
        problem = store.check(name, entry) if args.full else ""
        if not problem and store.object_size(name) != entry.get("size"):
            problem = "published, but its object is missing or has another size"
        if problem:
            skipped.append({"path": store.object_url(name), "problems": [problem]})
            continue
        path, info = store.object_url(name), entry
        break
    error = None
    if path is None:
        kind = f"{args.reason} " if args.reason else ""
        error = f"no published {kind}checkpoint in {args.dir}" + (
            f"; every candidate fails its check: {skipped}" if skipped else ""
        )
    if args.json:
        print(json.dumps({"path": path, "info": info, "skipped": skipped, "error": error}, indent=1))
    elif path is not None:
        print(path)
    if error is not None:
        _warn("latest", error)
        _warn_unpublished("latest", args.dir, unpublished)
        return EXIT_CHECKPOINT
    for r in skipped:
        _warn("latest", f"skipped {r['path']}: {'; '.join(r['problems'])}")
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    if _is_url(args.dir):
        return _ls_url(args)
    _need_directory(args.dir)
    listing = _list(args.dir)
    rows = _rows(args.dir, listing, check=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        cols = ["name", "reason", "iteration", "epoch", "score", "size", "age_s"]
        _print_table(rows, cols + ([] if args.no_verify else ["verified"]))
    if not rows and not listing.missing:
        _warn("ls", _no_checkpoint(args.dir, listing))
    if listing.missing:
        _warn(
            "ls",
            f"listed in the manifest but missing: {', '.join(listing.missing)} (deleted or moved after they were "
            "saved; async-ckpt verify fails on them)",
        )
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    path: str = args.path
    if _is_url(path):
        return _verify_url(args)
    if os.path.isdir(path):
        listing = _list(path)
        names = sorted(listing.names + listing.missing)
        if not names:
            if args.json:
                print("[]")
            _warn("verify", _no_checkpoint(path, listing, ", nothing to verify"))
            return EXIT_CHECKPOINT
        results = [verify(os.path.join(path, n)) for n in names]
    elif os.path.exists(path):
        results = [verify(path)]
    else:
        directory, name = os.path.split(path)
        listed = os.path.isdir(directory or ".") and name in read_manifest(directory or ".")["files"]
        why = (
            f"the manifest of {directory or '.'} lists it, so it was deleted or moved after it was saved"
            if listed
            else "pass a checkpoint file or the directory your saver writes to (its save_dir)"
        )
        raise _UsageError(f"{path} does not exist: {why}")
    return _report_verify(args, results, path if os.path.isdir(path) else os.path.dirname(path) or ".")


def _report_verify(args: argparse.Namespace, results: list[VerifyResult], where: str) -> int:
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    else:
        for r in results:
            status = "ok  " if r.ok else "FAIL"
            print(f"{status} {r.path} [{', '.join(r.checked)}]" + (f": {_problems(r)}" if r.problems else ""))
        print(f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed")
    failed = sum(not r.ok for r in results)
    if failed:
        _warn("verify", f"{failed} of {len(results)} failed. {_RESUME_HINT} (async-ckpt latest --full {where}).")
        return EXIT_CHECKPOINT
    return EXIT_OK


def _why_none(args: argparse.Namespace, listing: _Listing, search: LatestSearch) -> str:
    """Why ``latest`` found no checkpoint, naming what the directory does hold."""
    kind = f"{args.reason} " if args.reason else ""
    if not listing.names and not listing.missing:
        return _no_checkpoint(args.dir, listing)
    if search.skipped:
        reasons = "; ".join(f"{os.path.basename(r.path)}: {_problems(r)}" for r in search.skipped)
        message = f"no complete {kind}checkpoint in {args.dir}; every candidate fails its check: {reasons}"
    else:
        by_reason: dict[str, list[str]] = {}
        for name in sorted(listing.files):
            by_reason.setdefault(str(listing.files[name].get("reason")), []).append(name)
        unlisted = [n for n in listing.names if n not in listing.files]
        held = [f"{r}: {', '.join(names)}" for r, names in sorted(by_reason.items())]
        if unlisted:
            held.append(f"{len(unlisted)} file(s) the manifest does not list, so with no recorded reason")
        message = (
            f"no {kind}checkpoint in {args.dir}: the manifest lists none saved for reason {args.reason!r}. "
            f"It holds {'; '.join(held)}"
        )
    if args.reason:
        other = find_latest(args.dir, full_check=args.full).path
        if other is not None:
            message += f". The newest complete checkpoint of any reason is {other} (drop --reason to get it)"
    return message


def _cmd_latest(args: argparse.Namespace) -> int:
    if _is_url(args.dir):
        return _latest_url(args)
    _need_directory(args.dir)
    listing = _list(args.dir)
    search = find_latest(args.dir, reason=args.reason, full_check=args.full)
    error = None if search.path is not None else _why_none(args, listing, search)
    if args.json:
        skipped = [{"path": r.path, "problems": r.problems} for r in search.skipped]
        print(json.dumps({"path": search.path, "info": search.info, "skipped": skipped, "error": error}, indent=1))
    elif search.path is not None:
        print(search.path)
    if error is not None:
        _warn("latest", error)
        return EXIT_CHECKPOINT
    for r in search.skipped:
        _warn("latest", f"skipped {r.path}: {_problems(r)}")
    return EXIT_OK


def _cmd_bench(rest: list[str]) -> int:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        stall = importlib.import_module("benchmarks.stall")
    except ImportError:
        _warn("bench", "it runs benchmarks/stall.py from a source checkout: cd into the checkout first")
        return EXIT_USAGE
    return int(stall.main(rest))


def _url_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for a URL (repeatable; e.g. anon=True, or endpoint_url via AWS_ENDPOINT_URL)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-ckpt",
        description="Inspect and verify checkpoint directories written by async_ckpt (read-only).",
        epilog="Exit status: 0 ok, 1 a checkpoint problem, 2 a usage or path problem.",
    )
    parser.add_argument("--version", action="version", version=f"async-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("ls", help="list checkpoints: name, step, score, size, age, verified")
    p.add_argument("dir", help="a directory, or a URL (s3://bucket/prefix)")
    _url_options(p)
    p.add_argument("--json", action="store_true", help="a JSON list with one object per file")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC check of every file")
    p.set_defaults(func=_cmd_ls)
    p = sub.add_parser("verify", help="check files against the manifest and their CRCs; exit 1 if any fails")
    p.add_argument("path", help="a checkpoint file or a directory (or their URL)")
    _url_options(p)
    p.add_argument("--json", action="store_true", help="a JSON list with one object per file")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("latest", help="print the newest complete checkpoint of a directory")
    p.add_argument("dir", help="a directory, or a URL (s3://bucket/prefix)")
    _url_options(p)
    p.add_argument("--reason", choices=["interval", "key_metric", "final"])
    p.add_argument("--full", action="store_true", help="re-read every record of the candidate")
    p.add_argument("--json", action="store_true", help="a JSON object: path, info, skipped, error")
    p.set_defaults(func=_cmd_latest)
    sub.add_parser("bench", help="run the stall benchmark (benchmarks/stall.py; pass its options after 'bench')")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``async-ckpt`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: :data:`EXIT_OK`, :data:`EXIT_CHECKPOINT` or :data:`EXIT_USAGE`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, already explained on stderr)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args))
    except _UsageError as exc:
        _warn(args.command, str(exc))
        return EXIT_USAGE
