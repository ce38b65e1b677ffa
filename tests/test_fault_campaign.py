"""Fault campaign: many saves while a seeded storage double fails random writes, fsyncs, renames and unlinks, on the
direct (O_DIRECT) and the buffered write path."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from _doubles import direct_io_refusal
from conftest import checkpoint_names, load_checkpoint, temp_names
from ignite.engine import Engine

from async_ckpt import AsyncCheckpointSaver, CheckpointWriteError
from async_ckpt.pipeline.integrity import verify
from async_ckpt.pipeline.storage import FileStorage

SAVES = int(os.environ.get("ASYNC_CKPT_CAMPAIGN_SAVES", "120"))
SEED = int(os.environ.get("ASYNC_CKPT_CAMPAIGN_SEED", "1234"))
SHAPE = (320, 256)  # 320 KiB of float32


class RandomFaults(FileStorage):
    """Fails each file operation with probability ``p`` (seeded), counting what it injected."""

    def __init__(self, p: float, seed: int, direct_io: bool) -> None:
        super().__init__(fsync=True, direct_io=direct_io)
        self.p = p
        self.enabled = True
        self.rng = random.Random(seed)
        self.injected: dict[str, int] = {}
        self.direct_writes = 0  # O_DIRECT writes that went through

    def _maybe(self, op: str) -> None:
        if self.enabled and self.rng.random() < self.p:
            self.injected[op] = self.injected.get(op, 0) + 1
            code = self.rng.choice([errno.ENOSPC, errno.EIO, errno.EACCES])
            raise OSError(code, f"injected {op} fault ({os.strerror(code)})")

    def _open(self, path: str) -> BinaryIO:
        self._maybe("open")
        return super()._open(path)

    def _fsync_fd(self, fd: int) -> None:
        self._maybe("fsync")
        super()._fsync_fd(fd)

    def _replace(self, src: str, dst: str) -> None:
        self._maybe("rename")
        super()._replace(src, dst)

    def _unlink(self, path: str) -> None:
        self._maybe("unlink")
        super()._unlink(path)

    def _open_direct(self, path: str) -> int:
        self._maybe("open_direct")
        return super()._open_direct(path)

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        self._maybe("pwrite_direct")
        n = super()._pwrite_direct(fd, view, offset)
        self.direct_writes += 1
        return n


class Counter:
    """A tiny state object whose state records the step, so every file can be checked against its name."""

    def __init__(self) -> None:
        self.step = 0
        self.weights = torch.zeros(SHAPE)  # above the direct path's minimum: its record goes O_DIRECT

    def state_dict(self) -> dict[str, object]:
        return {"step": self.step, "weights": self.weights}


@pytest.mark.parametrize("io_path", ["direct", "buffered"])
def test_random_faults_never_leave_a_bad_file_or_a_lost_error(tmp_path: Path, io_path: str) -> None:
    """Under random I/O faults every failure is reported once, every final-named file verifies and holds the state
    of its step, and the top-N lists match the files on disk, keep the newest interval and the best metric save."""
    if io_path == "direct" and (why := direct_io_refusal(tmp_path)) is not None:
        pytest.skip(why)
    storage = RandomFaults(p=0.08, seed=SEED, direct_io=io_path == "direct")
    state = Counter()
    engine = Engine(lambda e, b: None)
    rng = random.Random(SEED + 1)
    saver = AsyncCheckpointSaver(
        str(tmp_path),
        {"counter": state},
        save_key_metric=True,
        key_metric_name="score",
        key_metric_n_saved=2,
        save_interval=1,
        epoch_level=False,
        n_saved=3,
        storage=storage,
    )
    raised = 0
    reported = 0
    for step in range(1, SAVES + 1):
        state.step = step
        state.weights.fill_(step)
        engine.state.iteration = engine.state.epoch = step
        engine.state.metrics = {"score": round(rng.random(), 4)}
        for event in (saver.interval_completed, saver.metrics_completed):
            try:
                event(engine)
            except CheckpointWriteError as exc:
                raised += 1
                reported += 1 + exc.more
                assert isinstance(exc.__cause__, OSError) and "injected" in str(exc.__cause__)
    storage.enabled = False
    try:
        saver.wait()
    except CheckpointWriteError as exc:
        raised += 1
        reported += 1 + exc.more
    # One clean save per list flushes the evictions that rollbacks deferred to "the next durable save".
    state.step = SAVES + 1
    state.weights.fill_(SAVES + 1)
    engine.state.iteration = engine.state.epoch = SAVES + 1
    engine.state.metrics = {"score": 2.0}
    saver.interval_completed(engine)
    saver.metrics_completed(engine)
    saver.close()

    saves = saver.stats.saves
    failed = [s for s in saves if not s.ok]
    print(
        f"\nfault campaign: saves={len(saves)} injected={sum(storage.injected.values())} {storage.injected} "
        f"failed_saves={len(failed)} errors_raised={raised} failures_reported={reported} "
        f"files_left={len(checkpoint_names(tmp_path))} direct_writes={storage.direct_writes}"
    )
    if io_path == "direct":
        assert storage.direct_writes > SAVES // 2, "the direct path was not exercised"
    else:
        assert storage.direct_writes == 0
    injected = sum(storage.injected.values())
    assert injected > 5 and failed, "the campaign must actually inject faults"
    # Every failed save is reported; so are failed evictions and manifest updates of durable saves. A job stops
    # at its first fault, but a durable save can meet two (eviction, then manifest), reported as one failure.
    assert len(failed) <= reported <= injected
    assert temp_names(tmp_path) == []
    names = checkpoint_names(tmp_path)
    for name in names:
        assert verify(str(tmp_path / name)).ok, name
        stored = load_checkpoint(tmp_path / name)
        assert torch.equal(stored["weights"], torch.full(SHAPE, float(stored["step"])))
        if "iteration=" in name:
            assert stored["step"] == int(name.split("iteration=")[1].split(".pt")[0])
    interval = sorted(it.filename for it in saver._interval_checkpoint._saved)  # type: ignore[union-attr]
    best = sorted(it.filename for it in saver._key_metric_checkpoint._saved)  # type: ignore[union-attr]
    assert sorted(interval + best) == names, "bookkeeping and disk disagree"
    assert len(interval) <= 3 and len(best) <= 2
    assert f"counter_iteration={SAVES + 1}.pt" in interval
    assert "counter_key_metric=2.0000.pt" in best
