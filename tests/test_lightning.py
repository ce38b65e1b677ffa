"""AsyncCheckpointIO with a real Lightning Trainer on CPU: same files as TorchCheckpointIO, same resume, snapshot at
save time, no partial file under a final name after SIGKILL, failures raised in fit, removals deferred until safe."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

pytest.importorskip("lightning")

from _lightning_worker import Tiny
from conftest import checkpoint_names, clone_tree, temp_names, trees_equal
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from async_ckpt.errors import CheckpointWriteError
from async_ckpt.lightning import AsyncCheckpointIO
from async_ckpt.pipeline.storage import TMP_MARKER, FileStorage

TIMEOUT = 30.0
WORKER = Path(__file__).with_name("_lightning_worker.py")


class HeldStorage(FileStorage):
    """Every ``.ckpt`` write waits (bounded) until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__(fsync=False)
        self.go = threading.Event()
        self.entered = threading.Event()

    def _open(self, path: str) -> BinaryIO:
        if ".ckpt" + TMP_MARKER in os.path.basename(path):
            self.entered.set()
            if not self.go.wait(TIMEOUT):
                raise TimeoutError("test gate never opened")
        return super()._open(path)


class FullDisk(FileStorage):
    """A disk that is full for every ``.ckpt`` file."""

    def __init__(self) -> None:
        super().__init__(fsync=False)

    def _open(self, path: str) -> BinaryIO:
        if ".ckpt" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device (test double)")
        return super()._open(path)


def _fit(
    directory: Path,
    plugin: AsyncCheckpointIO | None,
    max_steps: int,
    *,
    ckpt_path: str | None = None,
    module: LightningModule | None = None,
    callbacks: list[Callback] | None = None,
    **checkpoint: Any,
) -> LightningModule:
    torch.manual_seed(0)
    model = module if module is not None else Tiny()
    options = {"save_top_k": 2, "monitor": "loss", "save_last": True, "every_n_train_steps": 2, **checkpoint}
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(directory),
        callbacks=[ModelCheckpoint(dirpath=str(directory), **options), *(callbacks or [])],
        plugins=[plugin] if plugin is not None else [],
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_same_files_as_torch_checkpoint_io(tmp_path: Path) -> None:
    """ModelCheckpoint(save_top_k=2, monitor, save_last, every_n_train_steps) leaves the same file names as with
    Lightning's TorchCheckpointIO, and every file loads equal to its synchronous twin."""
    run = tmp_path / "ckpt"
    _fit(run, None, max_steps=9)
    run.rename(tmp_path / "sync")
    _fit(run, AsyncCheckpointIO(fsync=False), max_steps=9)
    names = checkpoint_names(run)
    assert names == checkpoint_names(tmp_path / "sync")
    assert "last.ckpt" in names and len(names) == 3
    assert temp_names(run) == []
    for name in names:
        ours = torch.load(run / name, map_location="cpu", weights_only=False)
        theirs = torch.load(tmp_path / "sync" / name, map_location="cpu", weights_only=False)
        assert trees_equal(ours, theirs), name


def test_resume_from_last_matches_a_synchronous_resume(tmp_path: Path) -> None:
    """fit(ckpt_path="last") from this plugin's checkpoint ends with the same weights as from TorchCheckpointIO's."""
    finals = []
    for name, plugin in (("sync", None), ("async", AsyncCheckpointIO(fsync=False))):
        _fit(tmp_path / name, plugin, max_steps=5)
        model = _fit(tmp_path / name, plugin, max_steps=11, ckpt_path="last")
        finals.append(clone_tree(model.state_dict()))
    assert trees_equal(finals[0], finals[1])
    assert not trees_equal(finals[1], clone_tree(Tiny().state_dict()))


class _Record(Callback):
    """Records the module's state at every batch end, before ModelCheckpoint (Lightning runs it last) saves."""

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = clone_tree(pl_module.state_dict())


class _Mutating(Tiny):
    """Changes every parameter in place right after each checkpoint, while the writer is held back."""

    def __init__(self, storage: HeldStorage) -> None:
        super().__init__()
        self.storage = storage

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.add_(1000.0)

    def on_train_end(self) -> None:
        self.storage.go.set()


def test_tensors_changed_after_a_save_do_not_reach_the_file(tmp_path: Path) -> None:
    """Every file holds the weights at its save, although they were changed in place before anything was written."""
    storage = HeldStorage()
    record = _Record()
    plugin = AsyncCheckpointIO(storage=storage, max_pending=8)
    _fit(tmp_path, plugin, 4, module=_Mutating(storage), callbacks=[record], save_top_k=-1, every_n_train_steps=1)
    names = checkpoint_names(tmp_path)
    assert len(names) == 5  # four steps and last.ckpt
    for step in range(1, 5):
        saved = torch.load(tmp_path / f"epoch=0-step={step}.ckpt", map_location="cpu", weights_only=False)
        assert trees_equal(saved["state_dict"], record.states[step]), step


def test_sigkill_leaves_only_complete_files(tmp_path: Path) -> None:
    """A training process killed while a checkpoint is in flight leaves complete files under final names only."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("HELD "), line
        held = line.split(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    names = checkpoint_names(tmp_path)
    assert any(t.startswith(held + TMP_MARKER) for t in temp_names(tmp_path))  # killed with a write in flight
    assert "last.ckpt" in names
    for name in names:
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=False)
        assert "state_dict" in state and "loops" in state, name


def test_failing_disk_raises_in_fit(tmp_path: Path) -> None:
    """A checkpoint that cannot be written makes fit raise CheckpointWriteError with the OSError as cause."""
    with pytest.raises(CheckpointWriteError) as info:
        _fit(tmp_path, AsyncCheckpointIO(storage=FullDisk()), max_steps=4)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert checkpoint_names(tmp_path) == []


def test_remove_waits_for_the_replacing_checkpoint(tmp_path: Path) -> None:
    """remove_checkpoint leaves the old file in place while the checkpoint saved before it is pending, and removes
    it once that one is durable; a removal never overtakes a pending write of the same path."""
    storage = HeldStorage()
    plugin = AsyncCheckpointIO(storage=storage, max_pending=4)
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    plugin.save_checkpoint({"w": torch.ones(3)}, old)
    plugin.save_checkpoint({"w": torch.zeros(3)}, new)
    plugin.remove_checkpoint(old)
    assert storage.entered.wait(TIMEOUT)
    assert not old.exists() and not new.exists()  # nothing is written yet, and nothing removed
    plugin.save_checkpoint({"w": torch.ones(1)}, tmp_path / "gone.ckpt")
    plugin.remove_checkpoint(tmp_path / "gone.ckpt")  # queued behind its own pending write
    storage.go.set()
    plugin.teardown()
    assert checkpoint_names(tmp_path) == ["new.ckpt"]
    assert torch.equal(plugin.load_checkpoint(new)["w"], torch.zeros(3))
    plugin.remove_checkpoint(new)  # nothing pending: at once
    assert checkpoint_names(tmp_path) == []


def test_evicted_file_stays_until_its_replacement_is_durable(tmp_path: Path) -> None:
    """An older checkpoint removed by ModelCheckpoint's request stays on disk while its replacement is pending."""
    storage = HeldStorage()
    plugin = AsyncCheckpointIO(storage=storage)
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    storage.go.set()
    plugin.save_checkpoint({"w": torch.ones(3)}, old)
    plugin.teardown()
    storage.go.clear()
    storage.entered.clear()
    plugin.save_checkpoint({"w": torch.zeros(3)}, new)
    plugin.remove_checkpoint(old)
    assert storage.entered.wait(TIMEOUT)
    assert old.exists() and not new.exists()
    storage.go.set()
    plugin.teardown()
    assert checkpoint_names(tmp_path) == ["new.ckpt"]


def test_load_waits_for_a_pending_write(tmp_path: Path) -> None:
    """load_checkpoint of a path still being written returns its new content, not an older file's."""
    storage = HeldStorage()
    plugin = AsyncCheckpointIO(storage=storage)
    path = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    plugin.save_checkpoint({"w": torch.full((2,), 7.0)}, path)
    threading.Timer(0.0, storage.go.set).start()
    assert torch.equal(plugin.load_checkpoint(path)["w"], torch.full((2,), 7.0))
    plugin.teardown()


def test_storage_options_are_refused(tmp_path: Path) -> None:
    """storage_options raise TypeError, as with TorchCheckpointIO; remote URLs raise ValueError."""
    plugin = AsyncCheckpointIO()
    with pytest.raises(TypeError, match="storage_options"):
        plugin.save_checkpoint({}, tmp_path / "a.ckpt", storage_options={"x": 1})
    with pytest.raises(ValueError, match="local files only"):
        plugin.save_checkpoint({}, "s3://bucket/a.ckpt")
    plugin.teardown()
    shutil.rmtree(tmp_path)


def test_teardown_during_an_exception_attaches_the_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """teardown() while an exception ends training logs the write failure instead of replacing that exception."""
    plugin = AsyncCheckpointIO(storage=FullDisk())
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    with pytest.raises(RuntimeError, match="boom") as info:
        try:
            raise RuntimeError("boom")
        finally:
            plugin.teardown()
    assert any("a.ckpt" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    if sys.version_info >= (3, 11):
        assert any("a.ckpt" in note for note in info.value.__notes__)


class HeldThenFull(HeldStorage):
    """Holds every ``.ckpt`` write until ``go``, then fails the ones named ``new.ckpt`` (disk full)."""

    def _open(self, path: str) -> BinaryIO:
        f = super()._open(path)
        if os.path.basename(path).startswith("new.ckpt"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device (test double)")
        return f


def test_failed_replacement_keeps_the_evicted_file(tmp_path: Path) -> None:
    """When the checkpoint saved before a removal fails, the file to be removed stays, through the raise and
    teardown."""
    storage = HeldThenFull()
    storage.go.set()
    plugin = AsyncCheckpointIO(storage=storage)
    old = tmp_path / "old.ckpt"
    plugin.save_checkpoint({"w": torch.ones(3)}, old)
    plugin.teardown()
    storage.go.clear()
    plugin.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "new.ckpt")
    plugin.remove_checkpoint(old)
    storage.go.set()
    with pytest.raises(CheckpointWriteError):
        while True:  # the failure is raised by the first call after the write failed
            plugin.remove_checkpoint(tmp_path / "never-saved.ckpt")
    plugin.teardown()
    assert checkpoint_names(tmp_path) == ["old.ckpt"]


def test_removal_waits_for_a_failing_replacement_behind_a_later_save(tmp_path: Path) -> None:
    """A removal asked for while its replacement is pending is not carried out by a later save that succeeds when the
    replacement itself fails: the evicted file stays."""
    storage = HeldThenFull()
    storage.go.set()
    plugin = AsyncCheckpointIO(storage=storage)
    old = tmp_path / "old.ckpt"
    plugin.save_checkpoint({"w": torch.ones(3)}, old)
    plugin.teardown()
    storage.go.clear()
    plugin.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "new.ckpt")  # will fail
    plugin.remove_checkpoint(old)
    plugin.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "later.ckpt")  # will succeed
    storage.go.set()
    with pytest.raises(CheckpointWriteError):
        plugin.teardown()
    assert checkpoint_names(tmp_path) == ["later.ckpt", "old.ckpt"]
