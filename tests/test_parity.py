"""Differential tests: MONAI's ``CheckpointSaver`` is the oracle for file names, file contents and errors.

Each test runs MONAI's saver and ours on identically seeded trainings (``make_training(seed)``) in separate
directories and compares the directories: the same file names, and every file loading to equal contents. Bytes are
not compared (``torch.save`` embeds a random serialization id and the archive name).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import METRICS, Training, make_training, trees_equal
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader, CheckpointSaver

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.integrity import MANIFEST_NAME, read_manifest

IMPLS = {"monai": CheckpointSaver, "ours": AsyncCheckpointSaver}


def load_dir(path: Path) -> dict[str, Any]:
    """Every checkpoint file of ``path`` by name, loaded with ``torch.load(weights_only=True)``.

    Our manifest (a hidden JSON file MONAI does not write) is not a checkpoint: it is checked to list exactly the
    checkpoint files and left out.
    """
    if not path.exists():
        return {}
    names = sorted(n for n in os.listdir(path) if n != MANIFEST_NAME)
    if MANIFEST_NAME in os.listdir(path):
        assert sorted(read_manifest(str(path))["files"]) == names, "the manifest does not list the checkpoints"
    return {name: torch.load(path / name, weights_only=True) for name in names}


def assert_same_dirs(ref: dict[str, Any], ours: dict[str, Any]) -> None:
    """The same file names, and each file's loaded contents equal."""
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert trees_equal(ref[name], ours[name]), f"contents of {name} differ from MONAI's"


@dataclass
class Outcome:
    """What one saver left behind after a run."""

    files: dict[str, Any]
    error: BaseException | None
    training: Training
    files_at_return: dict[str, Any] | None = None
    warnings: list[warnings.WarningMessage] = field(default_factory=list)


def run_saver(
    impl: str,
    save_dir: Path,
    kwargs: dict[str, Any],
    *,
    seed: int = 0,
    max_epochs: int = 8,
    metrics: Sequence[Any] = METRICS,
    fail_at_iteration: int | None = None,
    single: bool = False,
    layout: str | None = None,
    state_key_metric: str | None = None,
    runs: Sequence[int] = (),
) -> Outcome:
    """Train with one saver attached and return the files it left (after ``close()`` for ours).

    ``layout`` names one of :data:`LAYOUTS` (nested ``save_dict`` values); ``state_key_metric`` sets
    ``engine.state.key_metric_name`` at ``STARTED``; ``runs`` lists further ``max_epochs`` to resume the same engine
    with after the first run.
    """
    t = make_training(seed, metrics=metrics, fail_at_iteration=fail_at_iteration)
    if state_key_metric is not None:

        @t.engine.on(Events.STARTED)
        def _key(e: Engine) -> None:
            e.state.key_metric_name = state_key_metric

    save_dict = layout_of(t, layout) if layout is not None else {"net": t.net} if single else t.save_dict
    saver = IMPLS[impl](save_dir=str(save_dir), save_dict=save_dict, **kwargs)
    error: BaseException | None = None
    at_return = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                saver.attach(t.engine)
                for n in (max_epochs, *runs):
                    t.engine.run(t.data, max_epochs=n)
            except Exception as exc:
                error = exc
            # Ours waits for every pending file at COMPLETED, and before an exception leaves engine.run when it
            # saves a final checkpoint: the directory must already be complete here, before close().
            if error is None or kwargs.get("save_final"):
                at_return = load_dir(save_dir)
        finally:
            if isinstance(saver, AsyncCheckpointSaver):
                saver.close()
    return Outcome(load_dir(save_dir), error, t, at_return, list(caught))


def layout_of(t: Training, layout: str) -> dict[str, Any]:
    """A ``save_dict`` of ``t`` whose values nest lists, tuples and dicts of objects, as ignite's ``Checkpoint``
    accepts them (a GAN's ``{"nets": [gen, disc]}``)."""
    return {
        "list": {"nets": [t.net, t.opt]},
        "dict": {"models": {"net": t.net, "opt": t.opt}},
        "mixed": {"nets": [t.net], "optims": {"adam": t.opt}, "trainer": t.engine},
        "deep": {"gan": {"parts": [t.net, [t.opt]], "trainer": {"engine": t.engine}}},
        "tuple": {"nets": (t.net,), "opt": t.opt},
    }[layout]


LAYOUTS = ("list", "dict", "mixed", "deep", "tuple")
LOADABLE = ("list", "dict", "mixed", "deep")  # ignite's load_objects walks no tuples (whoever saved the file)


def run_both(tmp_path: Path, kwargs: dict[str, Any], **run_kwargs: Any) -> tuple[Outcome, Outcome]:
    """Run MONAI's saver and ours with the same arguments on identically seeded trainings."""
    ref = run_saver("monai", tmp_path / "monai", kwargs, **run_kwargs)
    ours = run_saver("ours", tmp_path / "ours", kwargs, **run_kwargs)
    return ref, ours


def assert_parity(ref: Outcome, ours: Outcome) -> None:
    """Same exception (type and message) out of ``engine.run`` and the same files with the same contents."""
    assert type(ours.error) is type(ref.error)
    if ref.error is not None:
        assert str(ours.error) == str(ref.error)
    assert_same_dirs(ref.files, ours.files)
    if ref.files_at_return is not None:
        assert ours.files_at_return is not None
        assert_same_dirs(ref.files_at_return, ours.files_at_return)


KM = {"save_key_metric": True, "key_metric_name": "acc"}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # id: (saver kwargs, run_saver kwargs)
    "final": ({"save_final": True}, {}),
    "final-fixed-name": ({"save_final": True, "final_filename": "last.pt"}, {}),
    "final-on-exception": ({"save_final": True}, {"fail_at_iteration": 11}),
    "final-fixed-name-on-exception": ({"save_final": True, "final_filename": "last.pt"}, {"fail_at_iteration": 11}),
    "final-on-exception-with-interval-and-key-metric": (
        {"save_final": True, "save_interval": 2, "epoch_level": False, "n_saved": 2, **KM},
        {"fail_at_iteration": 17},
    ),
    "exception-without-final": ({"save_interval": 1, **KM}, {"fail_at_iteration": 8}),
    "final-replaced-on-second-run": ({"save_final": True, "save_interval": 1, "n_saved": 2}, {"runs": (12,)}),
    "key-metric": (KM, {}),
    "key-metric-name-from-engine-state": ({"save_key_metric": True}, {"state_key_metric": "acc"}),
    "key-metric-name-missing": ({"save_key_metric": True}, {}),
    "key-metric-n3": ({**KM, "key_metric_n_saved": 3}, {}),
    "key-metric-fixed-name": ({**KM, "key_metric_filename": "best.pt"}, {}),
    "key-metric-fixed-name-ties-replace": (
        {**KM, "key_metric_filename": "best.pt", "key_metric_greater_or_equal": True},
        {"max_epochs": 7},
    ),
    "key-metric-save-state": ({**KM, "key_metric_save_state": True}, {}),
    "key-metric-save-state-n3": ({**KM, "key_metric_save_state": True, "key_metric_n_saved": 3}, {}),
    "key-metric-ties-keep-first": ({**KM, "key_metric_greater_or_equal": False}, {"max_epochs": 7}),
    "key-metric-ties-keep-latest": ({**KM, "key_metric_greater_or_equal": True}, {"max_epochs": 7}),
    "key-metric-ties-keep-latest-n3": ({**KM, "key_metric_greater_or_equal": True, "key_metric_n_saved": 3}, {}),
    "key-metric-ties-keep-first-n3-state": (
        {**KM, "key_metric_n_saved": 3, "key_metric_save_state": True},
        {"metrics": (0.5, 0.5, 0.5, 0.5, 0.6, 0.6)},
    ),
    "key-metric-negative-sign": ({**KM, "key_metric_negative_sign": True}, {}),
    "key-metric-negative-sign-ties-n3": (
        {**KM, "key_metric_negative_sign": True, "key_metric_greater_or_equal": True, "key_metric_n_saved": 3},
        {},
    ),
    "interval-epoch-1-keep-all": ({"save_interval": 1, "n_saved": None}, {}),
    "interval-epoch-3-keep-all": ({"save_interval": 3}, {}),
    "interval-epoch-1-keep-1": ({"save_interval": 1, "n_saved": 1}, {}),
    "interval-epoch-2-keep-3": ({"save_interval": 2, "n_saved": 3}, {}),
    "interval-iteration-5-keep-all": ({"save_interval": 5, "epoch_level": False}, {}),
    "interval-iteration-2-keep-1": ({"save_interval": 2, "epoch_level": False, "n_saved": 1}, {}),
    "interval-iteration-4-keep-3": ({"save_interval": 4, "epoch_level": False, "n_saved": 3}, {}),
    "epoch-level-false-without-interval": ({"epoch_level": False, "save_final": True}, {}),
    "file-prefix": (
        {"file_prefix": "run7", "save_final": True, "save_interval": 3, "n_saved": 2, **KM, "key_metric_n_saved": 2},
        {},
    ),
    "single-entry": ({"save_final": True, "save_interval": 2, "n_saved": 2, **KM}, {"single": True}),
    "single-entry-fixed-names-state": (
        {"save_final": True, "final_filename": "f.pt", **KM, "key_metric_filename": "b.pt"},
        {"single": True},
    ),
    **{
        f"nested-{layout}": (
            {"save_final": True, "save_interval": 2, "epoch_level": False, "n_saved": 2, **KM, "key_metric_n_saved": 2},
            {"layout": layout, "max_epochs": 4},
        )
        for layout in LAYOUTS
    },
    "nested-on-exception": (
        {"save_final": True, "save_interval": 1, **KM},
        {"layout": "mixed", "fail_at_iteration": 8},
    ),
    "nested-single-list-fixed-names": (
        {"save_final": True, "final_filename": "f.pt", **KM, "key_metric_filename": "b.pt"},
        {"layout": "list", "max_epochs": 4},
    ),
    "everything": (
        {
            "file_prefix": "all",
            "save_final": True,
            **KM,
            "key_metric_n_saved": 2,
            "key_metric_save_state": True,
            "key_metric_greater_or_equal": True,
            "save_interval": 1,
            "n_saved": 2,
        },
        {},
    ),
}


@pytest.mark.parametrize(("kwargs", "run_kwargs"), list(CASES.values()), ids=list(CASES))
def test_same_files_and_contents_as_monai(tmp_path: Path, kwargs: dict[str, Any], run_kwargs: dict[str, Any]) -> None:
    """For each argument combination ours leaves MONAI's file names and contents and raises what MONAI raises."""
    ref, ours = run_both(tmp_path, kwargs, **run_kwargs)
    assert_parity(ref, ours)


def test_exception_propagates_and_final_saved(tmp_path: Path) -> None:
    """On a training failure both re-raise the original exception and leave the state of the failing step as final."""
    ref, ours = run_both(tmp_path, {"save_final": True}, fail_at_iteration=11)
    assert isinstance(ours.error, RuntimeError)
    assert "boom" in str(ours.error)
    assert sorted(ours.files) == ["checkpoint_final_iteration=11.pt"]
    assert_parity(ref, ours)
    # The final file holds the state when the failure happened: the weights after iteration 10.
    assert trees_equal(ours.files["checkpoint_final_iteration=11.pt"]["net"], ours.training.net.state_dict())


def test_ties_pinned(tmp_path: Path) -> None:
    """On a tie (0.7 then 0.7) greater_or_equal decides whether the first or the latest equal model is kept."""
    metrics = (0.7, 0.7, 0.5)
    first_ref, first = run_both(tmp_path / "first", {**KM}, metrics=metrics, max_epochs=3)
    latest_ref, latest = run_both(
        tmp_path / "latest", {**KM, "key_metric_greater_or_equal": True}, metrics=metrics, max_epochs=3
    )
    assert_parity(first_ref, first)
    assert_parity(latest_ref, latest)
    name = "checkpoint_key_metric=0.7000.pt"
    assert sorted(first.files) == sorted(latest.files) == [name]
    # Epoch 2 changed the weights: keep-first holds the epoch-1 state, keep-latest the epoch-2 state.
    assert not trees_equal(first.files[name]["net"], latest.files[name]["net"])


def _trained_checkpoint(tmp_path: Path) -> tuple[Training, Path]:
    """Train 4 epochs with our saver and return the training and its final checkpoint."""
    t = make_training(0)
    with AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_final=True) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=4)
    return t, tmp_path / "checkpoint_final_iteration=12.pt"


def test_checkpoint_loader_restores_weights(tmp_path: Path) -> None:
    """A file of ours loads through MONAI's CheckpointLoader into fresh objects with the saved weights and state."""
    t, path = _trained_checkpoint(tmp_path)
    fresh = make_training(seed=1)
    assert not trees_equal(fresh.net.state_dict(), t.net.state_dict())
    loader = CheckpointLoader(load_path=str(path), load_dict={"net": fresh.net, "opt": fresh.opt})
    loader(Engine(lambda e, b: None))
    assert trees_equal(fresh.net.state_dict(), t.net.state_dict())
    assert trees_equal(fresh.opt.state_dict(), t.opt.state_dict())


def test_ignite_load_objects_restores_weights(tmp_path: Path) -> None:
    """A file of ours loads through ignite's Checkpoint.load_objects (from a path) with the saved weights and state."""
    t, path = _trained_checkpoint(tmp_path)
    fresh = make_training(seed=2)
    Checkpoint.load_objects(to_load={"net": fresh.net, "opt": fresh.opt}, checkpoint=str(path))
    assert trees_equal(fresh.net.state_dict(), t.net.state_dict())
    assert trees_equal(fresh.opt.state_dict(), t.opt.state_dict())


def test_single_entry_file_loads_as_bare_state(tmp_path: Path) -> None:
    """A single-entry save_dict is named after its key, holds the bare state_dict, and loads through both loaders."""
    t = make_training(0)
    with AsyncCheckpointSaver(str(tmp_path), {"net": t.net}, save_final=True) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=2)
    path = tmp_path / "net_final_iteration=6.pt"
    assert sorted(load_dir(tmp_path)) == [path.name]
    assert trees_equal(torch.load(path, weights_only=True), t.net.state_dict())
    fresh = make_training(seed=3)
    CheckpointLoader(load_path=str(path), load_dict={"net": fresh.net})(Engine(lambda e, b: None))
    assert trees_equal(fresh.net.state_dict(), t.net.state_dict())
    other = make_training(seed=4)
    Checkpoint.load_objects(to_load={"net": other.net}, checkpoint=str(path))
    assert trees_equal(other.net.state_dict(), t.net.state_dict())


@pytest.mark.parametrize("layout", LOADABLE)
def test_nested_save_dict_loads_through_monai_and_ignite(tmp_path: Path, layout: str) -> None:
    """A checkpoint of a nested ``save_dict`` loads through MONAI's CheckpointLoader and ignite's
    ``Checkpoint.load_objects`` into fresh objects of the same layout, with the saved weights and state."""
    t = make_training(0)
    with AsyncCheckpointSaver(str(tmp_path), layout_of(t, layout), save_final=True) as saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=2)
    (path,) = (tmp_path / n for n in load_dir(tmp_path))
    for load in ("monai", "ignite"):
        fresh = make_training(seed=5)
        fresh.engine.state.max_epochs = 1
        assert not trees_equal(fresh.net.state_dict(), t.net.state_dict())
        to_load = layout_of(fresh, layout)
        if load == "monai":
            CheckpointLoader(load_path=str(path), load_dict=to_load)(Engine(lambda e, b: None))
        elif len(to_load) > 1:
            Checkpoint.load_objects(to_load=to_load, checkpoint=str(path))
        else:
            # ignite reads a single-key file as the bare state of one object, which a nested value is not: the
            # file holds the value's nesting, so the caller wraps it (as MONAI's CheckpointLoader does).
            (key,) = to_load
            Checkpoint.load_objects(to_load=to_load, checkpoint={key: torch.load(path, weights_only=True)})
        assert trees_equal(fresh.net.state_dict(), t.net.state_dict()), load
        assert trees_equal(fresh.opt.state_dict(), t.opt.state_dict()), load


def _resume(impl: str, save_dir: Path, use_loader: bool) -> dict[str, Any]:
    """MONAI's documented resume: save the tracking list, then load it into a new saver before training on."""
    kwargs = {**KM, "key_metric_n_saved": 2, "key_metric_save_state": True}
    first = run_saver(impl, save_dir, kwargs)
    assert first.error is None
    assert sorted(first.files) == ["checkpoint_key_metric=0.9000.pt", "checkpoint_key_metric=0.9500.pt"]
    t = make_training(1, metrics=(0.92, 0.8, 0.97))
    saver = IMPLS[impl](str(save_dir), t.save_dict, **kwargs)
    try:
        if use_loader:
            CheckpointLoader(str(save_dir / "checkpoint_key_metric=0.9500.pt"), {"checkpointer": saver}).attach(
                t.engine
            )
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=3)
    finally:
        if isinstance(saver, AsyncCheckpointSaver):
            saver.close()
    return load_dir(save_dir)


@pytest.mark.parametrize("use_loader", [True, False], ids=["resumed", "not-resumed"])
def test_resume_key_metric_tracking_list(tmp_path: Path, use_loader: bool) -> None:
    """Loading the "checkpointer" entry via CheckpointLoader makes a new saver continue MONAI's top-N list."""
    ref = _resume("monai", tmp_path / "monai", use_loader)
    ours = _resume("ours", tmp_path / "ours", use_loader)
    assert_same_dirs(ref, ours)
    if use_loader:
        # 0.92 evicts 0.90, then 0.97 evicts 0.92; 0.80 never beats the resumed list.
        expected = ["checkpoint_key_metric=0.9500.pt", "checkpoint_key_metric=0.9700.pt"]
    else:
        expected = [f"checkpoint_key_metric={m}.pt" for m in ("0.9000", "0.9200", "0.9500", "0.9700")]
    assert sorted(ours) == expected
    assert (
        ours["checkpoint_key_metric=0.9700.pt"]["checkpointer"]
        == ref["checkpoint_key_metric=0.9700.pt"]["checkpointer"]
    )


def test_load_state_dict_without_key_metric_warns_like_monai(tmp_path: Path) -> None:
    """load_state_dict on a saver without a key-metric checkpoint warns (UserWarning) as MONAI does."""
    t = make_training(0)
    categories = []
    for impl in IMPLS:
        saver = IMPLS[impl](str(tmp_path / impl), t.save_dict, save_final=True)
        with pytest.warns(UserWarning, match="no key metric checkpoint saver") as record:
            saver.load_state_dict({"saved": []})
        categories.append([w.category for w in record])
        if isinstance(saver, AsyncCheckpointSaver):
            saver.close()
    assert categories[0] == categories[1]


VAL_METRICS = (0.4, 0.8, 0.6, 0.8, 0.9, 0.2)


def _run_with_evaluator(impl: str, save_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trainer that runs an evaluator at every epoch end; the saver is attached to the evaluator."""
    t = make_training(0)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["val_acc"] = VAL_METRICS[t.engine.state.epoch - 1]

    @t.engine.on(Events.EPOCH_COMPLETED)
    def _validate(e: Engine) -> None:
        evaluator.run([0, 1], max_epochs=1)

    saver = IMPLS[impl](
        str(save_dir),
        t.save_dict,
        save_final=True,
        save_key_metric=True,
        key_metric_name="val_acc",
        key_metric_n_saved=2,
        key_metric_save_state=True,
    )
    try:
        saver.attach(evaluator)
        t.engine.run(t.data, max_epochs=len(VAL_METRICS))
        at_return = load_dir(save_dir)
    finally:
        if isinstance(saver, AsyncCheckpointSaver):
            saver.close()
    return at_return, load_dir(save_dir)


def test_key_metric_saver_on_evaluator(tmp_path: Path) -> None:
    """A key-metric saver on an evaluator run from the trainer each epoch leaves MONAI's files, complete at return."""
    ref_at_return, ref = _run_with_evaluator("monai", tmp_path / "monai")
    ours_at_return, ours = _run_with_evaluator("ours", tmp_path / "ours")
    assert_same_dirs(ref, ours)
    assert_same_dirs(ref_at_return, ours_at_return)
    assert sorted(ours) == [
        "checkpoint_final_iteration=2.pt",
        "checkpoint_key_metric=0.8000.pt",
        "checkpoint_key_metric=0.9000.pt",
    ]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def test_file_modes_follow_umask_like_monai(tmp_path: Path, umask: int) -> None:
    """Checkpoint files get MONAI's permission bits (0o666 less the umask): group-writable or private as configured."""
    old = os.umask(umask)
    try:
        run_both(tmp_path, {"save_final": True, "save_interval": 1, **KM}, max_epochs=2)
    finally:
        os.umask(old)

    def modes(d: Path) -> dict[str, int]:
        return {n: stat.S_IMODE(os.stat(d / n).st_mode) for n in os.listdir(d) if n != MANIFEST_NAME}

    ref = modes(tmp_path / "monai")
    assert set(ref.values()) == {0o666 & ~umask}
    assert modes(tmp_path / "ours") == ref


def test_nothing_enabled_writes_nothing(tmp_path: Path) -> None:
    """With no checkpoint kind enabled neither saver creates the directory nor writes anything."""
    ref, ours = run_both(tmp_path, {}, max_epochs=1)
    assert_parity(ref, ours)
    assert not (tmp_path / "monai").exists()
    assert not (tmp_path / "ours").exists()
