"""Crash safety: SIGKILL a training process at random moments and check what is left on disk.

A child process (``_crash_worker.crash_child``, forked from a forkserver with torch preloaded) trains with an
``AsyncCheckpointSaver`` that saves every iteration (top-2) and the best model under a fixed name. It prints a line
after each iteration with the checkpoints the saver has reported durable, and a line before each file operation of
the writer thread. The parent reads those lines and SIGKILLs the child after a seeded random number of them:
reading the child's output is the only synchronization, and the kill lands between any two steps of a write.

The trials are split between the direct (O_DIRECT) and the buffered write path. ``ASYNC_CKPT_CRASH_TRIALS`` sets the
number of trials in all (default 8), ``ASYNC_CKPT_CRASH_SEED`` the base seed.
(``python tests/_crash_worker.py crash DIR SEED ITERATIONS`` runs one child by hand, printing to stdout.)
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from _doubles import direct_io_refusal
from conftest import load_checkpoint as _load

from async_ckpt.pipeline.storage import TMP_MARKER

try:
    from async_ckpt.pipeline.integrity import MANIFEST_NAME
except ImportError:  # a library without the manifest
    MANIFEST_NAME = ".async_ckpt_manifest.json"

WORKER = Path(__file__).with_name("_crash_worker.py")
ITERATIONS = 40
PER_EPOCH = 5  # must match _crash_worker.crash
N_SAVED = 2
INTERVAL = re.compile(r"^checkpoint_iteration=(\d+)\.pt$")
TRIALS = int(os.environ.get("ASYNC_CKPT_CRASH_TRIALS", "8"))
BASE_SEED = int(os.environ.get("ASYNC_CKPT_CRASH_SEED", "20240611"))
CHILD_TIMEOUT_S = 120
# Per trial, a simulated disk latency added to every fsync in the child (0: the real disk only). A slow disk keeps
# the writer busy, so that kills land while files are being written, renamed and evicted.
FSYNC_DELAYS = (0.0, 0.005, 0.02, 0.02)
# The child prints a line per iteration and one before each file operation of the writer (about ten per iteration),
# so a kill after a random number of lines lands between any two steps of a durable write or eviction.
KILL_WITHIN_LINES = ITERATIONS * 8


@dataclass
class Outcome:
    seed: int
    killed: bool
    lines: int
    direct_writes: int = 0
    files_checked: int = 0
    temp_files: int = 0
    problems: list[str] = field(default_factory=list)


def _worker_module() -> Any:
    """Import ``_crash_worker`` (beside this file) so that forkserver children can unpickle its functions."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("_crash_worker")


def _context() -> Any:
    """A forkserver context with torch, ignite and async_ckpt preloaded: each trial forks a warm, thread-free
    process instead of importing torch again (a child is still a separate process that SIGKILL ends)."""
    _worker_module()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ignite.engine", "async_ckpt"])  # the forkserver does not see sys.path
    return ctx


def _run_and_kill(ctx: Any, directory: Path, seed: int, direct_io: bool) -> tuple[bool, list[dict[str, Any]], int]:
    """Start a child, read a random number of its lines, SIGKILL it; return (killed, its iteration lines, how many
    O_DIRECT writes it began)."""
    rng = random.Random(seed)
    kill_after = rng.randint(1, KILL_WITHIN_LINES) + rng.choice([0, 0, 1, 2, 3])  # lines, sometimes a few more
    fsync_delay = rng.choice(FSYNC_DELAYS)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker_module().crash_child,
        args=(writer, str(directory), seed, ITERATIONS, fsync_delay, direct_io),
        daemon=True,
    )
    proc.start()
    writer.close()
    lines: list[bytes] = []

    def receive(timeout: float) -> bytes | None:
        if not reader.poll(timeout):
            raise AssertionError(f"child (seed {seed}) sent nothing for {timeout}s")
        try:
            return bytes(reader.recv_bytes())
        except EOFError:
            return None

    try:
        while len(lines) < kill_after:
            line = receive(CHILD_TIMEOUT_S)
            if line is None:
                break
            lines.append(line)
        proc.kill()
        proc.join(CHILD_TIMEOUT_S)
        while (line := receive(CHILD_TIMEOUT_S)) is not None:  # all it sent before dying was reported before the kill
            lines.append(line)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
        reader.close()
    killed = proc.exitcode == -signal.SIGKILL
    if not killed:
        assert proc.exitcode == 0 and lines[-1:] == [b"DONE"], f"child failed (seed {seed}, exit {proc.exitcode})"
    reports = [json.loads(line) for line in lines if line != b"DONE"]
    direct = sum(r.get("op") == "pwrite_direct" for r in reports)
    return killed, [r for r in reports if "it" in r], direct  # the others announce file operations: kill points


def _consistent(state: Any, iteration: int) -> str | None:
    """Why ``state`` is not the training state after ``iteration`` steps, or ``None`` if it is."""
    if set(state) != {"net", "opt", "tag"}:
        return f"unexpected keys {sorted(state)}"
    tag = state["tag"]
    if tag["iteration"] != iteration:
        return f"stored iteration {tag['iteration']} != {iteration}"
    if not torch.equal(tag["fill"], torch.full_like(tag["fill"], float(iteration))):
        return "marker tensor does not hold the iteration"
    steps = {float(s["step"]) for s in state["opt"]["state"].values()}
    if steps != {float(iteration)}:
        return f"optimizer steps {steps} != {iteration} (objects snapshotted at different moments)"
    if not all(torch.isfinite(t).all() for t in state["net"].values()):
        return "non-finite weights"
    return None


def _trial(ctx: Any, base: Path, index: int, direct_io: bool) -> Outcome:
    seed = BASE_SEED + index
    directory = base / f"trial{index}"
    directory.mkdir()
    killed, reports, direct = _run_and_kill(ctx, directory, seed, direct_io)
    out = Outcome(seed=seed, killed=killed, lines=len(reports), direct_writes=direct)
    _check(directory, reports, out)
    return out


def _check(directory: Path, reports: list[dict[str, Any]], out: Outcome) -> None:
    """Record in ``out`` every way the files in ``directory`` break the guarantees, given the child's reports."""
    durable_intervals: set[int] = set()
    newest_key = 0
    for report in reports:
        for item in report["durable"]:
            name = os.path.basename(item["path"])
            if item["reason"] == "interval":
                m = INTERVAL.match(name)
                assert m, f"unexpected interval name {name}"
                durable_intervals.add(int(m.group(1)))
            elif item["reason"] == "key_metric":
                assert name == "best.pt"
                newest_key = max(newest_key, int(item["iteration"]))

    intervals: list[int] = []
    best_iteration = None
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST_NAME:  # the saver's JSON index, not a checkpoint: it must parse (atomic replace)
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                out.problems.append(f"{path.name} is not valid JSON: {exc}")
            continue
        if TMP_MARKER in path.name:
            out.temp_files += 1
            if path.name.endswith(".pt"):
                out.problems.append(f"temporary file {path.name} looks like a checkpoint")
            continue
        out.files_checked += 1
        try:
            state = _load(path)
        except Exception as exc:
            out.problems.append(f"{path.name} does not load: {exc!r}")
            continue
        m = INTERVAL.match(path.name)
        if m:
            iteration = int(m.group(1))
            intervals.append(iteration)
        elif path.name == "best.pt":
            iteration = int(state["tag"]["iteration"]) if isinstance(state, dict) and "tag" in state else -1
            best_iteration = iteration
            if iteration % PER_EPOCH != 0:
                out.problems.append(f"best.pt holds iteration {iteration}, not an epoch end")
        else:
            out.problems.append(f"unexpected file {path.name}")
            continue
        why = _consistent(state, iteration)
        if why:
            out.problems.append(f"{path.name}: {why}")

    # A durable interval checkpoint may only be gone once the n_saved newer ones that evicted it are complete:
    # in particular the newest one reported durable is never lost.
    for reported in sorted(durable_intervals):
        newer = [i for i in intervals if i > reported]
        if reported not in intervals and len(newer) < N_SAVED:
            out.problems.append(
                f"checkpoint_iteration={reported}.pt was reported durable and is gone, with only {len(newer)} newer "
                f"complete checkpoint(s) on disk (left: {sorted(intervals)}; n_saved={N_SAVED})"
            )
    if len(intervals) > N_SAVED + 1:
        out.problems.append(f"{len(intervals)} interval files left with n_saved={N_SAVED}: {sorted(intervals)}")
    if newest_key:
        if best_iteration is None:
            out.problems.append(f"best.pt (iteration {newest_key}) was reported durable and is gone")
        elif best_iteration < newest_key:
            out.problems.append(f"best.pt went back from iteration {newest_key} to {best_iteration}")


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL and a forkserver")
@pytest.mark.parametrize("io_path", ["direct", "buffered"])
def test_sigkill_at_random_moments_leaves_only_complete_consistent_checkpoints(tmp_path: Path, io_path: str) -> None:
    """After a SIGKILL at a random moment, every non-temporary file is a complete, consistent checkpoint and no
    checkpoint reported durable before the kill is lost (neither the newest interval file nor the best model), on
    either write path."""
    direct = io_path == "direct"
    if direct and (why := direct_io_refusal(tmp_path)) is not None:
        pytest.skip(why)
    trials = max(2, TRIALS // 2)  # half of the trials per path: both paths for the time of one
    first = 0 if direct else trials  # different seeds on the two paths
    ctx = _context()
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda i: _trial(ctx, tmp_path, i, direct), range(first, first + trials)))

    kills = sum(o.killed for o in outcomes)
    files = sum(o.files_checked for o in outcomes)
    temps = sum(o.temp_files for o in outcomes)
    writes = sum(o.direct_writes for o in outcomes)
    print(
        f"\ncrash-safety ({io_path}): trials={trials} kills={kills} files_checked={files} temp_files_left={temps} "
        f"direct_writes={writes}"
    )
    problems = [f"seed {o.seed} ({o.lines} lines read): {p}" for o in outcomes for p in o.problems]
    assert not problems, "\n".join(problems)
    assert kills >= max(1, trials // 2), f"only {kills} of {trials} children were killed before they finished"
    assert files >= trials, "too few checkpoints were on disk to check anything"
    assert (writes > 0) == direct, f"{writes} O_DIRECT writes on the {io_path} path"
