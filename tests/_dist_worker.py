"""One rank of a multi-process CPU test (not a test module); ``tests/test_distributed.py`` starts two of them.

Usage: ``python _dist_worker.py SCENARIO RANK WORLD_SIZE INIT_FILE WORK_DIR``

Every rank joins a gloo process group through ``file://INIT_FILE`` (the collective timeout is short, so a missing
peer ends a rank with an error instead of a hang), trains a small ``DistributedDataParallel`` model with an ignite
trainer, runs the scenario and prints one line ``RESULT <json>`` that the test reads. An assertion that fails in a
rank ends it with a non-zero exit status and a traceback on stderr.

Scenarios:

``parity``
    MONAI's ``CheckpointSaver`` (``WORK_DIR/monai``) and ours (``WORK_DIR/ours``) attached to the same trainer with
    the same arguments; rank 1's saver gets a storage double that records every call.
``fail_event`` / ``fail_event_final``
    Rank 0's storage fails every fsync with ``ENOSPC``; the trainer saves every iteration (and, in the ``_final``
    variant, also the final checkpoint on ``EXCEPTION_RAISED``). Each rank reports what left ``engine.run``.
``fail_evaluator``
    The saver keeps the best model of an evaluator that runs at the end of every trainer epoch; rank 0's storage
    fails every fsync. The last best-model write is flushed at the trainer's ``COMPLETED``.
``skip``
    ``overflow="skip"`` with ``max_pending=1``: rank 0's checkpoint writes are held until ``COMPLETED``, so rank 0 has
    no free slot at every interval event after the first; every rank must skip with it.
``preempt_one_rank``
    ``preempt_signal=SIGTERM`` over a Python handler that raises ``Preempted``; only rank 1 is signalled, inside
    iteration 2. Each rank reports the iteration it was preempted at and the final files.
``fail_completed``
    ``save_final=True``; at ``COMPLETED`` rank 0's state holds a value that cannot be copied (``SnapshotError``).
``fail_staging``
    At iteration 2's interval checkpoint rank 0's ``state_dict()`` raises ``RuntimeError`` (not a
    ``SnapshotError``).
``fail_wait``
    No engine run: one interval checkpoint is queued by calling the handler directly, then rank 1 calls ``wait()``
    (local: nothing to report there) and both ranks call ``wait(barrier=True)``.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from _doubles import NoSpaceStorage
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from async_ckpt import AsyncCheckpointSaver, CheckpointWriteError, FileStorage
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER

COLLECTIVE_TIMEOUT = timedelta(seconds=45)
METRICS = (0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.3, 0.95)
WORKER = Path(__file__).resolve()


class RankFailure(AssertionError):
    """A rank exited with an error, or the ranks did not finish in time (the output of every rank is attached)."""


def launch(scenario: str, work_dir: Path, world_size: int = 2, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Run ``scenario`` in ``world_size`` fresh processes and return each rank's ``RESULT`` dict, by rank.

    Never hangs: after ``timeout`` seconds every rank still running gets ``SIGUSR1`` (it dumps the stacks of all its
    threads to its stderr), then ``SIGKILL``, and :class:`RankFailure` is raised with every rank's output.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    init_file = work_dir / "rendezvous"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    for rank in range(world_size):
        out, err = work_dir / f"rank{rank}.out", work_dir / f"rank{rank}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            cmd = [sys.executable, str(WORKER), scenario, str(rank), str(world_size), str(init_file), str(work_dir)]
            procs.append((subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env), out, err))
    deadline = time.monotonic() + timeout
    hung = False
    for proc, _, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def report() -> str:
        parts = []
        for rank, (proc, out, err) in enumerate(procs):
            parts.append(
                f"--- rank {rank} (exit status {proc.returncode}) stdout:\n{out.read_text(errors='replace')[-4000:]}"
                f"\n--- rank {rank} stderr:\n{err.read_text(errors='replace')[-8000:]}"
            )
        return "\n".join(parts)

    if hung:
        raise RankFailure(f"scenario {scenario!r} did not finish within {timeout}s (hang)\n{report()}")
    if any(proc.returncode != 0 for proc, _, _ in procs):
        raise RankFailure(f"scenario {scenario!r}: a rank failed\n{report()}")
    results = []
    for _proc, out, _ in procs:
        lines = [ln for ln in out.read_text().splitlines() if ln.startswith("RESULT ")]
        if len(lines) != 1:
            raise RankFailure(f"scenario {scenario!r}: expected one RESULT line per rank\n{report()}")
        results.append(json.loads(lines[0][len("RESULT ") :]))
    return sorted(results, key=lambda r: int(r["rank"]))


class RecordingStorage(FileStorage):
    """A storage double: records the name of every file operation it is asked for (and then performs it)."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.calls: list[str] = []

    def _fsync_fd(self, fd: int) -> None:
        self.calls.append("_fsync_fd")
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self.calls.append(f"_replace {dst}")
        super()._replace(src, dst)

    def _link(self, src: str, dst: str) -> None:
        self.calls.append(f"_link {dst}")
        super()._link(src, dst)

    def _unlink(self, path: str) -> None:
        self.calls.append(f"_unlink {path}")
        super()._unlink(path)

    def _open(self, path: str) -> BinaryIO:
        self.calls.append(f"_open {path}")
        return super()._open(path)

    def sync_dir(self, directory: str) -> None:
        self.calls.append(f"sync_dir {directory}")
        super().sync_dir(directory)

    def write_atomic(self, path: str, produce: Any) -> Any:
        self.calls.append(f"write_atomic {path}")
        return super().write_atomic(path, produce)

    def link_atomic(self, src: str, dst: str) -> Any:
        self.calls.append(f"link_atomic {dst}")
        return super().link_atomic(src, dst)

    def remove(self, path: str) -> bool:
        self.calls.append(f"remove {path}")
        return super().remove(path)


def build_training(rank: int, batches: int = 3) -> tuple[DistributedDataParallel, torch.optim.Optimizer, Engine, list]:  # type: ignore[type-arg]
    """An identically initialized model on every rank, wrapped in DDP; each rank gets its own data."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    data = [torch.randn(4, 4, generator=gen) for _ in range(batches)]

    def step(engine: Engine, batch: torch.Tensor) -> float:
        opt.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()  # DDP all-reduces the gradients here: a rank that stopped early would leave this hanging
        opt.step()
        return float(loss.item())

    engine = Engine(step)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = METRICS[(e.state.epoch - 1) % len(METRICS)]

    return model, opt, engine, data


def describe(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    cause = exc.__cause__
    return {
        "type": type(exc).__name__,
        "cause_message": str(cause) if cause is not None else None,
        "is_write_error": isinstance(exc, CheckpointWriteError),
        "message": str(exc),
        "cause_type": type(cause).__name__ if cause is not None else None,
        "cause_errno": getattr(cause, "errno", None),
    }


def scenario_parity(rank: int, work: str) -> dict[str, Any]:
    from monai.handlers import CheckpointSaver

    model, opt, engine, data = build_training(rank)
    save_dict = {"net": model, "opt": opt, "trainer": engine}
    kwargs: dict[str, Any] = dict(
        save_final=True,
        save_key_metric=True,
        key_metric_name="acc",
        key_metric_n_saved=2,
        save_interval=2,
        epoch_level=False,
        n_saved=2,
    )
    monai_dir, ours_dir = os.path.join(work, "monai"), os.path.join(work, "ours")
    storage = RecordingStorage() if rank != 0 else None
    reference = CheckpointSaver(monai_dir, save_dict, **kwargs)
    ours = AsyncCheckpointSaver(ours_dir, save_dict, storage=storage, **kwargs)
    reference.attach(engine)
    ours.attach(engine)
    engine.run(data, max_epochs=4)
    ours.close()
    dist.barrier()  # rank 0's files are complete before any rank reports
    return {
        "storage_calls": storage.calls if storage is not None else None,
        "saves": len(ours.stats.saves),
        "iteration": engine.state.iteration,
    }


def scenario_fail_event(rank: int, work: str, save_final: bool) -> dict[str, Any]:
    model, opt, engine, data = build_training(rank)
    saver = AsyncCheckpointSaver(
        os.path.join(work, "ours"),
        {"net": model, "opt": opt},
        save_interval=1,
        epoch_level=False,
        n_saved=2,
        save_final=save_final,
        storage=NoSpaceStorage() if rank == 0 else None,
    )
    saver.attach(engine)
    error: BaseException | None = None
    try:
        engine.run(data, max_epochs=3)
    except Exception as exc:
        error = exc
    saver.close()  # the failure was reported once; nothing is left to raise
    stopped_at = engine.state.iteration
    dist.barrier()  # both ranks are alive and in step after the error
    return {"error": describe(error), "iteration": stopped_at, "saves": len(saver.stats.saves)}


def scenario_fail_wait(rank: int, work: str) -> dict[str, Any]:
    model, opt, engine, _ = build_training(rank)
    saver = AsyncCheckpointSaver(
        os.path.join(work, "ours"),
        {"net": model, "opt": opt},
        save_interval=1,
        storage=NoSpaceStorage() if rank == 0 else None,
    )
    saver.attach(engine)
    engine.state.iteration, engine.state.epoch = 3, 1
    saver.interval_completed(engine)  # every rank: one (empty) failure agreement, then rank 0 queues the file
    local: BaseException | None = None
    if rank != 0:
        try:
            saver.wait()  # no collective: rank 1 has nothing of its own to report
        except Exception as exc:
            local = exc
    error: BaseException | None = None
    try:
        saver.wait(barrier=True)
    except Exception as exc:
        error = exc
    saver.close()
    dist.barrier()
    return {"local_wait_error": describe(local), "error": describe(error)}


def scenario_fail_evaluator(rank: int, work: str) -> dict[str, Any]:
    model, _, trainer, data = build_training(rank)
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = METRICS[trainer.state.epoch - 1]

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(e: Engine) -> None:
        evaluator.run([0], max_epochs=1)

    saver = AsyncCheckpointSaver(
        os.path.join(work, "ours"),
        {"net": model},
        save_key_metric=True,
        key_metric_name="acc",
        storage=NoSpaceStorage() if rank == 0 else None,
    )
    saver.attach(evaluator)
    error: BaseException | None = None
    try:
        trainer.run(data, max_epochs=1)
    except Exception as exc:
        error = exc
    saver.close()
    dist.barrier()
    return {"error": describe(error), "iteration": trainer.state.iteration}


# -- agreement scenarios: something fails or is skipped on one rank only ---------------------------------------------
class HeldWrites(FileStorage):
    """Rank 0's disk while training runs: checkpoint writes wait (bounded) until ``release`` is called."""

    def __init__(self) -> None:
        super().__init__(fsync=False)
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def _open(self, path: str) -> BinaryIO:
        if ".pt" + TMP_MARKER in os.path.basename(path) and not self.released.wait(COLLECTIVE_TIMEOUT.total_seconds()):
            raise TimeoutError("the test never released the writes")
        return super()._open(path)


class Stateful:
    """An object in ``save_dict`` whose ``state_dict`` fails on one rank from a chosen iteration on.

    Args:
        kind: ``"runtime"`` raises ``RuntimeError`` from ``state_dict`` (not a ``SnapshotError``); ``"uncopyable"``
            returns a value that cannot be copied (the saver raises ``SnapshotError``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.failing = False
        self.value = torch.zeros(2)

    def state_dict(self) -> dict[str, Any]:
        if self.failing and self.kind == "runtime":
            raise RuntimeError("injected state_dict failure")
        if self.failing:
            return {"value": self.value, "lock": threading.Lock()}  # deepcopy raises TypeError
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.copy_(state["value"])


def scenario_skip(rank: int, work: str) -> dict[str, Any]:
    model, opt, engine, data = build_training(rank)
    storage = HeldWrites() if rank == 0 else None
    saver = AsyncCheckpointSaver(
        os.path.join(work, "ours"),
        {"net": model, "opt": opt},
        save_interval=1,
        epoch_level=False,
        max_pending=1,
        overflow="skip",
        storage=storage,
    )

    @engine.on(Events.COMPLETED)
    def _release(e: Engine) -> None:  # registered before the saver's flush
        if storage is not None:
            storage.release()

    saver.attach(engine)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            engine.run(data, max_epochs=2)
    finally:
        if storage is not None:
            storage.release()
        saver.close()
    dist.barrier()
    assert saver._interval_checkpoint is not None
    return {
        "iteration": engine.state.iteration,
        "skipped": saver.stats.skipped,
        "saved_list": [item.filename for item in saver._interval_checkpoint._saved],
        "files": sorted(n for n in os.listdir(os.path.join(work, "ours")) if n.endswith(".pt")),
    }


class Preempted(BaseException):
    """What the previous SIGTERM handler raises: the process would end here."""


def scenario_preempt_one_rank(rank: int, work: str) -> dict[str, Any]:
    model, opt, engine, data = build_training(rank)

    def previous(signum: int, frame: Any) -> None:
        raise Preempted(signum)

    signal.signal(signal.SIGTERM, previous)
    save_dir = os.path.join(work, "ours")
    saver = AsyncCheckpointSaver(save_dir, {"net": model, "opt": opt}, save_final=True, preempt_signal=signal.SIGTERM)

    @engine.on(Events.ITERATION_STARTED(once=2))
    def _term(e: Engine) -> None:  # only rank 1 is signalled, inside iteration 2
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    saver.attach(engine)
    preempted_at = None
    try:
        engine.run(data, max_epochs=3)
    except Preempted:
        preempted_at = engine.state.iteration
    saver.close()
    dist.barrier()
    return {"preempted_at": preempted_at, "files": sorted(n for n in os.listdir(save_dir) if n.endswith(".pt"))}


def scenario_fail_staging(rank: int, work: str, kind: str, event: str) -> dict[str, Any]:
    """Rank 0's ``state_dict`` fails at one event only: at iteration 2's interval checkpoint or at ``COMPLETED``."""
    model, opt, engine, data = build_training(rank)
    extra = Stateful(kind)
    at_completed = event == "completed"
    saver = AsyncCheckpointSaver(
        os.path.join(work, "ours"),
        {"net": model, "opt": opt, "extra": extra},
        save_final=at_completed,
        save_interval=0 if at_completed else 1,
        epoch_level=False,
    )
    trigger = Events.COMPLETED if at_completed else Events.ITERATION_COMPLETED(once=2)

    @engine.on(trigger)
    def _break(e: Engine) -> None:  # registered before the saver's handlers: runs first
        extra.failing = rank == 0

    saver.attach(engine)
    error: BaseException | None = None
    try:
        engine.run(data, max_epochs=2)
    except Exception as exc:
        error = exc
    extra.failing = False
    saver.close()
    dist.barrier()
    return {"error": describe(error), "iteration": engine.state.iteration}


# -- sharded (DCP) scenarios ----------------------------------------------------------------------------------------
class SlowTempSync(FileStorage):
    """A slow disk for checkpoint directories being written: fsyncing a temporary directory takes longer."""

    def sync_dir(self, directory: str) -> None:
        if TMP_MARKER in directory:
            time.sleep(0.3)
        super().sync_dir(directory)


class ObservingStorage(FileStorage):
    """Rank 0's storage: records, whenever a temporary checkpoint directory is fsynced (its files are complete
    then), which entries of the save directory carry a final name."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(fsync=True)
        self.save_dir = save_dir
        self.seen: list[tuple[str, list[str]]] = []

    def sync_dir(self, directory: str) -> None:
        if TMP_MARKER in directory:
            final = os.path.basename(directory).split(TMP_MARKER)[0]
            self.seen.append((final, [n for n in os.listdir(self.save_dir) if TMP_MARKER not in n]))
        super().sync_dir(directory)


class NoSpaceDirSync(FileStorage):
    """A full disk while a checkpoint directory is written: its fsync fails with ``ENOSPC``."""

    def sync_dir(self, directory: str) -> None:
        if TMP_MARKER in directory:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
        super().sync_dir(directory)


class PublishDenied(FileStorage):
    """Renaming anything onto a final checkpoint name fails with ``EACCES``."""

    def _replace(self, src: str, dst: str) -> None:
        if TMP_MARKER not in dst:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), dst)
        super()._replace(src, dst)


class Counter:
    """A Stateful with one tensor; ``state_dict`` fails on the ranks listed in ``fail_on``."""

    def __init__(self, rank: int, fail_on: tuple[int, ...] = ()) -> None:
        self.value = torch.zeros(3)
        self.rank = rank
        self.fail_on = fail_on

    def state_dict(self) -> dict[str, Any]:
        if self.rank in self.fail_on:
            raise RuntimeError(f"injected state_dict failure on rank {self.rank}")
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.copy_(state["value"])


def sharded_table(rank: int, world: int, fill: float | None = None) -> Any:
    """An (8, 2) table sharded by rows over every rank (a DTensor on a CPU mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(16.0).reshape(8, 2) if fill is None else torch.full((8, 2), fill)
    return distribute_tensor(full, mesh, [Shard(0)])


def scenario_sharded_roundtrip(rank: int, world: int, work: str) -> dict[str, Any]:
    from conftest import trees_equal

    from async_ckpt.sharded import ModelOptimizerState, ShardedCheckpointSaver, load

    model, opt, engine, data = build_training(rank)
    table = {"t": sharded_table(rank, world)}

    @engine.on(Events.ITERATION_COMPLETED)
    def _touch(e: Engine) -> None:
        table["t"].add_(1.0)  # the sharded state changes every iteration

    save_dir = os.path.join(work, "sharded")
    saver = ShardedCheckpointSaver(
        save_dir,
        {"train": ModelOptimizerState(model, opt), "trainer": engine, "table": table},
        save_interval=1,
        n_saved=2,
        timeout=COLLECTIVE_TIMEOUT,
    )
    saver.attach(engine)
    engine.run(data, max_epochs=4)
    saved = [os.path.basename(p) for p in saver.saved]
    last = saver.last_checkpoint
    assert last is not None
    saver.close()

    # Load into fresh objects: another initialization, a fresh optimizer (no state yet), a fresh engine.
    torch.manual_seed(1234)
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model2 = DistributedDataParallel(net2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    engine2 = Engine(lambda e, b: None)
    table2 = {"t": sharded_table(rank, world, fill=-1.0)}
    load(last, {"train": ModelOptimizerState(model2, opt2), "trainer": engine2, "table": table2})
    # Replicated state is written from rank 0 (DDP replicas of BatchNorm statistics differ between ranks).
    reference = [model.module.state_dict()]
    dist.broadcast_object_list(reference, src=0)
    result = {
        "saved": saved,
        "model_equal": trees_equal(reference[0], net2.state_dict()),
        "optimizer_equal": trees_equal(opt.state_dict(), opt2.state_dict()),
        "trainer": [engine2.state.epoch, engine2.state.iteration],
        "table_equal": bool(torch.equal(table["t"].to_local(), table2["t"].to_local())),
    }
    full_table = table["t"].full_tensor()  # a collective: every rank
    if rank == 0:
        torch.save(
            {"net": model.module.state_dict(), "opt": opt.state_dict(), "table": full_table},
            os.path.join(work, "expected.pt"),
        )
    dist.barrier()
    return result


def scenario_sharded_visibility(rank: int, world: int, work: str) -> dict[str, Any]:
    from async_ckpt.sharded import ShardedCheckpointSaver, is_complete

    save_dir = os.path.join(work, "sharded")
    shared = [dead_pid() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    pid = shared[0]
    stale = os.path.join(save_dir, f"checkpoint_iteration=99{TMP_MARKER}{_HOST}.{pid}.feed.0")
    # Left alone: the same, written from another host sharing the directory (its pid means nothing here).
    foreign = os.path.join(save_dir, f"checkpoint_iteration=98{TMP_MARKER}otherhost.{pid}.feed.0")
    if rank == 0:
        for path in (stale, foreign):
            os.makedirs(path)
            with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
                f.write(b"partial")
    dist.barrier()
    model, _, engine, data = build_training(rank)
    counter = Counter(rank)
    storage: FileStorage = ObservingStorage(save_dir) if rank == 0 else SlowTempSync()
    saver = ShardedCheckpointSaver(
        save_dir,
        {"net": model, "counter": counter},
        save_interval=2,
        epoch_level=False,
        n_saved=2,
        timeout=COLLECTIVE_TIMEOUT,
        storage=storage,
    )
    stale_removed = not os.path.exists(stale) and os.path.isdir(foreign)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(foreign)
    problems: list[str] = []
    in_flight_seen = 0

    @engine.on(Events.ITERATION_COMPLETED)
    def _observe(e: Engine) -> None:
        nonlocal in_flight_seen
        counter.value.fill_(float(e.state.iteration))
        if rank != 0:
            return
        job = saver._in_flight
        if job is not None and not job.future.done():
            in_flight_seen += 1
            if os.path.exists(job.final):
                problems.append(f"iteration {e.state.iteration}: {job.final} visible while it is being written")
        for name in os.listdir(save_dir):
            if TMP_MARKER not in name and not is_complete(os.path.join(save_dir, name)):
                problems.append(f"iteration {e.state.iteration}: {name} has a final name but is incomplete")

    saver.attach(engine)
    engine.run(data, max_epochs=4)
    after_run = sorted(os.listdir(save_dir))
    # Saving under an existing name replaces the directory (an atomic swap where the file system offers one).
    counter.value.fill_(-7.0)
    saver.save("checkpoint_iteration=12")
    saver.wait()
    saved = [os.path.basename(p) for p in saver.saved]
    check = Counter(rank)
    from async_ckpt.sharded import load

    load(os.path.join(save_dir, "checkpoint_iteration=12"), {"counter": check})
    saver.close()
    dist.barrier()
    seen = storage.seen if isinstance(storage, ObservingStorage) else []
    for final, visible in seen:
        if final in visible and final != "checkpoint_iteration=12":
            problems.append(f"{final} was visible before its files were durable: {visible}")
    return {
        "stale_removed": stale_removed,
        "problems": problems,
        "in_flight_seen": in_flight_seen,
        "observed_writes": len(seen),
        "after_run": after_run,
        "final_listing": sorted(os.listdir(save_dir)),
        "saved": saved,
        "replaced_value": check.value.tolist(),
    }


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def scenario_sharded_fail(rank: int, world: int, work: str) -> dict[str, Any]:
    from async_ckpt.sharded import ShardedCheckpointSaver

    out: dict[str, Any] = {}
    # 1. Rank 1's checkpoint directory cannot be fsynced: DCP fails the save on every rank.
    model, _, engine, data = build_training(rank)
    save_dir = os.path.join(work, "write")
    saver = ShardedCheckpointSaver(
        save_dir,
        {"net": model},
        save_interval=1,
        epoch_level=False,
        timeout=COLLECTIVE_TIMEOUT,
        storage=NoSpaceDirSync() if rank == 1 else None,
    )
    saver.attach(engine)
    error: BaseException | None = None
    try:
        engine.run(data, max_epochs=2)
    except Exception as exc:
        error = exc
    saver.close()
    dist.barrier()
    out["write"] = {"error": describe(error), "iteration": engine.state.iteration, "listing": os.listdir(save_dir)}

    # 2. Rank 0 cannot rename the finished directory into place: raised on every rank at wait().
    save_dir = os.path.join(work, "publish")
    saver = ShardedCheckpointSaver(
        save_dir, {"net": model}, timeout=COLLECTIVE_TIMEOUT, storage=PublishDenied() if rank == 0 else None
    )
    saver.save("manual")
    error = None
    try:
        saver.wait()
    except Exception as exc:
        error = exc
    saver.close()
    dist.barrier()
    out["publish"] = {"error": describe(error), "listing": os.listdir(save_dir)}

    # 3. Rank 1 cannot produce its state at the event: nothing is started on any rank, both raise at once.
    save_dir = os.path.join(work, "stage")
    saver = ShardedCheckpointSaver(save_dir, {"counter": Counter(rank, fail_on=(1,))}, timeout=COLLECTIVE_TIMEOUT)
    error = None
    try:
        saver.save("manual")
    except Exception as exc:
        error = exc
    saver.close()
    dist.barrier()
    out["stage"] = {"error": describe(error), "listing": os.listdir(save_dir)}
    return out


Scenario = Callable[[int, int, str], dict[str, Any]]  # (rank, world size, work dir) -> this rank's result


def run_worker(scenarios: dict[str, Scenario]) -> None:
    """Join the gloo group described by ``sys.argv``, run the named scenario, print its result and exit.

    ``sys.argv``: scenario name, rank, world size, the rendezvous file, the work directory.
    """
    scenario, rank, world, init_file, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher asks for stacks before killing a hang
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        if scenario not in scenarios:
            raise SystemExit(f"unknown scenario {scenario!r}")
        result = scenarios[scenario](rank, world, work)
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, **result}), flush=True)
    sys.stderr.flush()
    # Under load, gloo's threads sometimes abort the interpreter's teardown ("terminate called without an active
    # exception") after everything above has finished; the scenario's result is complete, so skip the teardown.
    os._exit(0)


def main() -> None:
    run_worker(
        {
            "parity": lambda rank, world, work: scenario_parity(rank, work),
            "fail_event": lambda rank, world, work: scenario_fail_event(rank, work, save_final=False),
            "fail_event_final": lambda rank, world, work: scenario_fail_event(rank, work, save_final=True),
            "sharded_visibility": scenario_sharded_visibility,
            "fail_evaluator": lambda rank, world, work: scenario_fail_evaluator(rank, work),
            "fail_wait": lambda rank, world, work: scenario_fail_wait(rank, work),
            "skip": lambda rank, world, work: scenario_skip(rank, work),
            "preempt_one_rank": lambda rank, world, work: scenario_preempt_one_rank(rank, work),
            "fail_completed": lambda rank, world, work: scenario_fail_staging(rank, work, "uncopyable", "completed"),
            "fail_staging": lambda rank, world, work: scenario_fail_staging(rank, work, "runtime", "interval"),
        }
    )


if __name__ == "__main__":
    main()
