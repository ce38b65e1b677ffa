"""async_ckpt: PyTorch checkpoints written in the background, durably; a drop-in for MONAI's CheckpointSaver."""

from async_ckpt._version import __version__
from async_ckpt.errors import AsyncCheckpointError, CheckpointWriteError, SnapshotError, WriterClosedError
from async_ckpt.options import AsyncOptions
from async_ckpt.saver import AsyncCheckpointSaver
from async_ckpt.storage import FileStorage
from async_ckpt.telemetry import SaveStats

__all__ = [
    "AsyncCheckpointError",
    "AsyncCheckpointSaver",
    "AsyncOptions",
    "CheckpointWriteError",
    "FileStorage",
    "SaveStats",
    "SnapshotError",
    "WriterClosedError",
    "__version__",
]
