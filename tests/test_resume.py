"""Resuming after a restart: the newest good checkpoint, stale temp files, and top-N retention across runs.

The retention tests use MONAI's ``CheckpointSaver`` as the oracle: a run stopped after 4 of 8 epochs and continued by
a second saver (``resume=True``) must leave the files one uninterrupted MONAI run leaves, with the same contents;
without ``resume`` the second saver must leave what MONAI's second saver leaves (it does not know the old files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import METRICS, RETENTION, checkpoint_names, flip_tensor_byte, load_checkpoint, make_training, trees_equal
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from async_ckpt import AsyncCheckpointSaver, FileStorage
from async_ckpt.core.resume import find_latest, latest_checkpoint, remove_stale_temp_files
from async_ckpt.pipeline.integrity import MANIFEST_NAME, read_manifest
from async_ckpt.pipeline.storage import TMP_MARKER, temp_owner


class Both:
    """One ``save_dict`` entry holding the model and the optimizer (so a one-key save_dict still saves everything)."""

    def __init__(self, net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.net, self.opt = net, opt

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


CONFIGS: dict[str, tuple[bool, dict[str, Any]]] = {  # name: (one save_dict key, saver arguments)
    "two-objects": (False, RETENTION),
    "one-object-with-key-metric-state": (True, {**RETENTION, "key_metric_save_state": True}),
}


def load_all(directory: Path) -> dict[str, Any]:
    """Every checkpoint of ``directory`` by name, loaded."""
    return {n: load_checkpoint(directory / n) for n in checkpoint_names(directory)}


def dead_pid() -> int:
    """The id of a process that has exited and been reaped (so no process has it, barring reuse)."""
    proc = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    assert proc.wait(timeout=60) == 0
    return proc.pid


def make_saver(impl: str, save_dir: Path, save_dict: dict[str, Any], **kwargs: Any) -> Any:
    """MONAI's saver (``impl="monai"``) or ours with the same MONAI arguments."""
    if impl == "monai":
        return CheckpointSaver(save_dir=str(save_dir), save_dict=save_dict, **kwargs)
    return AsyncCheckpointSaver(str(save_dir), save_dict, **kwargs)


def run_segment(
    impl: str,
    save_dir: Path,
    kwargs: dict[str, Any],
    *,
    stop_after: int | None,
    resume_from: dict[str, Any] | None,
    single: bool = False,
) -> dict[str, Any]:
    """Train up to 8 epochs with one saver, optionally stopping after ``stop_after`` epochs (``engine.terminate``).

    ``resume_from`` (the engine's ``state_dict`` of an earlier segment) continues that run: the model and optimizer
    are loaded from the newest interval checkpoint of ``save_dir``. ``single`` saves both under one key
    (``{"model": Both}``). Returns the engine's state dict at the end.
    """
    t = make_training(metrics=METRICS)
    if resume_from is not None:
        path = latest_checkpoint(str(save_dir), reason="interval") if impl == "ours" else None
        if path is None:  # MONAI writes no manifest: take its newest interval file by name
            names = [n for n in checkpoint_names(save_dir) if "_epoch=" in n]
            path = str(save_dir / max(names, key=lambda n: int(n.split("=")[1][:-3])))
        state = torch.load(path, weights_only=True)
        t.net.load_state_dict(state["net"])
        t.opt.load_state_dict(state["opt"])
        t.engine.load_state_dict(resume_from)
    if stop_after is not None:

        @t.engine.on(Events.EPOCH_COMPLETED(once=stop_after))
        def _stop(engine: Engine) -> None:
            engine.terminate()

    saver = make_saver(impl, save_dir, {"model": Both(t.net, t.opt)} if single else t.save_dict, **kwargs)
    try:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=8)
    finally:
        if impl == "ours":
            saver.close()
    return dict(t.engine.state_dict())


def run_in_two(
    impl: str, save_dir: Path, resume: bool, kwargs: dict[str, Any] = RETENTION, single: bool = False
) -> None:
    """Run 4 epochs, stop, and continue to 8 epochs with a second saver on the same directory."""
    extra = {"resume": True} if resume else {}
    state = run_segment(impl, save_dir, kwargs, stop_after=4, resume_from=None, single=single)
    assert state["iteration"] == 12
    state = run_segment(impl, save_dir, {**kwargs, **extra}, stop_after=None, resume_from=state, single=single)
    assert state["iteration"] == 24


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_continues_retention_like_one_uninterrupted_monai_run(tmp_path: Path, config: str) -> None:
    """With ``resume=True`` a restarted run leaves exactly the files (and contents) of one uninterrupted MONAI run."""
    single, kwargs = CONFIGS[config]
    run_segment("monai", tmp_path / "monai", kwargs, stop_after=None, resume_from=None, single=single)
    run_in_two("ours", tmp_path / "ours", resume=True, kwargs=kwargs, single=single)
    name = "model" if single else "checkpoint"  # ignite names a one-entry save_dict after its key
    expected = sorted(
        [
            f"{name}_epoch=7.pt",
            f"{name}_epoch=8.pt",
            f"{name}_final_iteration=24.pt",
            f"{name}_key_metric=0.9000.pt",
            f"{name}_key_metric=0.9500.pt",
        ]
    )
    assert checkpoint_names(tmp_path / "monai") == expected
    assert checkpoint_names(tmp_path / "ours") == expected
    assert sorted(read_manifest(str(tmp_path / "ours"))["files"]) == expected
    ref, ours = load_all(tmp_path / "monai"), load_all(tmp_path / "ours")
    for name in expected:
        assert trees_equal(ref[name], ours[name]), f"{name} differs from the uninterrupted MONAI run"


def test_without_resume_old_files_are_never_pruned_like_monai(tmp_path: Path) -> None:
    """Without ``resume`` the second saver ignores the first run's files, exactly as MONAI's second saver does."""
    run_in_two("monai", tmp_path / "monai", resume=False)
    run_in_two("ours", tmp_path / "ours", resume=False)
    names = checkpoint_names(tmp_path / "monai")
    # The first segment's survivors are still there next to the second segment's.
    for old in ("checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt", "checkpoint_final_iteration=12.pt"):
        assert old in names
    assert {"checkpoint_epoch=7.pt", "checkpoint_epoch=8.pt", "checkpoint_final_iteration=24.pt"} <= set(names)
    assert checkpoint_names(tmp_path / "ours") == names
    ref, ours = load_all(tmp_path / "monai"), load_all(tmp_path / "ours")
    for name in names:
        assert trees_equal(ref[name], ours[name]), f"{name} differs from MONAI's"


def test_resume_on_an_empty_directory_is_a_fresh_run(tmp_path: Path) -> None:
    """``resume=True`` with nothing to resume from behaves like a first run."""
    run_segment("ours", tmp_path, {**RETENTION, "resume": True}, stop_after=None, resume_from=None)
    assert checkpoint_names(tmp_path) == [
        "checkpoint_epoch=7.pt",
        "checkpoint_epoch=8.pt",
        "checkpoint_final_iteration=24.pt",
        "checkpoint_key_metric=0.9000.pt",
        "checkpoint_key_metric=0.9500.pt",
    ]


def run_alone_or_shared(save_dir: Path, savers: list[dict[str, Any]]) -> None:
    """Two segments (4 + 4 epochs) with every saver of ``savers`` attached; the second segment resumes.

    A saver spec names its ``save_dict`` as key -> ``"net"``/``"opt"``, and may set ``file_prefix``,
    ``epoch_level`` and ``save_interval``; ``n_saved`` is required.
    """
    state: dict[str, Any] | None = None
    for stop_after in (4, None):
        t = make_training(metrics=METRICS)
        if state is not None:
            t.engine.load_state_dict(state)
        if stop_after is not None:
            t.engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
        objs = {"net": t.net, "opt": t.opt}
        opened = []
        try:
            for spec in savers:
                saver = AsyncCheckpointSaver(
                    str(save_dir),
                    {key: objs[obj] for key, obj in spec["save_dict"].items()},
                    file_prefix=spec.get("file_prefix", ""),
                    epoch_level=spec.get("epoch_level", True),
                    save_interval=spec.get("save_interval", 1),
                    n_saved=spec["n_saved"],
                    resume=state is not None,
                )
                opened.append(saver)
                saver.attach(t.engine)
            t.engine.run(t.data, max_epochs=8)
        finally:
            for saver in opened:
                saver.close()
        state = dict(t.engine.state_dict())


BOTH = {"net": "net", "opt": "opt"}


@pytest.mark.parametrize(
    "savers",
    [
        pytest.param(
            [{"save_dict": {"net": "net"}, "n_saved": 1}, {"save_dict": {"opt": "opt"}, "n_saved": 3}],
            id="different-save_dict-keys",
        ),
        pytest.param(
            [{"save_dict": {"net": "net"}, "n_saved": 1}, {"save_dict": {"net_ema": "opt"}, "n_saved": 3}],
            id="one-key-a-prefix-of-the-other",
        ),
        pytest.param(
            [{"save_dict": BOTH, "n_saved": 1}, {"save_dict": BOTH, "n_saved": 3, "file_prefix": "b"}],
            id="different-file_prefix",
        ),
        pytest.param(
            [
                {"save_dict": BOTH, "n_saved": 1},
                {"save_dict": BOTH, "n_saved": 3, "epoch_level": False, "save_interval": 2},
            ],
            id="epoch-and-iteration-intervals",
        ),
    ],
)
def test_resume_adopts_only_the_files_this_saver_would_have_written(
    tmp_path: Path, savers: list[dict[str, Any]]
) -> None:
    """A resumed saver keeps the files it would keep alone, even when another saver writes into the same directory."""
    expected: set[str] = set()
    for i, spec in enumerate(savers):
        alone = tmp_path / f"alone{i}"
        run_alone_or_shared(alone, [spec])
        expected |= set(checkpoint_names(alone))
    shared = tmp_path / "shared"
    run_alone_or_shared(shared, savers)
    assert checkpoint_names(shared) == sorted(expected)


# -- latest_checkpoint -----------------------------------------------------------------------------------------------


def run_interval_and_key_metric(save_dir: Path, max_epochs: int = 4) -> None:
    """Interval saves every epoch (all kept) and the best key-metric file (top-1)."""
    t = make_training(metrics=METRICS)
    with AsyncCheckpointSaver(
        str(save_dir), t.save_dict, save_interval=1, save_key_metric=True, key_metric_name="acc"
    ) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=max_epochs)


def test_latest_checkpoint_is_the_newest_durable_file_and_honours_reason(tmp_path: Path) -> None:
    """The newest durable file overall, or the newest of one reason; ``None`` for a reason never saved."""
    run_interval_and_key_metric(tmp_path)
    assert checkpoint_names(tmp_path) == [f"checkpoint_epoch={e}.pt" for e in range(1, 5)] + [
        "checkpoint_key_metric=0.7000.pt"
    ]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=4.pt")
    assert latest_checkpoint(str(tmp_path), reason="interval") == str(tmp_path / "checkpoint_epoch=4.pt")
    assert latest_checkpoint(str(tmp_path), reason="key_metric") == str(tmp_path / "checkpoint_key_metric=0.7000.pt")
    assert latest_checkpoint(str(tmp_path), reason="final") is None


def test_latest_checkpoint_skips_a_corrupted_newest_file(tmp_path: Path) -> None:
    """A truncated newest file is skipped for the previous one; a bit flip is caught with ``full_check``."""
    run_interval_and_key_metric(tmp_path)
    newest = tmp_path / "checkpoint_epoch=4.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=3.pt")
    assert latest_checkpoint(str(tmp_path), reason="interval") == str(tmp_path / "checkpoint_epoch=3.pt")
    # Damage inside tensor data of epoch 3 keeps size and directory: only the full check sees it.
    third = tmp_path / "checkpoint_epoch=3.pt"
    assert third.stat().st_nlink == 1
    flip_tensor_byte(third)
    assert latest_checkpoint(str(tmp_path), full_check=True) == str(tmp_path / "checkpoint_epoch=2.pt")
    # A listed file that has disappeared is skipped too.
    os.unlink(tmp_path / "checkpoint_epoch=2.pt")
    assert latest_checkpoint(str(tmp_path), full_check=True) == str(tmp_path / "checkpoint_key_metric=0.7000.pt")


def test_latest_checkpoint_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    """No directory, an empty one, or one holding only temp files and a stale manifest: ``None``."""
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    assert latest_checkpoint(str(tmp_path)) is None
    run_interval_and_key_metric(tmp_path, max_epochs=1)
    for name in checkpoint_names(tmp_path):
        os.replace(tmp_path / name, tmp_path / temp_name(name))
    assert (tmp_path / MANIFEST_NAME).exists()
    assert latest_checkpoint(str(tmp_path)) is None


def test_latest_checkpoint_orders_files_outside_the_manifest_by_mtime(tmp_path: Path) -> None:
    """Files another tool wrote are ranked by modification time and must pass their CRCs; non-.pt files are ignored."""
    for i, name in enumerate(["a.pt", "b.pt", "c.pt"]):
        torch.save({"w": torch.full((16,), float(i))}, tmp_path / name)
    (tmp_path / "notes.txt").write_text("newest, but not a checkpoint")
    base = 1_700_000_000
    for name, offset in {"a.pt": 10, "b.pt": 30, "c.pt": 20, "notes.txt": 40}.items():
        os.utime(tmp_path / name, (base + offset, base + offset))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "b.pt")
    os.truncate(tmp_path / "b.pt", 100)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "c.pt")
    # They are never returned for a reason (no manifest entry says why they were saved) ...
    assert latest_checkpoint(str(tmp_path), reason="interval") is None
    # ... and they compete with manifest-listed files by time: durable time for those, mtime for these.
    run_interval_and_key_metric(tmp_path, max_epochs=1)
    listed = str(tmp_path / "checkpoint_epoch=1.pt")
    assert latest_checkpoint(str(tmp_path)) == listed  # c.pt is older than the listed files
    saved_at = read_manifest(str(tmp_path))["files"]["checkpoint_epoch=1.pt"]["saved_at"]
    os.utime(tmp_path / "c.pt", (saved_at + 3600, saved_at + 3600))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "c.pt")
    assert latest_checkpoint(str(tmp_path), reason="interval") == listed


def test_find_latest_names_the_newer_candidates_it_skipped_and_why(tmp_path: Path) -> None:
    """``find_latest`` returns the path, its manifest entry and each newer candidate it rejected (newest first)."""
    run_interval_and_key_metric(tmp_path)
    files = read_manifest(str(tmp_path))["files"]
    os.unlink(tmp_path / "checkpoint_epoch=4.pt")
    os.truncate(tmp_path / "checkpoint_epoch=3.pt", 1000)
    found = find_latest(str(tmp_path), reason="interval")
    assert (found.path, found.info) == (str(tmp_path / "checkpoint_epoch=2.pt"), files["checkpoint_epoch=2.pt"])
    assert [(os.path.basename(r.path), r.problems[0]) for r in found.skipped] == [
        ("checkpoint_epoch=4.pt", "listed in the manifest but missing: no file at this path"),
        (
            "checkpoint_epoch=3.pt",
            f"size 1000 B vs {files['checkpoint_epoch=3.pt']['size']} B in the manifest (truncated)",
        ),
    ]
    nothing = find_latest(str(tmp_path), reason="final")
    assert (nothing.path, nothing.info, nothing.skipped) == (None, {}, [])


# -- stale temporary files ---------------------------------------------------------------------------------------


def temp_name(final: str, *, pid: int | None = None, host: str | None = None) -> str:
    """The name of a temp file the library would write for ``final``, made to look written by ``pid``/``host``."""
    name = os.path.basename(FileStorage.temp_path(final))
    owner = temp_owner(name)
    assert owner is not None and owner[1] == os.getpid()
    head, tail = name.rsplit(TMP_MARKER, 1)
    tail = tail.replace(owner[0], host or owner[0], 1)
    tail = tail.replace(f".{os.getpid()}.", f".{pid or os.getpid()}.", 1)
    name = f"{head}{TMP_MARKER}{tail}"
    assert temp_owner(name) == (host or owner[0], pid or os.getpid())
    return name


def populate_temp_files(directory: Path) -> tuple[set[str], set[str]]:
    """Create temp files of a dead and of a live writer, plus files that are not ours; return (stale, keep)."""
    dead = dead_pid()
    stale = {
        temp_name("checkpoint_epoch=1.pt", pid=dead),
        temp_name(MANIFEST_NAME, pid=dead),
    }
    keep = {
        temp_name("checkpoint_epoch=2.pt"),  # a live writer's file in flight (this process)
        temp_name("checkpoint_epoch=3.pt", pid=dead, host="another-host"),  # maybe live on a shared file system
        f"weird{TMP_MARKER}notapid",
        "notes.txt",
        "checkpoint_epoch=0.pt",
    }
    for name in stale | keep:
        (directory / name).write_bytes(b"x" * 10)
    return stale, keep


def test_remove_stale_temp_files_removes_only_dead_writers_temp_files(tmp_path: Path) -> None:
    """Temp files of a dead pid of this host go; a live pid's, another host's, unrelated files and checkpoints stay."""
    stale, keep = populate_temp_files(tmp_path)
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / n) for n in stale)
    assert set(os.listdir(tmp_path)) == keep
    assert remove_stale_temp_files(str(tmp_path)) == []
    assert remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_saver_removes_stale_temp_files_at_attach(tmp_path: Path) -> None:
    """Attaching a saver clears a crashed writer's temp files and nothing else."""
    stale, keep = populate_temp_files(tmp_path)
    t = make_training()
    with AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_interval=1) as saver:
        assert stale <= set(os.listdir(tmp_path))  # construction alone does not touch them
        saver.attach(t.engine)
        assert set(os.listdir(tmp_path)) == keep
