"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), on the ignite engine; needs torch>=2.9.

See :mod:`async_ckpt.sharded.saver` for the guarantees; this package exports its public names.
"""

from async_ckpt.sharded.loading import is_complete, latest_sharded_checkpoint, load
from async_ckpt.sharded.saver import ShardedCheckpointSaver
from async_ckpt.sharded.state import ModelOptimizerState
from async_ckpt.sharded.storage import ShardedStorage
from async_ckpt.sharded.writer import DurableFileSystemWriter

__all__ = [
    "DurableFileSystemWriter",
    "ModelOptimizerState",
    "ShardedCheckpointSaver",
    "ShardedStorage",
    "is_complete",
    "latest_sharded_checkpoint",
    "load",
]
