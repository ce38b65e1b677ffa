"""Lightning adapters of ``benchmarks.integrations``: the three ``CheckpointIO`` plugins, timed, and the step clock.

Every variant (``LIGHTNING_VARIANTS``, in ``benchmarks.integrations_savers`` so that the report needs no
Lightning import) trains the same ``LightningModule`` (``benchmarks.workloads.lightning_module``) with a CPU
``lightning.Trainer`` and one ``ModelCheckpoint(every_n_train_steps=K, save_top_k=-1)`` (every file kept, so
every file can be verified). Only the plugin differs:

- ``none``: no checkpoint callback (``enable_checkpointing=False``), the baseline of the throughput overhead.
- ``lightning-default``: Lightning's default ``TorchCheckpointIO`` (``torch.save`` on the training thread, no fsync,
  no rename); "durable" is only "returned".
- ``lightning-async``: ``lightning.pytorch.plugins.io.AsyncCheckpointIO`` over ``TorchCheckpointIO``: it clones
  every tensor into fresh memory, then ``torch.save`` runs on a thread pool (no fsync); "durable" is when that
  ``torch.save`` returns.
- ``async-ckpt``: ``async_ckpt.lightning.AsyncCheckpointIO``: a snapshot into reused buffers, then a background
  write, fsync and rename; durable when its ``on_durable`` callback runs.

How it is timed, through public hooks only: each plugin is a subclass whose ``save_checkpoint`` records its own
duration (``in plugin``); ``TimedModelCheckpoint`` overrides ``on_train_batch_end`` to record the time inside the
checkpoint callback (the *stall*: building the checkpoint dict plus the plugin's save) and then samples the state
it should hold; ``StepTimer`` (the first callback's ``on_train_batch_start``) and the module's
``on_train_batch_end`` (which Lightning calls after every callback's) bracket the whole step.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO as LightningAsyncCheckpointIO
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from async_ckpt.lightning import AsyncCheckpointIO
from benchmarks.integrations_savers import LIGHTNING_VARIANTS, telemetry_of
from benchmarks.workloads import sample_state

LIGHTNING_METADATA = {".async_ckpt_manifest.json"}


class SaveLog:
    """What the plugins report, by absolute path: the ``save_checkpoint`` call and when the file was complete.

    ``completed`` may be called from a writer thread, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, tuple[float, float]] = {}
        self.done: dict[str, float] = {}
        self.telemetry: dict[str, dict[str, float]] = {}
        self.last_call_start = 0.0

    def called(self, path: str, t0: float, t1: float) -> None:
        """``save_checkpoint(path)`` ran from ``t0`` to ``t1``."""
        with self._lock:
            self.calls[os.path.abspath(path)] = (t0, t1)
            self.last_call_start = t0

    def completed(self, path: str, telemetry: dict[str, float] | None = None) -> None:
        """The file at ``path`` is complete now (durable, for a plugin that fsyncs), with the plugin's own figures."""
        t = time.perf_counter()
        with self._lock:
            self.done[os.path.abspath(path)] = t
            if telemetry is not None:
                self.telemetry[os.path.abspath(path)] = telemetry


def _timed_save(cls: type[CheckpointIO], log: SaveLog, done_on_return: bool) -> type[CheckpointIO]:
    """A subclass of plugin ``cls`` whose ``save_checkpoint`` logs its duration (and completion, if synchronous)."""

    class Timed(cls):  # type: ignore[valid-type,misc]
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            t0 = time.perf_counter()
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            t1 = time.perf_counter()
            log.called(str(path), t0, t1)
            if done_on_return:
                log.completed(str(path))

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


class _CompletingTorchCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that logs when each ``torch.save`` returns: the base of Lightning's async plugin."""

    def __init__(self, log: SaveLog) -> None:
        super().__init__()
        self._log = log

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        self._log.completed(str(path))


def make_plugin(name: str, log: SaveLog) -> CheckpointIO | None:
    """The timed plugin of variant ``name`` (``None`` for ``none``)."""
    if name == "none":
        return None
    if name == "lightning-default":
        return _timed_save(TorchCheckpointIO, log, done_on_return=True)()
    if name == "lightning-async":
        timed_async = _timed_save(LightningAsyncCheckpointIO, log, done_on_return=False)
        return timed_async(checkpoint_io=_CompletingTorchCheckpointIO(log))
    if name == "async-ckpt":
        timed_ours = _timed_save(AsyncCheckpointIO, log, done_on_return=False)
        return timed_ours(on_durable=lambda stats: log.completed(stats.path, telemetry_of(stats)))
    raise ValueError(f"unknown Lightning variant {name!r}; choose from {', '.join(LIGHTNING_VARIANTS)}")


class StepClock:
    """Step times of one ``fit``: from :meth:`start` to :meth:`end`, less the benchmark's own sampling time."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.first: float | None = None
        self.last = 0.0
        self.own = 0.0
        self.own_total = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        """The step begins (the first callback's ``on_train_batch_start``)."""
        self._t0 = time.perf_counter()
        if self.first is None:
            self.first = self._t0

    def end(self) -> None:
        """The step ends (the module's ``on_train_batch_end``, after every callback's)."""
        t = time.perf_counter()
        self.steps.append(t - self._t0 - self.own)
        self.own_total += self.own
        self.own = 0.0
        self.last = t

    @property
    def window_s(self) -> float:
        """Wall time from the first step's start to the last step's end, less the sampling time."""
        return self.last - (self.first or self.last) - self.own_total


class StepTimer(Callback):
    """The first callback: starts the step clock at ``on_train_batch_start``."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.clock.start()


class TimedModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that records the time inside its ``on_train_batch_end`` when it saved, then samples state.

    Attributes:
        events: per global step that saved, ``t0``/``t1`` of the callback and the ``path`` the plugin was given.
        samples: per global step that saved, a sample of (model, optimizer) state right after the save.
    """

    def __init__(self, log: SaveLog, clock: StepClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_log, self.clock = log, clock
        self.events: dict[int, dict[str, Any]] = {}
        self.samples: dict[int, list[Any]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        t1 = time.perf_counter()
        if self.save_log.last_call_start < t0:
            return  # no save in this step
        step = int(trainer.global_step)
        calls = self.save_log.calls
        path = next((p for p, (c0, _) in calls.items() if c0 == self.save_log.last_call_start), "")
        self.events[step] = {"t0": t0, "t1": t1, "path": path}
        self.samples[step] = sample_state((pl_module.state_dict(), trainer.optimizers[0].state_dict()))
        self.clock.own += time.perf_counter() - t1


def load_lightning(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (model, optimizer) state dicts of a Lightning checkpoint, for the correctness check."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return obj["state_dict"], obj["optimizer_states"][0]
