"""Staging buffers: 4 KiB-aligned slices of one arena, a small padding footprint, and a cached plan that never
serves a stale copy when the state changes between saves."""

from __future__ import annotations

import pytest
import torch

from async_ckpt import SnapshotError
from async_ckpt.pipeline._staging_buffers import STAGING_ALIGN, geometry
from async_ckpt.pipeline.snapshot import Stager


def _mixed_state() -> list[torch.Tensor]:
    """Storages of awkward sizes, small and large, interleaved, with a shared storage and an offset view."""
    base = torch.arange(5000, dtype=torch.float32)
    return [
        torch.randn(3),
        torch.randn(1025),  # 4100 bytes: just over a page
        base,
        base[7:1007].view(10, 100),
        torch.ones(2, dtype=torch.int8),
        torch.randn(64, 64).double(),
        torch.tensor(3, dtype=torch.int64),
        torch.empty(0),
    ]


def test_large_buffers_start_on_4k_boundaries_and_small_ones_pack() -> None:
    """Every buffer of at least 4 KiB starts on a 4 KiB boundary (direct I/O can write from it), smaller ones on
    64 bytes, and the padding is under a page per large buffer plus 64 bytes per small one."""
    src = _mixed_state()
    stager = Stager(max_pending=1)
    staged = stager.stage(src)
    assert staged is not None
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in staged.views}
    for ptr, n in storages.items():
        assert ptr % (STAGING_ALIGN if n >= STAGING_ALIGN else 64) == 0, (ptr, n)
    large = sum(1 for n in storages.values() if n >= STAGING_ALIGN)
    assert staged.nbytes == sum(storages.values())
    assert staged.footprint - staged.nbytes < STAGING_ALIGN * (large + 1) + 64 * len(storages)
    assert staged.footprint % STAGING_ALIGN == 0 and stager.footprint_bytes() == staged.footprint
    for view, t in zip(staged.views, src, strict=True):
        assert torch.equal(view, t) and view.stride() == t.stride() and view.storage_offset() == t.storage_offset()
    staged.release()


def test_geometry_of_a_typical_model_costs_little_padding() -> None:
    """For an MLP's parameters and Adam state (page-multiple weights, small biases) the arena is within 1% of the
    state's bytes."""
    net = torch.nn.Sequential(*[torch.nn.Linear(1000, 1000) for _ in range(4)], torch.nn.Linear(1000, 10))
    layout = tuple((p.untyped_storage().nbytes(), "cpu") for p in net.parameters()) * 3
    _, total = geometry(layout)
    state = sum(n for n, _ in layout)
    assert state <= total <= state * 1.01


def test_replaced_storage_of_same_shape_is_copied_from_the_new_one() -> None:
    """A parameter given new memory of the same shape between saves is staged from the new memory, not from the
    storage the cached plan saw at the previous save."""
    stager = Stager(max_pending=1)
    w = torch.nn.Parameter(torch.zeros(4096))
    first = stager.stage([w.detach()])
    assert first is not None and torch.equal(first.views[0], torch.zeros(4096))
    first.release()
    w.data = torch.full((4096,), 5.0)
    second = stager.stage([w.detach()])
    assert second is not None and torch.equal(second.views[0], torch.full((4096,), 5.0))
    second.release()


def test_changed_shapes_and_sharing_are_planned_again() -> None:
    """A tensor resized or re-viewed between saves, or two tensors that start sharing a storage, are staged with
    their new shape, stride and sharing."""
    stager = Stager(max_pending=1)
    a, b = torch.arange(12.0), torch.arange(100.0, 112.0)
    for tensors in ([a, b], [a.view(3, 4), b], [a.view(3, 4).t(), a[2:6]], [a.resize_(20).fill_(1.0), b]):
        staged = stager.stage(tensors)
        assert staged is not None
        for view, t in zip(staged.views, tensors, strict=True):
            assert torch.equal(view, t) and view.stride() == t.stride() and view.storage_offset() == t.storage_offset()
        shared = [t.untyped_storage().data_ptr() for t in tensors]
        copied = [v.untyped_storage().data_ptr() for v in staged.views]
        assert (shared[0] == shared[1]) == (copied[0] == copied[1])
        staged.release()


def test_repeated_saves_of_an_unchanged_layout_reuse_the_plan_and_copy_fresh_values() -> None:
    """Saves of a state whose tensors keep their layout (fresh state_dict objects each time) copy the current values
    into the same buffers, with no new allocation."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    stager = Stager(max_pending=1)
    for i in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float(i))
        sd = net.state_dict()
        staged = stager.stage(list(sd.values()))
        assert staged is not None
        assert all(torch.equal(v, t) for v, t in zip(staged.views, sd.values(), strict=True))
        staged.release()
    assert stager.allocations == 1


@pytest.mark.parametrize("cached", [False, True], ids=["first-save", "cached-plan"])
def test_resized_deferred_source_fails_on_a_cached_plan_too(cached: bool) -> None:
    """The check against a deferred source resized in place holds whether or not the plan came from the cache."""
    stager = Stager(max_pending=1)
    grown, neighbour = torch.zeros(1024), torch.arange(4096.0)
    if cached:
        warm = stager.stage([grown, neighbour], defer=[True, False])
        assert warm is not None
        warm.wait_ready()
        warm.release()
    staged = stager.stage([grown, neighbour], defer=[True, False])
    assert staged is not None
    grown.resize_(8192).fill_(7.0)
    staged.guard()
    with pytest.raises(SnapshotError, match="tensor 0"):
        staged.wait_ready()
    assert torch.equal(staged.views[1], torch.arange(4096.0))
    staged.release()


def test_many_small_storages_are_copied_exactly_and_the_padding_stays_zero() -> None:
    """A state of thousands of small storages of awkward sizes and dtypes between large ones (several serial copy
    groups of the arena's small tail) is copied exactly on every save, and no padding byte is ever written."""
    dtypes = (torch.float32, torch.int8, torch.float64, torch.bool, torch.bfloat16, torch.int64)
    small = [torch.randint(0, 100, (1 + i % 97,)).to(dtypes[i % len(dtypes)]) for i in range(1500)]
    large = [torch.randn(1025 + 7 * i) for i in range(5)]  # sizes that leave padding after each page-aligned buffer
    tensors = [t for pair in zip(small, large * 300, strict=True) for t in pair][:1500] + small[750:] + large
    stager = Stager(max_pending=1)
    for save in range(2):
        with torch.no_grad():
            for t in tensors:
                if t.dtype == torch.bool:
                    t.logical_not_()
                else:
                    t.add_(1)
        staged = stager.stage(tensors)
        assert staged is not None
        assert all(torch.equal(v, t) for v, t in zip(staged.views, tensors, strict=True)), save
        arena = staged._bufset.arena if staged._bufset is not None else None
        assert arena is not None
        used = torch.zeros(arena.numel(), dtype=torch.bool)
        base = arena.data_ptr()
        for v in staged.views:
            start = v.untyped_storage().data_ptr() - base
            used[start : start + v.untyped_storage().nbytes()] = True
        assert int(arena[~used].count_nonzero()) == 0
        assert staged.footprint > staged.nbytes
        staged.release()
    assert stager.allocations == 1
    assert sum(t.untyped_storage().nbytes() for t in small) > 3 * 32768  # several serial groups (see _cat_groups)


def _as_int32(a: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int32)


def _shrink(a: torch.Tensor) -> torch.Tensor:
    return a.resize_(5)


def _transpose(a: torch.Tensor) -> torch.Tensor:
    return a.view(2, 6).t_()


def _grow_storage(a: torch.Tensor) -> torch.Tensor:
    a.untyped_storage().resize_(4 * 1000)
    return a


def _set_elsewhere(a: torch.Tensor) -> torch.Tensor:
    return a.set_(torch.arange(50.0, 62.0).untyped_storage())


def _needs_grad(a: torch.Tensor) -> torch.Tensor:
    return a.requires_grad_(True)


def _as_parameter(a: torch.Tensor) -> torch.Tensor:
    return torch.nn.Parameter(a, requires_grad=False)


@pytest.mark.parametrize(
    "change",
    [_as_int32, _shrink, _transpose, _grow_storage, _set_elsewhere, _needs_grad, _as_parameter],
    ids=["dtype-view", "shrunk-in-place", "transposed-in-place", "storage-resized", "set-to-other", "grad", "param"],
)
def test_cached_plan_is_not_reused_after_any_change_of_a_tensor(change: object) -> None:
    """A tensor changed in place between two saves (same Python object, as optimizer state is) or replaced by one
    on the same storage with another dtype, type or requires_grad, is staged as it is now, never as planned."""
    stager = Stager(max_pending=1)
    a, b = torch.arange(12.0), torch.arange(100.0, 112.0)
    warm = stager.stage([a, b])
    assert warm is not None
    warm.release()
    now = [change(a), b]  # type: ignore[operator]
    staged = stager.stage(now)
    assert staged is not None
    for view, t in zip(staged.views, now, strict=True):
        assert type(view) is type(t) and view.dtype == t.dtype and view.requires_grad == t.requires_grad
        assert view.shape == t.shape and view.stride() == t.stride() and view.storage_offset() == t.storage_offset()
        assert torch.equal(view.detach(), t.detach())
        assert view.untyped_storage().nbytes() == t.untyped_storage().nbytes()
    staged.release()
