"""Split a nested state into its tensors and a tensor-free skeleton, and rebuild it around other tensors.

The skeleton is a pickle of the state in which every tensor stands as a *slot*. One pass of the C pickler walks the
tree, collects the tensors and copies every non-tensor value (an optimizer's hyper-parameters, a module
``state_dict``'s ``_metadata``) at the call, so later edits of the live state do not reach the checkpoint. The only
Python code it runs per object is the reducer of each tensor (``benchmarks.save_path`` compares it with the Python
walk it replaced). The bytes are the fingerprint too (equal skeletons pickle equal), and :func:`unflatten`, the
slower half, runs on the writer thread.

Objects keep the identities they had: a tensor or a container reached twice is one object in the rebuilt tree, as
``torch.save`` of the live state would load it. A value that cannot be pickled fails here, at the call, where
``torch.save`` would have failed in the writer later.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Flat", "flatten", "unflatten"]


def _tensor() -> torch.Tensor:
    """What a slot unpickles through: :class:`_Loader` resolves this name to "the next tensor" instead."""
    raise RuntimeError("a skeleton from async_ckpt.pipeline._tree must be rebuilt with unflatten()")


@dataclass
class Flat:
    """A nested state split into a tensor-free skeleton and its tensors.

    Attributes:
        skeleton: the state pickled with every tensor replaced by a slot (non-tensor values copied).
        tensors: the distinct tensor objects of the state, in the order their slots unpickle.
    """

    skeleton: bytes
    tensors: list[torch.Tensor]

    def fingerprint(self) -> bytes:
        """Bytes that are equal for equal skeletons: the skeleton itself."""
        return self.skeleton


class _Reducers(dict[type, Callable[[Any], Any]]):
    """The pickler's dispatch table: every tensor type reduces to a slot; other types to what pickle would use."""

    def __init__(self, reduce_tensor: Callable[[Any], Any]) -> None:
        super().__init__({torch.Tensor: reduce_tensor, torch.nn.Parameter: reduce_tensor})
        self._reduce_tensor = reduce_tensor

    def __missing__(self, cls: type) -> Callable[[Any], Any]:
        # Reached once per object of a type not in the table (OrderedDict, user classes; not dict, list, str, int).
        if isinstance(cls, type) and issubclass(cls, torch.Tensor):
            self[cls] = self._reduce_tensor
            return self._reduce_tensor
        return copyreg.dispatch_table[cls]  # KeyError: the pickler falls back to the object's __reduce_ex__


def flatten(tree: Any) -> Flat:
    """Split ``tree`` into a skeleton and its tensors; non-tensor values are copied.

    Containers keep their type (``OrderedDict`` stays ``OrderedDict``) and their attributes (a module
    ``state_dict``'s ``_metadata``), so the rebuilt tree pickles to what ``torch.save`` would have written.

    Raises:
        Exception: whatever pickling raises for a value that cannot be pickled.
    """
    tensors: list[torch.Tensor] = []
    add = tensors.append
    slot = (_tensor, ())

    def reduce_tensor(t: torch.Tensor) -> tuple[Callable[[], torch.Tensor], tuple[()]]:
        add(t)
        return slot

    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _Reducers(reduce_tensor)
    pickler.dump(tree)
    return Flat(out.getvalue(), tensors)


class _Loader(pickle.Unpickler):
    def __init__(self, skeleton: bytes, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__(io.BytesIO(skeleton))
        self.rest = iter(tensors)

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == _tensor.__name__:
            return self.rest.__next__
        return super().find_class(module, name)


def unflatten(skeleton: bytes, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild a tree from ``skeleton``, putting ``tensors[i]`` where the ``i``-th slot stands.

    Raises:
        ValueError: ``tensors`` holds more or fewer tensors than ``skeleton`` has slots.
    """
    loader = _Loader(skeleton, tensors)
    try:
        tree = loader.load()
    except StopIteration:
        raise ValueError("unflatten: fewer tensors than the skeleton has slots") from None
    if next(loader.rest, None) is not None:
        raise ValueError("unflatten: more tensors than the skeleton has slots")
    return tree
