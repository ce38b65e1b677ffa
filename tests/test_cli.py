"""The ``async-ckpt`` command: listing, verifying and finding checkpoints, read-only.

Most commands run in-process through :func:`async_ckpt.cli.main` (what both the console script and
``python -m async_ckpt`` call), which keeps the suite fast; three tests run ``python -m async_ckpt`` or the installed
``async-ckpt`` script as real subprocesses, and the script's registration is checked through the package metadata.
Bad input (a missing path, a file for a directory, an empty or temp-only directory, truncated, bit-flipped and
vanished files) is a table: each row gives the exit status (0 ok, 1 a checkpoint problem, 2 a usage or path
problem) and what stdout and stderr must say.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from conftest import RETENTION, checkpoint_names, flip_tensor_byte, make_training

from async_ckpt import AsyncCheckpointSaver, FileStorage
from async_ckpt.cli import main
from async_ckpt.pipeline.integrity import MANIFEST_NAME

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 120
EXPECTED = [
    "checkpoint_epoch=3.pt",
    "checkpoint_epoch=4.pt",
    "checkpoint_final_iteration=12.pt",
    "checkpoint_key_metric=0.7000.pt",
]
ROW_FIELDS = {"name", "reason", "iteration", "epoch", "score", "size", "age_s", "in_manifest", "verified", "problems"}


@pytest.fixture(scope="module")
def pristine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory after a 4-epoch run: interval (keep 2), best key metric and final checkpoints (built once)."""
    save_dir = tmp_path_factory.mktemp("pristine") / "ckpt"
    t = make_training()
    with AsyncCheckpointSaver(str(save_dir), t.save_dict, **{**RETENTION, "key_metric_n_saved": 1}) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=4)
    assert checkpoint_names(save_dir) == EXPECTED
    return save_dir


@pytest.fixture
def ckpt_dir(pristine_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine run's directory (files and manifest, modification times kept)."""
    copy = tmp_path / "ckpt"
    shutil.copytree(pristine_dir, copy)
    return copy


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
    """``verify FILE`` checks just that file; a plain ``torch.save`` file is checked by its record CRCs only."""
    target = ckpt_dir / "checkpoint_epoch=3.pt"
    before = snapshot(ckpt_dir)
    assert main(["verify", str(target)]) == 0
    assert snapshot(ckpt_dir) == before
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok   {target} [manifest, records]", "1 passed, 0 failed"]
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(4)}, plain)
    assert main(["verify", str(plain)]) == 0
    assert f"ok   {plain} [records]" in capsys.readouterr().out


def test_latest_prints_the_newest_checkpoint(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``latest DIR`` prints the newest complete checkpoint and ``--reason`` narrows it to one reason."""
    before = snapshot(ckpt_dir)
    assert main(["latest", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_final_iteration=12.pt'}\n"
    assert main(["latest", "--reason", "interval", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_epoch=4.pt'}\n"
    assert main(["latest", "--full", "--reason", "key_metric", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out == f"{ckpt_dir / 'checkpoint_key_metric=0.7000.pt'}\n"
    assert snapshot(ckpt_dir) == before


# -- bad input, as a new user gives it ------------------------------------------------------------------------------

FINAL = "checkpoint_final_iteration=12.pt"
KEY = "checkpoint_key_metric=0.7000.pt"
TRUNCATED_TO = 1000


def damage(case: str, directory: Path, tmp_path: Path) -> dict[str, str]:
    """Put ``directory`` (a copy of the pristine run) or a sibling into the state ``case`` names; return the
    placeholders the table below uses (``{d}``: the run's directory; others: the path under test)."""
    names = {"d": str(directory), "size": str((directory / "checkpoint_epoch=4.pt").stat().st_size)}
    if case == "nonexistent":
        names["p"] = str(tmp_path / "no-such-dir")
    elif case == "file":
        names["p"] = str(directory / "checkpoint_epoch=3.pt")
    elif case in ("empty", "temp_only"):
        (tmp_path / case).mkdir()
        names["p"] = str(tmp_path / case)
        if case == "temp_only":
            shutil.copyfile(
                directory / "checkpoint_epoch=3.pt",
                tmp_path / case / os.path.basename(FileStorage.temp_path("checkpoint_epoch=3.pt")),
            )
    elif case == "truncated":
        os.truncate(directory / "checkpoint_epoch=4.pt", TRUNCATED_TO)
        names["p"] = str(directory / "checkpoint_epoch=4.pt")
    elif case == "flipped":
        flip_tensor_byte(directory / KEY)
        names["p"] = str(directory / KEY)
    elif case == "listed_missing":
        os.unlink(directory / FINAL)
        names["p"] = str(directory / FINAL)
    elif case == "no_final":  # a run without save_final: no such file, no such manifest entry
        os.unlink(directory / FINAL)
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        del manifest["files"][FINAL]
        (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    else:
        raise AssertionError(case)
    return names


# (case, argv, exit status, stdout fragments, stderr fragments); "~" starts a regular expression.
BAD_INPUTS: list[tuple[str, list[str], int, list[str], list[str]]] = [
    ("nonexistent", ["ls", "{p}"], 2, [], ["async-ckpt ls: {p} does not exist"]),
    ("nonexistent", ["verify", "{p}"], 2, [], ["async-ckpt verify: {p} does not exist"]),
    ("nonexistent", ["latest", "{p}"], 2, [], ["async-ckpt latest: {p} does not exist"]),
    ("nonexistent", ["latest", "--json", "{p}"], 2, [], ["{p} does not exist"]),
    ("file", ["ls", "{p}"], 2, [], ["{p} is a file, not a directory", "async-ckpt verify {p}"]),
    ("file", ["latest", "{p}"], 2, [], ["{p} is a file, not a directory", "async-ckpt verify {p}"]),
    ("empty", ["ls", "{p}"], 0, [], ["no checkpoint in {p}", "saver's save_dir"]),
    ("empty", ["verify", "{p}"], 1, [], ["no checkpoint in {p}", "nothing to verify"]),
    ("empty", ["latest", "{p}"], 1, [], ["no checkpoint in {p}", "saver's save_dir"]),
    ("temp_only", ["ls", "{p}"], 0, [], ["no checkpoint in {p}", "1 temporary file of an unfinished write"]),
    ("temp_only", ["verify", "{p}"], 1, [], ["no checkpoint in {p}", "1 temporary file of an unfinished write"]),
    ("temp_only", ["latest", "{p}"], 1, [], ["no checkpoint in {p}", "1 temporary file of an unfinished write"]),
    (
        "truncated",
        ["verify", "{d}"],
        1,
        ["FAIL {p} [manifest, records]: size 1000 B vs {size} B in the manifest (truncated)", "3 passed, 1 failed"],
        ["latest --full"],
    ),
    ("truncated", ["verify", "{p}"], 1, ["FAIL {p} [manifest, records]: size 1000 B vs {size} B"], []),
    ("truncated", ["ls", "{d}"], 0, ["~checkpoint_epoch=4.pt .*1000 B .*False"], []),
    (
        "truncated",
        ["latest", "--reason", "interval", "{d}"],
        0,
        ["{d}/checkpoint_epoch=3.pt"],
        ["skipped {p}: size 1000 B vs {size} B in the manifest (truncated)"],
    ),
    (
        "flipped",
        ["verify", "{p}"],
        1,
        [
            r"~FAIL .* record '[^']+/data/\d+' fails its CRC-32 "
            r"\(0x[0-9a-f]{8} read, 0x[0-9a-f]{8} in the zip directory\)"
        ],
        [],
    ),
    (
        "flipped",
        ["latest", "--full", "--reason", "key_metric", "{d}"],
        1,
        [],
        ["no complete key_metric checkpoint in {d}", f"{KEY}: record", "fails its CRC-32"],
    ),
    ("listed_missing", ["verify", "{d}"], 1, ["FAIL {p} [manifest]: listed in the manifest but missing"], []),
    ("listed_missing", ["verify", "{p}"], 2, [], ["{p} does not exist", "the manifest of {d} lists it"]),
    ("listed_missing", ["ls", "{d}"], 0, ["checkpoint_epoch=4.pt"], [f"listed in the manifest but missing: {FINAL}"]),
    ("listed_missing", ["latest", "{d}"], 0, ["{d}/checkpoint_epoch=4.pt"], ["skipped {p}: listed in the manifest"]),
    (
        "listed_missing",
        ["latest", "--reason", "final", "{d}"],
        1,
        [],
        ["no complete final checkpoint in {d}", f"{FINAL}: listed in the manifest but missing"],
    ),
    (
        "no_final",
        ["latest", "--reason", "final", "{d}"],
        1,
        [],
        [
            "no final checkpoint in {d}",
            "interval: checkpoint_epoch=3.pt, checkpoint_epoch=4.pt",
            f"key_metric: {KEY}",
            "The newest complete checkpoint of any reason is {d}/checkpoint_epoch=4.pt",
        ],
    ),
    ("no_final", ["latest", "--reason", "best", "{d}"], 2, [], ["invalid choice: 'best'"]),
]


def check_output(text: str, fragments: list[str], names: dict[str, str]) -> None:
    """Every fragment (after placeholder substitution) occurs in ``text``; "~" fragments are regular expressions."""
    for fragment in fragments:
        if fragment.startswith("~"):
            assert re.search(fragment[1:], text), f"{fragment[1:]!r} not in:\n{text}"
        else:
            assert fragment.format(**names) in text, f"{fragment.format(**names)!r} not in:\n{text}"


@pytest.mark.parametrize(
    ("case", "argv", "status", "out", "err"), BAD_INPUTS, ids=[f"{c[0]}-{'-'.join(c[1][:-1])}" for c in BAD_INPUTS]
)
def test_bad_input_gives_the_documented_status_and_says_what_is_wrong(
    case: str,
    argv: list[str],
    status: int,
    out: list[str],
    err: list[str],
    ckpt_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each subcommand on each kind of bad input exits 0 / 1 (a checkpoint problem) / 2 (a usage or path problem)
    and says on stderr what is wrong and what to do; a status of 2 prints nothing on stdout."""
    names = damage(case, ckpt_dir, tmp_path)
    before = snapshot(ckpt_dir)
    assert main([a.format(**names) for a in argv]) == status
    captured = capsys.readouterr()
    assert snapshot(ckpt_dir) == before
    check_output(captured.out, out, names)
    check_output(captured.err, err, names)
    if status == 2:
        assert captured.out == ""
    if status != 0 or err:
        assert captured.err.strip(), "no reason given on stderr"


LATEST_FIELDS = {"path", "info", "skipped", "error"}
VERIFY_FIELDS = {"path", "ok", "checked", "problems", "info"}


def test_every_subcommand_has_json_output_with_a_stable_shape(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ls``, ``verify`` and ``latest`` all take ``--json`` and print the documented fields, also when they exit 1."""
    assert main(["ls", "--json", str(ckpt_dir)]) == 0
    assert all(set(r) == ROW_FIELDS for r in json.loads(capsys.readouterr().out))
    assert main(["verify", "--json", str(ckpt_dir)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [set(r) for r in results] == [VERIFY_FIELDS] * len(EXPECTED)
    assert main(["latest", "--json", str(ckpt_dir)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert set(found) == LATEST_FIELDS
    assert found["path"] == str(ckpt_dir / FINAL)
    assert (found["info"]["reason"], found["info"]["iteration"], found["skipped"], found["error"]) == (
        "final",
        12,
        [],
        None,
    )
    # Nothing found: exit 1, the same shape, the reason in "error" and each rejected candidate in "skipped".
    os.unlink(ckpt_dir / FINAL)
    assert main(["latest", "--json", "--reason", "final", str(ckpt_dir)]) == 1
    captured = capsys.readouterr()
    missing = json.loads(captured.out)
    assert set(missing) == LATEST_FIELDS
    assert (missing["path"], missing["info"]) == (None, {})
    assert missing["error"] and missing["error"] in captured.err
    assert [s["path"] for s in missing["skipped"]] == [str(ckpt_dir / FINAL)]
    assert "listed in the manifest but missing" in missing["skipped"][0]["problems"][0]
    # verify --json lists the missing file as a failed result.
    assert main(["verify", "--json", str(ckpt_dir)]) == 1
    failed = [r for r in json.loads(capsys.readouterr().out) if not r["ok"]]
    assert [(r["path"], r["checked"]) for r in failed] == [(str(ckpt_dir / FINAL), ["manifest"])]


def test_console_script_and_module_report_bad_input_like_main(ckpt_dir: Path, tmp_path: Path) -> None:
    """The installed ``async-ckpt`` script and ``python -m async_ckpt`` give main's exit status and messages."""
    script = str(Path(sys.executable).with_name("async-ckpt"))
    missing = str(tmp_path / "no-such-dir")
    flip_tensor_byte(ckpt_dir / KEY)
    procs = [
        subprocess.Popen([script, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (["verify", missing], ["latest", "--json", "--full", "--reason", "key_metric", str(ckpt_dir)])
    ]
    procs.append(run_module("ls", str(missing), cwd=tmp_path))
    (vcode, vout, verr), (lcode, lout, lerr), (mcode, mout, merr) = (finish(p) for p in procs)
    assert (vcode, vout) == (2, "") and f"async-ckpt verify: {missing} does not exist" in verr
    assert (mcode, mout) == (2, "") and f"async-ckpt ls: {missing} does not exist" in merr
    assert lcode == 1
    result = json.loads(lout)
    assert result["path"] is None and result["error"] in lerr
    assert [s["path"] for s in result["skipped"]] == [str(ckpt_dir / KEY)]
