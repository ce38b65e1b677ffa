"""ignite's save-handler seam, asynchronous: ``__call__`` snapshots and enqueues, ``remove`` defers.

The saver's handlers share one :class:`~async_ckpt.core.save_pipeline.SavePipeline` (the core's stager, writer
client and telemetry). :class:`AsyncSaveHandler` is the thin ``BaseSaveHandler`` that ignite's ``Checkpoint``
calls; it maps fixed file names the way MONAI's private ``_DiskSaver`` does and turns every ``remove`` into an
eviction that runs only after the next file of the same handler is durable.

It subclasses ignite's ``DiskSaver`` only so that ``Checkpoint.last_checkpoint`` returns a full path and
``Checkpoint.reload_objects`` works, exactly as with MONAI's saver; none of ``DiskSaver``'s writing code runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.handlers import DiskSaver

from async_ckpt.core.save_pipeline import SavePipeline, save_dict_objects, state_of
from async_ckpt.pipeline.writer import WriteJob

__all__ = ["AsyncSaveHandler", "save_dict_objects", "state_of"]


class AsyncSaveHandler(DiskSaver):
    """ignite ``BaseSaveHandler`` that snapshots at the call and writes in the background.

    Args:
        pipeline: the saver's shared pipeline.
        dirname: directory of the checkpoints.
        filename: a fixed file name that replaces the one ignite generates (MONAI's ``final_filename`` /
            ``key_metric_filename``).
        reason: label recorded in telemetry (``"interval"``, ``"key_metric"``, ``"final"``).
        save_on_rank: only this rank snapshots and writes; the others do no copy and no I/O.
    """

    def __init__(
        self,
        pipeline: SavePipeline,
        dirname: str | os.PathLike[str],
        filename: str | None = None,
        reason: str = "interval",
        save_on_rank: int = 0,
    ) -> None:
        super().__init__(
            dirname=Path(dirname), atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank
        )
        self.filename = filename
        self.reason = reason
        self._pipeline = pipeline
        self._removes: list[str] = []
        self.last_job: WriteJob | None = None
        self.context: dict[str, Any] = {}
        self.step: Any = None

    def path_for(self, filename: str) -> str:
        """The final path a file name given by ignite maps to."""
        return str(self.dirname / (self.filename if self.filename is not None else filename))

    def __call__(self, checkpoint: Mapping[str, Any], filename: str, metadata: Mapping[str, Any] | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            self._removes.clear()
            return
        path = self.path_for(filename)
        info = {**self.context}
        if metadata is not None:
            info.update(score=metadata.get("priority"), score_name=metadata.get("score_name"))
        # Removing the name being rewritten would open a window with no file: the atomic replace covers it.
        removes = [p for p in self._removes if p != path]
        self._removes = []
        self.last_job = self._pipeline.save(checkpoint, path, removes, self.reason, info, step=self.step)

    def remove(self, filename: str) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        self._removes.append(self.path_for(filename))

    def retry_removes(self, paths: list[str]) -> None:
        """Queue removals that failed or never ran again, to run after this handler's next durable save."""
        self._removes.extend(p for p in paths if p not in self._removes)

    def pending_removes(self) -> list[str]:
        """The removals waiting for this handler's next durable save."""
        return list(self._removes)

    def restore_removes(self, removes: list[str]) -> None:
        """Put back the waiting removals as they were before a save that did not happen."""
        self._removes = list(removes)
