"""Staging: turn a nested ``state_dict`` into a training-safe CPU copy held in reusable buffers.

The training thread calls :meth:`Stager.stage` at the checkpoint event. Every tensor storage reachable from the
state is copied once into a CPU buffer of the same byte size, and every tensor is rebuilt as a view of its buffer
with the same dtype, offset, size and stride. Tensors that shared a storage (tied weights, views) therefore still
share one in the copy, exactly as ``torch.save`` would write them. Non-tensor leaves are deep-copied.

Buffers are grouped in *buffer sets*, one per snapshot in flight. A set is allocated once for a state layout (the
byte sizes of its storages) and reused for every later save with the same layout, so a save costs one copy, not an
allocation. When the state lives on a GPU the buffers are pinned and the copies run ``non_blocking`` on a side
stream; :meth:`Staged.wait_ready` (called by the writer thread, never the training thread) waits for them, and
makes the deferred CPU copies of overlap mode that the training thread has not needed yet.

This module touches no files. The only threads it starts end with their work: copy helpers joined inside the
call that started them, and the thread that issues the deferred CUDA copies of overlap mode.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import mmap
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict

from async_ckpt.errors import SnapshotError

__all__ = ["Flat", "Staged", "Stager", "flatten", "unflatten"]

logger = logging.getLogger("async_ckpt")


@dataclass(frozen=True)
class _Slot:
    """Placeholder for the ``index``-th tensor in a flattened tree."""

    index: int


@dataclass
class Flat:
    """A nested state split into a tensor-free skeleton and its tensors.

    Attributes:
        skeleton: the tree with every tensor replaced by a ``_Slot``; non-tensor leaves are deep copies.
        tensors: the source tensors, in slot order.
    """

    skeleton: Any
    tensors: list[torch.Tensor]

    def fingerprint(self) -> bytes | None:
        """Bytes that are equal for equal skeletons, or ``None`` when the skeleton cannot be pickled."""
        try:
            return pickle.dumps(self.skeleton, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None


def flatten(tree: Any) -> Flat:
    """Split ``tree`` into a skeleton and its tensors; non-tensor leaves are deep-copied.

    Containers keep their type (``OrderedDict`` stays ``OrderedDict``) and their attributes (a module
    ``state_dict``'s ``_metadata``), so the rebuilt tree pickles to what ``torch.save`` would have written.

    Raises:
        Exception: whatever ``copy.deepcopy`` raises for a leaf that cannot be copied.
    """
    tensors: list[torch.Tensor] = []
    memo: dict[int, Any] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return _Slot(len(tensors) - 1)
        if isinstance(node, dict):
            out = copy.copy(node)  # keeps the dict subclass and shallow-copies its attributes
            if hasattr(node, "__dict__"):
                out.__dict__.update(copy.deepcopy(node.__dict__, memo))
            for key, value in node.items():
                out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(walk(v) for v in node)
        if isinstance(node, tuple):  # namedtuple
            return type(node)(*(walk(v) for v in node))
        return copy.deepcopy(node, memo)

    return Flat(walk(tree), tensors)


def unflatten(skeleton: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild a tree from ``skeleton``, putting ``tensors[i]`` where ``_Slot(i)`` stands."""

    def walk(node: Any) -> Any:
        if isinstance(node, _Slot):
            return tensors[node.index]
        if isinstance(node, dict):
            out = copy.copy(node)
            for key, value in node.items():
                out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(walk(v) for v in node)
        if isinstance(node, tuple):
            return type(node)(*(walk(v) for v in node))
        return node

    return walk(skeleton)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_plain_strided(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN_TYPES and t.layout == torch.strided and not t.is_quantized and not t.is_meta


def _tensor_signature(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...] | None:
    """What must be unchanged for an earlier copy of ``tensors`` to still be exact (``None``: cannot tell)."""
    sig = []
    try:
        for t in tensors:
            sig.append(
                (
                    type(t),
                    t.device,
                    t.dtype,
                    t.untyped_storage().data_ptr(),
                    t.storage_offset(),
                    tuple(t.shape),
                    t.stride(),
                    t._version,
                    t.requires_grad,
                )
            )
    except RuntimeError:  # inference tensors have no version counter
        return None
    return tuple(sig)


@dataclass
class _Plan:
    """How the tensors of one state map onto storages: computed on every stage, so kept to a few attribute reads.

    No tensor is created here (a ``torch.empty().set_()`` costs ~5 us, which is most of a plan over thousands of
    tensors); copies work from storage addresses (CPU) or build byte views where they are issued (CUDA).
    """

    storages: list[torch.UntypedStorage]  # each distinct source storage
    holders: list[torch.Tensor]  # a tensor on each storage (keeps it alive; its device; record_stream)
    owner: list[int]  # tensor index -> storage index, or -1 for a tensor cloned as a whole
    first: list[int]  # storage index -> index of the first tensor on it (named in error messages)
    layout: tuple[tuple[int, str], ...]  # (nbytes, source device) per storage

    @property
    def on_cuda(self) -> bool:
        return any(d.startswith("cuda") for _, d in self.layout)


def _plan(tensors: Sequence[torch.Tensor]) -> _Plan:
    storages: list[torch.UntypedStorage] = []
    holders: list[torch.Tensor] = []
    sizes: list[tuple[int, str]] = []
    index: dict[tuple[int, int, torch.device], int] = {}
    names: dict[torch.device, str] = {}
    owner: list[int] = []
    first: list[int] = []
    for i, t in enumerate(tensors):
        if not _is_plain_strided(t):
            owner.append(-1)
            continue
        st = t.untyped_storage()
        n = st.nbytes()
        device = t.device
        key = (st.data_ptr(), n, device)
        o = index.get(key) if n else None
        if o is None:
            o = index[key] = len(storages)
            storages.append(st)
            holders.append(t)
            first.append(i)
            name = names.get(device)
            if name is None:
                name = names[device] = str(device)
            sizes.append((n, name))
        owner.append(o)
    return _Plan(storages, holders, owner, first, tuple(sizes))


# Host buffers that hold copies of device storages, by address, with the device they came from. torch.save asks
# its registered "taggers" for each storage's location, in priority order; ours answers for these buffers only, so
# a file written from a GPU state records "cuda:N" like torch.save of the original state (and MONAI's files) does,
# and torch.load restores it where it would have restored the original. For every other storage it answers None.
_DEVICE_OF_BUFFER: dict[tuple[int, int], str] = {}

# torch runs taggers in ascending priority (its own use 10-26; ours must precede "cpu" at 10), and sorts the
# registry as tuples, so two taggers at one priority make the sort compare functions and raise. An unusual negative
# priority keeps ours away from the 0-9 that other libraries pick; it is registered on first use, not at import.
_TAGGER_PRIORITY = -7919
_tagger_lock = threading.Lock()
_tagger_registered = False


def _tag_staged_storage(storage: Any) -> str | None:
    if not _DEVICE_OF_BUFFER:
        return None
    try:
        key = (storage.data_ptr(), storage.nbytes())
    except (AttributeError, RuntimeError):
        return None
    return _DEVICE_OF_BUFFER.get(key)


def _no_restore(storage: Any, location: str) -> None:
    return None  # restoring is left to torch's own deserializers


def _register_tagger() -> None:
    """Register the tagger with ``torch.serialization`` once, at a priority no registered tagger uses."""
    global _tagger_registered
    with _tagger_lock:
        if _tagger_registered:
            return
        # Read-only look at torch's registry, only to avoid a priority someone already took.
        taken = {entry[0] for entry in getattr(torch.serialization, "_package_registry", ())}
        priority = _TAGGER_PRIORITY
        while priority in taken:
            priority -= 1
        torch.serialization.register_package(priority, _tag_staged_storage, _no_restore)
        _tagger_registered = True


def _tag(buffer: torch.Tensor, device: str) -> tuple[int, int]:
    """Make ``torch.save`` record ``buffer``'s storage as being on ``device``; returns the key for :func:`_untag`."""
    _register_tagger()
    key = (buffer.data_ptr(), buffer.untyped_storage().nbytes())
    _DEVICE_OF_BUFFER[key] = device
    return key


def _untag(keys: list[tuple[int, int]]) -> None:
    for key in keys:
        _DEVICE_OF_BUFFER.pop(key, None)


_HUGE_PAGE = 2 << 20


_ALIGN = 64  # bytes between buffers in an arena: any dtype's view of a buffer starts aligned


def _arena(layout: tuple[tuple[int, str], ...]) -> tuple[torch.Tensor | None, list[torch.Tensor], list[int]]:
    """One anonymous mapping holding every buffer of a layout, each buffer its own storage over a slice of it.

    Returns the whole arena as a byte tensor (``None`` where the platform lacks private anonymous mappings; then
    the buffers are separate allocations), the buffers, and the padding after each buffer. On Linux the mapping is
    advised ``MADV_HUGEPAGE`` and faults in 2 MiB at a time: measured here, touching a fresh 2 GiB buffer took
    0.16 s instead of 0.5 s, and copies into it ran 5-10% faster (fewer TLB misses). A single ``torch.cat``
    into the arena then copies a whole state at ``copy_`` speed (one parallel op instead of one per storage),
    while ``torch.save`` still sees one storage per buffer and writes the same records as for the original state.
    """
    pads = [-n % _ALIGN for n, _ in layout]
    total = sum(n + p for (n, _), p in zip(layout, pads, strict=True))
    if total == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return None, [torch.empty(n, dtype=torch.uint8) for n, _ in layout], pads
    area = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if total >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            area.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(area, dtype=torch.uint8)  # the tensors keep the mapping alive
    parts, offset = [], 0
    for (n, _), pad in zip(layout, pads, strict=True):
        parts.append(
            torch.frombuffer(area, dtype=torch.uint8, count=n, offset=offset)
            if n
            else torch.empty(0, dtype=torch.uint8)
        )
        offset += n + pad
    return whole, parts, pads


class _BufferSet:
    """Host buffers for one snapshot in flight, one per source storage, kept in a ``TensorDict``.

    Pinned sets (for GPU state) hold one pinned allocation per storage; other sets carve their buffers out of one
    arena (see :func:`_arena`).
    """

    def __init__(self, layout: tuple[tuple[int, str], ...], pin: bool, touch: bool = False) -> None:
        self.layout = layout
        self.pinned = pin
        t0 = time.perf_counter()
        self.arena: torch.Tensor | None = None
        self.pads: list[int] = []
        if pin:
            parts = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n, _ in layout]
        else:
            self.arena, parts, self.pads = _arena(layout)
        self.buffers = TensorDict({str(i): b for i, b in enumerate(parts)}, batch_size=[])
        self.list: list[torch.Tensor] = parts  # indexing the TensorDict costs microseconds per buffer
        if touch:  # fault the pages in now, so the first copy into them runs at memcpy speed
            for b in [self.arena] if self.arena is not None else self.list:
                b.zero_()
        self.alloc_s = time.perf_counter() - t0
        self.nbytes = sum(n for n, _ in layout)
        self.views: list[torch.Tensor] = []
        self.views_meta: tuple[Any, ...] | None = None
        tagged = []
        for i, (n, device) in enumerate(layout):
            if device != "cpu" and n:
                tagged.append(_tag(self.list[i], device))
        if tagged:
            weakref.finalize(self, _untag, tagged)


@dataclass
class Staged:
    """A CPU copy of a state's tensors, valid until its last holder calls :meth:`release`.

    Thread-safety: ``retain``/``release`` may be called from any thread; the views are read-only by contract.
    """

    views: list[torch.Tensor]
    nbytes: int
    signature: tuple[Any, ...] | None
    copy_s: float
    wait_s: float
    alloc_s: float
    _stager: Stager
    _bufset: _BufferSet | None
    _ready: Callable[[], None] | None = None
    _guard: Callable[[], None] | None = None
    _refs: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_ready(self) -> None:
        """Block until every copy into the buffers has finished; make a deferred CPU copy nobody made yet.

        Called by the writer thread before it serializes, never by the training thread.
        """
        if self._ready is not None:
            self._ready()

    def guard(self) -> None:
        """Order a write of a deferred source tensor after its copy (training thread, overlap mode).

        On CPU this makes the copy if the writer thread has not made it yet (or waits for it to finish); on CUDA
        it makes the current stream wait on the copy's event, without a CPU synchronization. A no-op when nothing
        was deferred or the copy already finished.
        """
        if self._guard is not None:
            self._guard()

    @property
    def deferred(self) -> bool:
        """Whether some copies of this snapshot may still be running after ``stage`` returned."""
        return self._guard is not None

    def retain(self) -> bool:
        """Take another reference; ``False`` if the buffers were already returned to the pool."""
        with self._lock:
            if self._refs == 0:
                return False
            self._refs += 1
            return True

    def release(self) -> None:
        """Drop a reference; the last one returns the buffers to the stager's pool."""
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last and self._bufset is not None:
            self._stager._give_back(self._bufset)


class Stager:
    """Copies states into a bounded pool of reusable buffer sets.

    At most ``max_pending`` snapshots hold buffers at once; :meth:`stage` waits (or, with ``block=False``,
    returns ``None``) when all are taken. Thread-safety: :meth:`stage` is called from one training thread at a
    time; buffers come back from the writer thread through :meth:`Staged.release`.

    Args:
        max_pending: buffer sets that may be in use at once.
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._free: list[_BufferSet] = []
        self._in_use = 0
        self._last: Staged | None = None
        self._streams: dict[torch.device, Any] = {}
        self.allocations = 0
        self._held_bytes = 0

    # -- pool -------------------------------------------------------------------------------------------------
    def has_free_slot(self) -> bool:
        """Whether a snapshot could be staged now without waiting for the writer."""
        with self._cond:
            return self._in_use < self.max_pending

    def _take(self, layout: tuple[tuple[int, str], ...], pin: bool, block: bool) -> tuple[_BufferSet | None, float]:
        t0 = time.perf_counter()
        with self._cond:
            while self._in_use >= self.max_pending:
                if not block:
                    return None, 0.0
                self._cond.wait()
            self._in_use += 1
            match = next((b for b in self._free if b.layout == layout and b.pinned == pin), None)
            if match is not None:
                self._free.remove(match)
            elif self._free and len(self._free) + self._in_use > self.max_pending:
                # a set for another layout: drop it so memory stays bounded
                self._held_bytes -= self._free.pop(0).nbytes
        waited = time.perf_counter() - t0
        if match is None:
            try:
                match = self._allocate(layout, pin, touch=False)
            except (RuntimeError, MemoryError) as exc:  # out of (pinned) host memory: give the slot back
                with self._cond:
                    self._in_use -= 1
                    self._cond.notify_all()
                need = sum(n for n, _ in layout) / 2**20
                raise SnapshotError(
                    f"cannot allocate {need:.0f} MiB of {'pinned ' if pin else ''}host memory to stage the state "
                    f"({exc}). Each snapshot in flight holds a full copy: lower max_pending (now "
                    f"{self.max_pending}), free host memory, or save less state."
                ) from exc
        return match, waited

    def _allocate(self, layout: tuple[tuple[int, str], ...], pin: bool, touch: bool) -> _BufferSet:
        bufset = _BufferSet(layout, pin, touch)
        with self._cond:
            self.allocations += 1
            self._held_bytes += bufset.nbytes
        logger.info(
            "async_ckpt: allocated %.1f MiB of %sstaging buffers in %.3fs",
            bufset.nbytes / 2**20,
            "pinned " if pin else "",
            bufset.alloc_s,
        )
        return bufset

    def prewarm(self, tensors: Sequence[torch.Tensor]) -> int:
        """Allocate (and touch) every buffer set for the layout of ``tensors`` now, off the first save's clock.

        Pinned allocation in particular is slow (seconds for tens of GiB). Sets for the layout that are already
        held count; free sets for another layout (an earlier prewarm, before the optimizer created its state) are
        dropped; the pool never holds more than ``max_pending`` sets.

        Returns:
            How many buffer sets were allocated.
        """
        plan = _plan(tensors)
        pin = plan.on_cuda and torch.cuda.is_available()
        with self._cond:
            for stale in [b for b in self._free if b.layout != plan.layout or b.pinned != pin]:
                self._free.remove(stale)
                self._held_bytes -= stale.nbytes
        made = 0
        while True:
            with self._cond:
                if len(self._free) + self._in_use >= self.max_pending:
                    return made
            bufset = self._allocate(plan.layout, pin, touch=True)
            bufset.alloc_s = 0.0  # paid here, not by a save
            with self._cond:
                self._free.append(bufset)
                self._cond.notify_all()
            made += 1

    def _give_back(self, bufset: _BufferSet) -> None:
        with self._cond:
            self._in_use -= 1
            self._free.append(bufset)
            self._cond.notify_all()

    def _reclaim(self, bufset: _BufferSet) -> bool:
        """Take ``bufset`` out of the free list untouched, if it is there and a slot is free."""
        with self._cond:
            if bufset in self._free and self._in_use < self.max_pending:
                self._free.remove(bufset)
                self._in_use += 1
                return True
            return False

    def memory_bytes(self) -> int:
        """Bytes held by all buffer sets, free or in use (for telemetry and tests)."""
        with self._cond:
            return self._held_bytes

    # -- staging ----------------------------------------------------------------------------------------------
    def stage(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        block: bool = True,
        reuse: bool = True,
        defer: Sequence[bool] | None = None,
        step: Any = None,
    ) -> Staged | None:
        """Copy ``tensors`` into host buffers and return views of the copies.

        Args:
            tensors: source tensors, any device.
            block: wait for a free buffer set when all ``max_pending`` are in flight; if ``False``, return
                ``None`` instead.
            reuse: if the previous snapshot was taken at the same ``step`` of exactly these, unchanged tensors
                (same storages, shapes and version counters), return it again instead of copying. Requiring the
                same step matters: in-place writes through ``.data`` do not bump version counters.
            defer: per tensor, whether its copy may finish after this call returns (overlap mode). A storage is
                deferred only if every tensor on it is. Deferred CPU copies run in the first of
                :meth:`Staged.wait_ready` (the writer thread) and :meth:`Staged.guard`; deferred CUDA copies are
                issued by a background thread on the side stream without holding back the compute stream. The
                caller must make every writer of those tensors wait for :meth:`Staged.guard` first.

        Returns:
            The staged copy (the caller owns one reference), or ``None`` when ``block`` is false and no buffer
            set is free.
        """
        signature = _tensor_signature(tensors) if reuse and step is not None else None
        if signature is not None:
            signature = (step, signature)
        last = self._last
        if signature is not None and last is not None and last.signature == signature:
            if last.retain():
                return last
            if last._bufset is not None and self._reclaim(last._bufset):
                again = Staged(
                    last.views, last.nbytes, signature, 0.0, 0.0, 0.0, self, last._bufset, last._ready, last._guard
                )
                self._last = again
                return again

        plan = _plan(tensors)
        late = [False] * len(plan.storages)
        if defer is not None:
            late = [True] * len(plan.storages)
            for flag, o in zip(defer, plan.owner, strict=True):
                if o >= 0 and not flag:
                    late[o] = False
        pin = plan.on_cuda and torch.cuda.is_available()
        bufset, waited = self._take(plan.layout, pin, block)
        if bufset is None:
            return None
        t0 = time.perf_counter()
        try:
            copies = [
                _Copy(st, holder, buf, flag, index, n)
                for st, holder, buf, flag, index, (n, _) in zip(
                    plan.storages, plan.holders, bufset.list, late, plan.first, plan.layout, strict=True
                )
            ]
            ready, guard = self._copy(copies, bufset)
            views = self._cached_views(bufset, tensors, plan, bufset.list)
        except BaseException:
            self._give_back(bufset)
            raise
        staged = Staged(
            views=views,
            nbytes=bufset.nbytes + sum(v.nbytes for v, o in zip(views, plan.owner, strict=True) if o < 0),
            signature=signature,
            copy_s=time.perf_counter() - t0,
            wait_s=waited,
            alloc_s=bufset.alloc_s,
            _stager=self,
            _bufset=bufset,
            _ready=ready,
            _guard=guard,
        )
        bufset.alloc_s = 0.0  # paid once
        self._last = staged
        return staged

    def _cached_views(
        self, bufset: _BufferSet, tensors: Sequence[torch.Tensor], plan: _Plan, buffers: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The views of ``bufset`` for ``tensors``: the previous ones if every tensor has the same metadata."""
        if any(o < 0 for o in plan.owner):  # whole-tensor clones are fresh every time
            return list(self._views(tensors, plan, buffers))
        meta = tuple(
            (o, t.dtype, t.storage_offset(), t.shape, t.stride(), type(t), t.requires_grad)
            for t, o in zip(tensors, plan.owner, strict=True)
        )
        if bufset.views_meta != meta:
            bufset.views = list(self._views(tensors, plan, buffers))
            bufset.views_meta = meta
        return list(bufset.views)  # a new list: list identity marks "the same snapshot" (see SavePipeline)

    @staticmethod
    def _views(tensors: Sequence[torch.Tensor], plan: _Plan, buffers: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for t, o in zip(tensors, plan.owner, strict=True):
            if o < 0:
                yield t.detach().to("cpu", copy=True)
                continue
            v = torch.empty(0, dtype=t.dtype).set_(
                buffers[o].untyped_storage(), t.storage_offset(), t.size(), t.stride()
            )
            if isinstance(t, torch.nn.Parameter):
                v = torch.nn.Parameter(v, requires_grad=t.requires_grad)
            elif t.requires_grad:
                v.requires_grad_(True)
            yield v

    def _copy(
        self, copies: list[_Copy], bufset: _BufferSet
    ) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
        """Copy each source storage into its buffer; return (wait-for-all, guard-for-deferred) callables or None."""
        waits: list[Callable[[], None]] = []
        guards: list[Callable[[], None]] = []
        on_cuda = [c for c in copies if c.holder.is_cuda]
        if on_cuda:
            wait, guard = self._copy_cuda(on_cuda)
            waits.append(wait)
            if guard is not None:
                guards.append(guard)
        on_cpu = [c for c in copies if c.holder.device.type == "cpu"]
        for c in copies:  # other accelerators: a plain blocking copy
            if not c.holder.is_cuda and c.holder.device.type != "cpu":
                c.buffer.copy_(c.source())
        if bufset.arena is not None and len(on_cpu) == len(copies) and not any(c.late for c in on_cpu):
            _cat_copy(on_cpu, bufset.arena, bufset.pads)  # the whole state in one parallel op
        else:
            host_now = [c.span() for c in on_cpu if not c.late]
            if host_now:
                _parallel_memmove(host_now, torch.get_num_threads())
        host_late = [c for c in on_cpu if c.late]
        if host_late:
            # No thread of its own (starting one cost the training thread 0.5-3 ms): the writer thread copies
            # just before it serializes, or the optimizer's step pre-hook does, whichever comes first. The job
            # holds the _Copy objects, so the source storages stay alive until it has run.
            once = _Once(functools.partial(_memmove_copies, host_late))
            waits.append(once.run)
            guards.append(once.run_quietly)  # a failure is the writer's to report, for that save only

        def run_all(fns: list[Callable[[], None]]) -> Callable[[], None] | None:
            if not fns:
                return None

            def call() -> None:
                for fn in fns:
                    fn()

            return call

        return run_all(waits), run_all(guards)

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            self._streams[device] = stream
        return stream

    def _copy_cuda(self, copies: list[_Copy]) -> tuple[Callable[[], None], Callable[[], None] | None]:
        """Issue device-to-host copies on a side stream ordered after the compute stream.

        The side stream first waits for the work already queued on each source device's current stream, so it
        copies the values at the event; the sources are recorded on the side stream so the caching allocator
        cannot hand their memory to someone else before the copy ran. For eager copies, the current stream then
        waits for the copy-done event, so any later kernel that writes the sources runs after the copy, without
        the CPU ever synchronizing.

        Deferred copies are issued by a named background thread, because issuing thousands of copies costs the
        CPU milliseconds that the training thread should not pay. The side stream waits on an event recorded on
        the compute stream at the call, so it still copies the values at the event, and the thread holds the
        sources until they are recorded on the side stream. Deferred copies do not hold back the compute stream:
        the returned guard (called from the optimizer's step pre-hook) waits until they are issued, then makes
        the *then* current stream wait for them.
        """
        done_events: list[torch.cuda.Event] = []
        issuers: list[tuple[torch.device, _Background, list[torch.cuda.Event]]] = []
        for device in {c.holder.device for c in copies}:
            stream = self._side_stream(device)
            compute = torch.cuda.current_stream(device)
            now = [c for c in copies if c.holder.device == device and not c.late]
            later = [c for c in copies if c.holder.device == device and c.late]
            if now:
                stream.wait_stream(compute)
                with torch.cuda.stream(stream):
                    done = _issue_d2h(now, stream)
                done_events.append(done)
                compute.wait_event(done)
            if later:
                at_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                at_event.record(compute)
                box: list[torch.cuda.Event] = []
                issue = functools.partial(_issue_d2h_after, device, stream, at_event, later, box)
                issuers.append((device, _Background("async_ckpt-stage", issue), box))

        def ready() -> None:
            for e in done_events:
                e.synchronize()
            for _, issuer, box in issuers:
                issuer.wait()
                box[0].synchronize()

        if not issuers:
            return ready, None

        def guard() -> None:
            for device, issuer, box in issuers:
                issuer.wait()
                torch.cuda.current_stream(device).wait_event(box[0])

        return ready, guard


@dataclass
class _Copy:
    """One source storage to copy into its host buffer."""

    storage: torch.UntypedStorage
    holder: torch.Tensor  # a tensor viewing ``storage``
    buffer: torch.Tensor  # uint8 host buffer of the storage's byte size
    late: bool  # deferred (overlap mode)
    index: int  # the first tensor on ``storage``, in the order given to ``stage``
    nbytes: int  # the storage's byte size at the event: the size of ``buffer``

    def source(self) -> torch.Tensor:
        """The source storage as a byte tensor."""
        return torch.empty(0, dtype=torch.uint8, device=self.holder.device).set_(self.storage)

    def span(self) -> tuple[int, int, int]:
        """(destination address, source address, bytes) for a host-to-host memmove.

        Raises:
            SnapshotError: the storage was resized in place since the event (a deferred copy): its memory was
                replaced, so the values at the event are gone, and copying its new size would overrun the buffer.
        """
        self.check()
        return self.buffer.data_ptr(), self.storage.data_ptr(), self.nbytes

    def check(self) -> None:
        """Raise ``SnapshotError`` if the storage was resized in place since the event (see :meth:`span`)."""
        now = self.storage.nbytes()
        if now != self.nbytes:
            raise SnapshotError(
                f"cannot copy the state: the storage of tensor {self.index} ({self.holder.dtype}) was resized in "
                f"place from {self.nbytes} to {now} bytes after the checkpoint event and before its deferred copy "
                "(snapshot_mode='overlap') ran, so its values at the event are gone. Do not resize tensors of the "
                "saved state (resize_, set_) between a checkpoint event and the next optimizer step, or use "
                "snapshot_mode='eager'."
            )


def _issue_d2h(copies: list[_Copy], stream: Any) -> torch.cuda.Event:
    """Queue ``copies`` on ``stream`` (the current stream), protect their sources, return the done event."""
    for c in copies:
        c.check()
    for c in copies:
        src = c.source()
        c.buffer.copy_(src, non_blocking=True)
        src.record_stream(stream)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record(stream)
    return done


def _issue_d2h_after(
    device: torch.device, stream: Any, at_event: torch.cuda.Event, copies: list[_Copy], box: list[torch.cuda.Event]
) -> None:
    """Background half of deferred CUDA staging: copies ordered after ``at_event``; the done event goes in ``box``."""
    with torch.cuda.device(device), torch.cuda.stream(stream):
        stream.wait_event(at_event)
        box.append(_issue_d2h(copies, stream))
    copies.clear()  # the sources are recorded on the stream now; stop holding them


_ZEROS = torch.zeros(_ALIGN, dtype=torch.uint8)


def _cat_copy(copies: list[_Copy], arena: torch.Tensor, pads: list[int]) -> None:
    """Copy every (CPU) source storage into its slice of ``arena`` with one ``torch.cat``.

    Measured on two cores: 1.04-1.06x a single ``copy_`` of the same bytes, against 1.2-1.5x for one copy per
    storage (a parallel region per storage) and 1.2-1.5x for memmoves split over threads.
    """
    pieces: list[torch.Tensor] = []
    for c, pad in zip(copies, pads, strict=True):
        pieces.append(c.source())
        if pad:
            pieces.append(_ZEROS[:pad])
    torch.cat(pieces, out=arena)


def _memmove_all(spans: list[tuple[int, int, int]]) -> None:
    # A plain memmove per storage: a torch op here would start a second OpenMP team whose spinning threads
    # steal the cores from the training thread's own parallel ops (measured: 10x slower eager copies on 2 cores).
    for dst, src, n in spans:
        if n:
            ctypes.memmove(dst, src, n)


def _memmove_copies(copies: list[_Copy]) -> None:
    _memmove_all([c.span() for c in copies])  # every size is checked before any byte moves


def _parallel_memmove(spans: list[tuple[int, int, int]], threads: int) -> None:
    """Copy (destination, source, bytes) spans with plain memmoves, split by bytes over ``threads`` threads.

    Storage copies are byte copies, so memmove is exact. Compared with one ``copy_`` per storage this avoids a
    dispatch and an OpenMP fork/join per tensor (measured 1.1-1.5x the single-``copy_`` floor for states of
    hundreds of small tensors) and reaches the floor. ``ctypes`` releases the GIL during each call, and the
    helper threads are started and joined inside this call.
    """
    spans = [s for s in spans if s[2]]
    total = sum(n for _, _, n in spans)
    threads = max(1, min(threads, total // (8 << 20) or 1))  # below ~8 MiB per thread, threads cost more
    share = -(-total // threads)
    chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    index, room = 0, share
    for dst, src, n in spans:
        offset = 0
        while n - offset > 0:
            take = min(n - offset, room) if index < threads - 1 else n - offset
            chunks[index].append((dst + offset, src + offset, take))
            offset += take
            room -= take
            if room == 0 and index < threads - 1:
                index, room = index + 1, share

    helpers = [threading.Thread(target=_memmove_all, args=(c,), name="async_ckpt-copy") for c in chunks[1:] if c]
    for t in helpers:
        t.start()
    try:
        _memmove_all(chunks[0])
    finally:
        for t in helpers:
            t.join()


class _Once:
    """Runs ``fn`` on the first thread that calls :meth:`run`; later callers wait for it and share its outcome."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def run(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
            if fn is not None:
                try:
                    fn()
                except BaseException as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error

    def run_quietly(self) -> None:
        """Like :meth:`run`, but keep a failure for the callers of :meth:`run` instead of raising it."""
        with contextlib.suppress(Exception):
            self.run()


class _Background:
    """Runs ``fn`` once on a named daemon thread; :meth:`wait` joins it and re-raises its error (every time)."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            assert self._fn is not None
            self._fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self._fn = None  # drop the references the work held

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
