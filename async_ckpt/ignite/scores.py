"""MONAI's score functions for the saver's final and key-metric ``Checkpoint`` objects, as MONAI 1.6 defines them.

ignite's ``Checkpoint`` ranks saves by the number a score function returns and puts it in the file name, so these
must return exactly what MONAI's do (including MONAI's ``-1`` and warning for a non-scalar metric) for the saver to
keep and name the same files as MONAI's ``CheckpointSaver``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine

__all__ = ["final_score", "is_scalar", "key_metric_score"]


def is_scalar(value: Any) -> bool:
    """MONAI's ``is_scalar``: a 0-d tensor, or anything ``numpy.isscalar`` accepts."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.ndim == 0
    return bool(np.isscalar(value))


def final_score(engine: Engine) -> Any:
    """The final checkpoint's score: the iteration (``final_iteration`` in the file name)."""
    return engine.state.iteration


def key_metric_score(key_metric_name: str | None, negative_sign: bool) -> Callable[[Engine], Any]:
    """The key-metric checkpoint's score function.

    Args:
        key_metric_name: the metric in ``engine.state.metrics``; ``None`` reads ``engine.state.key_metric_name``.
        negative_sign: smaller metric is better (the score is the negated metric).
    """

    def score(engine: Engine) -> Any:
        if isinstance(key_metric_name, str):
            metric_name = key_metric_name
        elif hasattr(engine.state, "key_metric_name"):
            metric_name = engine.state.key_metric_name
        else:
            raise ValueError(f"Incompatible values: save_key_metric=True and key_metric_name={key_metric_name}.")
        metric = engine.state.metrics[metric_name]
        if not is_scalar(metric):
            warnings.warn(
                "key metric is not a scalar value, skip metric comparison and don't save a model."
                "please use other metrics as key metric, or change the `reduction` mode to 'mean'."
                f"got metric: {metric_name}={metric}.",
                stacklevel=2,
            )
            return -1
        return (-1 if negative_sign else 1) * metric

    return score
