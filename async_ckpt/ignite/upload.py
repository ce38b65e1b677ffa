"""The saver on a URL ``save_dir`` (``s3://bucket/prefix``): local first, then the core's remote tier.

The saver writes into a local staging directory exactly as it does for a local ``save_dir`` (same names, same
retention, same commit protocol); :class:`~async_ckpt.core.uploader.RemoteTier` mirrors each durable file to the
store in the background and publishes it with a manifest written last. These functions are the wiring: which
directory the saver writes to, which saves the uploader must never coalesce away, and the hooks that feed it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist

from async_ckpt.core.save_pipeline import SavePipeline
from async_ckpt.core.uploader import RemoteTier, UploadOptions, open_directory
from async_ckpt.pipeline.telemetry import SaveStats

__all__ = ["PROTECTED_REASONS", "connect", "open_remote"]

PROTECTED_REASONS = ("key_metric", "final")
"""Saves the uploader never skips when it falls behind: the best-metric and the final checkpoints."""


def open_remote(
    save_dir: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    local_dir: str | os.PathLike[str] | None,
    upload: UploadOptions | None,
    name: str,
) -> tuple[str, RemoteTier | None]:
    """The local directory the saver writes to, and the remote tier when ``save_dir`` is a URL.

    Only the saving rank (rank 0) opens the tier: it lists the bucket, cleans up leftovers of a killed upload and
    uploads; the other ranks write nothing, so they only need the directory's name.

    Raises:
        ValueError: a remote option with a local ``save_dir``, or a bad URL.
        ImportError: fsspec or the protocol's package (``s3fs``) is missing.
    """
    return open_directory(
        save_dir,
        storage_options=storage_options,
        local_dir=local_dir,
        upload=upload,
        name=name,
        is_checkpoint=lambda n: n.endswith(".pt"),
        arg="save_dir",
        uploads_here=idist.get_rank() == 0,
    )


def connect(
    pipeline: SavePipeline, tier: RemoteTier, on_durable: Callable[[SaveStats], None] | None
) -> Callable[[], None]:
    """Feed ``tier`` from ``pipeline``: each durable file is queued for upload (before the user's ``on_durable``),
    and each eviction of the local retention is deleted from the store after the next publish.

    Returns:
        ``start``: queues what a previous run left unpublished and starts the uploader; call it last in the saver's
        constructor, after its retention lists are rebuilt.
    """

    def durable(stats: SaveStats) -> None:
        tier.submit(stats.path, protected=stats.reason in PROTECTED_REASONS)
        if on_durable is not None:
            on_durable(stats)

    pipeline.on_durable = durable
    pipeline.on_evicted = tier.evicted

    def start() -> None:
        tier.submit_unpublished(protected=lambda entry: entry.get("reason") in PROTECTED_REASONS)
        tier.start()

    return start
