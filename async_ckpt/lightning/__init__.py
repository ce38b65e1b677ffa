"""PyTorch Lightning integration: :class:`AsyncCheckpointIO`, a ``CheckpointIO`` plugin on the core pipeline.

Its name mirrors Lightning's own ``AsyncCheckpointIO``, so switching is one import. Needs the ``lightning`` extra.
"""

from async_ckpt.lightning.checkpoint_io import AsyncCheckpointIO

__all__ = ["AsyncCheckpointIO"]
