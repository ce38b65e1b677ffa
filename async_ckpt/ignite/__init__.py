"""Layer 3, the ignite/MONAI integration: :class:`AsyncCheckpointSaver`, a drop-in for MONAI's ``CheckpointSaver``.

ignite's ``Checkpoint`` decides file names and what it keeps; the core pipeline snapshots and writes.
"""

from async_ckpt.ignite.saver import AsyncCheckpointSaver

__all__ = ["AsyncCheckpointSaver"]
