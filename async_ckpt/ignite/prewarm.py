"""Prewarm: have the staging buffers allocated before the first save, so that the first save stalls no longer.

The first snapshot would otherwise allocate and page in a CPU copy of the whole state on the training thread. The
pipeline can do that on a background thread instead; this piece asks it twice: when the saver is attached, and once
more after the first iteration, because optimizers such as Adam create their state at their first ``step()``, after
``attach``, which changes the layout the saves will copy.
"""

from __future__ import annotations

from ignite.engine import Engine, Events

from async_ckpt.core.save_pipeline import SavePipeline

__all__ = ["Prewarm"]


class Prewarm:
    """Allocates the staging buffers in the background at ``attach`` and again after the first iteration.

    Args:
        pipeline: the saver's pipeline, whose stager holds the buffers.
    """

    def __init__(self, pipeline: SavePipeline) -> None:
        self._pipeline = pipeline
        self._after_step_done = False

    def attach(self, engine: Engine) -> None:
        """Start a background prewarm now and register the one after ``engine``'s first iteration."""
        self._pipeline.prewarm()
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._after_first_step)

    def _after_first_step(self, engine: Engine) -> None:
        if self._after_step_done:
            return
        self._after_step_done = True
        self._pipeline.prewarm()  # a no-op when the layout did not change since attach
