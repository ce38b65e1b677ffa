"""Resuming after a restart: find the newest good checkpoint, clear our stale temp files, rebuild top-N lists."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from async_ckpt.pipeline.integrity import VerifyResult, read_manifest, verify
from async_ckpt.pipeline.storage import _HOST, TMP_MARKER, temp_owner

__all__ = ["LatestSearch", "find_latest", "latest_checkpoint", "remove_stale_temp_files", "saved_items"]

logger = logging.getLogger("async_ckpt")


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

    Only names carrying async_ckpt's temp marker, written on this host by a process that no longer runs, are
    removed; nothing else in the directory is touched, and files in flight of a live process (or of another host
    sharing the directory) are left alone.

    Returns:
        The removed paths.
    """
    removed = []
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return []
    for name in names:
        owner = temp_owner(name)
        if owner is None or owner[0] != _HOST or _pid_alive(owner[1]):
            continue  # not ours, another host's (a shared file system), or a live writer's (this process too)
        path = os.path.join(save_dir, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue  # only regular files are ours to remove
        try:
            os.unlink(path)
            removed.append(path)
        except OSError as exc:  # gone already, or not ours to remove after all: leave it
            logger.debug("async_ckpt: could not remove stale temporary file %s: %s", path, exc)
    return removed


@dataclass
class LatestSearch:
    """What :func:`find_latest` found, and what it rejected on the way (for messages that say why).

    Attributes:
        path: the newest complete checkpoint, or ``None``.
        info: its manifest entry (empty for a file the manifest does not list).
        skipped: the candidates newer than ``path`` (all of them when ``path`` is ``None``) that failed their
            check, newest first, each with its problems.
    """

    path: str | None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: list[VerifyResult] = field(default_factory=list)


def find_latest(
    save_dir: str, *, reason: str | None = None, full_check: bool = False, suffix: str = ".pt"
) -> LatestSearch:
    """The newest complete checkpoint in ``save_dir``, with the newer candidates that failed their check.

    Candidates are ordered newest first: files recorded in the directory's manifest by the time they became
    durable, other ``suffix`` files (written by another tool, or by us just before a crash that preceded the
    manifest update) by modification time. A listed file must be present and match the manifest (size and
    checksum; with ``full_check``, every record's CRC too); an unlisted one must pass the record CRC check.

    Args:
        save_dir: the checkpoint directory (a missing one has no checkpoint).
        reason: only files saved for this reason (``"interval"``, ``"key_metric"``, ``"final"``); only the
            manifest records reasons, so unlisted files are left out.
        full_check: re-read every record of manifest-listed files too.
        suffix: file name suffix of checkpoints.
    """
    if not os.path.isdir(save_dir):
        return LatestSearch(None)
    files: dict[str, Any] = read_manifest(save_dir)["files"]
    candidates: list[tuple[float, str, bool]] = []
    for name, entry in files.items():
        if reason is None or entry.get("reason") == reason:
            candidates.append((float(entry.get("saved_at", 0.0)), os.path.join(save_dir, name), True))
    if reason is None:
        for name in os.listdir(save_dir):
            path = os.path.join(save_dir, name)
            if name not in files and name.endswith(suffix) and TMP_MARKER not in name and os.path.isfile(path):
                # Written by another tool, or by us just before a crash that came before the manifest update.
                candidates.append((os.path.getmtime(path), path, False))
    skipped: list[VerifyResult] = []
    for _, path, listed in sorted(candidates, reverse=True):
        result = verify(path, records=full_check or not listed)
        if result.ok:
            return LatestSearch(path, result.info, skipped)
        skipped.append(result)
    return LatestSearch(None, skipped=skipped)


def latest_checkpoint(
    save_dir: str, *, reason: str | None = None, full_check: bool = False, suffix: str = ".pt"
) -> str | None:
    """The newest complete checkpoint in ``save_dir``, or ``None`` (see :func:`find_latest` for the rules)."""
    return find_latest(save_dir, reason=reason, full_check=full_check, suffix=suffix).path


def saved_items(save_dir: str, reason: str, prefix: str) -> list[tuple[Any, str]]:
    """(priority, file name) of the manifest's files for ``reason`` whose name starts with ``prefix``, best last.

    This is the shape of the list in ignite's ``Checkpoint.state_dict()``, so a saver on the same directory can continue
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
