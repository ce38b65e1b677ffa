"""The benchmarks still run end to end, tiny: every checkpoint they write verifies, and the report has its rows.

No timing is asserted (the figures of such short runs are noise); what can fail is a benchmark that crashes, writes
a file that does not hold the state at its save, or drops a variant from its report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(ROOT)  # benchmarks/ is a folder of the checkout, not part of the package


def test_integrations_loop_and_lightning_verify_every_file(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from benchmarks import integrations

    variants = "none,torch-save-fsync,checkpointer,lightning-async,async-ckpt"
    args = ["--sizes", "1", "--every", "2", "--checkpoints", "2", "--rounds", "1", "--compute-iters", "0"]
    rc = integrations.main([*args, "--variants", variants, "--out", str(tmp_path / "out")])
    assert rc == 0
    with open(tmp_path / "out" / "integrations.json") as f:
        result = json.load(f)
    runs = result["raw"][0]["runs"]
    ran = {(r["suite"], r["variant"]) for r in runs}
    assert ran == {
        ("loop", "none"),
        ("loop", "torch-save-fsync"),
        ("loop", "checkpointer"),
        ("lightning", "none"),
        ("lightning", "lightning-async"),
        ("lightning", "async-ckpt"),
    }
    for r in runs:
        assert "error" not in r, r
        expected = 0 if r["variant"] == "none" else 2
        assert (r["verified_ok"], r["verified_expected"], r["verify_errors"]) == (expected, expected, [])
        assert len(r["durable_s"]) == expected  # every file reported complete
    pairs = {(c["suite"], c["ours"], c["anchor"]) for c in result["ratios"]}
    assert pairs == {("loop", "checkpointer", "torch-save-fsync"), ("lightning", "async-ckpt", "lightning-async")}
    assert not (tmp_path / "out" / "ckpt-tmp").exists()  # the checkpoints are removed at the end


def test_stall_runs_in_its_worker_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ignite")
    from benchmarks import stall

    out = tmp_path / "out"
    args = ["--sizes", "1", "--steps", "4", "--every", "2", "--rounds", "1", "--compute-iters", "0"]
    rc = stall.main([*args, "--tight-every", "0", "--savers", "none,async-eager", "--no-plots", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out
    with open(out / "stall.json") as f:
        result = json.load(f)
    table = result["summary"][0]["intervals"]["2"]
    assert set(table) == {"none", "async-eager"}
    assert (table["async-eager"]["verified_ok"], table["async-eager"]["verified_expected"]) == (2, 2)
    assert "| 2 | async-eager |" in capsys.readouterr().out
    assert not (out / "ckpt-tmp").exists()


def test_save_path_runs_this_checkout_in_a_child_and_verifies(tmp_path: Path) -> None:
    """The A/B of the save path imports the package of the revision it names (here this checkout), and its last
    file holds the state at its save."""
    from benchmarks import save_path

    out = tmp_path / "out"
    assert save_path.main(["--tensors", "19", "--saves", "2", "--pairs", "1", "--out", str(out)]) == 0
    with open(out / "save_path.json") as f:
        result = json.load(f)
    (run,) = result["runs"]["this checkout"]
    assert run["tensors"] == 19 and run["verified"] is True
    assert run["package"].startswith(ROOT) and run["save_s"] > 0
