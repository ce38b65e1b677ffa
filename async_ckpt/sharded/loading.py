"""Reading sharded checkpoints back: find the newest, check one is complete, load it, clean up after a crash.

Everything here works on ``save_dir`` as the saver left it, with no saver running: a resume script calls
:func:`latest_sharded_checkpoint` and :func:`load`; the saver calls :func:`remove_stale_temp_dirs` when it starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from async_ckpt.core.resume import _pid_alive
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER, is_temp_name, temp_owner
from async_ckpt.sharded._dcp import FileSystemReader, dcp_load
from async_ckpt.sharded.state import as_dcp_items
from async_ckpt.sharded.storage import ShardedStorage

__all__ = [
    "METADATA_NAME",
    "holds_checkpoint",
    "is_complete",
    "latest_sharded_checkpoint",
    "load",
    "prepare_save_dir",
    "remove_stale_temp_dirs",
]

logger = logging.getLogger("async_ckpt")

METADATA_NAME = ".metadata"
"""DCP's metadata file: written last, by rank 0, so a directory without it is not a checkpoint."""


def remove_stale_temp_dirs(save_dir: str, storage: ShardedStorage | None = None) -> list[str]:
    """Recover from a sharded saver of a finished or crashed run: put back what a replacement left aside, and
    delete the temporary checkpoint directories it left behind.

    A replacement without an atomic swap renames the old checkpoint aside (``<final><marker>...old<n>``) before it
    renames the new one onto ``<final>``; after a crash between the two, ``<final>`` is missing and the aside copy,
    if complete, is renamed back (the new one was never published). Every other temporary name is deleted. Only
    names written on this host by a process that no longer runs are touched (the process is rank 0's); those of a
    live process or of another host sharing the directory are left alone.

    Returns:
        The paths deleted.
    """
    storage = storage if storage is not None else ShardedStorage()
    try:
        names = sorted(os.listdir(save_dir))
    except FileNotFoundError:
        return []
    stale: list[str] = []
    for name in names:
        owner = temp_owner(name, fields=4)
        if owner is not None and owner[0] == _HOST and not _pid_alive(owner[1]):
            stale.append(name)
    for name in list(stale):
        final_name, _, owner_fields = name.rpartition(TMP_MARKER)
        final, path = os.path.join(save_dir, final_name), os.path.join(save_dir, name)
        if not owner_fields.rsplit(".", 1)[-1].startswith("old") or os.path.lexists(final):
            continue
        if not holds_checkpoint(path):
            continue
        try:
            storage._replace(path, final)
            storage.sync_dir(save_dir)
        except OSError as exc:
            logger.warning("async_ckpt: could not put %s back under its name %s: %r", path, final, exc)
            stale.remove(name)  # not deleted either: it may be the only copy of that checkpoint
            continue
        stale.remove(name)
        logger.warning(
            "async_ckpt: %s is back: a replacement of it was interrupted between its two renames (the new checkpoint "
            "under that name was never published)",
            final,
        )
    removed: list[str] = []
    for name in stale:
        path = os.path.join(save_dir, name)
        try:
            storage.remove_tree(path)
        except OSError as exc:
            logger.warning("async_ckpt: could not remove the stale temporary %s: %r", path, exc)
            continue
        removed.append(path)
    return removed


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete DCP checkpoint: not a temporary name, ``.metadata`` readable, every file
    it refers to present and long enough."""
    path = os.fspath(path)
    return not is_temp_name(path) and holds_checkpoint(path)


def holds_checkpoint(path: str) -> bool:
    """Whether the directory ``path`` (whatever its name) holds a complete DCP checkpoint."""
    if not os.path.isfile(os.path.join(path, METADATA_NAME)):
        return False
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception:
        return False
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in ends.items():
        try:
            if os.path.getsize(os.path.join(path, rel)) < end:
                return False
        except OSError:
            return False
    return True


def latest_sharded_checkpoint(save_dir: str | os.PathLike[str], *, full_check: bool = False) -> str | None:
    """The newest published checkpoint directory in ``save_dir`` (by the time its ``.metadata`` was written).

    Temporary directories are never returned. With ``full_check``, directories that :func:`is_complete` rejects are
    skipped (a published directory is complete unless something else modified it).
    """
    save_dir = os.fspath(save_dir)
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return None
    found: list[tuple[int, str]] = []
    for name in names:
        path = os.path.join(save_dir, name)
        if is_temp_name(name):
            continue
        try:
            mtime = os.stat(os.path.join(path, METADATA_NAME)).st_mtime_ns
        except OSError:
            continue
        found.append((mtime, path))
    for _, path in sorted(found, reverse=True):
        if not full_check or is_complete(path):
            return path
    return None


def load(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load a checkpoint written by :class:`ShardedCheckpointSaver` into ``state`` in place.

    ``state`` has the keys the checkpoint was saved with and the same kinds of values (modules,
    :class:`ModelOptimizerState`, objects with ``load_state_dict``, plain dicts), built for the current run: its
    tensors must already be allocated with their target placement. DCP reads for each rank only what its shards
    need, so the world size and the sharding may differ from the run that saved (resharding on load). Without an
    initialized process group (or with one process) the checkpoint is read in this process alone.

    Must be called by every rank of the process group at the same time.
    """
    items = as_dcp_items(state)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    dcp_load(items, checkpoint_id=os.fspath(path), process_group=process_group, no_dist=not distributed)


def prepare_save_dir(save_dir: str, storage: ShardedStorage) -> None:
    """Create ``save_dir`` (durably) and recover what an interrupted run left in it (rank 0, when a saver starts).

    Raises:
        OSError: ``save_dir`` cannot be created.
    """
    os.makedirs(save_dir, exist_ok=True)
    storage.sync_dir(os.path.dirname(os.path.abspath(save_dir)))
    removed = remove_stale_temp_dirs(save_dir, storage)
    if removed:
        logger.info("async_ckpt: removed %d temporary checkpoint(s) of an interrupted run", len(removed))
