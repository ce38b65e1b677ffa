"""Subprocess entry point for the preemption tests (not a test module).

Usage: ``python _preempt_worker.py MODE DIR`` with MODE one of

``term``
    ``preempt_signal=SIGTERM`` over the default SIGTERM action.
``term-chain``
    ``preempt_signal=SIGTERM`` over a Python SIGTERM handler installed first, which prints what is on disk when it
    runs (``previous {...}``) and raises ``SystemExit(3)``.
``usr1-ignored``
    ``preempt_signal=SIGUSR1`` over ``SIG_IGN``.
``abrt-foreign``
    ``preempt_signal=SIGABRT`` over a handler installed outside Python: the parent starts the child with
    ``PYTHONFAULTHANDLER=1``, so faulthandler's C handler holds SIGABRT and ``signal.getsignal`` reports ``None``.
``term-last-epoch``
    ``preempt_signal=SIGTERM``; every ``EPOCH_COMPLETED`` (a validation, say) is a gate ``epoch E``, so the parent
    can signal after the last iteration has completed.
``term-after-run``
    ``preempt_signal=SIGTERM`` used the MONAI way, without ``close()``: after ``engine.run`` returns the child
    passes a gate ``ran``, prints ``still alive`` and exits 0.

The child trains 4 epochs of 3 iterations with ``save_final=True``. Each step prints ``step N`` and then waits for a
line on stdin before it computes (a gate), so the parent decides when each step proceeds and can send a signal
while the child is inside step N. After every iteration the child prints ``done N {json}`` (from a handler
registered before the saver's, so it runs before the saver's preemption check) with the parameters at that
iteration, and, in ``usr1-ignored`` mode, ``finals N {json}`` from a handler registered after the saver's with the
final checkpoints on disk at that point. ``exit 0`` is printed when ``engine.run`` returns.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
from types import FrameType

import torch
from conftest import make_step
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.integrity import verify

torch.set_num_threads(1)


def final_names(save_dir: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(save_dir, "checkpoint_final_iteration=*.pt")))


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def gate(line: str) -> None:
    """Print ``line`` and wait until the parent answers with a line on stdin."""
    emit(line)
    if sys.stdin.readline() == "":
        raise SystemExit(70)  # the parent went away


def params(net: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).tolist()


def main(mode: str, save_dir: str) -> int:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [torch.randn(2, 4) for _ in range(3)]

    engine = Engine(make_step(net, opt, before=lambda e: gate(f"step {e.state.iteration}")))

    @engine.on(Events.ITERATION_COMPLETED)
    def _done(e: Engine) -> None:
        emit(f"done {e.state.iteration} {json.dumps(params(net))}")

    if mode == "term-chain":

        def previous(signum: int, frame: FrameType | None) -> None:
            finals = final_names(save_dir)
            report = {
                "signum": signum,
                "finals": finals,
                "verified": [verify(os.path.join(save_dir, n)).ok for n in finals],
                "checked": [verify(os.path.join(save_dir, n)).checked for n in finals],
            }
            emit(f"previous {json.dumps(report)}")
            raise SystemExit(3)

        signal.signal(signal.SIGTERM, previous)
        signum = signal.SIGTERM
    elif mode == "usr1-ignored":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signum = signal.SIGUSR1
    elif mode == "abrt-foreign":
        if signal.getsignal(signal.SIGABRT) is not None:
            raise SystemExit("abrt-foreign needs PYTHONFAULTHANDLER=1 (a SIGABRT handler installed outside Python)")
        signum = signal.SIGABRT
    elif mode in ("term", "term-last-epoch", "term-after-run"):
        signum = signal.SIGTERM
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    if mode == "term-last-epoch":

        @engine.on(Events.EPOCH_COMPLETED)
        def _validate(e: Engine) -> None:
            gate(f"epoch {e.state.epoch}")

    saver = AsyncCheckpointSaver(save_dir, {"net": net, "opt": opt}, save_final=True, preempt_signal=signum)
    if mode == "term-after-run":
        saver.attach(engine)
        engine.run(data, max_epochs=4)
        gate("ran")
        emit("still alive")
        saver.close()
        return 0
    with saver:
        saver.attach(engine)
        if mode == "usr1-ignored":

            @engine.on(Events.ITERATION_COMPLETED)
            def _finals(e: Engine) -> None:
                emit(f"finals {e.state.iteration} {json.dumps(final_names(save_dir))}")

        engine.run(data, max_epochs=4)
    emit("exit 0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
