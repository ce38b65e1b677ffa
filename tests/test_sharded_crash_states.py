"""Crash states of the sharded publish: what a power loss may leave, enumerated from a recorded run.

Killing the process cannot show a missing fsync: the page cache survives it. Here a recording
:class:`~async_ckpt.sharded.ShardedStorage` logs every file-system operation of a sequence of sharded saves,
replacements of a name and prunes (one process, no process group, as the single-process tests of
``test_sharded.py``). Then, for every prefix of the log (a power loss at that point) and for subsets of the
operations that are not durable there, the directory is rebuilt as the disk may hold it, the saver's startup
recovery runs, and the invariants are checked.

What a power loss may drop (POSIX, nothing stronger assumed): the data written into a file since its last fsync
(it comes back torn: its first half), and each directory-entry operation (mkdir, create, rename, exchange, unlink,
rmdir) after which its directory was not fsynced. Each such operation is dropped or kept independently; an
operation whose source a drop removed does nothing.

Invariants, at every crash point and for every state checked:

* every directory under a final name (before and after recovery) is complete and loads to the state of a save
  under that name;
* after recovery, every checkpoint that the saver listed as kept when its last ``wait()`` before the crash point
  returned is present, with the state of that save or of a later save under the same name: the newest durable
  checkpoint is there, and nothing was pruned whose replacement could vanish;
* after recovery, no temporary directory of the crashed run is left.

Bounded: all subsets where there are few, otherwise the extremes, each single drop and seeded random subsets.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from async_ckpt.pipeline.storage import TMP_MARKER, is_temp_name
from async_ckpt.sharded import ShardedCheckpointSaver, ShardedStorage, is_complete, load
from async_ckpt.sharded.loading import remove_stale_temp_dirs

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the file of each fsync by /proc/self/fd"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

ENTRY_OPS = ("mkdir", "create", "rename", "exchange", "unlink", "rmdir")
ALL_SUBSETS_UP_TO = 5  # non-durable operations at a crash point: all 2**n subsets up to this n
RANDOM_SUBSETS = 6  # otherwise: none, all, each single one, and this many seeded random subsets


@dataclass
class Op:
    """One recorded operation; ``paths`` are relative to the save directory."""

    kind: str  # an ENTRY_OPS kind, "write", "fsync", "syncdir", or a marker: "save", "waited"
    paths: tuple[str, ...] = ()
    data: bytes = b""
    value: float = 0.0  # "save": the value of the state saved
    kept: dict[str, float] = field(default_factory=dict)  # "waited": kept name -> value of its last save


class RecordingStorage(ShardedStorage):
    """Performs every operation, then logs it (an operation that failed is not logged)."""

    def __init__(self, root: Path, exchange: bool) -> None:
        super().__init__(fsync=True)
        self.root, self.exchange = root, exchange
        self.log: list[Op] = []

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _mkdir(self, path: str) -> None:
        super()._mkdir(path)
        self.log.append(Op("mkdir", (self.rel(path),)))

    def _open_new(self, path: str) -> io.FileIO:
        f = super()._open_new(path)
        self.log.append(Op("create", (self.rel(path),)))
        return f

    def _file_written(self, path: str, fd: int, sync: bool) -> None:
        self.log.append(Op("write", (self.rel(path),), data=Path(path).read_bytes()))
        super()._file_written(path, fd, sync)

    def _replace(self, src: str, dst: str) -> None:
        super()._replace(src, dst)
        self.log.append(Op("rename", (self.rel(src), self.rel(dst))))

    def _exchange(self, a: str, b: str) -> bool:
        if not self.exchange or not super()._exchange(a, b):
            return False
        self.log.append(Op("exchange", (self.rel(a), self.rel(b))))
        return True

    def _unlink(self, path: str) -> None:
        super()._unlink(path)
        self.log.append(Op("unlink", (self.rel(path),)))

    def _rmdir(self, path: str) -> None:
        super()._rmdir(path)
        self.log.append(Op("rmdir", (self.rel(path),)))

    def _fsync_fd(self, fd: int) -> None:
        # Every fsync, of a file or of a directory (FileStorage.sync_dir comes here too), by the path it has now.
        path = os.readlink(f"/proc/self/fd/{fd}")
        super()._fsync_fd(fd)
        rel = self.rel(path)
        if not rel.startswith(".."):  # the save directory's parent, fsynced once at start
            self.log.append(Op("syncdir" if os.path.isdir(path) else "fsync", (rel,)))


def record_run(save_dir: Path, exchange: bool) -> list[Op]:
    """Saves, replacements and prunes with ``n_saved=2``, each followed by ``wait()``; returns the log."""
    save_dir.mkdir()
    storage = RecordingStorage(save_dir, exchange)
    state = {"t": torch.zeros(4)}
    saver = ShardedCheckpointSaver(save_dir, {"extra": state}, n_saved=2, storage=storage)
    last: dict[str, float] = {}
    # c replaces itself; a is pruned when c is published, b when d is; d replaces itself too.
    for name, value in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("c", 4.0), ("d", 5.0), ("d", 6.0)):
        storage.log.append(Op("save", (name,), value=value))
        state["t"].fill_(value)
        saver.save(name)
        saver.wait()
        last[name] = value
        storage.log.append(Op("waited", kept={os.path.basename(p): last[os.path.basename(p)] for p in saver.saved}))
    saver.close()
    assert sorted(os.listdir(save_dir)) == ["c", "d"], "the recorded run itself went wrong"
    return storage.log


# -- the model of the directory --------------------------------------------------------------------------------------
Entries = dict[str, tuple[str, int]]  # path -> ("dir" | "file", inode)


def _parent(path: str) -> str:
    return os.path.dirname(path) or "."


def _subtree(entries: Entries, path: str) -> list[str]:
    return [p for p in entries if p == path or p.startswith(path + "/")]


def _move(entries: Entries, src: str, dst: str) -> None:
    moved = {dst + p[len(src) :]: entries.pop(p) for p in _subtree(entries, src)}
    for p in _subtree(entries, dst):
        del entries[p]
    entries.update(moved)


def apply(op: Op, index: int, entries: Entries, contents: dict[int, bytes], torn: bool) -> None:
    """Apply one operation to the model (``torn``: a write whose data is lost comes back as its first half). An
    operation whose precondition fails (a dropped operation removed its source or parent) does nothing."""

    def exists(path: str) -> bool:
        return path == "." or path in entries

    kind, paths = op.kind, op.paths
    if kind in ("mkdir", "create"):
        if exists(_parent(paths[0])) and (kind == "create" or paths[0] not in entries):
            for p in _subtree(entries, paths[0]):
                del entries[p]
            entries[paths[0]] = ("dir" if kind == "mkdir" else "file", index)
    elif kind == "write":
        entry = entries.get(paths[0])
        if entry is not None:
            contents[entry[1]] = op.data[: len(op.data) // 2] if torn else op.data
    elif kind == "rename":
        if exists(paths[0]) and exists(_parent(paths[1])):
            _move(entries, paths[0], paths[1])
    elif kind == "exchange":
        a, b = paths
        if exists(a) and exists(b):
            _move(entries, a, "\0swap")
            _move(entries, b, a)
            _move(entries, "\0swap", b)
    elif kind in ("unlink", "rmdir"):
        for p in _subtree(entries, paths[0]):
            del entries[p]


@dataclass
class Durability:
    """For each operation of the log, the index of the fsync after which it is durable (``None``: never, or not an
    operation that a power loss can drop)."""

    durable_at: list[int | None]

    @classmethod
    def of(cls, log: list[Op]) -> Durability:
        """Replays the whole log to know which directory or file each operation and each fsync is about."""
        entries: Entries = {}
        contents: dict[int, bytes] = {}
        waits: list[set[tuple[str, int]]] = []  # the (fsync kind, inode) pairs that make op i durable
        syncs: list[tuple[str, int] | None] = []  # what op i makes durable
        for i, op in enumerate(log):
            inode = {".": 0} | {p: e[1] for p, e in entries.items()}
            wait: set[tuple[str, int]] = set()
            sync: tuple[str, int] | None = None
            if op.kind in ENTRY_OPS:
                wait = {("syncdir", inode[_parent(path)]) for path in op.paths}
            elif op.kind == "write":
                wait = {("fsync", inode[op.paths[0]])}
            elif op.kind in ("fsync", "syncdir"):
                sync = (op.kind, inode[op.paths[0]])
            waits.append(wait)
            syncs.append(sync)
            apply(op, i, entries, contents, torn=False)
        durable_at: list[int | None] = []
        for i, wait in enumerate(waits):
            done: list[int] = []
            for needed in wait:
                j = next((j for j in range(i + 1, len(log)) if syncs[j] == needed), None)
                if j is None:
                    break
                done.append(j)
            durable_at.append(max(done) if wait and len(done) == len(wait) else None)
        return cls(durable_at)

    def droppable(self, log: list[Op], crash: int) -> list[int]:
        """The operations before ``crash`` that a power loss at ``crash`` may drop."""
        droppable: list[int] = []
        for i in range(crash):
            at = self.durable_at[i]
            if (log[i].kind in ENTRY_OPS or log[i].kind == "write") and (at is None or at >= crash):
                droppable.append(i)
        return droppable


def drop_sets(candidates: list[int], rng: random.Random) -> Iterator[frozenset[int]]:
    if len(candidates) <= ALL_SUBSETS_UP_TO:
        for mask in range(1 << len(candidates)):
            yield frozenset(c for bit, c in enumerate(candidates) if mask >> bit & 1)
        return
    yield frozenset()
    yield frozenset(candidates)
    for c in candidates:
        yield frozenset((c,))
    for _ in range(RANDOM_SUBSETS):
        yield frozenset(c for c in candidates if rng.random() < 0.5)


def rebuild(log: list[Op], crash: int, dropped: frozenset[int], target: Path, pid: int, dead_pid: int) -> None:
    """Write into ``target`` the directory a power loss at ``crash`` leaves when ``dropped`` are lost; temporary
    names carry ``dead_pid`` instead of this process's id (the run that wrote them is gone)."""
    entries: Entries = {}
    contents: dict[int, bytes] = {}
    for i in range(crash):
        op = log[i]
        if i in dropped and op.kind != "write":
            continue
        apply(op, i, entries, contents, torn=i in dropped)
    target.mkdir()
    for path in sorted(entries, key=lambda p: p.count("/")):
        kind, inode = entries[path]
        real = target / path.replace(f".{pid}.", f".{dead_pid}.")
        if kind == "dir":
            real.mkdir()
        else:
            real.write_bytes(contents.get(inode, b""))


# -- the checks ------------------------------------------------------------------------------------------------------
class Loader:
    """Loads a checkpoint directory's value once per distinct content."""

    def __init__(self) -> None:
        self.memo: dict[tuple[tuple[str, int, int], ...], float | None] = {}

    def value(self, path: Path) -> float | None:
        """The value saved in the checkpoint at ``path``, or ``None`` if it is incomplete or does not load."""
        key = tuple(sorted((f.name, f.stat().st_size, zlib.crc32(f.read_bytes())) for f in path.iterdir()))
        if key not in self.memo:
            value: float | None = None
            if is_complete(path):
                loaded = {"t": torch.full((4,), -1.0)}
                try:
                    load(path, {"extra": loaded})
                    value = float(loaded["t"][0])
                except Exception:
                    value = None
            self.memo[key] = value
        return self.memo[key]


def check_state(log: list[Op], crash: int, target: Path, loader: Loader) -> list[str]:
    """The invariants for the directory ``target`` rebuilt for a crash at ``crash``; returns the violations."""
    problems: list[str] = []
    saved: dict[str, list[float]] = {}  # values saved under each name before the crash, in order
    kept: dict[str, float] = {}
    pruned_for: dict[str, tuple[str, float]] = {}  # name -> the save whose publish started its pruning
    current = ("", 0.0)
    for op in log[:crash]:
        if op.kind == "save":
            saved.setdefault(op.paths[0], []).append(op.value)
            current = (op.paths[0], op.value)
        elif op.kind == "waited":
            kept = op.kept
        elif op.kind == "rename" and not is_temp_name(op.paths[0]) and ".del" in op.paths[1]:
            pruned_for[op.paths[0]] = current

    def final_names(stage: str) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for name in sorted(os.listdir(target)):
            if is_temp_name(name):
                continue
            values[name] = value = loader.value(target / name)
            if value is None or value not in saved.get(name, []):
                problems.append(f"{stage}: {name!r} holds {value!r}, not a complete save of that name {saved}")
        return values

    final_names("before recovery")
    remove_stale_temp_dirs(str(target), ShardedStorage(fsync=False))
    after = final_names("after recovery")
    leftovers = [n for n in os.listdir(target) if TMP_MARKER in n]
    if leftovers:
        problems.append(f"temporary directories left after recovery: {leftovers}")

    def holds_or_later(name: str, value: float) -> bool:
        return after.get(name) in saved[name][saved[name].index(value) :]

    for name, value in kept.items():
        if name not in after and name in pruned_for:  # pruned after its replacement was published
            replacement = pruned_for[name]
            if not holds_or_later(*replacement):
                problems.append(f"{name!r} was pruned, but its replacement {replacement} is not there after recovery")
        elif not holds_or_later(name, value):
            problems.append(f"{name!r} (kept with {value}) holds {after.get(name)!r} after recovery")
    return problems


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited: the owner of the crashed run's temporary names."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the crash states are rebuilt: memory where the machine has a tmpfs (thousands of small directories)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="async_ckpt-crash-states-") as directory:
            yield Path(directory)
    else:
        (tmp_path / "states").mkdir()
        yield tmp_path / "states"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_every_crash_state_of_the_sharded_publish_recovers(
    tmp_path: Path, scratch: Path, exchange: bool, dead_pid: int
) -> None:
    """At every point of a run of saves, replacements and prunes, every state a power loss may leave holds only
    complete checkpoints under final names, and after the startup recovery every checkpoint that was kept when the
    last wait() returned is present with its state or a later one, and no temporary directory is left."""
    log = record_run(tmp_path / "run", exchange)
    kinds = {op.kind for op in log}
    assert {"mkdir", "create", "write", "fsync", "rename", "syncdir", "rmdir", "unlink"} <= kinds, kinds
    assert exchange or "exchange" not in kinds, "a replacement swapped names on a file system without the swap"
    durability = Durability.of(log)
    rng = random.Random(12)
    loader = Loader()
    problems: list[str] = []
    states = 0
    crash_points = [k for k in range(len(log) + 1) if k == 0 or log[k - 1].kind not in ("save", "waited")]
    for crash in crash_points:
        for dropped in drop_sets(durability.droppable(log, crash), rng):
            target = scratch / f"state{states}"
            rebuild(log, crash, dropped, target, os.getpid(), dead_pid)
            for problem in check_state(log, crash, target, loader):
                ops = [f"{i}:{log[i].kind} {' '.join(log[i].paths)}" for i in sorted(dropped)]
                problems.append(
                    f"crash after op {crash} ({log[crash - 1].kind if crash else '-'}), dropped {ops}: {problem}"
                )
            shutil.rmtree(target)
            states += 1
    assert states > len(crash_points), "no subset of dropped operations was checked"
    assert not problems, f"{len(problems)} violations in {states} crash states, first: " + "\n".join(problems[:5])
