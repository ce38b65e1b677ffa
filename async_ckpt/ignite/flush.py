"""Flush at the end of a run: every checkpoint of ``engine.run`` is durable (or its failure raised) when it returns.

Waiting at ``COMPLETED`` is what makes a background saver safe to use as a drop-in: the code after ``run`` may copy,
upload or load the files. But an evaluator run inside the trainer's run also completes, once per validation round;
flushing there would make the trainer wait for every best-model write. So an engine that completes inside another
engine's run registers the flush on the outermost running engine instead (once per outer engine).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from ignite.engine import Engine, Events

from async_ckpt.ignite.preemption import outermost_running_engine

__all__ = ["RunEndFlush"]


class RunEndFlush:
    """Calls ``flush`` at ``COMPLETED`` of the outermost running engine.

    Args:
        flush: waits until everything queued is durable and raises background failures (the saver's
            ``wait(barrier=True)``, which every rank reaches at the same ``COMPLETED``).
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._outer_engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def attach(self, engine: Engine) -> None:
        """Flush at ``engine``'s ``COMPLETED``, or at the outer run's if ``engine`` completes inside one."""
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _completed(self, engine: Engine) -> None:
        outer = outermost_running_engine()
        if outer is None or outer is engine:
            self._flush()
            return
        if outer not in self._outer_engines:
            self._outer_engines.add(outer)
            outer.add_event_handler(Events.COMPLETED, self._flush_outer)

    def _flush_outer(self, engine: Engine) -> None:
        self._flush()
