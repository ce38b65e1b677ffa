"""Subprocess entry points for the crash-safety and exit tests (not a test module).

Usage: ``python _crash_worker.py MODE DIR [ARGS...]`` with MODE one of

``crash DIR SEED ITERATIONS [FSYNC_DELAY [DIRECT_IO]]``
    Train with an asynchronous saver that saves every iteration (top-2) and the best model under a fixed name, and
    print one JSON line per iteration with the checkpoints the saver reported durable since the previous line, and
    one line before each file operation of the writer.
    (The test runs the same function, ``crash_child``, in children of a multiprocessing forkserver that has torch,
    ignite and async_ckpt preloaded, so that a trial does not pay for importing torch; lines go over a pipe.)
``exit-pending DIR``
    Queue interval checkpoints on a slow disk and end the script without ``wait()``/``close()``; the last line
    printed says how many were still pending.
``exit-raise DIR``
    Train until an injected failure with ``save_final=True`` and let the exception end the process.
``fork DIR``
    Fork while a checkpoint is queued; the child exits normally; print how long the child took to exit.
``exit-large DIR EXPECTED``
    A model with one 40 MiB tensor (above every size threshold of the writer), a checkpoint queued and held until
    the interpreter has begun to exit, then ``sys.exit(0)`` from an event handler without ``close()``; the state
    is also written with ``torch.save`` to EXPECTED for comparison.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

import torch
from _doubles import GatedStorage, SlowStorage
from conftest import make_step
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver

torch.set_num_threads(1)

FILL = 1 << 15  # elements of the marker tensor stored next to the iteration number


class Tag:
    """Records the iteration whose state the other objects hold, as a number and as a filled tensor."""

    def __init__(self) -> None:
        self.iteration = 0

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "fill": torch.full((FILL,), float(self.iteration))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])


class ReportingStorage(SlowStorage):
    """The real disk, plus a line before every file operation (so that a kill can land between any two of them),
    and optionally a simulated fsync latency (``fsync_delay`` 0: none). ``direct_io`` as in ``FileStorage``."""

    def __init__(self, emit: Callable[[str], None], fsync_delay: float, direct_io: bool | str = "auto") -> None:
        super().__init__(fsync_delay)
        self.direct_io = direct_io  # type: ignore[assignment]
        self.emit = emit

    def _report(self, op: str, path: str) -> None:
        self.emit(json.dumps({"op": op, "path": os.path.basename(path)}))

    def _open(self, path: str) -> BinaryIO:
        self._report("open", path)
        return super()._open(path)

    def _fsync_fd(self, fd: int) -> None:
        self._report("fsync", "")
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self._report("replace", dst)
        super()._replace(src, dst)

    def _link(self, src: str, dst: str) -> None:
        self._report("link", dst)
        super()._link(src, dst)

    def _unlink(self, path: str) -> None:
        self._report("unlink", path)
        super()._unlink(path)

    def _open_direct(self, path: str) -> int:
        self._report("open_direct", path)
        return super()._open_direct(path)

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        self._report("pwrite_direct", "")
        return super()._pwrite_direct(fd, view, offset)


def build(width: int, batches: int, fail_at: int | None = None) -> tuple[Engine, dict[str, Any], list[torch.Tensor]]:
    """A seeded MLP with Adam and a ``Tag``; the step records the iteration it finished in the tag."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    tag = Tag()
    data = [torch.randn(8, 64) for _ in range(batches)]

    def record(engine: Engine) -> None:
        tag.iteration = engine.state.iteration

    step = make_step(net, opt, fail_at_iteration=fail_at, after=record)
    return Engine(step), {"net": net, "opt": opt, "tag": tag}, data


def crash(
    dirname: str,
    seed: int,
    iterations: int,
    emit: Callable[[str], None],
    fsync_delay: float = 0.0,
    direct_io: bool | str = "auto",
) -> None:
    """The crash-test training: ``emit`` gets one JSON line per iteration (see the module docstring) and one line
    (``{"op": ...}``) before each file operation of the writer thread.

    ``fsync_delay`` > 0 simulates a slow disk, so that more kills land while a file is being made durable;
    ``direct_io`` chooses the write path (``FileStorage``'s argument).
    """
    lock = threading.Lock()

    def emit_locked(line: str) -> None:  # the training and the writer thread both emit
        with lock:
            emit(line)

    per_epoch = 5
    torch.manual_seed(seed)
    # ~1.2 MiB of parameters, ~3.6 MiB with Adam's moments: each durable write takes a moment.
    engine, save_dict, data = build(width=2304, batches=per_epoch)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = float(e.state.epoch)  # improves every epoch: the best file is rewritten

    saver = AsyncCheckpointSaver(
        dirname,
        save_dict,
        save_key_metric=True,
        key_metric_name="acc",
        key_metric_filename="best.pt",
        epoch_level=False,
        save_interval=1,
        n_saved=2,
        storage=ReportingStorage(emit_locked, fsync_delay, direct_io),
    )
    saver.attach(engine)
    key_iterations: list[int] = []  # iteration of each queued best-model save, in queue (= durable) order
    seen = 0
    key_seen = 0

    @engine.on(Events.EPOCH_COMPLETED)
    def _key_queued(e: Engine) -> None:  # runs after the saver's handler queued the best-model save
        key_iterations.append(e.state.iteration)

    @engine.on(Events.ITERATION_COMPLETED)
    def _report(e: Engine) -> None:
        nonlocal seen, key_seen
        saves = saver.stats.saves
        new, seen = saves[seen:], len(saves)
        durable = []
        for s in new:
            if not s.ok:
                continue
            item: dict[str, Any] = {"path": s.path, "reason": s.reason}
            if s.reason == "key_metric":
                item["iteration"] = key_iterations[key_seen]
                key_seen += 1
            durable.append(item)
        emit_locked(json.dumps({"it": e.state.iteration, "durable": durable}))

    engine.run(data, max_epochs=-(-iterations // per_epoch))
    saver.close()


def crash_child(
    conn: Connection, dirname: str, seed: int, iterations: int, fsync_delay: float, direct_io: bool | str = "auto"
) -> None:
    """``crash`` in a forkserver child (the test's fast path): each line is one message on ``conn``."""
    crash(dirname, seed, iterations, lambda line: conn.send_bytes(line.encode()), fsync_delay, direct_io)
    conn.send_bytes(b"DONE")


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def exit_pending(dirname: str) -> None:
    engine, save_dict, data = build(width=256, batches=6)
    saver = AsyncCheckpointSaver(
        dirname, save_dict, epoch_level=False, save_interval=1, n_saved=2, max_pending=8, storage=SlowStorage(0.05)
    )
    # Registered by hand instead of attach(): nothing flushes at COMPLETED, only the interpreter-exit hook can.
    engine.add_event_handler(Events.ITERATION_COMPLETED, saver.interval_completed)
    engine.run(data, max_epochs=1)
    print(json.dumps({"pending": saver._pipeline.client.pending}), flush=True)
    # no wait(), no close(): the script just ends


def exit_raise(dirname: str) -> None:
    engine, save_dict, data = build(width=256, batches=6, fail_at=4)
    saver = AsyncCheckpointSaver(
        dirname,
        save_dict,
        save_final=True,
        final_filename="final.pt",
        epoch_level=False,
        save_interval=1,
        n_saved=2,
        storage=SlowStorage(0.05),
    )
    saver.attach(engine)
    engine.run(data, max_epochs=1)  # raises RuntimeError("boom ...") out of the script


def fork(dirname: str) -> None:
    engine, save_dict, _ = build(width=16, batches=1)
    storage = GatedStorage()
    saver = AsyncCheckpointSaver(
        dirname, save_dict, epoch_level=False, save_interval=1, exit_timeout=10.0, storage=storage
    )
    engine.state.iteration = 1
    engine.state.epoch = 1
    saver.interval_completed(engine)  # queued; the writer is held at the gate
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: the interpreter-exit hook runs in the child
    _, status = os.waitpid(pid, 0)
    child_s = time.monotonic() - t0
    storage.open_all()
    saver.close()
    print(json.dumps({"child_exit_s": child_s, "child_status": status}), flush=True)


def exit_large(dirname: str, expected: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(2560, 4096, bias=False)  # 40 MiB: above the CRC piece split (16 MiB) and write-behind
    torch.save(net.state_dict(), expected)
    engine = Engine(lambda e, b: None)
    storage = GatedStorage()
    storage.fsync = True  # the real commit protocol, write-behind included
    saver = AsyncCheckpointSaver(dirname, {"net": net}, epoch_level=False, save_interval=1, storage=storage)
    saver.attach(engine)
    # atexit runs hooks last-registered first: this one opens the gate before async_ckpt's drain waits for the write,
    # so the whole write happens after interpreter shutdown has begun.
    atexit.register(storage.open_all)

    @engine.on(Events.ITERATION_COMPLETED)
    def _leave(e: Engine) -> None:  # after the saver's handler queued the checkpoint
        sys.exit(0)  # SystemExit is not an Exception: ignite fires no EXCEPTION_RAISED, nothing calls close()

    engine.run([0], max_epochs=1)


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "crash":
        delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
        direct: bool | str = (
            {"true": True, "false": False}.get(sys.argv[6].lower(), "auto") if len(sys.argv) > 6 else "auto"
        )
        crash(directory, int(sys.argv[3]), int(sys.argv[4]), _print_line, delay, direct)
    elif mode == "exit-pending":
        exit_pending(directory)
    elif mode == "exit-raise":
        exit_raise(directory)
    elif mode == "fork":
        fork(directory)
    elif mode == "exit-large":
        exit_large(directory, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
