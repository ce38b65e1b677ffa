"""``AsyncCheckpointIO``: a Lightning ``CheckpointIO`` plugin that writes checkpoints in the background, durably.

Switching from Lightning's own plugin is one import::

    from async_ckpt.lightning import AsyncCheckpointIO   # was: from lightning.pytorch.plugins.io import ...
    trainer = Trainer(plugins=[AsyncCheckpointIO()])

``ModelCheckpoint`` still decides every file name and which files to keep; this plugin changes how its requests
are carried out:

* ``save_checkpoint`` copies the checkpoint's tensors into reused buffers and returns; the writer thread writes
  ``torch.save``'s format to a temporary name, fsyncs, and renames it into place (a final name is always a complete
  file).
* ``remove_checkpoint`` never runs before the checkpoints saved before it are durable (among them the one that
  replaces the file): while any is pending the removal waits, then runs on the writer thread after the next save,
  or at once at a later call, or at ``teardown``. If one of them failed, the file is kept.
* ``teardown`` (the end of ``fit``/``validate``/``test``) waits until every checkpoint is durable and raises a
  background failure as :class:`~async_ckpt.CheckpointWriteError`; an earlier failure is raised by the next
  ``save_checkpoint`` or ``remove_checkpoint``. A failure found while another exception is ending ``fit`` is
  attached to it instead of replacing it.
* ``load_checkpoint`` reads these files and any ordinary Lightning checkpoint (waiting first if that path is
  still being written).

Requires ``lightning`` (``pip install async-ckpt[lightning]``); local paths only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from async_ckpt.core.resume import remove_stale_temp_files
from async_ckpt.core.save_pipeline import SavePipeline, attach_failure, failure_to_error
from async_ckpt.errors import CheckpointWriteError
from async_ckpt.options import AsyncOptions
from async_ckpt.pipeline.integrity import update_manifest
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.telemetry import SaveStats, Telemetry
from async_ckpt.pipeline.writer import WriteJob

__all__ = ["AsyncCheckpointIO"]

logger = logging.getLogger("async_ckpt")

REASON = "lightning"  # the manifest's "reason" of the files this plugin writes


def _on_cpu(storage: Any, location: Any) -> Any:
    """``TorchCheckpointIO``'s default ``map_location``: keep every storage where it was loaded (the CPU)."""
    return storage


class AsyncCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O with background, durable writes and evictions deferred until safe.

    Thread-safety: Lightning calls the plugin from the training thread (on the global rank 0 for saves and
    removals); the writer thread only runs queued jobs.

    Args:
        max_pending: checkpoints in flight at once (each holds a CPU copy of the state); a further save waits.
        fsync: make files and renames durable before they count as saved.
        dedup: write a second name as a hard link when the same state is saved twice at one step (e.g. a top-k file
            and ``last.ckpt``).
        manifest: keep ``.async_ckpt_manifest.json`` in each checkpoint directory (size, checksum, step per file)
            for ``async-ckpt verify``.
        exit_timeout: seconds the interpreter-exit hook waits for pending writes (``None``: unbounded).
        on_durable: called with each checkpoint's :class:`~async_ckpt.SaveStats` once it is durable, on the writer
            thread.
        storage: file operations (a :class:`~async_ckpt.FileStorage` subclass), for tests and special file systems.
    """

    def __init__(
        self,
        *,
        max_pending: int = 2,
        fsync: bool = True,
        dedup: bool = True,
        manifest: bool = True,
        exit_timeout: float | None = 600.0,
        on_durable: Callable[[SaveStats], None] | None = None,
        storage: FileStorage | None = None,
    ) -> None:
        super().__init__()
        self.options = AsyncOptions(
            max_pending=max_pending,
            fsync=fsync,
            dedup=dedup,
            manifest=manifest,
            sync_errors=False,
            exit_timeout=exit_timeout,
        )
        self.stats = Telemetry()
        self._on_durable = on_durable
        self._storage = storage
        self._pipeline: SavePipeline | None = None
        # Deferred removals, each with the saves that were not durable yet when it was asked for: it runs only once
        # all of them are durable, and is dropped (the file kept) if one of them failed.
        self._removes: list[tuple[str, list[WriteJob]]] = []
        self._jobs: dict[str, WriteJob] = {}  # path -> its newest job
        self._cleaned: set[str] = set()

    # -- CheckpointIO --------------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` and queue it to become ``path``; returns once later changes cannot reach it.

        Raises:
            TypeError: ``storage_options`` was given (as ``TorchCheckpointIO``).
            CheckpointWriteError: an earlier checkpoint failed in the background (cause chained).
            SnapshotError: the checkpoint could not be copied (nothing was queued).
        """
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}`. Please implement your custom `CheckpointIO` to define how you'd like to "
                "use `storage_options`."
            )
        self._raise_failures()
        target = _local(path)
        directory = os.path.dirname(target) or "."
        os.makedirs(directory, exist_ok=True)
        if directory not in self._cleaned:
            self._cleaned.add(directory)
            remove_stale_temp_files(directory)
        pipeline = self._ensure_pipeline()
        # A removal of the name being written now is superseded: Lightning wants a file there again.
        self._removes = [(p, guards) for p, guards in self._removes if p != target]
        removes = self._ready_removes()
        self._jobs = {p: j for p, j in self._jobs.items() if not (j.done.is_set() and j.result and j.result.ok)}
        info = {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
        step = ("lightning", checkpoint.get("epoch"), checkpoint.get("global_step"))
        try:
            self._jobs[target] = pipeline.save(checkpoint, target, removes, REASON, info, step=step)
        except BaseException:
            self._removes += [(p, []) for p in removes]
            raise

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove ``path`` once every checkpoint saved before this call is durable (at once if they all are).

        Raises:
            CheckpointWriteError: an earlier checkpoint failed in the background; ``path`` is kept, since the file
                that was to replace it is not on disk.
        """
        target = _local(path)
        guards = [j for j in self._jobs.values() if not (j.done.is_set() and j.result is not None and j.result.ok)]
        self._raise_failures()
        self._removes.append((target, guards))
        ready = self._ready_removes()
        if ready:
            self._remove_now(ready)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = _on_cpu, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint written by this plugin or by Lightning; waits first if ``path`` is still being written.

        Raises:
            FileNotFoundError: no file at ``path``.
            CheckpointWriteError: the write of ``path`` failed in the background.
        """
        job = self._jobs.get(_local(path)) if "://" not in str(path) else None
        if job is not None and not job.done.is_set() and self._pipeline is not None:
            self._pipeline.wait()
            self._raise_failures()
        return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def teardown(self) -> None:
        """Wait until every checkpoint is durable, run the deferred removals, and raise a background failure.

        When an exception is already ending training, a failure is attached to it (and logged) instead of raised.
        """
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        pipeline.close()
        self._jobs.clear()
        failures = pipeline.take_failures()
        removes = self._ready_removes()  # every save is finished now: each removal is ready or dropped
        if removes:
            self._remove_now(removes, pipeline.client.storage)
        if not failures:
            return
        error = failure_to_error(failures[0], more=len(failures) - 1)
        active = sys.exc_info()[1]
        if active is not None:
            attach_failure(active, error, logger)
            return
        raise error

    # -- internals -----------------------------------------------------------------------------------------------
    def _ensure_pipeline(self) -> SavePipeline:
        if self._pipeline is None:
            self._pipeline = SavePipeline({}, self.options, self._storage, lambda: logger, name="lightning")
            self._pipeline.telemetry = self.stats
            self._pipeline.on_durable = self._on_durable
        return self._pipeline

    def _ready_removes(self) -> list[str]:
        """Take the deferred removals whose saves are all durable; drop those with a failed save (keep the file)."""
        ready: list[str] = []
        waiting: list[tuple[str, list[WriteJob]]] = []
        for path, guards in self._removes:
            if not all(j.done.is_set() for j in guards):
                waiting.append((path, guards))
            elif all(j.result is not None and j.result.ok for j in guards):
                if path not in ready:
                    ready.append(path)
            else:
                logger.warning("async_ckpt: kept %s: a checkpoint saved before its removal was asked for failed", path)
        self._removes = waiting
        return ready

    def _remove_now(self, paths: list[str], storage: FileStorage | None = None) -> None:
        """Remove ``paths`` on this thread (every checkpoint saved before is durable)."""
        storage = storage or (self._pipeline.client.storage if self._pipeline is not None else None)
        storage = storage or self._storage or FileStorage(fsync=self.options.fsync)
        try:
            removed = [p for p in paths if storage.remove(p)]
        except OSError as exc:
            raise CheckpointWriteError(
                f"async_ckpt could not remove the evicted checkpoint(s) {paths}: {exc!r}. The newer checkpoints are "
                "intact; fix the cause (permissions) and delete the file(s) by hand.",
                path=paths[0],
            ) from exc
        if self.options.manifest:
            for directory in {os.path.dirname(p) or "." for p in removed}:
                names = [os.path.basename(p) for p in removed if (os.path.dirname(p) or ".") == directory]
                update_manifest(storage, directory, {}, names)

    def _raise_failures(self) -> None:
        if self._pipeline is None:
            return
        failures = self._pipeline.take_failures()
        if failures:
            raise failure_to_error(failures[0], more=len(failures) - 1)


def _local(path: _PATH) -> str:
    """``path`` as a local file name.

    Raises:
        ValueError: a remote URL (this plugin writes local files only).
    """
    text = os.fspath(path)
    if text.startswith("file://"):
        return text[len("file://") :]
    if "://" in text:
        raise ValueError(
            f"async_ckpt's AsyncCheckpointIO writes local files only, got {text!r}; use Lightning's "
            "TorchCheckpointIO for remote (fsspec) paths, or write locally and sync."
        )
    return text
