"""Resuming after a restart: find the newest good checkpoint, clear our stale temp files, rebuild top-N lists."""

from __future__ import annotations

import os
from typing import Any

from async_ckpt.integrity import read_manifest, verify
from async_ckpt.storage import TMP_MARKER

__all__ = ["latest_checkpoint", "remove_stale_temp_files", "saved_items"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(save_dir: str) -> list[str]:
    """Delete temporary files that a crashed async_ckpt writer left in ``save_dir``.

    Only names carrying async_ckpt's temp marker whose writing process no longer runs are removed; nothing else
    in the directory is touched, and a live process's files in flight are left alone.

    Returns:
        The removed paths.
    """
    removed = []
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if TMP_MARKER not in name:
            continue
        pid_part = name.rsplit(TMP_MARKER, 1)[1].split("-", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue  # a live writer (this process included) may be using it right now
        path = os.path.join(save_dir, name)
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def latest_checkpoint(
    save_dir: str, *, reason: str | None = None, full_check: bool = False, suffix: str = ".pt"
) -> str | None:
    """The newest complete checkpoint in ``save_dir``, or ``None``.

    Files recorded in the directory's manifest are ordered by the time they became durable and checked against
    it (size and checksum; with ``full_check``, every record's CRC too); a file that fails is skipped. Files not in
    the manifest (written by another tool) are considered after them, newest modification time first, and must
    pass the record CRC check.

    Args:
        save_dir: the checkpoint directory.
        reason: only files saved for this reason (``"interval"``, ``"key_metric"``, ``"final"``).
        full_check: re-read every record of manifest-listed files too.
        suffix: file name suffix of checkpoints.
    """
    if not os.path.isdir(save_dir):
        return None
    files: dict[str, Any] = read_manifest(save_dir)["files"]
    listed = sorted(
        (n for n, e in files.items() if reason is None or e.get("reason") == reason),
        key=lambda n: files[n].get("saved_at", 0.0),
        reverse=True,
    )
    for name in listed:
        path = os.path.join(save_dir, name)
        if os.path.exists(path) and verify(path, records=full_check).ok:
            return path
    if reason is not None:
        return None
    others = [
        os.path.join(save_dir, n)
        for n in os.listdir(save_dir)
        if n.endswith(suffix) and n not in files and TMP_MARKER not in n
    ]
    for path in sorted(others, key=os.path.getmtime, reverse=True):
        if verify(path).ok:
            return path
    return None


def saved_items(save_dir: str, reason: str, prefix: str) -> list[tuple[Any, str]]:
    """(priority, file name) of the manifest's files for ``reason`` whose name starts with ``prefix``, best last.

    This is the shape of ignite's ``Checkpoint._saved`` list, so a saver on the same directory can continue
    top-N / keep-last-N retention across restarts.
    """
    files: dict[str, Any] = read_manifest(save_dir)["files"]
    items = [
        (e["score"], name)
        for name, e in files.items()
        if e.get("reason") == reason
        and name.startswith(prefix)
        and e.get("score") is not None
        and os.path.exists(os.path.join(save_dir, name))
    ]
    return sorted(items, key=lambda it: it[0])
