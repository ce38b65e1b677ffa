"""The on-disk format: exactly what ``torch.save`` writes, so ``torch.load(weights_only=True)`` reads it."""

from __future__ import annotations

from typing import Any, BinaryIO

import torch

__all__ = ["serialize"]


def serialize(obj: Any, f: BinaryIO) -> None:
    """Write ``obj`` to the open binary file ``f`` in PyTorch's zip checkpoint format.

    Args:
        obj: a tree of dicts, lists, tuples, tensors and plain Python values.
        f: a writable binary file object.

    Raises:
        pickle.PicklingError: or another exception when ``obj`` holds something that cannot be pickled.
    """
    torch.save(obj, f)
