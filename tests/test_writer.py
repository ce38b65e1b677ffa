"""The shared background writer: FIFO order, deferred evictions, error latch, lifecycle."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from _doubles import GatedStorage

from async_ckpt.errors import WriterClosedError
from async_ckpt.pipeline import writer as writer_mod
from async_ckpt.pipeline.storage import FileStorage
from async_ckpt.pipeline.writer import JobResult, WriteJob, WriterClient, worker_alive


def _job(path: str, data: bytes = b"x", **kw: object) -> WriteJob:
    return WriteJob(path, lambda f: f.write(data), **kw)  # type: ignore[arg-type]


def test_jobs_of_all_clients_run_in_fifo_order(tmp_path: os.PathLike[str]) -> None:
    """Jobs from two clients are written strictly in submission order by the one worker."""
    storage = GatedStorage()
    a, b = WriterClient(storage), WriterClient(storage)
    names = [f"{i}.pt" for i in range(6)]
    for i, name in enumerate(names):
        (a if i % 2 else b).submit(_job(os.path.join(tmp_path, name)))
    storage.open_all()
    assert a.close(timeout=30) and b.close(timeout=30)
    assert storage.order == names


def test_eviction_waits_for_the_replacement(tmp_path: os.PathLike[str]) -> None:
    """A removal attached to a write runs only after that write is durable, and never if it fails."""
    old = os.path.join(tmp_path, "old.pt")
    Path(old).write_bytes(b"old")
    storage = GatedStorage()
    client = WriterClient(storage)
    client.submit(_job(os.path.join(tmp_path, "new.pt"), removes=[old]))
    assert storage.entered.wait(timeout=30)
    assert os.path.exists(old)  # the replacement is being written: the old file must still be there
    storage.open_all()
    assert client.wait(timeout=30)
    assert not os.path.exists(old)

    def fail(f: BinaryIO) -> None:
        raise OSError("disk on fire")

    keep = os.path.join(tmp_path, "new.pt")
    client.submit(WriteJob(os.path.join(tmp_path, "newer.pt"), fail, removes=[keep]))
    assert client.wait(timeout=30)
    failures = client.take_failures()
    assert [f.job.path for f in failures] == [os.path.join(tmp_path, "newer.pt")]
    assert os.path.exists(keep) and not os.path.exists(os.path.join(tmp_path, "newer.pt"))
    assert client.take_failures() == []  # reported once
    client.close()


def test_link_job_reuses_a_durable_file(tmp_path: os.PathLike[str]) -> None:
    """A job linked to an earlier identical job becomes a hard link of its file instead of a second write."""
    client = WriterClient(FileStorage(fsync=False))
    first = _job(os.path.join(tmp_path, "a.pt"), b"same")
    second = WriteJob(os.path.join(tmp_path, "b.pt"), None, link_from=first)
    client.submit(first)
    client.submit(second)
    assert client.close(timeout=30)
    assert second.result is not None and second.result.linked
    assert os.stat(os.path.join(tmp_path, "a.pt")).st_ino == os.stat(os.path.join(tmp_path, "b.pt")).st_ino


def test_link_without_a_source_file_is_reported(tmp_path: os.PathLike[str]) -> None:
    """If the file to link from failed and there is nothing to serialize, the job fails loudly."""

    def fail(f: BinaryIO) -> None:
        raise OSError("nope")

    client = WriterClient(FileStorage(fsync=False))
    first = WriteJob(os.path.join(tmp_path, "a.pt"), fail)
    client.submit(first)
    client.submit(WriteJob(os.path.join(tmp_path, "b.pt"), None, link_from=first))
    assert client.close(timeout=30)
    assert [os.path.basename(f.job.path) for f in client.take_failures()] == ["a.pt", "b.pt"]


def test_wait_times_out_while_blocked_and_close_joins(tmp_path: os.PathLike[str]) -> None:
    """wait() reports a timeout instead of hanging, and after close() no writer thread is left."""
    storage = GatedStorage()
    client = WriterClient(storage)
    client.submit(_job(os.path.join(tmp_path, "a.pt")))
    assert storage.entered.wait(timeout=30)
    assert client.wait(timeout=0.05) is False and client.pending == 1
    storage.open_all()
    assert client.close(timeout=30)
    assert not worker_alive()
    client.close()  # idempotent


def _writer_thread_of(job: WriteJob) -> list[threading.Thread]:
    seen: list[threading.Thread] = []  # the Thread objects themselves: an ident can be reused by a later thread
    job.on_done = lambda result: seen.append(threading.current_thread())
    return seen


def test_an_idle_writer_waits_for_the_next_save_of_an_open_client(tmp_path: os.PathLike[str]) -> None:
    """Between two saves of an open client the writer thread stays (the second save starts no thread on the
    caller's side); closing the last open client ends it."""
    client = WriterClient(FileStorage(fsync=False))
    first, second = _job(os.path.join(tmp_path, "a.pt")), _job(os.path.join(tmp_path, "b.pt"))
    ran_first, ran_second = _writer_thread_of(first), _writer_thread_of(second)
    client.submit(first)
    assert client.wait(timeout=30) and worker_alive()
    client.submit(second)
    assert client.close(timeout=30)
    assert len(ran_first) == len(ran_second) == 1 and ran_first[0] is ran_second[0]
    assert not worker_alive()


def test_a_client_collected_without_close_lets_the_writer_end(tmp_path: os.PathLike[str]) -> None:
    """A client dropped without close() (its saver was garbage-collected) does not keep the writer thread: the
    idle writer notices and ends."""
    import gc

    client = WriterClient(FileStorage(fsync=False))
    client.submit(_job(os.path.join(tmp_path, "a.pt")))
    assert client.wait(timeout=30)
    (thread,) = [t for t in threading.enumerate() if t.name == writer_mod.THREAD_NAME]
    del client
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_submit_after_close_is_refused(tmp_path: os.PathLike[str]) -> None:
    """A closed client refuses new work with a clear error."""
    client = WriterClient(FileStorage(fsync=False))
    client.close()
    with pytest.raises(WriterClosedError, match="closed"):
        client.submit(_job(os.path.join(tmp_path, "a.pt")))


def test_failure_in_on_done_is_reported(tmp_path: os.PathLike[str]) -> None:
    """An exception in a completion callback is not lost: it is reported as a failure of its job."""

    def boom(result: object) -> None:
        raise ValueError("callback bug")

    client = WriterClient(FileStorage(fsync=False))
    client.submit(_job(os.path.join(tmp_path, "a.pt"), on_done=boom))
    assert client.close(timeout=30)
    (failure,) = client.take_failures()
    assert isinstance(failure.error, ValueError)


def test_close_does_not_wait_for_another_clients_running_job(tmp_path: os.PathLike[str]) -> None:
    """close() of a client with nothing pending returns while another client's write is still in progress."""
    storage = GatedStorage()
    busy = WriterClient(storage, name="busy")
    idle = WriterClient(FileStorage(fsync=False), name="idle")
    busy.submit(_job(os.path.join(tmp_path, "a.pt")))
    assert storage.entered.wait(timeout=30)
    closed = threading.Event()

    def close_idle() -> None:
        idle.close()
        closed.set()

    closer = threading.Thread(target=close_idle, name="test-close-idle")
    closer.start()
    try:
        returned = closed.wait(timeout=10)
        still_writing = busy.pending == 1
    finally:
        storage.open_all()
        closer.join(timeout=30)
    assert returned and still_writing, "close() of an idle client waited for another client's write"
    assert busy.close(timeout=30)
    assert not worker_alive()


def test_exit_timeout_counts_only_clients_with_pending_jobs(tmp_path: os.PathLike[str]) -> None:
    """The exit hook's timeout comes from the clients that still have work: an unbounded client that was closed
    (or has nothing pending) no longer makes the exit wait without limit."""
    unbounded = WriterClient(FileStorage(fsync=False), exit_timeout=None)
    storage = GatedStorage()
    bounded = WriterClient(storage, exit_timeout=5.0)
    bounded.submit(_job(os.path.join(tmp_path, "a.pt")))
    assert storage.entered.wait(timeout=30)
    try:
        assert writer_mod._exit_timeout() == 5.0  # the unbounded client has nothing pending
        unbounded.submit(_job(os.path.join(tmp_path, "b.pt")))
        assert writer_mod._exit_timeout() is None  # now it has
    finally:
        storage.open_all()
    assert unbounded.close(timeout=30) and bounded.close(timeout=30)
    assert writer_mod._exit_timeout() == writer_mod._DEFAULT_EXIT_TIMEOUT


def test_after_commit_runs_between_the_durable_write_and_the_removals(tmp_path: Path) -> None:
    """after_commit sees the new file in place and the evicted one still there; if it fails, nothing is removed
    and the failure says stage 'record' with the file committed."""
    old = tmp_path / "old.pt"
    old.write_bytes(b"old")
    seen: list[tuple[bool, bool]] = []
    client = WriterClient(FileStorage(fsync=False))
    try:

        def record(result: JobResult) -> None:
            seen.append(((tmp_path / "new.pt").exists(), old.exists()))

        client.submit(
            WriteJob(str(tmp_path / "new.pt"), lambda f: f.write(b"new"), removes=[str(old)], after_commit=record)
        )
        assert client.wait(30)
        assert seen == [(True, True)] and not old.exists() and not client.take_failures()

        old.write_bytes(b"old")

        def broken(result: JobResult) -> None:
            raise OSError("manifest unwritable")

        client.submit(
            WriteJob(str(tmp_path / "n2.pt"), lambda f: f.write(b"n2"), removes=[str(old)], after_commit=broken)
        )
        assert client.wait(30)
        (failure,) = client.take_failures()
        assert failure.stage == "record" and failure.job.result is not None and failure.job.result.committed
        assert old.exists() and (tmp_path / "n2.pt").exists()
    finally:
        client.close()
