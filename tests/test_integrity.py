"""Integrity: the per-directory manifest lists exactly the durable checkpoints, and ``verify`` catches damage.

A run of :class:`AsyncCheckpointSaver` leaves ``.async_ckpt_manifest.json`` beside its files. These tests check its
entries against the files actually present (and against the engine's progress at each save), then damage files
in the ways a crash, a bad disk or an operator can (truncation, a flipped byte inside tensor data, a file swapped
for another valid checkpoint, a temporary name) and check that ``integrity.verify`` reports each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from conftest import METRICS, RETENTION, checkpoint_names, flip_tensor_byte, make_training
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver, FileStorage
from async_ckpt.pipeline.integrity import MANIFEST_NAME, describe, read_manifest, verify
from async_ckpt.pipeline.storage import TMP_MARKER

ENTRY_FIELDS = {"size", "cd_crc32", "reason", "iteration", "epoch", "score", "score_name", "saved_at"}
BATCHES = 3  # make_training's default: iterations per epoch


def run_full(save_dir: Path, max_epochs: int = 8, **kwargs: Any) -> list[tuple[list[str], list[str]]]:
    """Train with final, top-2 key-metric and keep-last-2 interval saves; return (files, manifest) after each epoch.

    A handler attached after the saver waits for the writer at every ``EPOCH_COMPLETED`` and records which checkpoint
    files exist and which names the manifest lists, so that pruning is observed while the run goes on.
    """
    t = make_training(metrics=METRICS)
    seen: list[tuple[list[str], list[str]]] = []
    with AsyncCheckpointSaver(str(save_dir), t.save_dict, **RETENTION, **kwargs) as saver:
        saver.attach(t.engine)

        @t.engine.on(Events.EPOCH_COMPLETED)
        def _observe(engine: Engine) -> None:
            saver.wait()
            seen.append((checkpoint_names(save_dir), sorted(read_manifest(str(save_dir))["files"])))

        t.engine.run(t.data, max_epochs=max_epochs)
    return seen


def run_interval(save_dir: Path, max_epochs: int = 4, **kwargs: Any) -> list[str]:
    """Train with one interval save per epoch (every file holds a different state, so none is a hard link)."""
    t = make_training()
    with AsyncCheckpointSaver(str(save_dir), t.save_dict, save_interval=1, **kwargs) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=max_epochs)
    return checkpoint_names(save_dir)


def test_manifest_lists_exactly_the_files_present_with_their_metadata(tmp_path: Path) -> None:
    """After a run the manifest lists exactly the .pt files, each with its size, checksum, reason, step and score."""
    run_full(tmp_path)
    names = checkpoint_names(tmp_path)
    assert names == [
        "checkpoint_epoch=7.pt",
        "checkpoint_epoch=8.pt",
        "checkpoint_final_iteration=24.pt",
        "checkpoint_key_metric=0.9000.pt",
        "checkpoint_key_metric=0.9500.pt",
    ]
    with open(tmp_path / MANIFEST_NAME, encoding="utf-8") as f:
        manifest = json.load(f)
    files = manifest["files"]
    assert sorted(files) == names
    for name, entry in files.items():
        assert set(entry) >= ENTRY_FIELDS, f"{name} lacks {ENTRY_FIELDS - set(entry)}"
        path = tmp_path / name
        assert entry["size"] == path.stat().st_size
        assert entry["cd_crc32"] == describe(str(path))["cd_crc32"]
        assert isinstance(entry["saved_at"], float)
        assert entry["iteration"] == entry["epoch"] * BATCHES
        # Adam counts its steps: the file holds the state of the iteration the manifest names.
        state = torch.load(path, weights_only=True)
        assert {int(s["step"]) for s in state["opt"]["state"].values()} == {entry["iteration"]}
        if name.startswith("checkpoint_epoch="):
            epoch = int(re.findall(r"\d+", name)[0])
            assert (entry["reason"], entry["score_name"], entry["score"], entry["epoch"]) == (
                "interval",
                "epoch",
                epoch,
                epoch,
            )
        elif name.startswith("checkpoint_final_iteration="):
            assert (entry["reason"], entry["score_name"], entry["score"], entry["iteration"]) == (
                "final",
                "final_iteration",
                24,
                24,
            )
        else:
            assert entry["reason"] == "key_metric"
            assert entry["score_name"] == "key_metric"
            assert f"={entry['score']:.4f}.pt" in name
            assert METRICS[entry["epoch"] - 1] == entry["score"]


def test_pruned_files_leave_the_manifest_as_the_run_goes(tmp_path: Path) -> None:
    """At every epoch boundary (once the writer is idle) the manifest names exactly the files on disk."""
    seen = run_full(tmp_path)
    assert len(seen) == 8
    for epoch, (files, listed) in enumerate(seen, start=1):
        assert listed == files, f"epoch {epoch}: manifest {listed} but files {files}"
    # Pruning really happened during the run, and the pruned names left the manifest.
    assert "checkpoint_epoch=1.pt" in seen[0][1]
    assert "checkpoint_epoch=1.pt" not in seen[2][1]
    assert "checkpoint_key_metric=0.5000.pt" in seen[0][1]
    assert "checkpoint_key_metric=0.5000.pt" not in seen[-1][1]


def test_verify_passes_for_every_good_file(tmp_path: Path) -> None:
    """Every file of a finished run verifies against the manifest and its record CRCs."""
    run_full(tmp_path)
    for name in checkpoint_names(tmp_path):
        result = verify(str(tmp_path / name))
        assert result.ok, (name, result.problems)
        assert result.checked == ["manifest", "records"]
        assert result.problems == []
        assert result.info["size"] == (tmp_path / name).stat().st_size


def test_verify_fails_for_a_truncated_file(tmp_path: Path) -> None:
    """A file cut short (as by a copy or a disk that lost its tail) fails verification."""
    names = run_interval(tmp_path)
    victim = tmp_path / names[-1]
    size = victim.stat().st_size
    os.truncate(victim, size - 100)
    result = verify(str(victim))
    assert not result.ok
    assert "manifest" in result.checked
    assert any("truncated" in p for p in result.problems), result.problems
    assert all(verify(str(tmp_path / n)).ok for n in names[:-1])


def test_verify_fails_for_one_flipped_byte_in_tensor_data(tmp_path: Path) -> None:
    """One inverted byte inside tensor data fails the record CRC check, though size and directory still match."""
    names = run_interval(tmp_path)
    victim = tmp_path / names[0]
    assert victim.stat().st_nlink == 1
    before = describe(str(victim))
    flip_tensor_byte(victim)
    assert describe(str(victim)) == before  # invisible to the cheap manifest check ...
    assert verify(str(victim), records=False).ok
    result = verify(str(victim))  # ... but not to the CRCs
    assert not result.ok
    assert result.checked == ["manifest", "records"]
    assert any("CRC" in p for p in result.problems), result.problems
    assert all(verify(str(tmp_path / n)).ok for n in names[1:])


def test_verify_fails_for_a_file_swapped_for_another_valid_checkpoint(tmp_path: Path) -> None:
    """A complete checkpoint put in place of another (different size, or same size but other content) fails."""
    names = run_interval(tmp_path)
    # Another valid torch.save archive of a different size.
    other = tmp_path.parent / "other.pt"
    torch.save({"x": torch.arange(1000)}, other)
    assert zipfile.ZipFile(other).testzip() is None
    victim = tmp_path / names[0]
    assert other.stat().st_size != victim.stat().st_size
    os.replace(other, victim)
    result = verify(str(victim))
    assert not result.ok
    assert any("size" in p for p in result.problems), result.problems
    assert any("central directory" in p for p in result.problems), result.problems
    # A sibling checkpoint of the same run: same size, valid CRCs, other content.
    victim2 = tmp_path / names[1]
    shutil.copyfile(tmp_path / names[2], victim2)
    assert victim2.stat().st_size == (tmp_path / names[2]).stat().st_size
    result2 = verify(str(victim2))
    assert not result2.ok
    assert len(result2.problems) == 1 and "central directory" in result2.problems[0], result2.problems
    assert "replaced or rewritten after it was saved" in result2.problems[0]


def test_verify_rejects_a_temporary_file(tmp_path: Path) -> None:
    """A name carrying the temp marker is never a checkpoint, even when its bytes are a complete archive."""
    names = run_interval(tmp_path, max_epochs=1)
    tmp_name = f"{names[0]}{TMP_MARKER}{os.getpid()}-0123456789ab"
    shutil.copyfile(tmp_path / names[0], tmp_path / tmp_name)
    result = verify(str(tmp_path / tmp_name))
    assert not result.ok
    assert any("temporary" in p for p in result.problems), result.problems


def test_verify_of_a_missing_file_fails(tmp_path: Path) -> None:
    """A path with no file fails (it is not silently 'ok')."""
    result = verify(str(tmp_path / "nothing.pt"))
    assert not result.ok
    assert result.problems == ["missing: no file at this path"]
    assert result.checked == []


def test_verify_of_a_file_the_manifest_lists_but_is_gone_says_so(tmp_path: Path) -> None:
    """A listed file that is gone fails after the manifest check alone, saying the manifest lists it."""
    names = run_interval(tmp_path, max_epochs=2)
    entry = read_manifest(str(tmp_path))["files"][names[0]]
    os.unlink(tmp_path / names[0])
    result = verify(str(tmp_path / names[0]))
    assert (result.ok, result.checked, result.info) == (False, ["manifest"], entry)
    assert result.problems == ["listed in the manifest but missing: no file at this path"]


def test_verify_problems_name_the_sizes_and_the_checksums_that_differ(tmp_path: Path) -> None:
    """A truncated file's problem gives both sizes; a flipped byte's gives the record and both CRC-32s, once."""
    names = run_interval(tmp_path)
    cut, flipped = tmp_path / names[-1], tmp_path / names[0]
    size = cut.stat().st_size
    os.truncate(cut, 1000)
    problems = verify(str(cut)).problems
    assert problems[0] == f"size 1000 B vs {size} B in the manifest (truncated)", problems
    assert len(problems) == 2 and "end-of-central-directory" in problems[1], problems  # said once, not per check
    flip_tensor_byte(flipped)
    with zipfile.ZipFile(flipped) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 0)
    (problem,) = verify(str(flipped)).problems
    match = re.fullmatch(
        rf"record '{re.escape(info.filename)}' fails its CRC-32 \(0x([0-9a-f]{{8}}) read, 0x{info.CRC:08x} in the zip "
        r"directory\): its bytes changed after it was written",
        problem,
    )
    assert match is not None, problem
    assert int(match.group(1), 16) != info.CRC


def test_verify_of_a_file_that_is_not_a_zip_archive_says_so(tmp_path: Path) -> None:
    """A ``.pt`` file that is not a zip archive (a text file, a legacy pickle) fails with one clear problem."""
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a checkpoint\n")
    result = verify(str(bogus))
    assert (result.ok, result.checked) == (False, ["records"])
    assert result.problems == ["not a readable zip archive (truncated, or torch.save did not write it)"]


def test_plain_torch_save_file_is_checked_by_record_crcs_only(tmp_path: Path) -> None:
    """A file not in the manifest (written by plain ``torch.save``) verifies by its record CRCs alone."""
    run_interval(tmp_path, max_epochs=1)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(64)}, plain)
    assert "plain.pt" not in read_manifest(str(tmp_path))["files"]
    result = verify(str(plain))
    assert result.ok, result.problems
    assert result.checked == ["records"]
    assert result.info == {}
    flip_tensor_byte(plain)
    damaged = verify(str(plain))
    assert not damaged.ok
    assert damaged.checked == ["records"]
    # The same holds in a directory with no manifest at all.
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save({"w": torch.randn(8)}, bare / "x.pt")
    assert verify(str(bare / "x.pt")).checked == ["records"]
    assert verify(str(bare / "x.pt")).ok


class RecordingStorage(FileStorage):
    """Real file operations that record, for the manifest, every open and every rename (and whether it parsed)."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.lock = threading.Lock()
        self.opened: list[str] = []
        self.manifest_renames: list[tuple[str, bool]] = []

    def _open(self, path: str) -> Any:
        with self.lock:
            self.opened.append(os.path.basename(path))
        return super()._open(path)

    def _replace(self, src: str, dst: str) -> None:
        if os.path.basename(dst) == MANIFEST_NAME:
            try:
                with open(src, encoding="utf-8") as f:
                    json.load(f)
                parsed = True
            except ValueError:
                parsed = False
            with self.lock:
                self.manifest_renames.append((os.path.basename(src), parsed))
        super()._replace(src, dst)


def test_manifest_is_replaced_atomically_and_never_partial(tmp_path: Path) -> None:
    """The manifest is only ever written under a temp name and renamed in whole; none is left half-written."""
    storage = RecordingStorage()
    t = make_training(batches=5)
    with AsyncCheckpointSaver(
        str(tmp_path), t.save_dict, save_interval=1, epoch_level=False, n_saved=2, storage=storage
    ) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=6)
    assert MANIFEST_NAME not in storage.opened  # never opened for writing under its own name
    assert len(storage.manifest_renames) == 30  # one atomic replace per durable save
    for src, parsed in storage.manifest_renames:
        assert TMP_MARKER in src
        assert parsed, f"{src} was renamed onto the manifest without being complete JSON"
    assert [n for n in os.listdir(tmp_path) if TMP_MARKER in n] == []
    with open(tmp_path / MANIFEST_NAME, encoding="utf-8") as f:
        manifest = json.load(f)
    assert sorted(manifest["files"]) == ["checkpoint_iteration=29.pt", "checkpoint_iteration=30.pt"]
    assert checkpoint_names(tmp_path) == sorted(manifest["files"])


def test_manifest_false_writes_no_manifest(tmp_path: Path) -> None:
    """``manifest=False`` leaves no manifest, and files then verify by record CRCs only."""
    names = run_interval(tmp_path, max_epochs=2, manifest=False)
    assert not (tmp_path / MANIFEST_NAME).exists()
    result = verify(str(tmp_path / names[-1]))
    assert result.ok
    assert result.checked == ["records"]
