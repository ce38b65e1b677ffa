"""Staging buffers: one page-aligned arena per buffer set, pinned for CUDA by registering it, and device tags.

A buffer set holds one host buffer per source storage of a state, all carved out of one anonymous mapping (the
*arena*). Buffers of at least :data:`STAGING_ALIGN` bytes start on a 4 KiB boundary, so a direct-I/O writer can
``pwrite`` their aligned spans straight from them; smaller ones are packed after them on 64-byte boundaries (any
dtype's view starts aligned), which keeps the padding to less than 4 KiB per large buffer. For a GPU state the
same arena is page-locked once with ``cudaHostRegister`` instead of one pinned allocation per storage (torch's
caching host allocator rounds each of those up to a power of two: up to twice the state).

Copies of device storages are tagged with their source device for ``torch.save`` (see :func:`tag`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import threading
import time
import weakref
from typing import Any

import torch

logger = logging.getLogger("async_ckpt")

STAGING_ALIGN = 4096  # every buffer of at least this many bytes starts on a multiple of it (direct I/O)
_SMALL_ALIGN = 64  # smaller buffers: any dtype's view starts aligned, and a cache line apart
_HUGE_PAGE = 2 << 20
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's

Layout = tuple[tuple[int, str], ...]  # (bytes, source device) per source storage

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


def tag(buffer: torch.Tensor, device: str) -> tuple[int, int]:
    """Make ``torch.save`` record ``buffer``'s storage as being on ``device``; returns the key for :func:`untag`."""
    _register_tagger()
    key = (buffer.data_ptr(), buffer.untyped_storage().nbytes())
    _DEVICE_OF_BUFFER[key] = device
    return key


def untag(keys: list[tuple[int, int]]) -> None:
    """Forget the device tags of buffers (their set is gone)."""
    for key in keys:
        _DEVICE_OF_BUFFER.pop(key, None)


def geometry(layout: Layout) -> tuple[list[int], int]:
    """Where each buffer of ``layout`` starts in the arena, and the arena's size (a whole number of 4 KiB pages).

    Large buffers come first, each on a 4 KiB boundary, in layout order; small ones follow, 64-byte aligned.
    """
    offsets = [0] * len(layout)
    at = 0
    for i, (n, _) in enumerate(layout):
        if n >= STAGING_ALIGN:
            offsets[i] = at
            at += -(-n // STAGING_ALIGN) * STAGING_ALIGN
    for i, (n, _) in enumerate(layout):
        if n < STAGING_ALIGN:
            offsets[i] = at
            at += -(-n // _SMALL_ALIGN) * _SMALL_ALIGN
    return offsets, -(-at // STAGING_ALIGN) * STAGING_ALIGN


def _touch(ptr: int, nbytes: int) -> None:
    # A plain memset releases the GIL and, unlike a torch op on a background thread, starts no second OpenMP team
    # whose spinning threads would take the cores from training.
    ctypes.memset(ptr, 0, nbytes)


def _register_pinned(ptr: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` at ``ptr`` for CUDA (device-to-host copies into it run asynchronously at full speed)."""
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))  # type: ignore[no-untyped-call]
    if err != 0:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes / 2**20:.0f} MiB of staging memory failed with CUDA error {err}"
        )


def _unregister_pinned(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit CUDA may be torn down already
        torch.cuda.cudart().cudaHostUnregister(ptr)  # type: ignore[no-untyped-call]


class BufferSet:
    """Host buffers for one snapshot in flight: one per source storage, each its own storage over a slice of one
    arena (see :func:`geometry`).

    The arena is an anonymous private mapping (page aligned), advised ``MADV_HUGEPAGE`` when large: measured here,
    touching a fresh 2 GiB buffer took 0.16 s instead of 0.5 s, and copies into it ran 5-10% faster. For a GPU
    layout (``pin``) the whole arena is registered with CUDA once and unregistered when the set is collected.
    ``torch.save`` still sees one storage per buffer and writes the same records as for the original state.

    Attributes:
        layout: (bytes, source device) per buffer.
        pinned: whether the arena is page-locked for CUDA.
        arena: the whole mapping as a byte tensor (``None`` for an empty layout).
        list: the buffers, in layout order.
        offsets: where each buffer starts in the arena.
        nbytes: bytes of state the set holds (the sum of the layout).
        footprint: bytes of memory the set really takes (the arena, padding included).
        alloc_s: seconds the allocation (and touch) took; zeroed once a save has accounted for it.
    """

    def __init__(self, layout: Layout, pin: bool, touch: bool = False) -> None:
        self.layout = layout
        self.pinned = pin
        t0 = time.perf_counter()
        self.offsets, total = geometry(layout)
        self.arena: torch.Tensor | None = None
        self.list: list[torch.Tensor]
        if total == 0:
            self.list = [torch.empty(0, dtype=torch.uint8) for _ in layout]
        else:
            area = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if total >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                with contextlib.suppress(OSError):
                    area.madvise(mmap.MADV_HUGEPAGE)
            self.arena = torch.frombuffer(area, dtype=torch.uint8)  # the tensors keep the mapping alive
            self.list = [
                torch.frombuffer(area, dtype=torch.uint8, count=n, offset=off)
                if n
                else torch.empty(0, dtype=torch.uint8)
                for (n, _), off in zip(layout, self.offsets, strict=True)
            ]
            if touch:  # fault the pages in now, so the first copy into them runs at memcpy speed
                _touch(self.arena.data_ptr(), total)
            if pin:
                ptr = self.arena.data_ptr()
                _register_pinned(ptr, total)
                weakref.finalize(self, _unregister_pinned, ptr)
        self.alloc_s = time.perf_counter() - t0
        self.nbytes = sum(n for n, _ in layout)
        self.footprint = total
        self.views: list[torch.Tensor] = []
        self.views_key: object = None
        self.spans: list[tuple[int, int, int]] | None = None  # cached (destination, source, bytes) per buffer
        self.spans_key: object = None
        tagged = [tag(self.list[i], device) for i, (n, device) in enumerate(layout) if device != "cpu" and n]
        if tagged:
            weakref.finalize(self, untag, tagged)
