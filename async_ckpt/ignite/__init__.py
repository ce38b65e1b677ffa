"""Layer 3, the ignite/MONAI integration: :class:`AsyncCheckpointSaver`, a drop-in for MONAI's ``CheckpointSaver``.

ignite's ``Checkpoint`` decides file names and what it keeps; the core pipeline snapshots and writes. The saver
(:mod:`.saver`) composes small pieces: the save handler ignite calls (:mod:`.save_handler`), the ``Checkpoint``
list read and replaced through its public ``state_dict``/``load_state_dict`` (:mod:`.kept`), MONAI's score
functions (:mod:`.scores`), the flush at the end of a run (:mod:`.flush`), background prewarm (:mod:`.prewarm`) and
the preemption signal (:mod:`.preemption`).
"""

from async_ckpt.ignite.saver import AsyncCheckpointSaver

__all__ = ["AsyncCheckpointSaver"]
