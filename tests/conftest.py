"""Shared fixtures and helpers: small seeded training setups, tree comparison, directory and damage helpers, and a
guard against leaked writer threads. The subprocess workers import ``make_step`` from here too."""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.snapshot import PREWARM_THREAD_NAME
from async_ckpt.pipeline.storage import TMP_MARKER
from async_ckpt.pipeline.writer import THREAD_NAME, flush_all
from async_ckpt.pipeline.writer import _worker as _writer  # the process-wide writer: its open clients

METRICS = (0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.3, 0.95)  # make_training's "acc" at the end of epochs 1, 2, ...
# Saver arguments that keep every kind of checkpoint: the final one, the best two by "acc" and the last two epochs.
RETENTION: dict[str, Any] = {
    "save_final": True,
    "save_key_metric": True,
    "key_metric_name": "acc",
    "key_metric_n_saved": 2,
    "save_interval": 1,
    "n_saved": 2,
}


@dataclass
class Training:
    """A tiny model, its Adam optimizer and an ignite trainer that sets a scripted ``acc`` metric each epoch."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    engine: Engine
    data: list[torch.Tensor]

    @property
    def save_dict(self) -> dict[str, Any]:
        return {"net": self.net, "opt": self.opt}


def make_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    *,
    fail_at_iteration: int | None = None,
    before: Callable[[Engine], None] | None = None,
    after: Callable[[Engine], None] | None = None,
) -> Callable[[Engine, torch.Tensor], float]:
    """An ignite step that minimises ``net(batch).pow(2).mean()`` with ``opt``: ``before`` and ``after`` run around
    the update, and ``fail_at_iteration`` makes that step raise ``RuntimeError`` (after ``before``)."""

    def step(engine: Engine, batch: torch.Tensor) -> float:
        if before is not None:
            before(engine)
        if fail_at_iteration is not None and engine.state.iteration == fail_at_iteration:
            raise RuntimeError("boom: injected training failure")
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        if after is not None:
            after(engine)
        return float(loss.item())

    return step


def make_training(
    seed: int = 0,
    metrics: Sequence[float] = METRICS,
    batches: int = 3,
    fail_at_iteration: int | None = None,
) -> Training:
    """Build an identically seeded training setup; ``fail_at_iteration`` makes that step raise ``RuntimeError``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = [torch.randn(4, 4) for _ in range(batches)]
    engine = Engine(make_step(net, opt, fail_at_iteration=fail_at_iteration))

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = metrics[(e.state.epoch - 1) % len(metrics)]

    return Training(net, opt, engine, data)


def iteration_saver(directory: str | os.PathLike[str], training: Training, **kwargs: Any) -> AsyncCheckpointSaver:
    """An ``AsyncCheckpointSaver`` of ``training`` that saves at every iteration (``epoch_level=False``,
    ``save_interval=1``); ``kwargs`` are its other arguments."""
    return AsyncCheckpointSaver(str(directory), training.save_dict, epoch_level=False, save_interval=1, **kwargs)


def trees_equal(a: Any, b: Any) -> bool:
    """Deep equality of loaded checkpoints: tensors by dtype, shape and values; containers by type and content."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and torch.equal(a, b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(trees_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(trees_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def checkpoint_names(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the files in ``directory`` that are neither temporary files nor hidden (the manifest)."""
    return sorted(n for n in os.listdir(directory) if TMP_MARKER not in n and not n.startswith("."))


def temp_names(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of async_ckpt's temporary files in ``directory``."""
    return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint the strict way users do (``weights_only``), onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def flip_tensor_byte(path: str | os.PathLike[str]) -> None:
    """Invert one byte in the middle of the first tensor-data record of a ``torch.save`` archive, in place: the size
    and the zip directory stay the same, only the record CRCs can tell."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 0)
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def clone_tree(tree: Any, device: str | None = None) -> Any:
    """A deep copy of a state with every tensor cloned (the reference values at an event), optionally moved."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone() if device is None else tree.detach().to(device, copy=True)
    if isinstance(tree, dict):
        return type(tree)((k, clone_tree(v, device)) for k, v in tree.items())
    if isinstance(tree, list):
        return [clone_tree(v, device) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tree(v, device) for v in tree)
    return tree


@pytest.fixture
def training_factory() -> Callable[..., Training]:
    return make_training


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny test models run faster on one intra-op thread, and idle OpenMP threads spinning on a 2-core machine
    would compete with the writer thread (it made the parity tests 7x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _writer_clients() -> list[Any]:
    return _writer.clients()


@pytest.fixture(autouse=True)
def no_leaked_writer() -> Iterator[None]:
    """Fail a test that leaves work queued, or a thread of ours running once its savers are closed.

    The writer thread stays while a client is open, so the savers a test left open are closed here (their work is
    finished first) before the threads are looked at.
    """
    yield
    leftovers = flush_all(timeout=30)
    for client in _writer_clients():
        client.close(timeout=30)
    watched = (THREAD_NAME, "async_ckpt-stage", PREWARM_THREAD_NAME)
    for t in threading.enumerate():
        if t.name in (THREAD_NAME, PREWARM_THREAD_NAME):  # both end by themselves once their work is done
            t.join(timeout=10)
    alive = [t.name for t in threading.enumerate() if t.name in watched and t.is_alive()]
    assert not leftovers, f"writes still pending after the test: {leftovers}"
    assert not alive, f"threads left running after the test: {alive}"
