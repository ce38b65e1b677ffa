"""CUDA staging: pinned buffers, side-stream copies ordered against the compute stream (skipped without a GPU)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from conftest import clone_tree, trees_equal
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.snapshot import Stager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _devices() -> list[Any]:
    return ["cpu", pytest.param("cuda", marks=cuda)]


@cuda
def test_buffers_are_pinned_and_copy_waits_on_compute_stream() -> None:
    """Host buffers for GPU state are pinned, and the copy sees work queued on the compute stream before the event."""
    x = torch.zeros(1 << 24, device="cuda")
    torch.cuda.synchronize()
    x.add_(1)  # queued, possibly still running, when stage() is called
    stager = Stager(max_pending=1)
    staged = stager.stage([x])
    assert staged is not None
    x.add_(1)  # queued after the event: must not reach the copy
    staged.wait_ready()
    assert staged.views[0].is_pinned()
    assert torch.all(staged.views[0] == 1)
    staged.release()


@cuda
def test_deferred_cuda_copy_is_guarded_by_stream_wait() -> None:
    """Overlap mode on CUDA: a write issued after guard() on the compute stream runs after the copy."""
    x = torch.randn(1 << 24, device="cuda")
    expected = x.cpu()
    staged = Stager(max_pending=1).stage([x], defer=[True])
    assert staged is not None and staged.deferred
    staged.guard()
    x.mul_(0)
    staged.wait_ready()
    assert torch.equal(staged.views[0], expected)
    staged.release()


@cuda
def test_deferred_copy_holds_sources_until_recorded_on_side_stream() -> None:
    """Overlap mode issues copies on a background thread: a source dropped right after stage() is still copied
    from its values at the event, even if the caching allocator could hand its memory to a new tensor."""
    stager = Stager(max_pending=1)
    x = torch.randn(1 << 24, device="cuda")
    expected = x.cpu()
    staged = stager.stage([x], defer=[True])
    assert staged is not None
    del x
    y = torch.full((1 << 24,), 7.0, device="cuda")  # would reuse x's block if nothing protected it
    staged.wait_ready()
    assert torch.equal(staged.views[0], expected)
    assert torch.all(y == 7)
    staged.release()


@cuda
def test_eager_and_deferred_copies_on_one_device_both_see_the_event() -> None:
    """A snapshot with eager (buffers) and deferred (parameters) storages on one GPU copies each at the event."""
    a = torch.randn(1 << 20, device="cuda")
    b = torch.randn(1 << 20, device="cuda")
    want_a, want_b = a.cpu(), b.cpu()
    staged = Stager(max_pending=1).stage([a, b], defer=[False, True])
    assert staged is not None
    a.add_(1)  # ordered after the eager copy by the compute stream's wait
    staged.guard()
    b.add_(1)  # ordered after the deferred copy by the guard
    staged.wait_ready()
    assert torch.equal(staged.views[0], want_a) and torch.equal(staged.views[1], want_b)
    staged.release()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mode", ["eager", "overlap"])
def test_training_state_at_event_on_device(tmp_path: os.PathLike[str], device: str, mode: str) -> None:
    """On CPU and GPU, in both modes, each file equals the state at its event while training mutates it after."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)).to(device)
    net[0].weight.data = net[0].weight.data.t().contiguous().t()  # non-contiguous parameter
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    extra = {"mask": torch.ones(16, dtype=torch.bool, device=device), "half": torch.randn(8, device=device).bfloat16()}

    class Extra:
        def state_dict(self) -> dict[str, torch.Tensor]:
            return extra

    def step(engine: Engine, batch: torch.Tensor) -> None:
        opt.zero_grad()
        net(batch.to(device)).pow(2).mean().backward()
        opt.step()

    engine = Engine(step)
    expected: dict[int, Any] = {}

    @engine.on(Events.ITERATION_COMPLETED)
    def _reference(e: Engine) -> None:
        state = {"net": net.state_dict(), "opt": opt.state_dict(), "extra": extra}
        expected[e.state.iteration] = clone_tree(state, "cpu")

    saver = AsyncCheckpointSaver(
        str(tmp_path),
        {"net": net, "opt": opt, "extra": Extra()},
        save_interval=1,
        epoch_level=False,
        snapshot_mode=mode,
    )
    saver.attach(engine)

    @engine.on(Events.ITERATION_COMPLETED)
    def _mutate_extra(e: Engine) -> None:  # not an optimizer-owned tensor: staged eagerly in both modes
        extra["mask"].logical_not_()
        extra["half"].add_(1)

    engine.run([torch.randn(32, 64) for _ in range(4)], max_epochs=2)
    saver.close()
    for it, state in expected.items():
        loaded = torch.load(os.path.join(tmp_path, f"checkpoint_iteration={it}.pt"), map_location="cpu")
        assert trees_equal(loaded, state), it


@cuda
def test_pinned_staging_is_one_registered_arena_not_rounded_up() -> None:
    """GPU state is staged into one page-locked arena: the buffers are pinned, hold the values at the event, and take
    the state's bytes plus under a page of padding each, not the power-of-two rounding of torch's host allocator."""
    src = [torch.randn((1 << 20) + 1, device="cuda") for _ in range(3)]  # 4 MiB + 4 B each: 8 MiB when rounded up
    expected = [t.cpu() for t in src]
    stager = Stager(max_pending=1)
    staged = stager.stage(src)
    assert staged is not None
    staged.wait_ready()
    assert all(v.is_pinned() for v in staged.views)
    assert all(torch.equal(v, e) for v, e in zip(staged.views, expected, strict=True))
    nbytes = sum(t.untyped_storage().nbytes() for t in src)
    assert nbytes <= stager.footprint_bytes() < nbytes + 4 * 4096
    assert all(v.untyped_storage().data_ptr() % 4096 == 0 for v in staged.views)
    staged.release()
    stager.close()


@cuda
def test_prewarm_pins_in_the_background_and_the_first_gpu_save_allocates_nothing() -> None:
    """prewarm_async of a GPU state registers the arena off the training thread; the first save then allocates
    nothing and copies exact values into pinned memory."""
    src = [torch.randn(1 << 20, device="cuda"), torch.arange(10, device="cuda")]
    stager = Stager(max_pending=1)
    stager.prewarm_async(src)
    assert stager.join_prewarm(60) and stager.allocations == 1
    staged = stager.stage(src)
    assert staged is not None and stager.allocations == 1
    staged.wait_ready()
    assert staged.views[0].is_pinned() and torch.equal(staged.views[1], torch.arange(10))
    staged.release()
    stager.close()
