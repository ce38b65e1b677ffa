"""AsyncCheckpointSaver behaviour beyond MONAI parity: snapshot at the event, dedup, flushes, telemetry."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from _doubles import GatedStorage
from conftest import checkpoint_names, clone_tree, iteration_saver, make_training, trees_equal
from conftest import load_checkpoint as _load
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import CheckpointEvents

import async_ckpt
from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.writer import worker_alive


def _mutate_everything(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            t.add_(1)
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    v.add_(1)
    opt.param_groups[0]["lr"] = 42.0


def _step_again(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What overlap mode guards: a forward (BatchNorm statistics) and an optimizer step (parameters, state)."""
    opt.zero_grad()
    net(torch.randn(4, 4)).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize(("mode", "mutate"), [("eager", _mutate_everything), ("overlap", _step_again)])
def test_file_holds_the_state_at_the_event(tmp_path: os.PathLike[str], mode: str, mutate: Any) -> None:
    """A state changed right after the event (eager: any in-place write; overlap: forward + step) is not in the file."""
    tr = make_training(batches=2)
    expected: dict[int, Any] = {}

    @tr.engine.on(Events.ITERATION_COMPLETED)
    def _reference(engine: Engine) -> None:  # registered before the saver: runs first
        expected[engine.state.iteration] = clone_tree({"net": tr.net.state_dict(), "opt": tr.opt.state_dict()})

    with iteration_saver(tmp_path, tr, snapshot_mode=mode) as saver:
        saver.attach(tr.engine)

        @tr.engine.on(Events.ITERATION_COMPLETED)
        def _vandal(engine: Engine) -> None:  # runs right after the saver returned
            mutate(tr.net, tr.opt)

        tr.engine.run(tr.data, max_epochs=2)
    for it, state in expected.items():
        assert trees_equal(_load(os.path.join(tmp_path, f"checkpoint_iteration={it}.pt")), state), it


def test_overlap_mode_writes_the_same_files_as_eager(tmp_path: os.PathLike[str]) -> None:
    """Overlap staging, where the optimizer step waits for the copy, produces the files eager staging produces."""
    outs = {}
    for mode in ("eager", "overlap"):
        tr = make_training(seed=3)
        d = os.path.join(tmp_path, mode)
        with iteration_saver(d, tr, snapshot_mode=mode) as s:
            s.attach(tr.engine)
            tr.engine.run(tr.data, max_epochs=3)
        outs[mode] = {f: _load(os.path.join(d, f)) for f in checkpoint_names(d)}
    assert outs["eager"].keys() == outs["overlap"].keys() and len(outs["eager"]) == 9
    assert all(trees_equal(outs["eager"][f], outs["overlap"][f]) for f in outs["eager"])


def test_same_event_is_staged_and_serialized_once(tmp_path: os.PathLike[str]) -> None:
    """Final, key-metric and interval checkpoints of one unchanged state share one snapshot and one write."""
    tr = make_training(metrics=(0.5,))
    with AsyncCheckpointSaver(
        str(tmp_path), tr.save_dict, save_final=True, save_key_metric=True, key_metric_name="acc", save_interval=1
    ) as saver:
        saver.attach(tr.engine)
        tr.engine.run(tr.data, max_epochs=1)
    saves = saver.stats.saves
    assert [s.reason for s in saves] == ["key_metric", "interval", "final"]
    assert [s.linked for s in saves] == [False, True, True]
    assert [s.reused_snapshot for s in saves] == [False, True, True]
    files = checkpoint_names(tmp_path)
    inodes = {os.stat(os.path.join(tmp_path, f)).st_ino for f in files}
    assert len(files) == 3 and len(inodes) == 1


def test_changed_state_between_events_is_not_deduplicated(tmp_path: os.PathLike[str]) -> None:
    """A handler that changes the state between the epoch's saves and COMPLETED gets a freshly copied final file."""
    tr = make_training(metrics=(0.5,))
    with AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_final=True, save_interval=1) as saver:
        saver.attach(tr.engine)
        tr.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: _mutate_everything(tr.net, tr.opt))
        tr.engine.run(tr.data, max_epochs=1)
    final = _load(os.path.join(tmp_path, "checkpoint_final_iteration=3.pt"))
    interval = _load(os.path.join(tmp_path, "checkpoint_epoch=1.pt"))
    assert final["opt"]["param_groups"][0]["lr"] == 42.0 and interval["opt"]["param_groups"][0]["lr"] != 42.0
    assert not torch.equal(final["net"]["0.weight"], interval["net"]["0.weight"])
    assert trees_equal(final, {"net": tr.net.state_dict(), "opt": tr.opt.state_dict()})


def test_key_metric_with_save_state_is_its_own_file(tmp_path: os.PathLike[str]) -> None:
    """A key-metric file that also stores the tracking list is serialized separately (its content differs)."""
    tr = make_training(metrics=(0.5,))
    with AsyncCheckpointSaver(
        str(tmp_path),
        tr.save_dict,
        save_key_metric=True,
        key_metric_name="acc",
        key_metric_save_state=True,
        save_interval=1,
    ) as saver:
        saver.attach(tr.engine)
        tr.engine.run(tr.data, max_epochs=1)
    assert [s.linked for s in saver.stats.saves] == [False, False]
    assert [s.reused_snapshot for s in saver.stats.saves] == [False, True]
    best = _load(os.path.join(tmp_path, "checkpoint_key_metric=0.5000.pt"))
    assert best["checkpointer"]["_saved"] == [(0.5, "checkpoint_key_metric=0.5000.pt")]


def test_evaluator_saver_does_not_make_the_trainer_wait(tmp_path: os.PathLike[str]) -> None:
    """A key-metric saver on an evaluator run every epoch lets the trainer go on; trainer.run() flushes it."""
    tr = make_training(batches=2)
    evaluator = Engine(lambda e, b: None)
    scores = iter([0.3, 0.6])

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(e: Engine) -> None:
        e.state.metrics["acc"] = next(scores)

    storage = GatedStorage()
    saver = AsyncCheckpointSaver(
        str(tmp_path), tr.save_dict, save_key_metric=True, key_metric_name="acc", key_metric_n_saved=2, storage=storage
    )
    saver.attach(evaluator)
    pending_seen: list[int] = []
    tr.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))

    @tr.engine.on(Events.EPOCH_COMPLETED)
    def _check(e: Engine) -> None:
        pending_seen.append(saver._pipeline.client.pending)
        if e.state.epoch == 2:
            storage.open_all()

    tr.engine.run(tr.data, max_epochs=2)
    assert pending_seen == [1, 2]  # both best-model writes were still queued while training went on
    assert checkpoint_names(tmp_path) == ["checkpoint_key_metric=0.3000.pt", "checkpoint_key_metric=0.6000.pt"]
    assert saver._pipeline.client.pending == 0
    saver.close()


def test_run_returns_with_every_checkpoint_durable(tmp_path: os.PathLike[str]) -> None:
    """When trainer.run() returns, every checkpoint of the run has been written (flush at COMPLETED)."""
    tr = make_training()
    saver = iteration_saver(tmp_path, tr, n_saved=None)
    saver.attach(tr.engine)
    tr.engine.run(tr.data, max_epochs=2)
    assert saver._pipeline.client.pending == 0
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".pt")]) == 6
    saver.close()
    assert not worker_alive()


def test_telemetry_records_each_save(tmp_path: os.PathLike[str]) -> None:
    """Each durable save reports blocking, snapshot, bytes, serialize/write/fsync and durable times."""
    tr = make_training()
    with AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_interval=1) as saver:
        saver.attach(tr.engine)
        tr.engine.run(tr.data, max_epochs=2)
    saves = saver.stats.saves
    assert len(saves) == 2 and all(s.ok for s in saves)
    for s in saves:
        assert s.nbytes == os.path.getsize(s.path)
        assert 0 < s.blocking_s <= s.durable_s and s.snapshot_s > 0 and s.fsync_s > 0 and s.throughput_mib_s > 0
    summary = saver.stats.summary()
    assert summary["saves"] == 2 and summary["failed"] == 0 and summary["bytes"] == sum(s.nbytes for s in saves)


def test_info_line_per_durable_save(tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    """A one-line info summary is logged for each durable save, through the saver's logger."""
    tr = make_training()
    with AsyncCheckpointSaver(str(tmp_path), tr.save_dict, name="ckpt-test", save_interval=1) as saver:
        saver.attach(tr.engine)
        with caplog.at_level("INFO", logger="ckpt-test"):
            tr.engine.run(tr.data, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt-test" and "durable in" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint_epoch=1.pt" in lines[0] and "training blocked" in lines[0]


def test_close_is_idempotent_and_refuses_new_saves(tmp_path: os.PathLike[str]) -> None:
    """close() can be called twice; a save after it raises WriterClosedError instead of being lost."""
    tr = make_training()
    saver = AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_interval=1)
    saver.attach(tr.engine)
    saver.close()
    saver.close()
    with pytest.raises(async_ckpt.WriterClosedError):
        tr.engine.run(tr.data, max_epochs=1)


def test_public_api_is_pinned() -> None:
    """The package exports exactly this small surface."""
    assert sorted(async_ckpt.__all__) == [
        "AsyncCheckpointError",
        "AsyncCheckpointSaver",
        "AsyncOptions",
        "CheckpointInfo",
        "CheckpointWriteError",
        "Checkpointer",
        "FileStorage",
        "SaveHandle",
        "SaveStats",
        "SnapshotError",
        "UploadOptions",
        "WriterClosedError",
        "__version__",
        "latest_checkpoint",
    ]
    for name in async_ckpt.__all__:
        assert getattr(async_ckpt, name) is not None


def test_prewarm_at_attach_takes_allocation_off_the_first_save(tmp_path: os.PathLike[str]) -> None:
    """With prewarm=True the buffers exist after attach, and no save allocates (optimizer state created first)."""
    tr = make_training()
    _step_again(tr.net, tr.opt)  # the optimizer state exists, so the layout is final
    with AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_interval=1, prewarm=True) as saver:
        saver.attach(tr.engine)
        assert saver._pipeline.stager.join_prewarm(timeout=60)  # prewarm runs in the background
        assert saver._pipeline.stager.allocations == 2
        tr.engine.run(tr.data, max_epochs=3)
    assert saver._pipeline.stager.allocations == 2


def test_prewarm_follows_optimizer_state_created_at_the_first_step(tmp_path: os.PathLike[str]) -> None:
    """Attached before the optimizer's first step (Adam has no state yet), prewarm allocates again once, after
    the first iteration, for the grown layout; no save allocates, and the pool holds only max_pending sets."""
    tr = make_training()
    saver = AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_interval=2, epoch_level=False, prewarm=True)
    saver.attach(tr.engine)
    stager = saver._pipeline.stager
    assert stager.join_prewarm(timeout=60)  # prewarm runs in the background
    assert stager.allocations == 2
    at_attach = stager.memory_bytes()
    tr.engine.run(tr.data, max_epochs=3)
    assert stager.join_prewarm(timeout=60)
    assert stager.allocations == 4  # 2 at attach, 2 after the first step; none during the 4 saves
    assert stager.memory_bytes() > at_attach
    assert len(stager._free) == 2
    saver.close()
    assert stager.memory_bytes() == 0  # close() gives the free sets back
    assert len(checkpoint_names(tmp_path)) == 4


def test_evaluator_rounds_are_never_deduplicated(tmp_path: os.PathLike[str]) -> None:
    """An evaluator restarts its counters every run, yet each round's best-model file holds that round's weights,
    even when the trainer updates them through ``.data`` (invisible to version counters)."""
    tr = make_training(batches=1)
    evaluator = Engine(lambda e, b: None)
    scores = iter([0.1, 0.2, 0.3])

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(e: Engine) -> None:
        e.state.metrics["acc"] = next(scores)

    with AsyncCheckpointSaver(
        str(tmp_path), {"net": tr.net}, save_key_metric=True, key_metric_name="acc", key_metric_n_saved=3
    ) as saver:
        saver.attach(evaluator)

        @tr.engine.on(Events.EPOCH_COMPLETED)
        def _validate(e: Engine) -> None:
            tr.net[0].weight.data.fill_(float(e.state.epoch))
            evaluator.run([0])

        tr.engine.run(tr.data, max_epochs=3)
    for epoch, score in ((1, "0.1000"), (2, "0.2000"), (3, "0.3000")):
        weight = _load(os.path.join(tmp_path, f"net_key_metric={score}.pt"))["0.weight"]
        assert torch.all(weight == epoch), epoch
    assert not any(s.reused_snapshot for s in saver.stats.saves)


def test_on_durable_fires_after_the_file_is_complete_and_saved_checkpoint_when_queued(
    tmp_path: os.PathLike[str],
) -> None:
    """ignite's SAVED_CHECKPOINT fires when the snapshot is queued (file not there yet); on_durable fires once the
    file is complete under its final name."""
    tr = make_training(batches=1)
    events: list[tuple[str, str, bool]] = []

    def durable(stats: async_ckpt.SaveStats) -> None:
        events.append(("durable", os.path.basename(stats.path), os.path.exists(stats.path)))

    storage = GatedStorage()
    saver = AsyncCheckpointSaver(str(tmp_path), tr.save_dict, save_interval=1, on_durable=durable, storage=storage)
    saver.attach(tr.engine)
    tr.engine.register_events(*CheckpointEvents)  # ignite registers them at the first save otherwise

    @tr.engine.on(Checkpoint.SAVED_CHECKPOINT)
    def _queued(engine: Engine) -> None:
        name = f"checkpoint_epoch={engine.state.epoch}.pt"
        events.append(("queued", name, os.path.exists(os.path.join(tmp_path, name))))
        storage.open_all()

    tr.engine.run(tr.data, max_epochs=2)
    saver.close()
    for name in ("checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"):
        queued = events.index(("queued", name, False))
        assert events.index(("durable", name, True)) > queued, events
    assert len(events) == 4


def test_save_that_raises_at_the_event_leaves_ignites_list_and_evictions_as_before(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ignite ranks and evicts before it calls the save handler: when the snapshot then raises, nothing was queued,
    so the ``Checkpoint``'s list (read through its public ``state_dict``) and the eviction waiting for the next
    durable save are put back. The next save then replaces the file that is really on disk."""
    from async_ckpt import SnapshotError
    from async_ckpt.ignite.kept import kept
    from async_ckpt.pipeline import snapshot

    first, third = "checkpoint_iteration=1.pt", "checkpoint_iteration=3.pt"
    tr = make_training(batches=1)
    saver = iteration_saver(tmp_path, tr, n_saved=1, prewarm=False)
    saver.attach(tr.engine)
    tr.engine.run(tr.data, max_epochs=1)
    checkpoint = saver._interval_checkpoint
    assert checkpoint is not None
    assert kept(checkpoint) == [(1, first)]

    class NoMemory(snapshot._BufferSet):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    with monkeypatch.context() as patch:
        patch.setattr(snapshot, "_BufferSet", NoMemory)
        saver._pipeline.stager._free.clear()  # the next save needs a fresh allocation
        with torch.no_grad():
            tr.net[0].weight.add_(1)
        tr.engine.state.iteration = 2
        with pytest.raises(SnapshotError):
            saver.interval_completed(tr.engine)
    assert kept(checkpoint) == [(1, first)]
    assert checkpoint.last_checkpoint == tmp_path / first
    tr.engine.state.iteration = 3
    saver.interval_completed(tr.engine)
    saver.close()
    assert kept(checkpoint) == [(3, third)]
    assert checkpoint_names(tmp_path) == [third]
