"""Staging: turn a nested ``state_dict`` into a training-safe CPU copy held in reusable buffers.

The training thread calls :meth:`Stager.stage` at the checkpoint event. Every tensor storage reachable from the
state is copied once into a host buffer of the same byte size, and every tensor is rebuilt as a view of its buffer
with the same dtype, offset, size and stride. Tensors that shared a storage (tied weights, views) therefore still
share one in the copy, exactly as ``torch.save`` would write them. Non-tensor values are copied (see ``_tree``).

Buffers are grouped in *buffer sets*, one per snapshot in flight, each carved out of one page-aligned arena (see
``_staging_buffers``). A set is allocated once for a state layout (the byte sizes of its storages)
and reused for every later save with the same layout, so a save costs one copy, not an allocation; sets can be
allocated and touched ahead of time on a background thread (:meth:`Stager.prewarm_async`). When the state lives
on a GPU the arena is pinned and the copies run ``non_blocking`` on a side stream; :meth:`Staged.wait_ready`
(called by the writer thread, never the training thread) waits for them, and makes the deferred CPU copies of
overlap mode that the training thread has not needed yet.

The training thread's work per tensor beyond the copy itself is one check of a cached plan: the plan (which tensor
lives on which storage, byte views of the storages, the views of the buffers, the ``torch.cat`` groups that copy
them) is cached and reused while every tensor is still set to the same storage with the same type, dtype, offset,
shape, stride and ``requires_grad``, and every storage has the same address and size, which is every save of a
training run whose state does not change shape (see :meth:`_Plan.matches`).

This module touches no files. Threads it starts: copy helpers joined inside the call that started them, the
thread that issues the deferred CUDA copies of overlap mode (it ends with its work), and one prewarm thread per
stager (joined by :meth:`Stager.close`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from async_ckpt.errors import SnapshotError
from async_ckpt.pipeline._staging_buffers import STAGING_ALIGN, Layout
from async_ckpt.pipeline._staging_buffers import BufferSet as _BufferSet
from async_ckpt.pipeline._staging_buffers import tag as _tag  # noqa: F401  (tests tag buffers through this module)
from async_ckpt.pipeline._staging_buffers import untag as _untag  # noqa: F401
from async_ckpt.pipeline._staging_copy import (
    Background,
    Copy,
    Once,
    check_source,
    issue_d2h,
    issue_d2h_after,
    memmove_all,
)
from async_ckpt.pipeline._staging_copy import parallel_memmove as _parallel_memmove
from async_ckpt.pipeline._tree import Flat, flatten, unflatten

__all__ = ["STAGING_ALIGN", "Flat", "Staged", "Stager", "flatten", "unflatten"]

logger = logging.getLogger("async_ckpt")

PREWARM_THREAD_NAME = "async_ckpt-prewarm"


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_data_ptr = torch.Tensor.data_ptr
_storage_offset = torch.Tensor.storage_offset
_stride = torch.Tensor.stride
_untyped_storage = torch.Tensor.untyped_storage
_storage_nbytes = torch.UntypedStorage.nbytes
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_requires_grad = operator.attrgetter("requires_grad")
_version = operator.attrgetter("_version")
_is_set_to = torch.Tensor.is_set_to
_storage_ptr = torch.UntypedStorage.data_ptr


def _is_plain_strided(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN_TYPES and t.layout == torch.strided and not t.is_quantized and not t.is_meta


def _keys(tensors: Sequence[torch.Tensor]) -> tuple[list[Any], ...] | None:
    """What identifies ``tensors``' layout for the dedup signature of a state whose plan is not cached (``None``:
    cannot tell). A cached plan is checked with :meth:`_Plan.matches` instead, which is cheaper.

    A storage resized in place gets new memory (a new address) or a new size; a tensor moved to another storage
    gets a new address, since the old storage is still held.
    """
    try:
        return (
            list(map(type, tensors)),
            list(map(_data_ptr, tensors)),
            list(map(_storage_offset, tensors)),
            list(map(_dtype, tensors)),
            list(map(_shape, tensors)),
            list(map(_stride, tensors)),
            list(map(_requires_grad, tensors)),
            list(map(_device, tensors)),
            list(map(_storage_nbytes, map(_untyped_storage, tensors))),
        )
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested and other tensors without a storage
        return None


_serial = itertools.count(1)


@dataclass(eq=False)
class _Plan:
    """How the tensors of one state map onto storages, and byte views of those storages (the copy sources).

    Made once per layout and reused while :meth:`matches` holds. Holding the byte views keeps the source storages
    alive, which is what makes an unchanged storage identity mean unchanged memory; they are dropped when the state
    changes shape (the next plan replaces this one) and by :meth:`Stager.close`.
    """

    sources: list[torch.Tensor]  # each distinct source storage as a byte tensor on its device
    ptrs: list[int]  # each storage's address when planned
    owner: list[int]  # tensor index -> storage index, or -1 for a tensor cloned as a whole
    first: list[int]  # storage index -> index of the first tensor on it (named in error messages)
    layout: Layout  # (nbytes, source device) per storage
    templates: list[torch.Tensor] | None = None  # per tensor, an alias of it as planned (None: not reusable)
    types: list[type] = field(default_factory=list)  # per tensor, as planned
    dtypes: list[torch.dtype] = field(default_factory=list)
    grads: list[bool] = field(default_factory=list)  # per tensor, requires_grad as planned
    storages: list[torch.UntypedStorage] = field(default_factory=list)  # per storage (see matches)
    sizes: list[int] = field(default_factory=list)  # per storage, bytes as planned
    cpu_idx: list[int] = field(default_factory=list)  # storages on the CPU
    cuda_idx: list[int] = field(default_factory=list)  # storages on a CUDA device
    other_idx: list[int] = field(default_factory=list)  # storages on another accelerator
    serial: int = field(default_factory=lambda: next(_serial))
    late_for: list[bool] | None = None  # the ``defer`` argument ``late`` was computed for
    late: list[bool] | None = None  # per storage: deferred
    cat_groups: list[tuple[list[torch.Tensor], slice]] | None = None  # see Stager._cat_groups

    cuda_by_device: dict[torch.device, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, t in enumerate(self.sources):
            (self.cpu_idx if t.device.type == "cpu" else self.cuda_idx if t.is_cuda else self.other_idx).append(i)
            if t.is_cuda:
                self.cuda_by_device.setdefault(t.device, []).append(i)

    @property
    def reusable(self) -> bool:
        """Whether the plan can be checked against later tensors (every tensor plain and strided)."""
        return self.templates is not None

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` still have the layout this plan was made for, so its views and copies hold.

        Per tensor: the same type, dtype and ``requires_grad``, and ``Tensor.is_set_to`` its template (an alias
        made at planning): the same storage object, offset, sizes and strides, in one C call (the device follows
        from the storage). Per storage: the same address and size, which a resize in place changes. At 2,739
        tensors this is 0.9 ms against 1.4 ms for reading and comparing nine attributes of every tensor.
        """
        templates = self.templates
        if templates is None or len(tensors) != len(templates):
            return False
        try:
            return (
                list(map(type, tensors)) == self.types
                and all(map(_is_set_to, tensors, templates))
                and list(map(_dtype, tensors)) == self.dtypes
                and list(map(_requires_grad, tensors)) == self.grads
                and list(map(_storage_ptr, self.storages)) == self.ptrs
                and list(map(_storage_nbytes, self.storages)) == self.sizes
            )
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor without a storage, an unsupported device
            return False

    @property
    def on_cuda(self) -> bool:
        return bool(self.cuda_idx)

    def late_storages(self, defer: Sequence[bool] | None) -> list[bool] | None:
        """Per storage, whether its copy may be deferred: only if every tensor on it is (``None``: none is)."""
        if defer is None:
            return None
        if self.late is not None and self.late_for == defer:
            return self.late
        late = [True] * len(self.sources)
        for flag, o in zip(defer, self.owner, strict=True):
            if o >= 0 and not flag:
                late[o] = False
        self.late_for, self.late = list(defer), late
        return late


def _plan(tensors: Sequence[torch.Tensor]) -> _Plan:
    sources: list[torch.Tensor] = []
    storages: list[torch.UntypedStorage] = []
    ptrs: list[int] = []
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
            o = index[key] = len(sources)
            sources.append(torch.empty(0, dtype=torch.uint8, device=device).set_(st))
            storages.append(st)
            ptrs.append(st.data_ptr())
            first.append(i)
            name = names.get(device)
            if name is None:
                name = names[device] = str(device)
            sizes.append((n, name))
        owner.append(o)
    plan = _Plan(sources, ptrs, owner, first, tuple(sizes))
    if all(o >= 0 for o in owner):
        plan.templates = [t.detach() for t in tensors]  # a new alias: in-place changes of ``t`` do not reach it
        plan.types = list(map(type, tensors))
        plan.dtypes = list(map(_dtype, tensors))
        plan.grads = list(map(_requires_grad, tensors))
        plan.storages = storages
        plan.sizes = [n for n, _ in sizes]
    return plan


_ZEROS = torch.zeros(STAGING_ALIGN, dtype=torch.uint8)

# torch's CPU ``cat`` fills an output of fewer than ``at::internal::GRAIN_SIZE`` (32768) elements in one tight serial
# loop (~0.1 us per input), a larger one with a dispatched ``copy_`` per input (~1 us per input). Small storages are
# therefore copied in groups whose output stays under this many bytes, large ones in one parallel ``cat``.
_SERIAL_CAT_BYTES = 32768


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

    @property
    def footprint(self) -> int:
        """Bytes of host memory the buffers of this copy take (padding for 4 KiB alignment included)."""
        return self._bufset.footprint if self._bufset is not None else self.nbytes

    def wait_ready(self) -> None:
        """Block until every copy into the buffers has finished; make a deferred CPU copy nobody made yet.

        Called by the writer thread before it serializes, never by the training thread.

        Raises:
            SnapshotError: a deferred source was resized in place before its copy ran (the save must fail).
        """
        if self._ready is not None:
            self._ready()

    def guard(self) -> None:
        """Order a write of a deferred source tensor after its copy (training thread, overlap mode).

        On CPU this makes the copy if the writer thread has not made it yet (or waits for it to finish); a failed
        copy is left for :meth:`wait_ready` to raise, so the writer reports that save and training goes on. On
        CUDA it makes the current stream wait on the copy's event, without a CPU synchronization. A no-op when
        nothing was deferred or the copy already finished.
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
    returns ``None``) when all are taken. Buffer sets can be made ahead of the first save, on a background thread
    (:meth:`prewarm_async`). Thread-safety: :meth:`stage`, :meth:`prewarm_async` and :meth:`close` are called from
    one training thread at a time; buffers come back from the writer thread through :meth:`Staged.release`, and
    the prewarm thread adds sets to the pool; the pool is guarded by one condition.

    Args:
        max_pending: buffer sets that may exist at once (in use or free).
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
        self._held_footprint = 0
        self._plan_cache: _Plan | None = None
        self._allocating: tuple[Layout, bool] | None = None  # what the prewarm thread is allocating now
        self._prewarm_target: tuple[Layout, bool] | None = None
        self._prewarm_running = False
        self._prewarm_thread: threading.Thread | None = None
        self._prewarm_made = 0
        self.prewarm_error: BaseException | None = None
        self._closed = False

    # -- pool -------------------------------------------------------------------------------------------------
    def has_free_slot(self) -> bool:
        """Whether a snapshot could be staged now without waiting for the writer."""
        with self._cond:
            return self._in_use < self.max_pending

    def _drop(self, bufset: _BufferSet) -> None:
        """Forget a set (caller holds the condition); its memory goes when its last view does."""
        self._held_bytes -= bufset.nbytes
        self._held_footprint -= bufset.footprint

    def _take(self, layout: Layout, pin: bool, block: bool) -> tuple[_BufferSet | None, float]:
        t0 = time.perf_counter()
        want = (layout, pin)
        with self._cond:
            while self._in_use >= self.max_pending:
                if not block:
                    return None, 0.0
                self._cond.wait()
            self._in_use += 1
            while True:
                match = next((b for b in self._free if b.layout == layout and b.pinned == pin), None)
                if match is not None or self._allocating != want:
                    break
                self._cond.wait()  # the prewarm thread is making a set for this layout: it is ahead of us
            if match is not None:
                self._free.remove(match)
            else:  # sets for another layout: drop them so memory stays bounded
                while self._free and len(self._free) + self._in_use > self.max_pending:
                    self._drop(self._free.pop(0))
        waited = time.perf_counter() - t0
        if match is None:
            try:
                match = self._allocate(layout, pin, touch=False)
            except (RuntimeError, MemoryError, OSError) as exc:  # out of (pinned) host memory: give the slot back
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

    def _allocate(self, layout: Layout, pin: bool, touch: bool) -> _BufferSet:
        bufset = _BufferSet(layout, pin, touch)
        with self._cond:
            self.allocations += 1
            self._held_bytes += bufset.nbytes
            self._held_footprint += bufset.footprint
        logger.info(
            "async_ckpt: allocated %.1f MiB of %sstaging buffers (%.1f MiB with 4 KiB alignment) in %.3fs",
            bufset.nbytes / 2**20,
            "pinned " if pin else "",
            bufset.footprint / 2**20,
            bufset.alloc_s,
        )
        return bufset

    def prewarm_async(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start allocating and touching the buffer sets for the layout of ``tensors`` on a background thread.

        Returns at once. The thread (one per stager, named ``async_ckpt-prewarm``) fills the pool up to
        ``max_pending`` sets for this layout; free sets for another layout (an earlier prewarm, before the optimizer
        created its state) are dropped first. A save that comes while the thread is making a set for its layout
        waits for that set instead of allocating another, so the pool never exceeds ``max_pending`` sets. A failed
        allocation is logged, kept in :attr:`prewarm_error`, and left for the save to retry. The plan of
        ``tensors`` is made here too, so the first save of this layout does not pay for it.
        """
        plan = self._plan_for(tensors)
        want = (plan.layout, plan.on_cuda and torch.cuda.is_available())
        old = None
        with self._cond:
            if self._closed:
                return
            for stale in [b for b in self._free if (b.layout, b.pinned) != want]:
                self._free.remove(stale)
                self._drop(stale)
            self._prewarm_target = want
            if self._prewarm_running:
                return  # the running thread reads the target before each set
            self._prewarm_running = True
            old = self._prewarm_thread
            self._prewarm_thread = threading.Thread(target=self._prewarm_loop, name=PREWARM_THREAD_NAME, daemon=True)
            thread = self._prewarm_thread
        if old is not None:
            old.join()  # it has finished its work already: only its exit is left
        thread.start()

    def _prewarm_loop(self) -> None:
        while True:
            with self._cond:
                want = self._prewarm_target
                if self._closed or want is None or len(self._free) + self._in_use >= self.max_pending:
                    self._prewarm_running = False
                    self._prewarm_target = None
                    self._cond.notify_all()
                    return
                self._allocating = want
            try:
                bufset = self._allocate(want[0], want[1], touch=True)
            except Exception as exc:
                logger.warning(
                    "async_ckpt: allocating %.1f MiB of staging buffers in the background failed (%r); the next "
                    "save will allocate them itself",
                    sum(n for n, _ in want[0]) / 2**20,
                    exc,
                    exc_info=True,
                )
                with self._cond:
                    self.prewarm_error = exc
                    self._allocating = None
                    self._prewarm_running = False
                    self._prewarm_target = None
                    self._cond.notify_all()
                return
            bufset.alloc_s = 0.0  # paid here, not by a save
            with self._cond:
                self._allocating = None
                if self._prewarm_target == want and not self._closed:
                    self._free.append(bufset)
                    self._prewarm_made += 1
                else:
                    self._drop(bufset)
                # A save that took a slot may be waiting for this very set; only sets of another layout go (a
                # save for another layout allocated its own meanwhile: the next save of that layout trims the rest).
                while len(self._free) + self._in_use > self.max_pending:
                    stale = next((b for b in self._free if (b.layout, b.pinned) != want), None)
                    if stale is None:
                        break
                    self._free.remove(stale)
                    self._drop(stale)
                self._cond.notify_all()

    def join_prewarm(self, timeout: float | None = None) -> bool:
        """Wait for the prewarm thread to finish; ``False`` if ``timeout`` ran out first."""
        thread = self._prewarm_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def prewarm(self, tensors: Sequence[torch.Tensor]) -> int:
        """Allocate (and touch) the buffer sets for the layout of ``tensors`` now (see :meth:`prewarm_async`).

        Returns:
            How many buffer sets were allocated.
        """
        before = self._prewarm_made
        self.prewarm_async(tensors)
        self.join_prewarm()
        return self._prewarm_made - before

    def close(self) -> None:
        """Stop and join the prewarm thread, and drop the free buffer sets and the cached plan (with the source
        storages it holds). Sets still in use are dropped when released; staging still works afterwards."""
        with self._cond:
            self._closed = True
            self._prewarm_target = None
            thread = self._prewarm_thread
        if thread is not None:
            thread.join()
        with self._cond:
            for bufset in self._free:
                self._drop(bufset)
            self._free.clear()
            self._plan_cache = None
            self._last = None
            self._closed = False  # staging (without prewarm) still works; a later prewarm starts a new thread

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
        """Bytes of state held by all buffer sets, free or in use (for telemetry and tests)."""
        with self._cond:
            return self._held_bytes

    def footprint_bytes(self) -> int:
        """Bytes of host memory all buffer sets really take, padding for 4 KiB alignment included."""
        with self._cond:
            return self._held_footprint

    # -- staging ----------------------------------------------------------------------------------------------
    def _cached_plan(self, tensors: Sequence[torch.Tensor]) -> _Plan | None:
        cached = self._plan_cache
        return cached if cached is not None and cached.matches(tensors) else None

    def _plan_for(self, tensors: Sequence[torch.Tensor], cached: _Plan | None = None) -> _Plan:
        """The cached plan if ``tensors`` still match it (``cached``: already checked), else a new one."""
        plan = cached or self._cached_plan(tensors)
        if plan is None:
            plan = _plan(tensors)
            self._plan_cache = plan if plan.reusable else None
        return plan

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

        Raises:
            SnapshotError: the buffers could not be allocated.
        """
        cached = self._cached_plan(tensors)
        signature = _signature(tensors, step, cached) if reuse and step is not None else None
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

        plan = self._plan_for(tensors, cached)
        if signature is not None and cached is None and plan.reusable:  # what the next save's lookup will compute
            signature = _signature(tensors, step, plan)
        late = plan.late_storages(defer)
        pin = plan.on_cuda and torch.cuda.is_available()
        bufset, waited = self._take(plan.layout, pin, block)
        if bufset is None:
            return None
        t0 = time.perf_counter()
        try:
            ready, guard = self._copy(plan, bufset, late)
            views = self._cached_views(bufset, tensors, plan)
            nbytes = bufset.nbytes
            if not plan.reusable:
                nbytes += sum(_clone_nbytes(v) for v, o in zip(views, plan.owner, strict=True) if o < 0)
        except BaseException:
            self._give_back(bufset)
            raise
        staged = Staged(
            views=views,
            nbytes=nbytes,
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

    def _cached_views(self, bufset: _BufferSet, tensors: Sequence[torch.Tensor], plan: _Plan) -> list[torch.Tensor]:
        """The views of ``bufset`` for ``tensors``: the previous ones if they were made for the same plan."""
        if not plan.reusable:  # whole-tensor clones are fresh every time
            return list(_views(tensors, plan, bufset.list))
        if bufset.views_key != plan.serial:
            bufset.views = list(_views(tensors, plan, bufset.list))
            bufset.views_key = plan.serial
        return list(bufset.views)  # a new list: list identity marks "the same snapshot" (see SavePipeline)

    def _copy(
        self, plan: _Plan, bufset: _BufferSet, late: list[bool] | None
    ) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
        """Copy each source storage into its buffer; return (wait-for-all, guard-for-deferred) callables or None."""
        if plan.cuda_idx or plan.other_idx or (late is not None and any(late)) or bufset.arena is None:
            return self._copy_each(plan, bufset, late)
        arena = bufset.arena
        for pieces, span in _cat_groups(plan, bufset):
            torch.cat(pieces, out=arena[span])
        return None, None

    def _copy_each(
        self, plan: _Plan, bufset: _BufferSet, late: list[bool] | None
    ) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
        waits: list[Callable[[], None]] = []
        guards: list[Callable[[], None]] = []
        buffers = bufset.list
        if plan.cuda_idx:
            wait, guard = self._copy_cuda(plan, buffers, late)
            waits.append(wait)
            if guard is not None:
                guards.append(guard)
        for i in plan.other_idx:  # other accelerators: a plain blocking copy
            buffers[i].copy_(plan.sources[i])
        if plan.cpu_idx:
            if bufset.spans_key != plan.serial:
                bufset.spans = [
                    (b.data_ptr(), p, n) for b, p, (n, _) in zip(buffers, plan.ptrs, plan.layout, strict=True)
                ]
                bufset.spans_key = plan.serial
            spans = bufset.spans
            assert spans is not None
            now = plan.cpu_idx if late is None else [i for i in plan.cpu_idx if not late[i]]
            if now:
                _parallel_memmove([spans[i] for i in now], torch.get_num_threads())
            later = [] if late is None else [i for i in plan.cpu_idx if late[i]]
            if later:
                # No thread of its own (starting one cost the training thread 0.5-3 ms): the writer thread copies
                # just before it serializes, or the optimizer's step pre-hook does, whichever comes first. The job
                # holds the plan, and so the source storages, until it has run.
                once = Once(functools.partial(_copy_late, plan, [spans[i] for i in later], later))
                waits.append(once.run)
                guards.append(once.run_quietly)  # a failure is the writer's to report, for that save only
        return _run_all(waits), _run_all(guards)

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            self._streams[device] = stream
        return stream

    def _copy_cuda(
        self, plan: _Plan, buffers: list[torch.Tensor], late: list[bool] | None
    ) -> tuple[Callable[[], None], Callable[[], None] | None]:
        """Issue device-to-host copies on a side stream ordered after the compute stream.

        The side stream first waits for the work already queued on each source device's current stream, so it
        copies the values at the event; the sources are recorded on the side stream so the caching allocator
        cannot hand their memory to someone else before the copy ran. For eager copies, the current stream then
        waits for the copy-done event, so any later kernel that writes the sources runs after the copy, without
        the CPU ever synchronizing.

        Deferred copies are prepared and issued by a named background thread, because issuing thousands of
        copies costs the CPU milliseconds that the training thread should not pay. The side stream waits on an
        event recorded on the compute stream at the call, so it still copies the values at the event, and the
        thread holds the plan (and so the sources) until they are recorded on the side stream. Deferred copies do
        not hold back the compute stream: the returned guard (called from the optimizer's step pre-hook) waits
        until they are issued, then makes the *then* current stream wait for them.
        """
        done_events: list[torch.cuda.Event] = []
        issuers: list[tuple[torch.device, Background, list[torch.cuda.Event]]] = []
        for device, idx in plan.cuda_by_device.items():
            stream = self._side_stream(device)
            compute = torch.cuda.current_stream(device)
            now = idx if late is None else [i for i in idx if not late[i]]
            later = [] if late is None else [i for i in idx if late[i]]
            if now:
                stream.wait_stream(compute)
                with torch.cuda.stream(stream):
                    done = issue_d2h(_copies(plan, buffers, now, False), stream)
                done_events.append(done)
                compute.wait_event(done)
            if later:
                at_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                at_event.record(compute)
                box: list[torch.cuda.Event] = []
                issue = functools.partial(_issue_later, device, stream, at_event, plan, buffers, later, box)
                issuers.append((device, Background("async_ckpt-stage", issue), box))

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


def _cat_groups(plan: _Plan, bufset: _BufferSet) -> list[tuple[list[torch.Tensor], slice]]:
    """The ``torch.cat`` calls that copy every source storage into the arena (the same for every set).

    Each call gets a run of source storages and the zero padding between them, in arena order, and the arena
    span they fill. Large storages (the arena's page-aligned head) go in one parallel ``cat``: measured
    1.04-1.06x a single ``copy_`` of the same bytes on two cores, against 1.2-1.5x for one copy per storage
    and for memmoves split over threads. Small storages (the tail) go in runs of under
    :data:`_SERIAL_CAT_BYTES`, which torch copies serially at ~0.1 us per storage instead of ~1 us: at 2,739
    tensors (1,716 under 4 KiB) the copy went from 3.2 ms to 1.1 ms.
    """
    if plan.cat_groups is None:
        groups: list[tuple[list[torch.Tensor], slice]] = []
        pieces: list[torch.Tensor] = []
        start = at = 0
        serial = False

        def flush() -> None:
            nonlocal pieces, start
            if pieces:
                groups.append((pieces, slice(start, at)))
            pieces, start = [], at

        def add(piece: torch.Tensor, n: int) -> None:
            nonlocal at
            if serial and at + n - start >= _SERIAL_CAT_BYTES:
                flush()
            pieces.append(piece)
            at += n

        for i in sorted(range(len(plan.sources)), key=bufset.offsets.__getitem__):
            n = plan.layout[i][0]
            if not n:
                continue
            if (n < STAGING_ALIGN) != serial:  # from the large head to the small tail
                flush()
                serial = n < STAGING_ALIGN
            gap = bufset.offsets[i] - at
            if gap:
                add(_ZEROS[:gap], gap)
            add(plan.sources[i], n)
        if bufset.footprint > at:
            add(_ZEROS[: bufset.footprint - at], bufset.footprint - at)
        flush()
        plan.cat_groups = groups
    return plan.cat_groups


def _views(tensors: Sequence[torch.Tensor], plan: _Plan, buffers: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for t, o in zip(tensors, plan.owner, strict=True):
        if o < 0:
            yield t.detach().to("cpu", copy=True)
            continue
        v = torch.empty(0, dtype=t.dtype).set_(buffers[o].untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            v = torch.nn.Parameter(v, requires_grad=t.requires_grad)
        elif t.requires_grad:
            v.requires_grad_(True)
        yield v


def _signature(tensors: Sequence[torch.Tensor], step: Any, plan: _Plan | None) -> tuple[Any, ...] | None:
    """What must be equal for a snapshot to be reused: the step, the layout (the reusable plan the tensors
    match, else their :func:`_keys`) and every tensor's version counter. ``None``: never reuse."""
    layout: Any = plan.serial if plan is not None and plan.reusable else _keys(tensors)
    if layout is None:
        return None
    try:
        return (step, layout, list(map(_version, tensors)))
    except RuntimeError:  # inference tensors have no version counter
        return None


def _clone_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor cloned as a whole; a sparse one counts its dense size (``nbytes`` is undefined for it)."""
    try:
        return int(t.nbytes)
    except RuntimeError:
        return t.numel() * t.element_size()


def _run_all(fns: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not fns:
        return None

    def call() -> None:
        for fn in fns:
            fn()

    return call


def _copies(plan: _Plan, buffers: list[torch.Tensor], indices: list[int], late: bool) -> list[Copy]:
    return [Copy(plan.sources[i], buffers[i], late, plan.first[i], plan.layout[i][0], plan.ptrs[i]) for i in indices]


def _issue_later(
    device: torch.device,
    stream: Any,
    at_event: torch.cuda.Event,
    plan: _Plan,
    buffers: list[torch.Tensor],
    indices: list[int],
    box: list[torch.cuda.Event],
) -> None:
    """Background thread: prepare the deferred CUDA copies of one snapshot and issue them after ``at_event``."""
    issue_d2h_after(device, stream, at_event, _copies(plan, buffers, indices, True), box)


def _copy_late(plan: _Plan, spans: list[tuple[int, int, int]], indices: list[int]) -> None:
    """Make the deferred CPU copies of one snapshot, after checking that no source was resized since the event."""
    for i in indices:
        check_source(plan.sources[i], plan.first[i], plan.layout[i][0], plan.ptrs[i])
    memmove_all(spans)
