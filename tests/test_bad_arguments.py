"""Bad constructor arguments and unusual key-metric values, with MONAI's ``CheckpointSaver`` as the oracle.

Where MONAI raises, ours raises the same exception type; our messages name what to change. Options that only
ours has are checked on their own. Key metrics that are NaN, infinite or not scalars are compared to MONAI run
for run and the outcome is pinned.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Training, make_training, trees_equal
from monai.handlers import CheckpointSaver

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.integrity import MANIFEST_NAME


class _NoState:
    """A value without ``state_dict``."""


OURS_ONLY = "ours-only"  # MONAI has no such argument


@dataclass(frozen=True)
class Row:
    """One constructor call: ``build(training)`` gives the keyword arguments other than ``save_dir``."""

    build: Callable[[Training], dict[str, Any]]
    monai: type[BaseException] | str | None  # what MONAI raises (None: accepts; OURS_ONLY: not a MONAI argument)
    match: str | None = None  # regex our message must match


def _sd(t: Training) -> dict[str, Any]:
    return t.save_dict


ROWS: dict[str, Row] = {
    "save_dir-None": Row(
        lambda t: {"save_dir": None, "save_dict": _sd(t), "save_final": True}, AssertionError, "directory"
    ),
    "save_dict-empty": Row(lambda t: {"save_dict": {}, "save_final": True}, AssertionError, "source objects to save"),
    "save_dict-None": Row(lambda t: {"save_dict": None, "save_final": True}, AssertionError, "source objects to save"),
    "no-state_dict-save_final": Row(
        lambda t: {"save_dict": {**_sd(t), "bad": _NoState()}, "save_final": True}, TypeError, r"'bad'.*state_dict"
    ),
    "no-state_dict-save_key_metric": Row(
        lambda t: {"save_dict": {**_sd(t), "bad": 3}, "save_key_metric": True}, TypeError, r"'bad'.*state_dict"
    ),
    "no-state_dict-save_interval": Row(
        lambda t: {"save_dict": {"bad": [1, 2]}, "save_interval": 1}, TypeError, r"'bad'.*state_dict"
    ),
    "no-state_dict-nested-list": Row(
        lambda t: {"save_dict": {"nets": [t.net, _NoState()]}, "save_final": True},
        TypeError,
        r"save_dict\['nets'\]\[1\] is a _NoState.*state_dict",
    ),
    "no-state_dict-nested-dict": Row(
        lambda t: {"save_dict": {"models": {"a": t.net, "b": {"c": 3}}}, "save_interval": 1},
        TypeError,
        r"save_dict\['models'\]\['b'\]\['c'\] is a int.*state_dict",
    ),
    "nested-accepted": Row(lambda t: {"save_dict": {"nets": [t.net], "o": {"a": t.opt}}, "save_interval": 1}, None),
    "no-state_dict-nothing-enabled": Row(lambda t: {"save_dict": {"bad": 3}}, None),
    "key_metric_filename-n2": Row(
        lambda t: {
            "save_dict": _sd(t),
            "save_key_metric": True,
            "key_metric_filename": "b.pt",
            "key_metric_n_saved": 2,
        },
        ValueError,
        "only save 1 model",
    ),
    "key_metric_filename-n2-after-final": Row(
        lambda t: {
            "save_dict": _sd(t),
            "save_final": True,
            "save_key_metric": True,
            "key_metric_filename": "b.pt",
            "key_metric_n_saved": 2,
        },
        ValueError,
        "only save 1 model",
    ),
    "key_metric_filename-n2-key-metric-disabled": Row(
        lambda t: {"save_dict": _sd(t), "key_metric_filename": "b.pt", "key_metric_n_saved": 2}, None
    ),
    "n_saved-0": Row(lambda t: {"save_dict": _sd(t), "save_interval": 1, "n_saved": 0}, ValueError, "n_saved"),
    "n_saved-negative": Row(lambda t: {"save_dict": _sd(t), "save_interval": 1, "n_saved": -2}, ValueError, "n_saved"),
    "n_saved-0-interval-disabled": Row(lambda t: {"save_dict": _sd(t), "n_saved": 0}, None),
    "key_metric_n_saved-0": Row(
        # ignite's own message names its `n_saved`, which is not the argument the user passed.
        lambda t: {"save_dict": _sd(t), "save_key_metric": True, "key_metric_n_saved": 0},
        ValueError,
        "key_metric_n_saved",
    ),
    "checkpointer-key-with-save-state": Row(
        lambda t: {"save_dict": {"checkpointer": t.net}, "save_key_metric": True, "key_metric_save_state": True},
        ValueError,
        # ignite's own message names its `include_self`, which is not the argument the user passed.
        r"checkpointer.*key_metric_save_state|key_metric_save_state.*checkpointer",
    ),
    "checkpointer-key-without-save-state": Row(
        lambda t: {"save_dict": {"checkpointer": t.net}, "save_key_metric": True}, None
    ),
    "max_pending-0": Row(
        lambda t: {"save_dict": _sd(t), "save_final": True, "max_pending": 0}, OURS_ONLY, "max_pending"
    ),
    "max_pending-float": Row(
        lambda t: {"save_dict": _sd(t), "save_final": True, "max_pending": 1.5}, OURS_ONLY, "max_pending must be an int"
    ),
    "overflow-drop": Row(
        lambda t: {"save_dict": _sd(t), "save_interval": 1, "overflow": "drop"}, OURS_ONLY, "'block' or 'skip'"
    ),
    "snapshot_mode-lazy": Row(
        lambda t: {"save_dict": _sd(t), "save_final": True, "snapshot_mode": "lazy"}, OURS_ONLY, "'eager' or 'overlap'"
    ),
    "exit_timeout-0": Row(
        lambda t: {"save_dict": _sd(t), "save_final": True, "exit_timeout": 0}, OURS_ONLY, "exit_timeout"
    ),
}


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_bad_constructor_argument(tmp_path: Path, row: Row) -> None:
    """Ours raises MONAI's exception type for each invalid argument, with a message that names what to change."""
    kwargs = row.build(make_training(0))
    dirs = {}
    monai_error: BaseException | None = None
    if row.monai != OURS_ONLY:
        dirs["monai"] = tmp_path / "monai"
        try:
            CheckpointSaver(**{"save_dir": str(dirs["monai"]), **kwargs})
        except Exception as exc:
            monai_error = exc
        assert type(monai_error) is (type(None) if row.monai is None else row.monai), "the table is wrong about MONAI"
    dirs["ours"] = tmp_path / "ours"
    ours_error: BaseException | None = None
    try:
        saver = AsyncCheckpointSaver(**{"save_dir": str(dirs["ours"]), **kwargs})
    except Exception as exc:
        ours_error = exc
    else:
        saver.close()
    if row.monai == OURS_ONLY:
        assert type(ours_error) is ValueError
    else:
        assert type(ours_error) is type(monai_error)
        if monai_error is None:
            # An accepted configuration creates the directory exactly when MONAI does.
            assert dirs["ours"].exists() == dirs["monai"].exists()
    if row.match is not None:
        assert ours_error is not None
        assert re.search(row.match, str(ours_error)), f"message {str(ours_error)!r} does not say {row.match!r}"


def test_str_value_without_state_dict(tmp_path: Path) -> None:
    """A str value in save_dict gives ours a TypeError naming the key, where MONAI/ignite recurse into the str."""
    kwargs = {"save_dict": {"net": make_training(0).net, "name": "text"}, "save_interval": 1}
    # ignite's Checkpoint._check_objects walks a str as a sequence of one-character strs, forever.
    with pytest.raises(RecursionError):
        CheckpointSaver(str(tmp_path / "monai"), **kwargs)
    with pytest.raises(TypeError, match=r"save_dict\['name'\] is a str, which has no state_dict"):
        AsyncCheckpointSaver(str(tmp_path / "ours"), **kwargs)


def test_save_dir_is_a_regular_file(tmp_path: Path) -> None:
    """A save_dir that is an existing regular file fails at construction (OSError naming it); MONAI only fails later."""
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"x")
    t = make_training(0)
    CheckpointSaver(str(path), t.save_dict, save_final=True)  # MONAI accepts it at construction
    with pytest.raises(OSError, match="not a directory") as info:
        AsyncCheckpointSaver(str(path), t.save_dict, save_final=True)
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"x"


def test_save_dir_is_a_regular_file_but_nothing_enabled(tmp_path: Path) -> None:
    """With no checkpoint kind enabled, save_dir is not checked, as in MONAI."""
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"x")
    t = make_training(0)
    CheckpointSaver(str(path), t.save_dict)
    AsyncCheckpointSaver(str(path), t.save_dict).close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions, so a read-only dir is writable")
def test_read_only_save_dir(tmp_path: Path) -> None:
    """A save_dir that cannot take files fails at construction with PermissionError, not at the first write."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        t = make_training(0)
        CheckpointSaver(str(ro), t.save_dict, save_final=True)  # MONAI accepts it at construction
        with pytest.raises(PermissionError, match="not writable"):
            AsyncCheckpointSaver(str(ro), t.save_dict, save_final=True)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("enabled", [True, False], ids=["save_final", "nothing-enabled"])
def test_nested_save_dir_created_like_monai(tmp_path: Path, enabled: bool) -> None:
    """A missing nested save_dir is created at construction when a checkpoint kind is enabled, as MONAI does."""
    t = make_training(0)
    kwargs = {"save_final": enabled}
    CheckpointSaver(str(tmp_path / "monai" / "a" / "b"), t.save_dict, **kwargs)
    with AsyncCheckpointSaver(str(tmp_path / "ours" / "a" / "b"), t.save_dict, **kwargs):
        pass
    assert (tmp_path / "ours" / "a" / "b").is_dir() == (tmp_path / "monai" / "a" / "b").is_dir() == enabled
    if enabled:
        assert os.listdir(tmp_path / "ours" / "a" / "b") == []


# -- unusual key-metric values --------------------------------------------------------------------------------------


@dataclass
class MetricRun:
    files: dict[str, Any]
    error: BaseException | None
    warning_categories: list[type[Warning]]


def _run_metrics(impl: type, save_dir: Path, metrics: Sequence[Any]) -> MetricRun:
    t = make_training(0, metrics=metrics)
    saver = impl(str(save_dir), t.save_dict, save_key_metric=True, key_metric_name="acc")
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            saver.attach(t.engine)
            t.engine.run(t.data, max_epochs=len(metrics))
        except Exception as exc:
            error = exc
        finally:
            if isinstance(saver, AsyncCheckpointSaver):
                saver.close()
    names = sorted(n for n in os.listdir(save_dir) if n != MANIFEST_NAME)  # our manifest is not a checkpoint
    files = {n: torch.load(save_dir / n, weights_only=True) for n in names}
    return MetricRun(files, error, [w.category for w in caught if "key metric" in str(w.message)])


NAN, INF = float("nan"), float("inf")
# id: (metrics per epoch, files MONAI leaves, exception MONAI raises, number of MONAI's UserWarnings)
METRIC_CASES: dict[str, tuple[tuple[Any, ...], list[str], type[BaseException] | None, int]] = {
    # NaN compares False with everything: a NaN first blocks every later save, a NaN later is never saved.
    "nan-first": ((NAN, 0.5, 0.7), ["checkpoint_key_metric=nan.pt"], None, 0),
    "nan-later": ((0.5, NAN, 0.7), ["checkpoint_key_metric=0.7000.pt"], None, 0),
    "inf": ((0.5, INF, 0.7), ["checkpoint_key_metric=inf.pt"], None, 0),
    "-inf-first": ((-INF, 0.5), ["checkpoint_key_metric=0.5000.pt"], None, 0),
    # A non-scalar scores -1 with a UserWarning: it is saved while the list is empty, then never beats a real score.
    "1d-tensor-only": ((torch.tensor([0.5, 0.6]),), ["checkpoint_key_metric=-1.pt"], None, 1),
    "1d-tensor-after-scalar": ((0.7, torch.tensor([0.5, 0.6])), ["checkpoint_key_metric=0.7000.pt"], None, 1),
    "1d-tensor-then-scalar": ((torch.tensor([0.9, 0.9]), 0.2), ["checkpoint_key_metric=0.2000.pt"], None, 1),
    "1d-ndarray": ((np.array([0.5]),), ["checkpoint_key_metric=-1.pt"], None, 1),
    # MONAI's is_scalar accepts a 0-d tensor, which ignite then rejects as not a number.
    "0d-tensor": ((torch.tensor(0.5),), [], ValueError, 0),
    "np-float32": ((np.float32(0.5),), ["checkpoint_key_metric=0.5000.pt"], None, 0),
    # MONAI's is_scalar (np.isscalar) rejects a 0-d ndarray: warning and -1.
    "0d-ndarray": ((np.array(0.5),), ["checkpoint_key_metric=-1.pt"], None, 1),
    # MONAI's is_scalar (np.isscalar) accepts a str, which ignite then rejects as not a number.
    "str": (("high",), [], ValueError, 0),
}


@pytest.mark.parametrize(
    ("metrics", "files", "error", "n_warnings"), list(METRIC_CASES.values()), ids=list(METRIC_CASES)
)
def test_unusual_key_metric_values(
    tmp_path: Path, metrics: tuple[Any, ...], files: list[str], error: type[BaseException] | None, n_warnings: int
) -> None:
    """NaN, inf and non-scalar key metrics leave MONAI's files, warnings (category and count) and exceptions."""
    ref = _run_metrics(CheckpointSaver, tmp_path / "monai", metrics)
    assert sorted(ref.files) == files
    assert type(ref.error) is (type(None) if error is None else error)
    assert ref.warning_categories == [UserWarning] * n_warnings
    ours = _run_metrics(AsyncCheckpointSaver, tmp_path / "ours", metrics)
    assert sorted(ours.files) == sorted(ref.files)
    for name in ref.files:
        assert trees_equal(ours.files[name], ref.files[name]), name
    assert type(ours.error) is type(ref.error)
    assert ours.warning_categories == ref.warning_categories


@pytest.mark.parametrize(
    ("url", "error", "says"),
    [
        ("gs://bucket/prefix", ImportError, "is a URL whose fsspec package is not installed"),
        ("file+s3://x", ValueError, "is a URL of a protocol unknown to fsspec"),
    ],
)
def test_a_url_save_dir_never_becomes_a_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, error: type[Exception], says: str
) -> None:
    """A URL whose store cannot be reached from here (its fsspec package missing, or an unknown protocol) raises an
    error that says so and creates nothing (a URL used to become a local directory named 's3:'); the Checkpointer
    behaves the same. URLs that work are tested against a real S3 API in test_remote*.py."""
    from async_ckpt import Checkpointer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    t = make_training(0)
    with pytest.raises(error, match=says):
        AsyncCheckpointSaver(url, t.save_dict, save_interval=1)
    with pytest.raises(error, match=says):
        Checkpointer(url)
    assert os.listdir(tmp_path) == []


def test_remote_options_with_a_local_save_dir_are_refused(tmp_path: Path) -> None:
    """storage_options / local_dir / upload only mean something with a URL: with a local save_dir they raise."""
    t = make_training(0)
    for kwargs in ({"storage_options": {}}, {"local_dir": str(tmp_path / "x")}):
        with pytest.raises(ValueError, match="apply to a URL save_dir"):
            AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_interval=1, **kwargs)  # type: ignore[arg-type]
