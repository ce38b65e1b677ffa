"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), on the ignite engine; needs torch>=2.9.

See :mod:`async_ckpt.sharded.saver` for the guarantees; this package exports its public names.
"""

from async_ckpt.sharded.saver import (
    DurableFileSystemWriter,
    ModelOptimizerState,
    ShardedCheckpointSaver,
    ShardedStorage,
    is_complete,
    latest_sharded_checkpoint,
    load,
)

__all__ = [
    "DurableFileSystemWriter",
    "ModelOptimizerState",
    "ShardedCheckpointSaver",
    "ShardedStorage",
    "is_complete",
    "latest_sharded_checkpoint",
    "load",
]
