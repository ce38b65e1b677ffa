"""Preemption: turn a termination signal into a durable final checkpoint at the next iteration boundary.

The signal handler only sets a flag (no I/O, no locks in signal context). At the end of the current iteration the
saver writes its final checkpoint, waits up to a grace budget for everything queued to become durable, restores
the previous handler and hands the signal on to it, so the process ends the way it would have without us: by the
default action (killed by the signal), by the previous Python handler (e.g. ``KeyboardInterrupt``), or not at all
if the signal was ignored before.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["PreemptionGuard", "outermost_running_engine"]

logger = logging.getLogger("async_ckpt")

_Handler = Callable[[int, FrameType | None], Any] | int | None


def outermost_running_engine() -> Engine | None:
    """The engine of the outermost ``Engine.run`` call on this thread's stack, if any."""
    code = Engine.run.__code__
    frame = sys._getframe(1)
    outer = None
    while frame is not None:
        if frame.f_code is code:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Engine):
                outer = candidate
        frame = frame.f_back  # type: ignore[assignment]
    return outer


class PreemptionGuard:
    """Installs a signal handler and performs the final save at the next ``ITERATION_COMPLETED``.

    Args:
        save_final: writes the final checkpoint for ``engine`` (the saver's final ``Checkpoint``).
        flush: waits up to the given seconds for everything queued to be durable; returns whether it finished.
        signum: the signal to handle (e.g. ``signal.SIGTERM``, or ``signal.SIGUSR1`` as SLURM sends before the end).
        grace_s: seconds to wait for pending writes before handing the signal on.
        agree: given this process's flag, whether any rank has received the signal; called by every rank at every
            iteration end (and at the end of the run). The default, for one process, returns the flag itself.
    """

    def __init__(
        self,
        save_final: Callable[[Engine], None],
        flush: Callable[[float], bool],
        signum: int,
        grace_s: float,
        agree: Callable[[bool], bool] = lambda requested: requested,
    ) -> None:
        self._save_final = save_final
        self._flush = flush
        self._agree = agree
        self.signum = signal.Signals(signum)
        self.grace_s = grace_s
        self.requested = False
        self._previous: _Handler = None
        self._installed = False

    def install(self, engine: Engine) -> None:
        """Take over the signal (main thread only) and check for it after every iteration of ``engine``."""
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                f"preempt_signal={self.signum.name} needs attach() to run in the main thread, where Python handles "
                "signals; attach from the main thread or leave preempt_signal=None."
            )
        self._take()
        engine.add_event_handler(Events.STARTED, lambda _: self._take())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._at_safe_point)
        engine.add_event_handler(Events.COMPLETED, self._at_run_end)

    def _take(self) -> None:
        if not self._installed:  # a second engine shares the handler; the previous one stays the user's
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def _at_run_end(self, engine: Engine) -> None:
        """After COMPLETED's final save: hand on a signal that came after the last iteration, else give it back.

        An engine run inside another one (an evaluator run by the trainer) is not the end of the run.
        """
        outer = outermost_running_engine()
        if outer is not None and outer is not engine:
            return
        if self._agree(self.requested):
            self.requested = False
            self._flush(self.grace_s)
            self._hand_on()
        else:
            self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def _at_safe_point(self, engine: Engine) -> None:
        # In a distributed run every rank acts on a signal that any rank received: all save the final checkpoint at
        # this same iteration and hand the signal on, instead of one rank leaving while the others block in their
        # next collective with it.
        here = self.requested
        if not self._agree(here):
            return
        self.requested = False
        logger.warning(
            "async_ckpt: %s received%s; writing the final checkpoint at iteration %d",
            self.signum.name,
            "" if here else " by another rank",
            engine.state.iteration,
        )
        try:
            self._save_final(engine)
        finally:
            finished = self._flush(self.grace_s)
            if not finished:
                logger.error("async_ckpt: checkpoints still pending after the %.0fs grace budget", self.grace_s)
            self._hand_on()

    def uninstall(self) -> None:
        """Give the signal back to the handler that was there before (handing on one that is still pending)."""
        if self.requested and self._installed:
            self.requested = False
            self._hand_on()
            return
        if self._installed:
            signal.signal(self.signum, _restorable(self.signum, self._previous))
            self._installed = False

    def _hand_on(self) -> None:
        previous = self._previous
        self.uninstall()
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            previous(int(self.signum), None)
            return
        os.kill(os.getpid(), self.signum)  # SIG_DFL (or None): the default action, as without us


def _restorable(signum: signal.Signals, previous: _Handler) -> _Handler:
    """The handler to put back: ``previous``, or ``SIG_DFL`` for one that Python cannot reinstall.

    ``signal.signal`` returns ``None`` when the handler it replaced was installed outside Python (by C code, e.g.
    ``faulthandler`` or an embedding application); it cannot be passed back to ``signal.signal``. Its nearest
    equivalent that Python can install is the default action, which is also what ``_hand_on`` then triggers.
    """
    if previous is not None:
        return previous
    logger.warning(
        "async_ckpt: the %s handler in place before the saver was installed outside Python and cannot be put back; "
        "restoring the default action (SIG_DFL) instead",
        signum.name,
    )
    return signal.SIG_DFL
