"""One rank of a two-process sharded (DCP) test (not a test module); ``tests/test_sharded.py`` starts two of them.

Usage: ``python _sharded_worker.py SCENARIO RANK WORLD_SIZE INIT_FILE WORK_DIR``, through :func:`launch`. Each
scenario runs one of ``_dist_worker.py``'s sharded scenarios and then more phases in the same processes (a new pair
of processes costs more than the phases), and prints one ``RESULT <json>`` line, as ``_dist_worker.py`` does.

Scenarios:

``sharded_roundtrip_top_n``
    ``sharded_roundtrip``, then ``top_n``: eight epochs with a scripted, rank-identical ``acc`` metric, scored
    saves with ``n_best=2`` and the final checkpoint; every kept directory is loaded into fresh objects and
    compared with the state recorded at its event. Then ``exception_final``: both ranks raise at the same
    iteration and write the final checkpoint before the exception propagates.
``sharded_fail_top_n``
    ``sharded_fail``, then ``score_mismatch``: a score that differs between the ranks is refused on both, before
    anything is written; and ``publish_denied``: rank 0 cannot publish a scored checkpoint, and after the error
    both ranks hold rank 0's best-N list.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any
from unittest import mock

import _dist_worker
import torch
import torch.distributed as dist
from _dist_worker import (
    COLLECTIVE_TIMEOUT,
    Counter,
    build_training,
    describe,
    scenario_sharded_fail,
    scenario_sharded_roundtrip,
    sharded_table,
)
from conftest import clone_tree, trees_equal
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from async_ckpt import FileStorage
from async_ckpt.pipeline.storage import TMP_MARKER
from async_ckpt.sharded import ShardedCheckpointSaver, load

WORKER = Path(__file__).resolve()


def launch(scenario: str, work_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """``_dist_worker.launch`` (bounded in time, every rank's output on failure) for this file's scenarios."""
    with mock.patch.object(_dist_worker, "WORKER", WORKER):
        return _dist_worker.launch(scenario, work_dir, timeout=timeout)


def fresh_net() -> torch.nn.Module:
    """The model of ``build_training``, unwrapped and initialized differently."""
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def listing(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TMP_MARKER not in n)


def phase_top_n(rank: int, world: int, work: str) -> dict[str, Any]:
    model, _, engine, data = build_training(rank)
    table = {"t": sharded_table(rank, world)}
    at_event: dict[int, dict[str, Any]] = {}  # by iteration: this rank's state when a checkpoint may be saved

    @engine.on(Events.ITERATION_COMPLETED)
    def _touch(e: Engine) -> None:
        table["t"].add_(1.0)

    @engine.on(Events.EPOCH_COMPLETED)
    def _record(e: Engine) -> None:
        at_event[e.state.iteration] = {
            "net": clone_tree(model.module.state_dict()),
            "table": table["t"].to_local().clone(),
        }

    save_dir = os.path.join(work, "top_n")
    saver = ShardedCheckpointSaver(
        save_dir,
        {"net": model, "trainer": engine, "table": table},
        save_interval=0,
        score_function=Checkpoint.get_default_score_fn("acc"),
        score_name="acc",
        n_best=2,
        save_final=True,
        timeout=COLLECTIVE_TIMEOUT,
    )
    saver.attach(engine)  # after _record and the metric: the score is read at the same event
    engine.run(data, max_epochs=8)
    best = [[score, os.path.basename(path)] for score, path in saver.best]
    final = saver.final_checkpoint
    saver.close()
    dist.barrier()

    # The checkpoint holds rank 0's replicas (BatchNorm statistics differ between DDP ranks) and each rank's shard.
    nets = [{it: state["net"] for it, state in at_event.items()}]
    dist.broadcast_object_list(nets, src=0)
    loaded: dict[str, Any] = {}
    for name in listing(save_dir):
        net, trainer, part = fresh_net(), Engine(lambda e, b: None), {"t": sharded_table(rank, world, fill=-1.0)}
        load(os.path.join(save_dir, name), {"net": net, "trainer": trainer, "table": part})
        it = trainer.state.iteration
        loaded[name] = {
            "iteration": it,
            "net_equal": it in nets[0] and trees_equal(net.state_dict(), nets[0][it]),
            "table_equal": it in at_event and torch.equal(part["t"].to_local(), at_event[it]["table"]),
        }
    return {
        "best": best,
        "final": os.path.basename(final) if final else None,
        "listing": sorted(os.listdir(save_dir)),
        "loaded": loaded,
    }


def phase_exception_final(rank: int, work: str) -> dict[str, Any]:
    model, _, engine, data = build_training(rank)
    before_failure: list[Any] = []

    @engine.on(Events.ITERATION_STARTED)
    def _fail(e: Engine) -> None:
        if e.state.iteration == 5:  # every rank, before the step's gradient all-reduce
            raise RuntimeError("injected failure on every rank")

    @engine.on(Events.ITERATION_COMPLETED(once=4))
    def _record(e: Engine) -> None:
        before_failure.append(clone_tree(model.module.state_dict()))

    save_dir = os.path.join(work, "exception_final")
    saver = ShardedCheckpointSaver(
        save_dir, {"net": model, "trainer": engine}, save_interval=0, save_final=True, timeout=COLLECTIVE_TIMEOUT
    )
    saver.attach(engine)
    error: BaseException | None = None
    try:
        engine.run(data, max_epochs=3)
    except RuntimeError as exc:
        error = exc
    dist.barrier()  # rank 0 published before its exception propagated
    seen_after_raise = listing(save_dir)
    saver.close()
    reference = [before_failure[0]]
    dist.broadcast_object_list(reference, src=0)
    net, trainer = fresh_net(), Engine(lambda e, b: None)
    load(os.path.join(save_dir, "checkpoint_final_iteration=5"), {"net": net, "trainer": trainer})
    return {
        "error": describe(error),
        "listing": seen_after_raise,
        "iteration": trainer.state.iteration,
        "net_equal": trees_equal(net.state_dict(), reference[0]),
    }


class PublishDeniedFor(FileStorage):
    """Renaming a finished directory onto a name that ends with ``suffix`` fails with ``EACCES``."""

    def __init__(self, suffix: str) -> None:
        super().__init__(fsync=True)
        self.suffix = suffix

    def _replace(self, src: str, dst: str) -> None:
        if dst.endswith(self.suffix):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), dst)
        super()._replace(src, dst)


def phase_score_mismatch(rank: int, work: str) -> dict[str, Any]:
    save_dir = os.path.join(work, "score_mismatch")
    saver = ShardedCheckpointSaver(
        save_dir,
        {"counter": Counter(rank)},
        save_interval=0,
        score_function=lambda e: 0.5 + rank,  # wrong on purpose: a per-rank value
        timeout=COLLECTIVE_TIMEOUT,
    )
    error: BaseException | None = None
    try:
        saver.save_best(Engine(lambda e, b: None))
    except ValueError as exc:
        error = exc
    saver.close()
    dist.barrier()
    return {"error": describe(error), "listing": sorted(os.listdir(save_dir))}


def phase_publish_denied(rank: int, work: str) -> dict[str, Any]:
    save_dir = os.path.join(work, "publish_denied")
    saver = ShardedCheckpointSaver(
        save_dir,
        {"counter": Counter(rank)},
        save_interval=0,
        score_function=Checkpoint.get_default_score_fn("acc"),
        score_name="acc",
        n_best=1,
        timeout=COLLECTIVE_TIMEOUT,
        storage=PublishDeniedFor("checkpoint_acc=0.9000") if rank == 0 else None,
    )
    engine = Engine(lambda e, b: None)
    out: dict[str, Any] = {}
    for step, score in enumerate((0.5, 0.9, 0.6)):
        engine.state.metrics["acc"] = score
        try:
            saver.save_best(engine)
        except Exception as exc:
            out["error"] = describe(exc)
            out["error_at"] = step
            out["best_after_error"] = [[s, os.path.basename(p)] for s, p in saver.best]
    saver.save_best(engine)  # 0.6 again: it enters on every rank, and displaces 0.5
    saver.wait()
    out["best"] = [[s, os.path.basename(p)] for s, p in saver.best]
    saver.close()
    dist.barrier()
    out["listing"] = listing(save_dir)
    return out


def roundtrip_top_n(rank: int, world: int, work: str) -> dict[str, Any]:
    result = scenario_sharded_roundtrip(rank, world, work)
    result["top_n"] = phase_top_n(rank, world, work)
    result["exception_final"] = phase_exception_final(rank, work)
    return result


def fail_top_n(rank: int, world: int, work: str) -> dict[str, Any]:
    result = scenario_sharded_fail(rank, world, work)
    result["score_mismatch"] = phase_score_mismatch(rank, work)
    result["publish_denied"] = phase_publish_denied(rank, work)
    return result


def main() -> None:
    _dist_worker.run_worker({"sharded_roundtrip_top_n": roundtrip_top_n, "sharded_fail_top_n": fail_top_n})


if __name__ == "__main__":
    main()
