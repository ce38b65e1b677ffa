"""The ``async-ckpt`` command: listing, verifying and finding checkpoints, read-only.

Most commands run in-process through :func:`async_ckpt.cli.main` (what both the console script and
``python -m async_ckpt`` call), which keeps the suite fast; two tests run ``python -m async_ckpt`` as a real
subprocess, and the console script's registration is checked through the installed package metadata.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from conftest import RETENTION, checkpoint_names, flip_tensor_byte, make_training

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.cli import main
from async_ckpt.integrity import MANIFEST_NAME

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 120
EXPECTED = [
    "checkpoint_epoch=3.pt",
    "checkpoint_epoch=4.pt",
    "checkpoint_final_iteration=12.pt",
    "checkpoint_key_metric=0.7000.pt",
]
ROW_FIELDS = {"name", "reason", "iteration", "epoch", "score", "size", "age_s", "in_manifest", "verified", "problems"}


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A directory after a 4-epoch run: interval (keep 2), best key metric and final checkpoints."""
    save_dir = tmp_path / "ckpt"
    t = make_training()
    with AsyncCheckpointSaver(str(save_dir), t.save_dict, **{**RETENTION, "key_metric_n_saved": 1}) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=4)
    assert checkpoint_names(save_dir) == EXPECTED
    return save_dir


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and inode of every entry of ``directory`` (hidden ones included) and of the directory itself."""
    state = {n: ((s := os.stat(directory / n)).st_size, s.st_mtime_ns, s.st_ino) for n in os.listdir(directory)}
    state["."] = (0, os.stat(directory).st_mtime_ns, os.stat(directory).st_ino)
    return state


def unlinked_victim(directory: Path) -> Path:
    """A checkpoint with a single name (damaging a hard-linked one would damage its other names too)."""
    for name in EXPECTED:
        if (directory / name).stat().st_nlink == 1:
            return directory / name
    raise AssertionError("every checkpoint is hard-linked")


def run_module(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """Start ``python -m async_ckpt ARGS`` (not waited for)."""
    return subprocess.Popen(
        [sys.executable, "-m", "async_ckpt", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def test_module_without_arguments_prints_help(tmp_path: Path) -> None:
    """``python -m async_ckpt`` with no arguments prints the usage with every command and exits 0."""
    code, out, _err = finish(run_module(cwd=tmp_path))
    assert code == 0
    assert out.startswith("usage: async-ckpt")
    for command in ("ls", "verify", "latest", "bench"):
        assert command in out


def test_module_verify_and_ls_in_a_subprocess_are_read_only(ckpt_dir: Path, tmp_path: Path) -> None:
    """As a real process: ``verify DIR`` exits 1 naming the damaged file, ``ls`` still lists it; nothing changes."""
    victim = unlinked_victim(ckpt_dir)
    flip_tensor_byte(victim)
    before = snapshot(ckpt_dir)
    procs = [run_module("verify", str(ckpt_dir), cwd=tmp_path), run_module("ls", "--json", str(ckpt_dir), cwd=tmp_path)]
    (vcode, vout, _), (lcode, lout, _) = (finish(p) for p in procs)
    assert snapshot(ckpt_dir) == before
    assert vcode == 1
    failed = [line for line in vout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and str(victim) in failed[0], vout
    assert vout.splitlines()[-1] == f"{len(EXPECTED) - 1} passed, 1 failed"
    assert lcode == 0
    rows = {r["name"]: r for r in json.loads(lout)}
    assert sorted(rows) == EXPECTED
    assert [n for n, r in rows.items() if not r["verified"]] == [victim.name]


def test_console_script_is_installed() -> None:
    """The ``async-ckpt`` console script points at ``async_ckpt.cli:main`` and exists beside the interpreter."""
    eps = entry_points(group="console_scripts", name="async-ckpt")
    assert [ep.value for ep in eps] == ["async_ckpt.cli:main"]
    script = Path(sys.executable).with_name("async-ckpt")
    assert script.is_file() and os.access(script, os.X_OK)


def test_ls_prints_a_table_with_a_verified_column(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ls DIR`` prints a header and one row per checkpoint, each verified, and skips the hidden manifest."""
    before = snapshot(ckpt_dir)
    assert main(["ls", str(ckpt_dir)]) == 0
    assert snapshot(ckpt_dir) == before
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "reason", "iteration", "epoch", "score", "size", "age_s", "verified"]
    assert [r.split()[0] for r in rows] == EXPECTED
    assert all(r.split()[-1] == "True" for r in rows), rows
    assert MANIFEST_NAME not in "\n".join(rows)
    final = next(r for r in rows if r.startswith("checkpoint_final_iteration=12.pt"))
    assert final.split()[1:4] == ["final", "12", "4"]


def test_ls_json_has_every_field(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ls --json`` prints a JSON list with name, reason, step, score, size, age, manifest and verification fields."""
    assert main(["ls", "--json", str(ckpt_dir)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == EXPECTED
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["verified"] is True and row["problems"] == []
        assert row["in_manifest"] is True
        assert row["size"] == (ckpt_dir / row["name"]).stat().st_size
    by_name = {r["name"]: r for r in rows}
    assert (by_name["checkpoint_epoch=3.pt"]["reason"], by_name["checkpoint_epoch=3.pt"]["epoch"]) == ("interval", 3)
    assert by_name["checkpoint_key_metric=0.7000.pt"]["score"] == 0.7
    # --no-verify skips the CRC pass and drops the verification fields.
    assert main(["ls", "--json", "--no-verify", str(ckpt_dir)]) == 0
    assert set(json.loads(capsys.readouterr().out)[0]) == ROW_FIELDS - {"verified", "problems"}


def test_verify_directory_passes_then_fails_naming_the_damaged_file(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``verify DIR`` exits 0 when every file is good and 1, naming the file, after one is damaged."""
    before = snapshot(ckpt_dir)
    assert main(["verify", str(ckpt_dir)]) == 0
    assert snapshot(ckpt_dir) == before
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"{len(EXPECTED)} passed, 0 failed"
    assert all(str(ckpt_dir / n) in out for n in EXPECTED)
    victim = unlinked_victim(ckpt_dir)
    os.truncate(victim, victim.stat().st_size - 1)
    assert main(["verify", str(ckpt_dir)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and str(victim) in failed[0], out
    assert main(["verify", "--json", str(ckpt_dir)]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [os.path.basename(r["path"]) for r in results if not r["ok"]] == [victim.name]


def test_verify_single_file(ckpt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``verify FILE`` checks just that file; a missing file fails; a plain ``torch.save`` file is checked by CRCs."""
    target = ckpt_dir / "checkpoint_epoch=3.pt"
    before = snapshot(ckpt_dir)
    assert main(["verify", str(target)]) == 0
    assert snapshot(ckpt_dir) == before
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok   {target} [manifest, records]", "1 passed, 0 failed"]
    assert main(["verify", str(ckpt_dir / "nothing.pt")]) == 1
    assert "missing" in capsys.readouterr().out
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(4)}, plain)
    assert main(["verify", str(plain)]) == 0
    assert f"ok   {plain} [records]" in capsys.readouterr().out


def test_latest_prints_the_newest_checkpoint(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``latest DIR`` prints the newest complete checkpoint, ``--reason`` narrows it, and an empty dir exits 1."""
    before = snapshot(ckpt_dir)
    assert main(["latest", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_final_iteration=12.pt'}\n"
    assert main(["latest", "--reason", "interval", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_epoch=4.pt'}\n"
    assert main(["latest", "--full", "--reason", "key_metric", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_key_metric=0.7000.pt'}\n"
    assert snapshot(ckpt_dir) == before
    empty = ckpt_dir.parent / "empty"
    empty.mkdir()
    assert main(["latest", str(empty)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no complete checkpoint" in captured.err


@pytest.mark.parametrize("command", ["ls", "latest"])
def test_non_directory_argument_exits_2_with_a_message(
    command: str, ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ls``/``latest`` on a file or a missing path exit 2 and say it is not a directory."""
    for path in (ckpt_dir / "checkpoint_epoch=3.pt", ckpt_dir / "missing"):
        assert main([command, str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "is not a directory" in captured.err and str(path) in captured.err
