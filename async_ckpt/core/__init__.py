"""Layer 2, the core: the framework-free ``Checkpointer`` and what every integration shares.

:mod:`~async_ckpt.core.save_pipeline` (snapshot, enqueue, account, errors), :mod:`~async_ckpt.core.retention`
(keep-last-N / keep-best-N decided without I/O), :mod:`~async_ckpt.core.agreement` (rank agreement),
:mod:`~async_ckpt.core.resume` (finding and cleaning up checkpoints) and :mod:`~async_ckpt.core.checkpointer`.
Imports only from :mod:`async_ckpt.pipeline` and the shared vocabulary (``errors``, ``options``).
"""
