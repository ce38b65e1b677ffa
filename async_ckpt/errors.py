"""Exceptions raised by async_ckpt.

The tree is small on purpose::

    AsyncCheckpointError            base of everything this library raises on its own
    ├── CheckpointWriteError        a background write, link or removal failed; ``__cause__`` is the original
    ├── SnapshotError               the state could not be staged at the event (nothing was queued)
    └── WriterClosedError           work was submitted after ``close()``

Bad constructor arguments raise the same built-in types MONAI's ``CheckpointSaver`` and ignite's ``Checkpoint``
raise (``AssertionError``, ``ValueError``, ``TypeError``) so that code written against MONAI keeps working.
"""

from __future__ import annotations


class AsyncCheckpointError(RuntimeError):
    """Base class of the errors raised by async_ckpt itself."""


class CheckpointWriteError(AsyncCheckpointError):
    """A checkpoint could not be made durable in the background.

    Raised on the training thread at the next checkpoint event, ``wait()``, ``close()`` or ``COMPLETED``, once.
    The original exception is chained as ``__cause__``.

    Attributes:
        path: the final path that was being written (or removed).
        more: how many further failures of the same saver happened before this one was reported.
    """

    def __init__(self, message: str, path: str, more: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.more = more


class SnapshotError(AsyncCheckpointError):
    """The state could not be copied at the checkpoint event; nothing was queued for it."""


class WriterClosedError(AsyncCheckpointError):
    """A save was requested from a saver that has been closed."""
