"""What a sharded checkpoint holds: the values of a ``save_dict`` as DCP ``Stateful`` items.

Modules are saved by parameter name, without the ``module.`` prefixes of DDP/FSDP wrappers, and with sharded
parameters kept sharded; a model and its optimizer(s) go together (:class:`ModelOptimizerState`), since an
optimizer's own ``state_dict()`` is keyed by parameter index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from async_ckpt.sharded._dcp import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

__all__ = ["ModelOptimizerState", "as_dcp_items"]


class ModelOptimizerState:
    """A model and its optimizer(s) as one DCP ``Stateful`` item, keyed by parameter names.

    Uses ``torch.distributed.checkpoint.state_dict.get_state_dict``/``set_state_dict``: the keys carry no
    ``module.`` prefix of DDP/FSDP wrappers, FSDP/DTensor parameters stay sharded, and a fresh optimizer's state is
    initialized before loading (a bare ``optimizer.state_dict()`` of a fresh optimizer has no entries to load into).

    Args:
        model: the (possibly wrapped) model.
        optimizers: its optimizer, or several.
        options: passed to ``get_state_dict``/``set_state_dict`` (e.g. ``StateDictOptions(strict=False)``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )


class _ModuleState:
    """A module as a DCP ``Stateful`` item (wrapper prefixes removed, sharded parameters kept sharded)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict)


def _as_item(key: str, value: Any) -> Any:
    """What DCP gets for ``save_dict[key]``: a ``Stateful`` object or a plain dict (loaded in place)."""
    if isinstance(value, torch.optim.Optimizer):
        raise TypeError(
            f"save_dict[{key!r}] is an optimizer on its own; its state_dict() is keyed by parameter index and a fresh "
            "optimizer has no state to load into. Pass ModelOptimizerState(model, optimizer) instead."
        )
    if isinstance(value, torch.nn.Module):
        return _ModuleState(value)
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return value
    if isinstance(value, dict):
        return value
    raise TypeError(
        f"save_dict[{key!r}] is a {type(value).__name__}: pass modules, ModelOptimizerState, objects with "
        "state_dict()/load_state_dict() (schedulers, ignite engines) or plain dicts."
    )


def as_dcp_items(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What DCP gets for ``save_dict``: each value as a ``Stateful`` object or a plain dict (see :func:`_as_item`)."""
    return {key: _as_item(key, value) for key, value in save_dict.items()}
