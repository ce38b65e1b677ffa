"""Layer 1, the pipeline: snapshot a state into reused buffers, serialize it, write it durably in the background.

No framework and no retention here: :mod:`~async_ckpt.pipeline.snapshot` (staging copies),
:mod:`~async_ckpt.pipeline.serialize` (torch's zip format, 4 KiB-aligned records),
:mod:`~async_ckpt.pipeline.storage` (file operations and the commit protocol),
:mod:`~async_ckpt.pipeline.writer` (the background writer thread), :mod:`~async_ckpt.pipeline.integrity` (manifest,
verification) and :mod:`~async_ckpt.pipeline.telemetry`.
"""
