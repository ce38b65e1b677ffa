"""What an ignite ``Checkpoint`` keeps, read and replaced through its public ``state_dict`` seam.

ignite's ``Checkpoint`` ranks a save, evicts the worst entry of its top-N list and appends the new one when it calls
the save handler, that is, when the saver has only *queued* the file. Three things then need the list changed from
outside: a save that raised before anything was queued (the list goes back as it was), a queued file that never
became durable (it leaves the list, the files it evicted that are still on disk come back), and a restart (the list
is rebuilt from the manifest so that ``n_saved`` pruning continues). All three go through ignite's public contract
only: ``Checkpoint.state_dict()`` returns the list as ``(priority, filename)`` pairs, and
``Checkpoint.load_state_dict()`` replaces it with the list that ignite's next call ranks, evicts from and appends to,
and that ``Checkpoint.last_checkpoint`` reads. File names come from the public ``Checkpoint.setup_filename_pattern``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ignite.engine import Engine
from ignite.handlers import Checkpoint

from async_ckpt.core.resume import saved_items
from async_ckpt.ignite.save_handler import AsyncSaveHandler
from async_ckpt.pipeline.writer import Failure

__all__ = ["KeptChange", "drop_oldest", "ignite_file_name", "kept", "replace_kept", "resume_kept", "roll_back"]

Item = Checkpoint.Item


def _list_key(state: Mapping[str, Any]) -> str:
    """The key of the one list in ``Checkpoint.state_dict()`` (``"_saved"`` in ignite 0.4-0.5, ``"saved"`` in its
    documentation): found by shape, so either spelling works, and a change of shape fails loudly here."""
    keys = [key for key, value in state.items() if isinstance(value, list)]
    if len(keys) != 1:
        raise RuntimeError(
            f"async_ckpt: ignite's Checkpoint.state_dict() has keys {sorted(state)}, not one list of (priority, "
            "filename) pairs; this ignite version is not supported (pin pytorch-ignite to a 0.4 or 0.5 release)."
        )
    return keys[0]


def kept(checkpoint: Checkpoint) -> list[Item]:
    """The (priority, filename) entries ``checkpoint`` keeps, lowest priority first, from ``state_dict()``."""
    state = checkpoint.state_dict()
    return [Item(priority, filename) for priority, filename in state[_list_key(state)]]


def replace_kept(checkpoint: Checkpoint, items: Iterable[tuple[Any, str]]) -> None:
    """Make ``items`` (lowest priority first) the list ``checkpoint`` keeps, through ``load_state_dict()``."""
    state = checkpoint.state_dict()
    state[_list_key(state)] = [(priority, filename) for priority, filename in items]
    checkpoint.load_state_dict(state)


def drop_oldest(checkpoint: Checkpoint) -> Item | None:
    """Take the lowest entry out of the list and return it (MONAI's ``_delete_previous_final_ckpt``), if any."""
    items = kept(checkpoint)
    if not items:
        return None
    replace_kept(checkpoint, items[1:])
    return items[0]


@dataclass(frozen=True)
class KeptChange:
    """What one call of ``checkpoint`` did to its list; the tag of the job it queued, read back if that job fails.

    Attributes:
        checkpoint: the ignite ``Checkpoint`` that queued the job.
        added: entries the call put in the list (the queued file's).
        evicted: entries the call took out of it (files whose removal waits for the queued file to be durable).
    """

    checkpoint: Checkpoint
    added: list[Item]
    evicted: list[Item]


def save_tracked(checkpoint: Checkpoint, handler: AsyncSaveHandler, engine: Engine) -> None:
    """Call ``checkpoint(engine)``, undo its list changes if it raises, and tag the job it queued with them.

    A call that raises queued nothing: the list goes back as it was, and so do the removals that wait for the
    handler's next durable save (ignite evicted before calling the handler).
    """
    before = kept(checkpoint)
    pending_removes = handler.pending_removes()
    handler.last_job = None
    try:
        checkpoint(engine)
    except BaseException:
        replace_kept(checkpoint, before)
        handler.restore_removes(pending_removes)
        raise
    job = handler.last_job
    if job is not None:
        after = kept(checkpoint)
        job.tag = KeptChange(
            checkpoint, [it for it in after if it not in before], [it for it in before if it not in after]
        )


def roll_back(handlers: Mapping[int, AsyncSaveHandler], failure: Failure) -> None:
    """Make the list of the ``Checkpoint`` that queued the failed job match what is on disk again.

    Args:
        handlers: each ``Checkpoint``'s save handler, by ``id`` of the ``Checkpoint``.
        failure: a failed job; one not tagged by :func:`save_tracked` is left alone.
    """
    job, result = failure.job, failure.job.result
    if not isinstance(job.tag, KeptChange) or result is None:
        return
    checkpoint, added, evicted = job.tag.checkpoint, job.tag.added, job.tag.evicted
    handler = handlers[id(checkpoint)]
    if result.committed:
        # The new file is under its final name (the failure came after the rename: a directory fsync, an
        # eviction, the manifest). It stays in the list; evictions that did not happen are retried after the
        # next durable save of this list, so no file is left behind untracked.
        handler.retry_removes([p for p in job.removes if p not in result.removed and p != job.path])
        return
    kept_now = [it for it in kept(checkpoint) if it not in added]
    # An evicted file comes back only if it is still on disk and no kept entry now owns its path (a fixed
    # file name rewritten by a later, successful save holds that save's state, not the evicted one's).
    taken = {handler.path_for(it.filename) for it in kept_now}
    back = [
        it
        for it in evicted
        if it not in kept_now
        and handler.path_for(it.filename) not in taken
        and os.path.exists(handler.path_for(it.filename))
    ]
    items = sorted(kept_now + back, key=lambda it: it.priority)
    # Saves queued after the failed one may have evicted on the assumption that it existed: keep the list
    # within n_saved, dropping the lowest entries; their files go after the next durable save, as ignite's do.
    while checkpoint.n_saved is not None and len(items) > checkpoint.n_saved:
        handler.remove(items.pop(0).filename)
    replace_kept(checkpoint, items)
    # Removals the failed job carried for files that are not back in the list (evictions retried from earlier
    # failures) must not be forgotten either.
    listed = {handler.path_for(it.filename) for it in items}
    handler.retry_removes([p for p in job.removes if p not in listed and p != job.path])


def ignite_file_name(checkpoint: Checkpoint, name: str, priority: Any) -> str:
    """The file name ignite's ``Checkpoint.__call__`` gives a save scored ``priority`` (no ``global_step``).

    ``checkpoint`` must have a ``score_function``, as the saver's three do. ``name`` is the single key of
    ``to_save``, or ``"checkpoint"`` for several.
    """
    pattern = checkpoint.filename_pattern
    if pattern is None:
        pattern = Checkpoint.setup_filename_pattern(
            with_prefix=len(checkpoint.filename_prefix) > 0,
            with_score=checkpoint.score_function is not None,
            with_score_name=checkpoint.score_name is not None,
            with_global_step=False,
        )
    score = f"{priority}" if isinstance(priority, numbers.Integral) else f"{priority:.4f}"
    return pattern.format(
        filename_prefix=checkpoint.filename_prefix,
        ext=checkpoint.ext,
        name=name,
        score_name=checkpoint.score_name,
        score=score,
        global_step=None,
    )


def resume_kept(
    checkpoints: Iterable[tuple[Checkpoint, AsyncSaveHandler]],
    save_dir: str,
    save_dict: Mapping[str, Any],
    file_prefix: str,
    published: Callable[[str, str], list[tuple[Any, str]]] | None = None,
) -> None:
    """Rebuild each ``Checkpoint``'s list from the files the manifest of ``save_dir`` records for its handler.

    Only files still on disk under the name this ``Checkpoint`` would give them (or its handler's fixed name) are
    taken, so that another saver's files in the same directory are never pruned by this one. With a URL
    ``save_dir``, ``published(reason, prefix)`` adds the checkpoints published in the store (a run resumed on an
    empty local directory continues the store's retention); a local file of the same name wins.
    """
    name = "checkpoint" if len(save_dict) > 1 else next(iter(save_dict))
    for checkpoint, handler in checkpoints:
        prefix = f"{file_prefix}_{name}_" if file_prefix else f"{name}_"  # ignite's default file name pattern
        if handler.filename is not None:
            prefix = ""
        items = dict((fname, priority) for priority, fname in published(handler.reason, prefix)) if published else {}
        items.update((fname, priority) for priority, fname in saved_items(save_dir, handler.reason, prefix))
        replace_kept(
            checkpoint,
            sorted(
                (
                    (priority, fname)
                    for fname, priority in items.items()
                    if fname == (handler.filename or ignite_file_name(checkpoint, name, priority))
                ),
                key=lambda it: it[0],
            ),
        )
