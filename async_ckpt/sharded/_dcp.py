"""The ``torch.distributed.checkpoint`` (DCP) API that :mod:`async_ckpt.sharded` uses, checked once, at import.

Every module of the package takes its DCP names from here, so that on a torch older than :data:`MIN_TORCH` (or one
built without ``torch.distributed``) importing any of them raises an ``ImportError`` that says which torch it needs,
instead of a bare missing-name error from inside torch.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

try:  # torch 2.9 brought DefaultStager, StagingOptions, AsyncSaveResponse and async_save(async_stager=, no_dist=)
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
    from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save
    from torch.distributed.checkpoint.storage import WriteResult
except ImportError as exc:
    if not dist.is_available():
        raise ImportError(
            f"async_ckpt.sharded needs torch.distributed, which this build of torch ({torch.__version__}) lacks: "
            "install a torch build with distributed support, or save with AsyncCheckpointSaver."
        ) from exc
    raise ImportError(
        f"async_ckpt.sharded needs torch>=2.9 (found {torch.__version__}): {exc}. Upgrade torch "
        "(pip install 'torch>=2.9'), or save with AsyncCheckpointSaver, which works with torch>=2.3."
    ) from exc

__all__ = [
    "MIN_TORCH",
    "AsyncSaveResponse",
    "AsyncStager",
    "DefaultSavePlanner",
    "DefaultStager",
    "FileSystem",
    "FileSystemReader",
    "FileSystemWriter",
    "Metadata",
    "SavePlan",
    "SavePlanner",
    "StagingOptions",
    "StateDictOptions",
    "WriteResult",
    "async_save",
    "dcp_load",
    "get_model_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_state_dict",
]

MIN_TORCH = (2, 9)
"""The oldest torch release that has every DCP API this package uses."""

_MISSING = {"async_stager", "no_dist", "planner", "process_group", "storage_writer"} - set(
    inspect.signature(async_save).parameters
)
if _MISSING:
    raise ImportError(
        f"async_ckpt.sharded needs torch>=2.9 (found {torch.__version__}): torch.distributed.checkpoint.async_save "
        f"has no argument {', '.join(sorted(_MISSING))}. Upgrade torch (pip install 'torch>=2.9'), or save with "
        "AsyncCheckpointSaver, which works with torch>=2.3."
    )
