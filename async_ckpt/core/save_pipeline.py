"""The save pipeline every integration shares: snapshot into reused buffers, enqueue, account, report failures.

:class:`SavePipeline` owns one saver's stager (buffers), writer client (queue and error latch) and telemetry; the
``Checkpointer``, the ignite/MONAI saver and the Lightning plugin each hold one. It knows nothing of a framework:
it takes a state, a path, the files to remove once that path is durable, and returns the queued job.
:func:`failure_to_error`, :func:`attach_failure` and :func:`close_on_exit` are how every integration turns a
background failure into the exception its user sees.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from async_ckpt.errors import CheckpointWriteError, SnapshotError
from async_ckpt.options import AsyncOptions
from async_ckpt.pipeline.integrity import entry_for, update_manifest
from async_ckpt.pipeline.serialize import serialize
from async_ckpt.pipeline.snapshot import Staged, Stager, flatten, unflatten
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.telemetry import SaveStats, Telemetry
from async_ckpt.pipeline.writer import Failure, JobResult, WriteJob, WriterClient

__all__ = [
    "SavePipeline",
    "attach_failure",
    "close_on_exit",
    "failure_to_error",
    "save_dict_objects",
    "state_of",
]


def save_dict_objects(save_dict: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every object of ``save_dict`` with its path (``"['nets'][1]"``), walking nested values as ignite does.

    ignite's ``Checkpoint`` accepts values that are mappings, lists, tuples or named tuples of objects (a GAN's
    ``{"nets": [gen, disc]}``) and saves the same nesting of their ``state_dict()``. A ``str`` is yielded as an
    object, not walked (ignite would recurse into its characters without end).
    """

    def walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                yield from walk(value, f"{path}[{key!r}]")
        elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")
        else:
            yield path, node

    yield from walk(save_dict, "")


def state_of(save_dict: Mapping[str, Any]) -> Any:
    """The state ignite's ``Checkpoint`` saves for ``save_dict``: each object's ``state_dict()`` in the same nesting,
    with (Distributed)DataParallel unwrapped."""

    def state(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {key: state(value) for key, value in node.items()}
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(state(v) for v in node))
        if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            return type(node)([state(v) for v in node])  # type: ignore[call-arg]
        if isinstance(node, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            node = node.module
        return node.state_dict()

    return state(save_dict)


@dataclass
class _LastJob:
    job: WriteJob
    views: list[torch.Tensor]
    fingerprint: bytes | None


class SavePipeline:
    """Snapshot, enqueue and account for the saves of one saver.

    Thread-safety: :meth:`save` and :meth:`raise_pending` run on the training thread; completion callbacks run on
    the writer thread and only touch the stager's pool, the telemetry and the log.

    Args:
        save_dict: the objects being checkpointed (used in overlap mode to find the optimizers to guard).
        options: asynchronous options.
        storage: file operations; ``None`` for the real file system.
        logger: where the per-save info line goes (a callable, because MONAI binds the engine's logger at
            ``attach``).
        name: a label for log lines.
    """

    def __init__(
        self,
        save_dict: Mapping[str, Any],
        options: AsyncOptions,
        storage: FileStorage | None,
        logger: Callable[[], logging.Logger],
        name: str = "saver",
    ) -> None:
        self.save_dict = save_dict
        self.options = options
        self.stager = Stager(options.max_pending)
        self.client = WriterClient(
            storage if storage is not None else FileStorage(fsync=options.fsync, direct_io=options.direct_io),
            name=name,
            exit_timeout=options.exit_timeout,
        )
        self.telemetry = Telemetry()
        self._logger = logger
        self._last: _LastJob | None = None
        self._deferred: list[Staged] = []
        self._hooks: dict[int, Any] = {}
        self.on_durable: Callable[[SaveStats], None] | None = None
        # After a save that had to allocate its buffers, make the pool's other sets on the prewarm thread (off for a
        # saver built with ``prewarm=False``, which allocates every set in the save that needs it).
        self.prewarm_after_allocation = True
        # Called on the writer thread with the files a durable save evicted (its ``removes``), before on_durable;
        # the remote tier deletes their published copies after its next publish.
        self.on_evicted: Callable[[list[str]], None] | None = None

    # -- the training-thread path --------------------------------------------------------------------------------
    def save(
        self,
        checkpoint: Any,
        path: str,
        removes: list[str],
        reason: str,
        info: dict[str, Any] | None = None,
        step: Any = None,
    ) -> WriteJob:
        """Stage ``checkpoint`` and queue it to become ``path``; queue ``removes`` to run once it is durable.

        ``step`` identifies the training step (e.g. run, iteration, epoch): a snapshot is reused for another save only
        at the same step, with unchanged tensors. ``None`` never reuses.

        Returns when the checkpoint is training-safe: in eager mode every tensor has been copied; in overlap mode
        the parameters and optimizer state are being copied, and the optimizers' next ``step()`` waits for it.

        Raises:
            SnapshotError: the state could not be copied (nothing was queued and nothing will be removed).
            WriterClosedError: the saver was closed.
        """
        t0 = time.perf_counter()
        try:
            flat = flatten(checkpoint)
        except Exception as exc:
            raise SnapshotError(
                f"cannot snapshot the state for {path!r}: a non-tensor value could not be pickled ({exc!r}), so "
                "torch.save could not write it either. Make every state_dict() return tensors and plain, picklable "
                "Python values."
            ) from exc
        defer = self._deferrable(flat.tensors)
        previous = self.stager._last
        staged = self.stager.stage(flat.tensors, block=True, reuse=self.options.dedup, defer=defer, step=step)
        assert staged is not None  # block=True always returns a snapshot
        if staged.alloc_s > 0 and self.options.max_pending > 1 and self.prewarm_after_allocation:
            # This save allocated its buffers (no prewarm saw this layout): make the other sets in the background,
            # so that a save coming while this one is still being written does not allocate on this thread too.
            self.stager.prewarm_async(flat.tensors)
        reused = previous is not None and staged.views is previous.views
        fingerprint = flat.fingerprint() if self.options.dedup else None  # the skeleton's bytes: free
        link_from = None
        last = self._last
        if (
            last is not None
            and fingerprint is not None
            and last.views is staged.views
            and last.fingerprint == fingerprint
            and last.job.path != path
        ):
            link_from = last.job
        blocking = time.perf_counter() - t0
        skeleton, views = flat.skeleton, staged.views

        def produce(f: Any) -> None:
            serialize(unflatten(skeleton, views), f)  # on the writer thread: the skeleton is a private copy

        def record(result: JobResult) -> None:
            # Before the evictions: the manifest never names a file that is already gone.
            update_manifest(
                self.client.storage,
                os.path.dirname(path),
                {os.path.basename(path): entry_for(path, {"reason": reason, **(info or {})})},
                [os.path.basename(p) for p in removes if p != path],
            )

        def done(result: JobResult) -> None:
            staged.release()
            if result.ok and self.on_evicted is not None:
                self.on_evicted([p for p in removes if p != path])
            self._record(path, reason, result, t0, blocking, staged, reused)

        job = WriteJob(
            path,
            produce,
            link_from=link_from,
            removes=removes,
            before=staged.wait_ready,
            after_commit=record if self.options.manifest else None,
            on_done=done,
        )
        try:
            self.client.submit(job)
        except BaseException:
            staged.release()
            raise
        if staged.deferred:
            self._deferred.append(staged)
        self._last = _LastJob(job, staged.views, fingerprint)
        return job

    def _deferrable(self, tensors: list[torch.Tensor]) -> list[bool] | None:
        """In overlap mode, which tensors only an optimizer's ``step()`` writes (so their copy may overlap)."""
        if self.options.snapshot_mode != "overlap":
            return None
        guarded: set[int] = set()
        for _, obj in save_dict_objects(self.save_dict):
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            self._install_guard(obj)
            for group in obj.param_groups:
                for p in group["params"]:
                    guarded.add(p.untyped_storage().data_ptr())
            for state in obj.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        guarded.add(value.untyped_storage().data_ptr())
        return [t.untyped_storage().data_ptr() in guarded for t in tensors]

    def _install_guard(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooks:
            return

        def wait_for_copies(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.settle()

        self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(wait_for_copies)

    def settle(self) -> None:
        """Order every write of a tensor whose copy was deferred after that copy (training thread)."""
        while self._deferred:
            self._deferred.pop(0).guard()

    def prewarm(self) -> None:
        """Start allocating and touching the staging buffers for the current layout of the state on a background
        thread, so that no save pays for them (see ``Stager.prewarm_async``); returns at once.

        Best effort: a state that cannot be flattened (a value that cannot be pickled) is not prewarmed; its save
        raises :class:`SnapshotError` at the event with the cause."""
        try:
            tensors = flatten(state_of(self.save_dict)).tensors
        except Exception as exc:
            logging.getLogger("async_ckpt").debug("no prewarm: the state cannot be flattened (%r)", exc)
            return
        self.stager.prewarm_async(tensors)

    def has_free_slot(self) -> bool:
        """Whether a save could be staged now without waiting for the writer."""
        return self.stager.has_free_slot()

    def take_failures(self) -> list[Failure]:
        return self.client.take_failures()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued save is durable or failed (``False`` if ``timeout`` ran out first)."""
        self.settle()
        return self.client.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        self.settle()
        finished = self.client.close(timeout)
        self.stager.close()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        return finished

    # -- the writer-thread path --------------------------------------------------------------------------------
    def _record(
        self, path: str, reason: str, result: JobResult, t0: float, blocking: float, staged: Staged, reused: bool
    ) -> None:
        times = result.times
        stats = SaveStats(
            path=path,
            reason=reason,
            ok=result.ok,
            blocking_s=blocking,
            backpressure_s=0.0 if reused else staged.wait_s,
            snapshot_s=0.0 if reused else staged.copy_s,
            nbytes=times.nbytes,
            serialize_s=times.serialize_s,
            write_s=times.write_s,
            fsync_s=times.fsync_s,
            durable_s=(result.durable_at - t0) if result.ok else float("nan"),
            linked=result.linked,
            reused_snapshot=reused,
            io_path=times.io_path,
        )
        self.telemetry.record(stats)
        if result.ok and self.on_durable is not None:
            self.on_durable(stats)
        log = self._logger()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("async_ckpt: %s", stats.as_dict())
        if result.ok:
            log.info(
                "async_ckpt: %s durable in %.3fs (%s, %.1f MiB, %.0f MiB/s); training blocked %.1f ms",
                path,
                stats.durable_s,
                "hard link" if stats.linked else reason,
                stats.nbytes / 2**20,
                stats.throughput_mib_s,
                blocking * 1e3,
            )


def failure_to_error(failure: Failure, more: int) -> CheckpointWriteError:
    """The exception a user sees for a failed job, with the original chained as ``__cause__``."""
    verb = {
        "remove": "remove an evicted file after writing",
        "link": "link",
        "stage": "copy the state for",
        "record": "record in the manifest the durable",
        "callback": "finish (on_durable callback) the durable",
    }.get(failure.stage, "write")
    extra = f" ({more} more save(s) of this saver failed after it)" if more else ""
    err = CheckpointWriteError(
        f"async_ckpt could not {verb} checkpoint {failure.job.path!r}: {failure.error!r}{extra}. "
        "Earlier checkpoints are intact; fix the cause (disk space, permissions, an unpicklable object) and resume.",
        path=failure.job.path,
        more=more,
    )
    err.__cause__ = failure.error
    return err


def attach_failure(exc: BaseException, failure: BaseException, log: logging.Logger) -> None:
    """Attach ``failure`` (a checkpoint failure) to ``exc``, the exception that is ending training, and log it.

    ``exc`` stays the exception that propagates: it says why training stopped. ``failure`` cannot be chained to it
    (``exc`` was raised already), so it becomes a note on ``exc`` where Python has notes (3.11+); it is always logged
    at ERROR with its traceback and cause, which is where it can be read on Python 3.10.
    """
    log.error(
        "async_ckpt: a checkpoint failed while %s was ending training: %s",
        type(exc).__name__,
        failure,
        exc_info=(type(failure), failure, failure.__traceback__),
    )
    add_note = getattr(exc, "add_note", None)
    if callable(add_note):
        add_note(f"async_ckpt: a checkpoint also failed while this exception was ending training: {failure!r}")


def close_on_exit(close: Callable[[], None], exc: BaseException | None, log: logging.Logger) -> None:
    """``__exit__`` of a saver: ``close()``; if an exception is leaving the block, it stays the one raised and a
    failure of ``close()`` is attached to it (see :func:`attach_failure`)."""
    if exc is None:
        close()
        return
    try:
        close()
    except Exception as failure:
        attach_failure(exc, failure, log)
