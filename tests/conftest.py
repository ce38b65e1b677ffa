"""Shared fixtures: small seeded training setups, tree comparison, and a guard against leaked writer threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from async_ckpt.storage import TMP_MARKER
from async_ckpt.writer import THREAD_NAME, flush_all


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


def make_training(
    seed: int = 0,
    metrics: Sequence[float] = (0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.3, 0.95),
    batches: int = 3,
    fail_at_iteration: int | None = None,
) -> Training:
    """Build an identically seeded training setup; ``fail_at_iteration`` makes that step raise ``RuntimeError``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = [torch.randn(4, 4) for _ in range(batches)]

    def step(engine: Engine, batch: torch.Tensor) -> float:
        if fail_at_iteration is not None and engine.state.iteration == fail_at_iteration:
            raise RuntimeError("boom: injected training failure")
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return float(loss.item())

    engine = Engine(step)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["acc"] = metrics[(e.state.epoch - 1) % len(metrics)]

    return Training(net, opt, engine, data)


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


def clone_tree(tree: Any) -> Any:
    """A deep copy of a state with every tensor cloned (the reference values at an event)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return type(tree)((k, clone_tree(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [clone_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tree(v) for v in tree)
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


@pytest.fixture(autouse=True)
def no_leaked_writer() -> Iterator[None]:
    """Fail a test that leaves the writer thread running (an unclosed saver with work still queued)."""
    yield
    leftovers = flush_all(timeout=30)
    for t in threading.enumerate():
        if t.name == THREAD_NAME:
            t.join(timeout=10)
    alive = [t.name for t in threading.enumerate() if t.name in (THREAD_NAME, "async_ckpt-stage") and t.is_alive()]
    assert not leftovers, f"writes still pending after the test: {leftovers}"
    assert not alive, f"threads left running after the test: {alive}"
