"""The names of sharded checkpoint directories: ignite's ``Checkpoint`` file names without the extension.

Names are formatted with ignite's public ``Checkpoint.setup_filename_pattern``, so that a sharded checkpoint is named
as ignite's ``Checkpoint`` (and MONAI's ``CheckpointSaver``) names a file, and read back from ``save_dir`` when a
saver resumes: the step of an interval or final checkpoint, the score of a scored one.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Iterable

from ignite.handlers import Checkpoint

from async_ckpt.core.retention import Entry
from async_ckpt.pipeline.storage import is_temp_name
from async_ckpt.sharded.kept import SCORE, Lists
from async_ckpt.sharded.loading import METADATA_NAME

__all__ = ["CheckpointNames", "format_score"]

logger = logging.getLogger("async_ckpt")

_INTEGER = r"\d+"
_SCORE = r"[-+]?(?:\d+(?:\.\d*)?|inf)"


def format_score(score: float) -> str:
    """A score as ignite's ``Checkpoint`` writes it into a name: integers as they are, other numbers to 4 decimals."""
    return f"{score}" if isinstance(score, numbers.Integral) else f"{score:.4f}"


def _parse_score(text: str) -> float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


class CheckpointNames:
    """The directory names one saver gives its checkpoints.

    Args:
        file_prefix: prefix of every name (``""``: none).
        epoch_level: interval checkpoints count epochs (``True``) or iterations (``False``).
        score_name: the score's name in the names of scored checkpoints (``None``: the score alone).
    """

    def __init__(self, file_prefix: str, epoch_level: bool, score_name: str | None) -> None:
        self.file_prefix = file_prefix
        self.step_name = "epoch" if epoch_level else "iteration"
        self.score_name = score_name

    def interval(self, step: int) -> str:
        """``[<file_prefix>_]checkpoint_<epoch|iteration>=<step>``."""
        return self._name(self.step_name, str(step))

    def best(self, score: float) -> str:
        """``[<file_prefix>_]checkpoint_<score_name>=<score>`` (``..._checkpoint_<score>`` without ``score_name``)."""
        return self._name(self.score_name, format_score(score))

    def final(self, iteration: int) -> str:
        """``[<file_prefix>_]checkpoint_final_iteration=<iteration>`` (MONAI's name)."""
        return self._name("final_iteration", str(iteration))

    def _name(self, score_name: str | None, score: str) -> str:
        """ignite's default name for a checkpoint scored ``score`` (``Checkpoint.setup_filename_pattern``), without
        the extension."""
        pattern = Checkpoint.setup_filename_pattern(
            with_prefix=bool(self.file_prefix),
            with_score=True,
            with_score_name=score_name is not None,
            with_global_step=False,
        )
        return pattern.removesuffix(".{ext}").format(
            filename_prefix=self.file_prefix, name="checkpoint", score_name=score_name, score=score
        )

    def _matching(self, names: Iterable[str], score_name: str | None, number: str) -> list[tuple[float, str]]:
        """``(score, name)`` of the ``names`` given to a checkpoint scored under ``score_name``, by score (``number``
        is the regular expression of a score)."""
        before, after = self._name(score_name, "\0").split("\0")
        pattern = re.compile(rf"{re.escape(before)}({number}){re.escape(after)}")
        found: list[tuple[float, str]] = []
        for name in names:
            m = pattern.fullmatch(name)
            if m is not None:
                found.append((_parse_score(m.group(1)), name))
        return sorted(found, key=lambda item: item[0])

    def kept_in(self, save_dir: str, scored: bool, n_best: int | None) -> Lists:
        """The lists of the published checkpoints in ``save_dir`` with these names (for ``resume``): interval and
        final ones oldest step first, the best ``n_best`` scored ones (with ``scored``), and the newest interval
        one as the last published."""
        try:
            names = [n for n in os.listdir(save_dir) if not is_temp_name(n)]
        except FileNotFoundError:
            names = []
        names = [n for n in names if os.path.isfile(os.path.join(save_dir, n, METADATA_NAME))]

        def entries(score_name: str) -> list[Entry]:
            return [
                Entry(os.path.join(save_dir, n), int(step)) for step, n in self._matching(names, score_name, _INTEGER)
            ]

        interval, finals = entries(self.step_name), entries("final_iteration")
        best: list[Entry] = []
        if scored:
            found = self._matching(names, self.score_name, _SCORE)
            if n_best is not None and len(found) > n_best:
                logger.info(
                    "async_ckpt: resume keeps the best %d scored checkpoints; leaving %s alone",
                    n_best,
                    [os.path.join(save_dir, n) for _, n in found[:-n_best]],
                )
                found = found[-n_best:]
            best = [Entry(os.path.join(save_dir, n), 0, {SCORE: score}) for score, n in found]
        return interval, best, finals, interval[-1].path if interval else None
