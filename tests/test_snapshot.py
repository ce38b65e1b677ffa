"""Staging into reusable buffers: exact copies, preserved sharing and layout, bounded memory."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import pytest
import torch
from conftest import clone_tree, trees_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from async_ckpt.pipeline.snapshot import Stager, flatten, unflatten


def _stage_tree(stager: Stager, tree: object, **kwargs: object) -> tuple[object, object]:
    flat = flatten(tree)
    staged = stager.stage(flat.tensors, **kwargs)  # type: ignore[arg-type]
    assert staged is not None
    return unflatten(flat.skeleton, staged.views), staged


def _roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


_leaf = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 7)),
    st.builds(lambda n: torch.ones(n, dtype=torch.int64), st.integers(0, 4)),
)
_trees = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), children, max_size=4),
        st.tuples(children, children),
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(_trees)
def test_flatten_unflatten_roundtrip(tree: object) -> None:
    """Any nested tree of containers, plain values and tensors is rebuilt equal from its skeleton and tensors."""
    flat = flatten(tree)
    assert trees_equal(unflatten(flat.skeleton, flat.tensors), tree)


@settings(max_examples=40, deadline=None)
@given(_trees)
def test_staged_tree_saves_like_the_original(tree: object) -> None:
    """A staged copy serializes to what torch.save of the original state would load as."""
    stager = Stager(max_pending=1)
    staged_tree, staged = _stage_tree(stager, tree)
    assert trees_equal(_roundtrip(staged_tree), _roundtrip(tree))
    staged.release()  # type: ignore[attr-defined]


def test_copy_is_immune_to_in_place_updates() -> None:
    """After stage() returns, in-place writes to parameters, buffers and optimizer state do not reach the copy."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"net": net.state_dict(), "opt": opt.state_dict()}
    expected = clone_tree(state)
    copy, staged = _stage_tree(Stager(1), state)
    with torch.no_grad():
        for t in flatten(state).tensors:
            t.add_(1) if t.dtype != torch.bool else t.logical_not_()
    state["opt"]["param_groups"][0]["lr"] = 123.0
    assert trees_equal(copy, expected)
    staged.release()  # type: ignore[attr-defined]


def test_tied_weights_and_views_keep_sharing_storage() -> None:
    """Tensors that share a storage in the state share one in the copy and in the saved file, as with torch.save."""
    base = torch.arange(12, dtype=torch.float32)
    tree = {"a": base, "tied": base, "view": base[2:8].view(2, 3), "t": base.view(3, 4).t()}
    copy, staged = _stage_tree(Stager(1), tree)
    assert copy["a"].untyped_storage().data_ptr() == copy["tied"].untyped_storage().data_ptr()  # type: ignore[index]
    assert copy["view"].untyped_storage().data_ptr() == copy["a"].untyped_storage().data_ptr()  # type: ignore[index]
    loaded = _roundtrip(copy)
    assert trees_equal(loaded, _roundtrip(tree))
    loaded["a"][0] = 99  # type: ignore[index]
    assert loaded["tied"][0] == 99 and loaded["t"][0, 0] == 99  # type: ignore[index]
    staged.release()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(20, dtype=torch.int64).view(4, 5).t(),
        torch.tensor([True, False, True]),
        torch.randn(3, 4).to(torch.bfloat16),
        torch.randn(6, 6)[1:5:2, ::3],
        torch.tensor(7, dtype=torch.int64),
        torch.empty(0, 3),
    ],
    ids=["noncontig-int64", "bool", "bf16", "strided-offset", "scalar-step", "empty"],
)
def test_dtypes_and_layouts_survive_exactly(tensor: torch.Tensor) -> None:
    """Non-contiguous, offset, integer, bool, bf16, 0-d and empty tensors keep dtype, stride, offset and values."""
    copy, staged = _stage_tree(Stager(1), {"x": tensor})
    out = copy["x"]  # type: ignore[index]
    assert out.dtype == tensor.dtype and out.stride() == tensor.stride()
    assert out.storage_offset() == tensor.storage_offset() and torch.equal(out, tensor)
    assert out.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr() or tensor.numel() == 0
    staged.release()  # type: ignore[attr-defined]


def test_parameters_and_metadata_are_kept() -> None:
    """Parameters stay Parameters, requires_grad is kept, and a module state_dict keeps its _metadata."""
    net = torch.nn.Linear(2, 2)
    tree = {"sd": net.state_dict(), "p": net.weight}
    copy, staged = _stage_tree(Stager(1), tree)
    assert isinstance(copy["p"], torch.nn.Parameter) and copy["p"].requires_grad  # type: ignore[index]
    assert isinstance(copy["sd"], OrderedDict) and copy["sd"]._metadata == tree["sd"]._metadata  # type: ignore[index,attr-defined]
    staged.release()  # type: ignore[attr-defined]


def test_flatten_copies_metadata_deeply_and_keeps_its_sharing() -> None:
    """A state_dict's ``_metadata`` (and a dict subclass's attributes) are copied at the call: later edits of the
    original do not reach the skeleton; an object reached twice is one object in the copy, as in the original and
    as torch.save of the original loads it."""
    shared = {"version": 1}
    sd: OrderedDict[str, object] = OrderedDict(w=torch.ones(2), step=3)
    sd._metadata = OrderedDict([("", shared), ("a", shared), ("b", {"version": 2})])  # type: ignore[attr-defined]
    flat = flatten({"sd": sd, "again": sd})
    shared["version"] = 99
    sd._metadata["b"]["version"] = 98  # type: ignore[attr-defined]
    rebuilt = unflatten(flat.skeleton, flat.tensors)
    for key in ("sd", "again"):
        meta = rebuilt[key]._metadata
        assert type(meta) is OrderedDict and list(meta) == ["", "a", "b"]
        assert meta[""] == {"version": 1} and meta["b"] == {"version": 2} and meta[""] is meta["a"]
        assert list(rebuilt[key].items())[1] == ("step", 3) and rebuilt[key]["w"] is sd["w"]
    assert rebuilt["sd"] is rebuilt["again"] and len(flat.tensors) == 1
    loaded = _roundtrip({"sd": sd, "again": sd})
    assert loaded["sd"] is loaded["again"]  # type: ignore[index]


def test_unflatten_needs_one_tensor_per_slot_and_fingerprints_compare_skeletons() -> None:
    """unflatten() refuses a tensor list of the wrong length; equal skeletons give equal fingerprints, and any
    change of a non-tensor value or of where a tensor stands changes it."""
    tree = {"a": torch.zeros(2), "b": [torch.ones(1), 5], "c": (torch.zeros(1),)}
    flat = flatten(tree)
    assert len(flat.tensors) == 3
    with pytest.raises(ValueError, match="fewer"):
        unflatten(flat.skeleton, flat.tensors[:2])
    with pytest.raises(ValueError, match="more"):
        unflatten(flat.skeleton, [*flat.tensors, torch.zeros(1)])
    same = flatten({"a": torch.ones(3), "b": [torch.zeros(4), 5], "c": (torch.ones(2),)})
    assert flat.fingerprint() is not None and flat.fingerprint() == same.fingerprint()
    assert flatten({"a": torch.zeros(2), "b": [torch.ones(1), 6], "c": (torch.zeros(1),)}).fingerprint() != (
        flat.fingerprint()
    )
    assert flatten({"a": torch.zeros(2), "b": [5, torch.ones(1)], "c": (torch.zeros(1),)}).fingerprint() != (
        flat.fingerprint()
    )


class _Holder:
    """A user object that holds a tensor in its attributes (pickled by its own ``__reduce_ex__``)."""

    def __init__(self, t: torch.Tensor, note: str) -> None:
        self.t, self.note = t, note


class _Sub(torch.Tensor):
    pass


def test_flatten_finds_tensors_anywhere_and_copies_everything_else() -> None:
    """Tensors inside user objects and tensor subclasses become slots (staged, not pickled by value); values that
    pickle through copyreg (complex, compiled patterns) are copied; the rebuilt tree equals the original."""
    import re

    inner = torch.arange(4.0)
    sub = torch.ones(2).as_subclass(_Sub)
    tree = {"obj": _Holder(inner, "x"), "sub": sub, "c": 1 + 2j, "pat": re.compile("a+"), "dtype": torch.float16}
    flat = flatten(tree)
    assert [id(t) for t in flat.tensors] == [id(inner), id(sub)]
    rebuilt = unflatten(flat.skeleton, [t.clone() for t in flat.tensors])
    assert isinstance(rebuilt["obj"], _Holder) and rebuilt["obj"].note == "x" and torch.equal(rebuilt["obj"].t, inner)
    assert rebuilt["obj"].t is not inner and type(rebuilt["sub"]) is _Sub
    assert rebuilt["c"] == 1 + 2j and rebuilt["pat"].pattern == "a+" and rebuilt["dtype"] is torch.float16


def test_flatten_refuses_what_torch_save_cannot_write() -> None:
    """A value that cannot be pickled fails flatten at the call, as torch.save of the state would fail."""
    with pytest.raises(Exception, match="lambda"):
        flatten({"w": torch.ones(1), "fn": lambda: 0})
    buf = io.BytesIO()
    with pytest.raises(Exception, match="lambda"):
        torch.save({"w": torch.ones(1), "fn": lambda: 0}, buf)


def test_buffers_are_reused_and_memory_is_bounded() -> None:
    """A hundred saves of one layout allocate at most max_pending buffer sets and hold constant memory."""
    stager = Stager(max_pending=2)
    src = [torch.randn(1000), torch.randn(10, 10)]
    held = set()
    for i in range(100):
        src[0].add_(1)  # a new version: no reuse of the previous snapshot
        staged = stager.stage(src)
        assert staged is not None and torch.equal(staged.views[0], src[0])
        held.add(stager.memory_bytes())
        staged.release()
        assert i < 1 or stager.allocations <= 2
    assert stager.allocations <= 2 and len(held) == 1


def test_full_pool_blocks_or_reports_none() -> None:
    """With every buffer set in flight, a non-blocking stage returns None and a blocking one waits for a release."""
    stager = Stager(max_pending=1)
    x = torch.zeros(8)
    first = stager.stage([x])
    assert first is not None and not stager.has_free_slot()
    x.add_(1)
    assert stager.stage([x], block=False) is None
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(stager.stage([x])))
    t.start()
    first.release()
    t.join(timeout=10)
    assert not t.is_alive() and got and torch.equal(got[0].views[0], x)  # type: ignore[attr-defined]
    got[0].release()  # type: ignore[attr-defined]


def test_unchanged_state_is_staged_once_per_step() -> None:
    """Staging the same unchanged tensors at the same step reuses the copy; a change or a new step forces a copy."""
    stager = Stager(max_pending=2)
    x = torch.zeros(8)
    a = stager.stage([x], step=1)
    b = stager.stage([x], step=1)
    assert a is not None and b is not None and b.views is a.views and stager.allocations == 1
    a.release()
    b.release()
    c = stager.stage([x], step=1)  # released but untouched: taken back without a copy
    assert c is not None and c.views is a.views
    x.add_(1)
    d = stager.stage([x], step=1)
    assert d is not None and d.views is not a.views and torch.equal(d.views[0], x)
    c.release()
    d.release()
    x.data.add_(1)  # invisible to the version counter: only the new step protects against it
    e = stager.stage([x], step=2)
    assert e is not None and e.views is not d.views and torch.equal(e.views[0], x)
    e.release()
    f = stager.stage([x])  # no step given: never reused
    assert f is not None and f.views is not e.views
    f.release()


def test_deferred_copy_is_ordered_before_guarded_writes() -> None:
    """In overlap mode the copy may finish late, but a write issued after guard() never reaches it."""
    stager = Stager(max_pending=1)
    src = [torch.randn(1 << 16) for _ in range(8)]
    expected = [t.clone() for t in src]
    staged = stager.stage(src, defer=[True] * len(src))
    assert staged is not None and staged.deferred
    staged.guard()
    for t in src:
        t.mul_(0)
    staged.wait_ready()
    assert all(torch.equal(v, e) for v, e in zip(staged.views, expected, strict=True))
    staged.release()


def test_deferred_cpu_copy_is_made_by_the_first_of_writer_and_guard() -> None:
    """On CPU no thread is started for the deferred copy: the writer thread makes it (wait_ready), and the
    training thread's guard then only waits; if the guard comes first, it makes the copy itself."""
    for writer_first in (True, False):
        stager = Stager(max_pending=1)
        src = [torch.randn(1 << 16) for _ in range(4)]
        expected = [t.clone() for t in src]
        staged = stager.stage(src, defer=[True] * len(src))
        assert staged is not None and staged.deferred
        assert "async_ckpt-stage" not in {t.name for t in threading.enumerate()}
        if writer_first:
            writer = threading.Thread(target=staged.wait_ready, name="fake-writer")
            writer.start()
            writer.join()
        staged.guard()
        for t in src:
            t.add_(1)  # after the guard: must not reach the copy
        staged.wait_ready()
        assert all(torch.equal(v, e) for v, e in zip(staged.views, expected, strict=True))
        staged.release()


def test_deferred_cpu_copy_keeps_its_sources_alive() -> None:
    """A deferred source whose last reference the caller drops (an optimizer state replaced before the copy ran)
    is still copied from its own memory: the pending copy holds the storage, not just its address."""
    stager = Stager(max_pending=1)
    src = [torch.randn(1 << 22) for _ in range(4)]  # 16 MiB each: freed memory goes straight back to the OS
    expected = [t.clone() for t in src]
    staged = stager.stage(src, defer=[True] * len(src))
    assert staged is not None and staged.deferred
    del src
    staged.wait_ready()
    assert all(torch.equal(v, e) for v, e in zip(staged.views, expected, strict=True))
    staged.release()


def test_mixed_deferral_copies_shared_storage_eagerly() -> None:
    """A storage is deferred only if every tensor on it is; eager ones are copied before stage() returns."""
    stager = Stager(max_pending=1)
    base = torch.arange(10.0)
    staged = stager.stage([base, base[2:4]], defer=[True, False])
    assert staged is not None and not staged.deferred
    base.zero_()
    assert torch.equal(staged.views[0], torch.arange(10.0))
    staged.release()


def test_copies_of_device_storage_keep_their_device_tag() -> None:
    """A file written from a staged copy records the source device (as torch.save of the original would)."""
    from async_ckpt.pipeline import snapshot

    stager = Stager(max_pending=1)
    x = torch.arange(6.0)
    staged = stager.stage([x])
    assert staged is not None
    buf = staged.views[0]
    key = snapshot._tag(buf, "cuda:3")  # what a buffer set for a GPU layout does
    seen: list[str] = []

    def record(storage: object, location: str) -> object:
        seen.append(location)
        return storage

    try:
        data = io.BytesIO()
        torch.save({"x": buf, "other": x}, data)
    finally:
        snapshot._untag([key])
    data.seek(0)
    loaded = torch.load(data, map_location=record, weights_only=True)
    assert seen == ["cuda:3", "cpu"] and torch.equal(loaded["x"], x)  # an unrelated storage is left alone
    plain = io.BytesIO()
    torch.save({"x": buf}, plain)
    plain.seek(0)
    seen.clear()
    torch.load(plain, map_location=record, weights_only=True)
    assert seen == ["cpu"]
    staged.release()


def test_prewarm_allocates_up_front_within_the_bound() -> None:
    """prewarm() fills the pool to max_pending sets for the layout, and the next saves allocate nothing."""
    stager = Stager(max_pending=2)
    src = [torch.randn(1000), torch.randn(10, 10)]
    assert stager.prewarm(src) == 2 and stager.allocations == 2
    assert stager.prewarm(src) == 0
    a = stager.stage(src)
    src[0].add_(1)
    b = stager.stage(src)
    assert a is not None and b is not None and stager.allocations == 2 and a.alloc_s == 0.0 and b.alloc_s == 0.0
    assert torch.equal(b.views[0], src[0])
    a.release()
    b.release()


def test_deferred_copy_of_a_storage_resized_in_place_fails_without_overrunning() -> None:
    """A deferred source whose storage was resized in place before its copy ran fails that save with a
    SnapshotError naming the storage, and never writes past its slice into a neighbouring buffer."""
    from async_ckpt import SnapshotError

    stager = Stager(max_pending=1)
    grown = torch.zeros(1024)  # 4 KiB: its slice ends where the next buffer starts
    neighbour = torch.arange(4096, dtype=torch.float32)
    staged = stager.stage([grown, neighbour], defer=[True, False])
    assert staged is not None and staged.deferred
    grown.resize_(4 * 1024)  # in place: same storage object, four times the bytes, new memory
    grown.fill_(7.0)
    staged.guard()  # the training thread's step pre-hook must not raise: the writer reports the save
    with pytest.raises(SnapshotError, match="resized") as info:
        staged.wait_ready()
    assert "tensor 0" in str(info.value) and "eager" in str(info.value)
    assert torch.equal(staged.views[1], torch.arange(4096, dtype=torch.float32))
    staged.release()


_TAGGER_CLASH = """
import io, sys, torch

def other_tag(storage):
    return None

def other_restore(storage, location):
    return None

torch.serialization.register_package(0, other_tag, other_restore)  # a library imported before async_ckpt
import async_ckpt
from async_ckpt.pipeline import snapshot

buf = torch.arange(4.0)
key = snapshot._tag(buf, "cuda:1")  # what staging a GPU state does
for priority in range(-1, 10):  # libraries imported later, at the priorities one picks to precede "cpu"
    torch.serialization.register_package(priority, other_tag, other_restore)
seen = []
data = io.BytesIO()
torch.save({"staged": buf, "user": torch.ones(2)}, data)
data.seek(0)
torch.load(data, map_location=lambda s, loc: seen.append(loc) or s, weights_only=True)
assert seen == ["cuda:1", "cpu"], seen
print("ok")
"""


def test_location_tagger_coexists_with_other_libraries_taggers() -> None:
    """Other libraries registering torch.serialization taggers at priority 0-9, before or after async_ckpt is
    imported, neither fail nor break torch.save, and staged buffers still record their source device."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TAGGER_CLASH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_sparse_tensors_are_cloned_and_a_failed_stage_gives_its_buffers_back() -> None:
    """A sparse tensor replacing a dense one is staged as a whole clone (counted by its dense size); a tensor that
    cannot be copied (meta) fails the call without keeping the buffer set, so the next save is not blocked."""
    stager = Stager(max_pending=1)
    dense, other = torch.arange(12.0), torch.arange(4.0)
    first = stager.stage([dense, other])
    assert first is not None
    first.release()
    sparse = dense.to_sparse()
    staged = stager.stage([sparse, other], block=False)
    assert staged is not None and staged.views[0].is_sparse
    assert torch.equal(staged.views[0].to_dense(), dense) and staged.nbytes == dense.nbytes + other.nbytes
    staged.release()
    with pytest.raises(NotImplementedError):
        stager.stage([torch.empty(12, device="meta"), other])
    again = stager.stage([dense, other], block=False)
    assert again is not None and torch.equal(again.views[0], dense)
    again.release()
