"""async_ckpt: PyTorch checkpoints written in the background, durably.

``Checkpointer`` serves a plain training loop; ``AsyncCheckpointSaver`` is a drop-in for MONAI's ``CheckpointSaver``
(an ignite handler); ``async_ckpt.lightning.AsyncCheckpointIO`` is a Lightning ``CheckpointIO`` plugin and
``async_ckpt.sharded`` saves ``torch.distributed.checkpoint`` states. All of them share one background writer.
"""

from typing import TYPE_CHECKING, Any

from async_ckpt._version import __version__
from async_ckpt.core.checkpointer import Checkpointer, CheckpointInfo, SaveHandle
from async_ckpt.core.resume import latest_checkpoint
from async_ckpt.core.uploader import UploadOptions
from async_ckpt.errors import AsyncCheckpointError, CheckpointWriteError, SnapshotError, WriterClosedError
from async_ckpt.options import AsyncOptions
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.telemetry import SaveStats

if TYPE_CHECKING:
    from async_ckpt.ignite.saver import AsyncCheckpointSaver

__all__ = [
    "AsyncCheckpointError",
    "AsyncCheckpointSaver",
    "AsyncOptions",
    "CheckpointInfo",
    "CheckpointWriteError",
    "Checkpointer",
    "FileStorage",
    "SaveHandle",
    "SaveStats",
    "SnapshotError",
    "UploadOptions",
    "WriterClosedError",
    "__version__",
    "latest_checkpoint",
]


def __getattr__(name: str) -> Any:
    # The ignite saver is imported on first use, so that a plain loop (``Checkpointer``) does not load ignite.
    if name == "AsyncCheckpointSaver":
        from async_ckpt.ignite.saver import AsyncCheckpointSaver

        return AsyncCheckpointSaver
    raise AttributeError(f"module 'async_ckpt' has no attribute {name!r}")
