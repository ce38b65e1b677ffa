"""A recording storage and a POSIX power-loss model, for crash-state enumeration (not a test module).

:class:`RecordingStorage` is a real ``FileStorage`` that does every operation on disk and
also appends it to an ordered log: file creation, writes (buffered, and ``O_DIRECT`` through ``_open_direct`` /
``_pwrite_direct``), file fsyncs (with a snapshot of the file's bytes), closes,
renames, links, unlinks and directory fsyncs, plus ``begin``/``durable`` markers around each ``write_atomic`` /
``link_atomic`` call (``durable`` is logged when the storage returns, which is when the writer reports the file
durable). Files get model inode numbers, so hard links and renames keep their identity.

:func:`crash_states` then enumerates what a power cut after each prefix of that log may leave (POSIX, no ordering
guarantees beyond fsync):

- a directory-entry operation (create, rename, link, unlink, mkdir) counts only once a later fsync of its directory
  returned; any subset of the ones not yet covered may be undone (every subset when there are few, else a seeded
  sample that always includes none, all, each one alone and each suffix in log order);
- a file whose data changed since its last fsync (a write, a close with different bytes, a fresh create) holds
  garbage: the model writes the first half of its newest known bytes, which never parses as a checkpoint, so a final
  name that can point at such a file shows up as a violation; a fsynced, unchanged file holds its fsynced bytes.

:func:`materialize` writes one crash state into a scratch directory, so the real readers (``torch.load``, the
manifest reader, :func:`async_ckpt.core.resume.latest_checkpoint`) can be run on it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from async_ckpt.pipeline.integrity import MANIFEST_NAME
from async_ckpt.pipeline.storage import TMP_MARKER, FileStorage, WriteTimes

DIR_KINDS = frozenset({"create", "rename", "link", "unlink", "mkdir"})


@dataclass(frozen=True)
class Op:
    """One logged operation.

    Attributes:
        index: position in the log.
        kind: ``create``, ``write``, ``open_direct``, ``write_direct`` (an ``O_DIRECT`` write), ``fsync``, ``close``,
            ``rename``, ``link``, ``unlink``, ``mkdir``, ``dirsync``, ``begin``, ``durable`` or ``reported``
            (the saver's ``on_durable`` callback).
        path: the file (source of a rename or link; the directory of a ``dirsync``), absolute.
        dst: the new name of a rename or link.
        ino: the model inode the operation concerns (-1 if none).
        data: the file's bytes after a ``fsync`` or at a ``close``.
        mtime_ns: the file's modification time at a ``fsync`` or ``close``.
        offset: where a ``write`` started; nbytes: how many bytes it wrote.
        job: for ``begin``/``durable``, the ordinal of the ``write_atomic``/``link_atomic`` call.
    """

    index: int
    kind: str
    path: str = ""
    dst: str = ""
    ino: int = -1
    data: bytes | None = None
    mtime_ns: int = 0
    offset: int = 0
    nbytes: int = 0
    job: int = -1

    @property
    def directory(self) -> str:
        """The directory whose entries a directory operation changes (renames and links stay in one directory)."""
        return os.path.dirname(self.dst or self.path)

    @property
    def is_manifest(self) -> bool:
        """Whether the operation concerns the manifest or one of its temporary files."""
        name = os.path.basename(self.path)
        return name == MANIFEST_NAME or name.startswith(MANIFEST_NAME + TMP_MARKER)


class _RecordingFile:
    """The file object of :meth:`RecordingStorage._open`: passes everything on and logs writes and the close."""

    def __init__(self, raw: BinaryIO, storage: RecordingStorage, ino: int) -> None:
        self._raw = raw
        self._storage = storage
        self._ino = ino
        self._fd = raw.fileno()

    def write(self, data: Any) -> int:
        offset = self._raw.tell()
        n = self._raw.write(data)
        self._storage._log("write", ino=self._ino, offset=offset, nbytes=memoryview(data).nbytes)
        return n

    def close(self) -> None:
        if self._raw.closed:
            return
        with contextlib.suppress(OSError, ValueError):
            self._raw.flush()
        self._storage._log("close", ino=self._ino, data=_read_fd(self._fd), mtime_ns=os.fstat(self._fd).st_mtime_ns)
        self._storage._forget_fd(self._fd)
        self._raw.close()

    def __enter__(self) -> _RecordingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # flush, fileno, tell, seek, closed, ...
        return getattr(self._raw, name)


def _abs(path: str) -> str:
    """``path`` with its directory resolved (as ``/proc/self/fd`` names a directory), the file name kept."""
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class RecordingStorage(FileStorage):
    """A :class:`FileStorage` that logs every file-system operation it makes, in order (see the module docstring).

    Thread-safety: the log is appended under a lock; in practice only the writer thread calls it.

    Args:
        skip_dir_sync_after_rename: a broken variant that does not fsync the directory after renaming a file into
            place (the crash checker must catch it).
        skip_file_fsync: a broken variant that never fsyncs files (nothing is logged for the skipped fsync).
    """

    def __init__(self, *, skip_dir_sync_after_rename: bool = False, skip_file_fsync: bool = False) -> None:
        super().__init__(fsync=True)
        self.skip_dir_sync_after_rename = skip_dir_sync_after_rename
        self.skip_file_fsync = skip_file_fsync
        self.ops: list[Op] = []
        self.escapes: list[str] = []  # operations on files the log never saw created
        self._lock = threading.Lock()
        self._ino_of_path: dict[str, int] = {}
        self._ino_of_fd: dict[int, int] = {}
        self._next_ino = 0
        self._jobs = 0
        self._depth = threading.local()

    # -- the log -----------------------------------------------------------------------------------------------
    def _log(self, kind: str, **fields: Any) -> Op:
        with self._lock:
            op = Op(len(self.ops), kind, **fields)
            self.ops.append(op)
        return op

    def _forget_fd(self, fd: int) -> None:
        with self._lock:
            self._ino_of_fd.pop(fd, None)

    def _ino(self, path: str, what: str) -> int:
        ino = self._ino_of_path.get(path)
        if ino is None:
            self.escapes.append(f"{what} of {path}, which was not created through the storage")
            ino = self._new_ino()
        return ino

    def _new_ino(self) -> int:
        with self._lock:
            self._next_ino += 1
            return self._next_ino

    def note_reported(self, path: str) -> None:
        """Log that the saver reported ``path`` durable to its user (its ``on_durable`` callback ran)."""
        path = _abs(path)
        begins = [op for op in self.ops if op.kind == "begin" and op.path == path]
        self._log("reported", path=path, job=begins[-1].job if begins else -1)

    # -- overridable primitives ----------------------------------------------------------------------------------
    def _open(self, path: str) -> BinaryIO:
        raw = super()._open(path)
        ino = self._new_ino()
        path = _abs(path)
        self._ino_of_path[path] = ino
        with self._lock:
            self._ino_of_fd[raw.fileno()] = ino
        self._log("create", path=path, ino=ino)
        return _RecordingFile(raw, self, ino)  # type: ignore[return-value]

    def _fsync_fd(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            super()._fsync_fd(fd)
            self._log("dirsync", path=os.path.realpath(f"/proc/self/fd/{fd}"))
            return
        if self.skip_file_fsync:
            return
        super()._fsync_fd(fd)
        with self._lock:
            ino = self._ino_of_fd.get(fd)
        if ino is None:
            self.escapes.append(f"fsync of descriptor {fd}, which was not opened through the storage")
            return
        self._log("fsync", ino=ino, data=_read_fd(fd), mtime_ns=st.st_mtime_ns)

    def _open_direct(self, path: str) -> int:
        fd = super()._open_direct(path)
        ino = self._ino(_abs(path), "O_DIRECT open")
        with self._lock:
            self._ino_of_fd[fd] = ino
        self._log("open_direct", path=_abs(path), ino=ino)
        return fd

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        n = super()._pwrite_direct(fd, view, offset)
        with self._lock:
            ino = self._ino_of_fd.get(fd, -1)
        if ino < 0:
            self.escapes.append(f"O_DIRECT write to descriptor {fd}, which was not opened through the storage")
        self._log("write_direct", ino=ino, offset=offset, nbytes=n)
        return n

    def _replace(self, src: str, dst: str) -> None:
        super()._replace(src, dst)
        src, dst = _abs(src), _abs(dst)
        ino = self._ino(src, "rename")
        self._ino_of_path.pop(src, None)
        self._ino_of_path[dst] = ino
        self._log("rename", path=src, dst=dst, ino=ino)

    def _link(self, src: str, dst: str) -> None:
        super()._link(src, dst)
        src, dst = _abs(src), _abs(dst)
        ino = self._ino(src, "link")
        self._ino_of_path[dst] = ino
        self._log("link", path=src, dst=dst, ino=ino)

    def _unlink(self, path: str) -> None:
        super()._unlink(path)
        path = _abs(path)
        ino = self._ino(path, "unlink")
        self._ino_of_path.pop(path, None)
        self._log("unlink", path=path, ino=ino)

    def _mkdir(self, path: str) -> None:
        super()._mkdir(path)
        self._log("mkdir", path=_abs(path))

    def _sync_committed(self, path: str) -> None:
        if not self.skip_dir_sync_after_rename:
            super()._sync_committed(path)

    # -- job markers ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _job(self, path: str) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        try:
            if depth:  # link_atomic falling back to write_atomic: one job
                yield
                return
            with self._lock:
                job = self._jobs
                self._jobs += 1
            self._log("begin", path=_abs(path), job=job)
            yield
            self._log("durable", path=_abs(path), job=job)
        finally:
            self._depth.n = depth

    def write_atomic(self, path: str, produce: Callable[[BinaryIO], object]) -> WriteTimes:
        with self._job(path):
            return super().write_atomic(path, produce)

    def link_atomic(self, src: str, dst: str) -> WriteTimes:
        with self._job(dst):
            return super().link_atomic(src, dst)

    # -- views of the log ------------------------------------------------------------------------------------------
    def checkpoint_jobs(self) -> list[Op]:
        """The ``begin`` markers of checkpoint writes and links (not of the manifest), in order."""
        return [op for op in self.ops if op.kind == "begin" and not op.is_manifest]

    def namespace(self) -> dict[str, int]:
        """Path -> model inode of every file the storage has put on disk and not removed (all operations applied)."""
        return dict(self._ino_of_path)


@dataclass
class CrashState:
    """What a power cut after ``prefix`` operations may leave, with the directory operations ``dropped`` undone.

    Attributes:
        prefix: how many operations of the log had happened.
        dropped: indices of the directory operations that did not survive.
        applied: indices of the directory operations that did (synced or lucky).
        files: path -> model inode of every file present.
        dirs: directories present (the roots and surviving ``mkdir``).
        contents: inode -> (bytes, mtime_ns, torn): what each present inode holds; ``torn`` when its data was not
            fsynced.
    """

    prefix: int
    dropped: frozenset[int]
    applied: frozenset[int]
    files: dict[str, int]
    dirs: set[str]
    contents: dict[int, tuple[bytes, int, bool]] = field(default_factory=dict)


def _subsets(unsynced: list[int], rng: random.Random, exhaustive: int, samples: int) -> Iterator[frozenset[int]]:
    """Sets of directory operations to drop: all when few, else none/all/singletons/suffixes plus a seeded sample."""
    if len(unsynced) <= exhaustive:
        for r in range(len(unsynced) + 1):
            for combo in itertools.combinations(unsynced, r):
                yield frozenset(combo)
        return
    seen: set[frozenset[int]] = set()
    fixed = [frozenset(), frozenset(unsynced)]
    fixed += [frozenset([i]) for i in unsynced]
    fixed += [frozenset(unsynced[i:]) for i in range(1, len(unsynced))]  # order-preserving: the newest are lost
    for s in fixed:
        if s not in seen:
            seen.add(s)
            yield s
    for _ in range(samples):
        s = frozenset(i for i in unsynced if rng.random() < 0.5)
        if s not in seen:
            seen.add(s)
            yield s


def _contents(ops: list[Op]) -> dict[int, tuple[bytes, int, bool]]:
    """Inode -> (bytes, mtime_ns, torn) after ``ops``: fsynced bytes if nothing changed since, else torn bytes."""
    synced: dict[int, Op] = {}
    newest: dict[int, Op] = {}
    dirty: dict[int, bool] = {}
    for op in ops:
        if op.kind in ("create", "write", "write_direct"):  # O_DIRECT bytes need the file's fsync too
            dirty[op.ino] = True
        elif op.kind == "fsync":
            synced[op.ino] = newest[op.ino] = op
            dirty[op.ino] = False
        elif op.kind == "close":
            newest[op.ino] = op
            last = synced.get(op.ino)
            if last is None or last.data != op.data:
                dirty[op.ino] = True
    out: dict[int, tuple[bytes, int, bool]] = {}
    for ino, is_dirty in dirty.items():
        if not is_dirty:
            op = synced[ino]
            assert op.data is not None
            out[ino] = (op.data, op.mtime_ns, False)
        else:
            known = newest.get(ino)
            data = known.data if known is not None and known.data is not None else b""
            out[ino] = (data[: len(data) // 2], known.mtime_ns if known is not None else 0, True)
    return out


def crash_states(
    ops: list[Op],
    roots: list[str],
    *,
    seed: int = 0,
    exhaustive: int = 6,
    samples: int = 48,
    counts: dict[str, int] | None = None,
) -> Iterator[CrashState]:
    """Every distinct crash state of the log ``ops`` (see the module docstring), prefix by prefix.

    Args:
        ops: the log of a :class:`RecordingStorage`.
        roots: directories that exist durably before the log starts.
        seed: seeds the sampling of dropped sets when more than ``exhaustive`` operations are unsynced.
        exhaustive: up to this many unsynced directory operations, every subset is tried.
        samples: random dropped sets tried beyond the fixed ones when there are more.
        counts: if given, filled with ``prefixes`` (crash points), ``unsynced_prefixes`` (crash points with
            directory operations a power cut may undo), ``undoable_entries`` (crash points where a rename, link or
            unlink may be undone) and ``candidates`` (states built before removing duplicates).
    """
    counts = counts if counts is not None else {}
    for name in ("prefixes", "unsynced_prefixes", "undoable_entries", "candidates"):
        counts.setdefault(name, 0)
    rng = random.Random(seed)
    seen: set[tuple[Any, ...]] = set()
    for k in range(len(ops) + 1):
        prefix = ops[:k]
        last_sync: dict[str, int] = {}
        for op in prefix:
            if op.kind == "dirsync":
                last_sync[op.path] = op.index
        dir_ops = [op for op in prefix if op.kind in DIR_KINDS]
        unsynced = [op.index for op in dir_ops if last_sync.get(op.directory, -1) < op.index]
        contents = _contents(prefix)
        markers = sum(op.kind in ("begin", "durable", "reported") for op in prefix)
        counts["prefixes"] += 1
        counts["unsynced_prefixes"] += bool(unsynced)
        counts["undoable_entries"] += any(ops[i].kind in ("rename", "link", "unlink") for i in unsynced)
        for dropped in _subsets(unsynced, rng, exhaustive, samples):
            counts["candidates"] += 1
            files: dict[str, int] = {}
            dirs = set(roots)
            applied = []
            for op in dir_ops:
                if op.index in dropped:
                    continue
                applied.append(op.index)
                if op.kind == "mkdir":
                    dirs.add(op.path)
                elif op.kind == "create":
                    files[op.path] = op.ino
                elif op.kind in ("rename", "link"):
                    if op.kind == "rename" and files.get(op.path) == op.ino:
                        del files[op.path]
                    files[op.dst] = op.ino
                elif op.kind == "unlink" and files.get(op.path) == op.ino:
                    del files[op.path]
            files = {p: i for p, i in files.items() if os.path.dirname(p) in dirs}
            key = (
                markers,  # what the checks expect changes with every marker, so it is part of the key
                tuple(i for i in applied if ops[i].kind == "unlink"),
                tuple(sorted(files.items())),
                tuple(sorted(dirs)),
                tuple(sorted((i, hash(contents[i][0]), contents[i][2]) for i in set(files.values()))),
            )
            if key in seen:
                continue
            seen.add(key)
            yield CrashState(
                prefix=k,
                dropped=dropped,
                applied=frozenset(applied),
                files=files,
                dirs=dirs,
                contents={i: contents[i] for i in set(files.values())},
            )


def materialize(state: CrashState, root: str, scratch: str) -> None:
    """Write ``state`` under ``scratch``: every path below ``root`` maps to the same relative path below it.

    ``scratch`` is emptied first; files get their bytes and modification times, directories only if present.
    """
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    for d in sorted(state.dirs):
        os.makedirs(os.path.join(scratch, os.path.relpath(d, root)), exist_ok=True)
    for path, ino in state.files.items():
        data, mtime_ns, _ = state.contents[ino]
        target = os.path.join(scratch, os.path.relpath(path, root))
        with open(target, "wb") as f:
            f.write(data)
        if mtime_ns:
            os.utime(target, ns=(mtime_ns, mtime_ns))
