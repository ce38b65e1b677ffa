"""Crash-state enumeration of the local path: what a power cut at any point of a run may leave on disk.

A real saver on a real ignite Engine writes through a :class:`~_recording.RecordingStorage`; every prefix of its
operation log, with every set of not-yet-fsynced directory operations undone and unsynced file data torn, is rebuilt
in a scratch directory and checked (see :meth:`Checker.violations`). The SIGKILL campaign cannot see these states: the
page cache survives the process, not a power cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _doubles import direct_io_refusal
from _recording import CrashState, Op, RecordingStorage, crash_states, materialize
from conftest import clone_tree, load_checkpoint, make_training, trees_equal
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import CheckpointEvents

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.core.resume import latest_checkpoint
from async_ckpt.ignite.save_handler import state_of
from async_ckpt.pipeline.integrity import MANIFEST_NAME
from async_ckpt.pipeline.storage import FileStorage, is_temp_name

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="the recording names the directory of each fsync by /proc/self/fd"
)

SEED = 1234
MAX_STATES = 20_000  # a bound on the enumeration; the correct run has a few hundred distinct states


@dataclass
class Recording:
    """A recorded run: the operation log, the state at each checkpoint event, and where the files went."""

    ops: list[Op]
    save_dir: str
    root: str
    expected: dict[int, Any]  # job ordinal -> the state at its event
    storage: RecordingStorage
    retention: dict[str, int]  # file-name prefix of a retention list -> how many files it keeps


def _record_run(root: str, storage: RecordingStorage, *, create_dir: bool = False) -> Recording:
    """Run 3 epochs of 2 iterations with every kind of checkpoint (interval every iteration, keep 2; best by "acc"
    under a fixed name, rewritten; final), through ``storage``; pair each queued save with the state at its event."""
    save_dir = os.path.join(root, "ckpt")
    if not create_dir:
        os.makedirs(save_dir)  # else the saver creates it, through the storage
    tr = make_training(metrics=(0.5, 0.7, 0.7), batches=2)
    # A record above the O_DIRECT threshold, changed at every iteration, so the direct-write path is in the log.
    table = torch.nn.Embedding(80, 1024)
    save_dict = {**tr.save_dict, "table": table}
    tr.engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: table.weight.data.add_(1.0))
    tr.engine.register_events(*CheckpointEvents)
    states: list[Any] = []

    @tr.engine.on(Checkpoint.SAVED_CHECKPOINT)
    def _queued(engine: Engine) -> None:
        states.append(clone_tree(state_of(save_dict)))

    saver = AsyncCheckpointSaver(
        save_dir,
        save_dict,
        save_final=True,
        save_key_metric=True,
        key_metric_name="acc",
        key_metric_n_saved=1,
        key_metric_filename="best.pt",
        epoch_level=False,
        save_interval=1,
        n_saved=2,
        storage=storage,
        on_durable=lambda stats: storage.note_reported(stats.path),
    )
    assert os.path.isdir(save_dir)
    with saver:
        saver.attach(tr.engine)
        tr.engine.run(tr.data, max_epochs=3)
    jobs = storage.checkpoint_jobs()
    # The writer runs jobs in submission order, so the n-th checkpoint job is the n-th queued save.
    assert len(jobs) == len(states), (len(jobs), len(states))
    expected = {j.job: s for j, s in zip(jobs, states, strict=True)}
    retention = {"checkpoint_iteration=": 2, "best.pt": 1, "checkpoint_final_iteration=": 1}
    return Recording(list(storage.ops), os.path.realpath(save_dir), root, expected, storage, retention)


@dataclass
class Report:
    """What an enumeration saw: how many states, which violations, and observations that are not violations."""

    states: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    latest_older: list[str] = field(default_factory=list)


class Checker:
    """Checks crash states of one recording; caches loads by content."""

    def __init__(self, rec: Recording, scratch: str) -> None:
        self.rec = rec
        self.scratch = scratch
        self.scratch_dir = os.path.join(scratch, os.path.relpath(rec.save_dir, os.path.realpath(rec.root)))
        self._loads: dict[bytes, Any] = {}
        self._equal: dict[tuple[bytes, int], bool] = {}

    def _load(self, path: str, digest: bytes) -> Any:
        if digest not in self._loads:
            try:
                self._loads[digest] = load_checkpoint(path)
            except Exception as exc:  # any failure to load is what is looked for
                self._loads[digest] = exc
        return self._loads[digest]

    def _equals(self, tree: Any, digest: bytes, job: int) -> bool:
        key = (digest, job)
        if key not in self._equal:
            self._equal[key] = trees_equal(tree, self.rec.expected[job])
        return self._equal[key]

    def violations(self, state: CrashState, report: Report) -> list[str]:
        """The invariants broken by ``state`` (see the bullets in the body), as sentences."""
        rec = self.rec
        ops = rec.ops[: state.prefix]
        materialize(state, os.path.realpath(rec.root), self.scratch)
        present = {os.path.basename(p): ino for p, ino in state.files.items() if os.path.dirname(p) == rec.save_dir}
        where = f"crash after op {state.prefix} ({ops[-1].kind if ops else 'start'}), undone {sorted(state.dropped)}"
        out: list[str] = []
        begins = [op for op in ops if op.kind == "begin"]
        # Durable: the storage returned from the write (the writer's "durable"), or the saver told its user so.
        durables = [op for op in ops if op.kind in ("durable", "reported")]
        complete: set[str] = set()

        # 1. Every file under a final name loads and holds the state of a save to that name that is not older
        #    than the newest one reported durable (the manifest: JSON of the same kind).
        for name, ino in present.items():
            if is_temp_name(name):
                continue
            data = state.contents[ino][0]
            path = os.path.join(self.scratch_dir, name)
            newest_durable = max((d.job for d in durables if os.path.basename(d.path) == name), default=-1)
            if name == MANIFEST_NAME:
                since = min((b.index for b in begins if b.is_manifest and b.job >= newest_durable), default=0)
                written = {op.ino for op in ops if op.kind == "create" and op.index > since and op.is_manifest}
                if not any(op.kind == "fsync" and op.ino in written and op.data == data for op in ops):
                    out.append(f"{where}: the manifest holds none of the versions written since its last durable one")
                continue
            jobs = [b.job for b in begins if os.path.basename(b.path) == name and b.job >= newest_durable]
            digest = hashlib.sha1(data).digest()
            tree = self._load(path, digest)
            if isinstance(tree, Exception):
                out.append(f"{where}: {name} does not load ({tree!r})")
            elif not any(self._equals(tree, digest, j) for j in jobs if j in rec.expected):
                out.append(f"{where}: {name} holds none of the states saved to it since its last durable save")
            else:
                complete.add(name)

        # 2. Every checkpoint reported durable is present, unless the run pruned it after its replacement was
        #    durable, and that replacement is present (or was pruned the same way). This covers the newest one.
        applied_unlinks = [op for op in ops if op.kind == "unlink" and op.index in state.applied]

        def accounted(name: str, after: int, depth: int = 0) -> bool:
            if name in present:
                return True
            for u in applied_unlinks:
                if os.path.basename(u.path) == name and u.index > after and depth < len(ops):
                    replacement = [d for d in durables if d.index < u.index and not d.is_manifest]
                    return bool(replacement) and accounted(
                        os.path.basename(replacement[-1].path), replacement[-1].index, depth + 1
                    )
            return False

        checkpoints = [d for d in durables if not d.is_manifest]
        for d in durables:
            name = os.path.basename(d.path)
            if not accounted(name, d.index):
                newest = bool(checkpoints) and d is checkpoints[-1]
                out.append(
                    f"{where}: {name}, reported durable at op {d.index}{' (the newest)' if newest else ''}, "
                    "is missing and was not pruned after a durable replacement"
                )

        # 2b. Pruning never leaves a retention list short: each keeps at least min(n, names it had durable) files.
        for prefix, keep in rec.retention.items():
            durable_names = {
                os.path.basename(d.path) for d in checkpoints if os.path.basename(d.path).startswith(prefix)
            }
            kept = {name for name in complete if name.startswith(prefix)}
            if len(kept) < min(keep, len(durable_names)):
                out.append(
                    f"{where}: retention list {prefix!r} holds {sorted(kept)}, fewer than min({keep}, "
                    f"{len(durable_names)} durable): a file was pruned before its replacement was durable"
                )

        # 3. The manifest names no missing file: it drops an evicted file before the file is removed.
        if MANIFEST_NAME in present and not any("the manifest holds none" in v for v in out):
            entries = json.loads(state.contents[present[MANIFEST_NAME]][0]).get("files", {})
            for name in entries:
                if name in present:
                    continue
                if not any(os.path.basename(u.path) == name for u in applied_unlinks):
                    out.append(f"{where}: the manifest names {name}, which is missing and was not pruned")
                else:
                    out.append(f"{where}: the manifest names {name}, which was pruned before the manifest dropped it")

        # 4. What resume picks is a complete checkpoint, and there is one whenever one is present.
        picked = latest_checkpoint(self.scratch_dir)
        if picked is None:
            if complete:
                out.append(f"{where}: latest_checkpoint found nothing though {sorted(complete)} are complete")
        elif os.path.basename(picked) not in complete:
            out.append(f"{where}: latest_checkpoint picked {os.path.basename(picked)}, which is not complete")
        else:
            # Not a violation (the file is complete), but worth seeing: resume chose an older save than the newest
            # durable one (listed files are ordered by the manifest's time, unlisted ones by their mtime).
            digest = hashlib.sha1(state.contents[present[os.path.basename(picked)]][0]).digest()
            tree = self._load(picked, digest)
            saves = [j for j in rec.expected if self._equals(tree, digest, j)]
            if checkpoints and max(saves) < checkpoints[-1].job:
                report.latest_older.append(
                    f"{where}: resume picked {os.path.basename(picked)} (save {max(saves)}), older than "
                    f"{os.path.basename(checkpoints[-1].path)} (save {checkpoints[-1].job}), reported durable"
                )
        return out


def _enumerate(rec: Recording, scratch: str, *, until: str | None = None) -> Report:
    """Check every crash state of ``rec``; stop early at the first violation containing ``until`` ("": any)."""
    checker = Checker(rec, scratch)
    roots = [os.path.realpath(rec.root)]
    if not any(op.kind == "mkdir" for op in rec.ops):
        roots.append(rec.save_dir)
    report = Report()
    for state in crash_states(rec.ops, roots, seed=SEED, counts=report.counts):
        report.states += 1
        assert report.states <= MAX_STATES, "the enumeration grew past its bound; reduce the run"
        found = checker.violations(state, report)
        report.violations.extend(found)
        if until is not None and any(until in v for v in found):
            break
    return report


@pytest.fixture(scope="module")
def correct_run(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return _record_run(str(tmp_path_factory.mktemp("run")), RecordingStorage())


def _fail_msg(report: Report) -> str:
    return f"{len(report.violations)} violation(s) in {report.states} states, e.g.:\n" + "\n".join(
        report.violations[:8]
    )


def test_every_write_of_a_run_goes_through_the_storage(correct_run: Recording) -> None:
    """Checkpoints, links, evictions and manifest updates all reach the disk through the storage's primitives, and
    the files on disk after the run are exactly the ones the log accounts for."""
    rec = correct_run
    storage = rec.storage
    assert storage.escapes == []
    kinds = {op.kind for op in rec.ops}
    assert {"create", "write", "fsync", "close", "rename", "link", "unlink", "dirsync"} <= kinds
    if direct_io_refusal(rec.root) is None:
        assert {"open_direct", "write_direct"} <= kinds
    assert any(op.is_manifest and op.kind == "durable" for op in rec.ops)
    reported = [op.job for op in rec.ops if op.kind == "reported"]
    assert reported == [op.job for op in storage.checkpoint_jobs()]  # each save reported once, after its write
    on_disk = {os.path.join(rec.save_dir, n) for n in os.listdir(rec.save_dir)}
    assert on_disk == set(storage.namespace())
    assert os.path.basename(storage.checkpoint_jobs()[-1].path).startswith("checkpoint_final_iteration=")


def test_the_recording_overrides_every_primitive_of_the_storage() -> None:
    """Every private method of FileStorage that touches the disk is recorded, so a primitive added later (a mkdir,
    another write path) fails here until the recording and the crash model learn it."""
    not_io = {"_direct_allowed", "_direct_refused"}  # policy, no system call of their own
    # _discard unlinks a failed write's temporary file with os.unlink directly: outside the log, harmless to it
    # (a temporary name, on an error path); _sync_committed only calls sync_dir, whose fsync is recorded.
    not_recorded = {"_discard", "_sync_committed"}
    primitives = {
        name
        for name, value in vars(FileStorage).items()
        if name.startswith("_") and not name.startswith("__") and callable(value)
    }
    assert primitives - not_io - not_recorded <= set(vars(RecordingStorage)), sorted(primitives - not_io)


def test_every_crash_state_of_a_local_run_keeps_the_invariants(correct_run: Recording, tmp_path: Any) -> None:
    """After a power cut at any point of a run with saves, evictions, a rewritten fixed name, hard links and
    manifest updates, every final name holds a complete checkpoint of a save to it, no durable checkpoint is lost
    unless pruned behind a surviving replacement, the manifest names no lost file, and resume picks a complete
    file."""
    report = _enumerate(correct_run, str(tmp_path / "crash"))
    # Not vacuous: every crash point was tried, many with renames, links or unlinks that a power cut may undo.
    assert report.counts["prefixes"] == len(correct_run.ops) + 1
    entry_ops = [op for op in correct_run.ops if op.kind in ("rename", "link", "unlink")]
    assert report.counts["undoable_entries"] >= len(entry_ops) > 20, report
    assert report.states > 40, report
    assert not report.violations, _fail_msg(report)


@pytest.mark.parametrize(
    ("variant", "symptom"),
    [
        ({"skip_dir_sync_after_rename": True}, "is missing and was not pruned"),
        ({"skip_file_fsync": True}, "does not load"),
    ],
    ids=["no-dir-fsync-after-rename", "no-file-fsync"],
)
def test_the_checker_catches_a_storage_that_skips_an_fsync(
    tmp_path: Any, variant: dict[str, bool], symptom: str
) -> None:
    """A storage that skips the directory fsync after a rename, or the file fsync before it, makes the enumeration
    report the loss it allows (so the passing enumeration above means something)."""
    rec = _record_run(str(tmp_path / "run"), RecordingStorage(**variant))
    report = _enumerate(rec, str(tmp_path / "crash"), until=symptom)
    assert any(symptom in v for v in report.violations), _fail_msg(report)


def _prune_first(ops: list[Op]) -> list[Op]:
    """``ops`` as a writer that prunes before it writes would log them: each unlink and the directory fsync after
    it move to just before the begin of the checkpoint job that carried them."""
    out = list(ops)
    for u in [op for op in ops if op.kind == "unlink"]:
        at = out.index(u)
        moved = out[at : at + 2] if at + 1 < len(out) and out[at + 1].kind == "dirsync" else out[at : at + 1]
        del out[at : at + len(moved)]
        begin = max(i for i, op in enumerate(out[:at]) if op.kind == "begin" and not op.is_manifest)
        out[begin:begin] = moved
    return [dataclasses.replace(op, index=i) for i, op in enumerate(out)]


def test_the_checker_catches_a_writer_that_prunes_before_the_replacement_is_durable(
    correct_run: Recording, tmp_path: Any
) -> None:
    """The same run's log, reordered as a writer that evicts first and writes the replacement after would make it,
    fails the enumeration: a power cut in between leaves a retention list short."""
    rec = dataclasses.replace(correct_run, ops=_prune_first(correct_run.ops))
    assert [op.kind for op in rec.ops].count("unlink") == 4
    report = _enumerate(rec, str(tmp_path / "crash"), until="was pruned before its replacement was durable")
    assert any("was pruned before its replacement was durable" in v for v in report.violations), _fail_msg(report)


def test_a_save_dir_the_saver_creates_survives_a_power_cut(tmp_path: Any) -> None:
    """When the saver creates save_dir itself, a power cut after a checkpoint was reported durable still leaves
    that checkpoint (the new directory's entry is fsynced in its parent)."""
    rec = _record_run(str(tmp_path / "run"), RecordingStorage(), create_dir=True)
    report = _enumerate(rec, str(tmp_path / "crash"), until="")
    assert not report.violations, _fail_msg(report)
