"""An exception that is ending training stays the exception raised; a checkpoint failure is attached to it.

The failures come from :class:`NoSpaceStorage`, a real ``FileStorage`` whose file fsyncs fail with ``ENOSPC``.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from _doubles import NoSpaceStorage
from conftest import checkpoint_names, iteration_saver, make_training
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver, CheckpointWriteError


class NoNotesError(RuntimeError):
    """A training exception that cannot carry notes, as every exception on Python 3.10."""

    add_note = None


def write_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The ERROR records that report a checkpoint failure, with the ``CheckpointWriteError`` attached."""
    return [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR
        and r.exc_info is not None
        and isinstance(r.exc_info[1], CheckpointWriteError)
        and "was ending training" in r.getMessage()
    ]


def notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if "async_ckpt: a checkpoint also failed" in n]


def test_final_checkpoint_failure_does_not_replace_the_training_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``save_final``, a training exception leaves ``engine.run`` even when the final write fails; the write
    failure is a note on it and an ERROR log record."""
    t = make_training(batches=4, fail_at_iteration=3)
    saver = AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_final=True, storage=NoSpaceStorage())
    saver.attach(t.engine)
    caplog.set_level(logging.ERROR)
    with pytest.raises(RuntimeError, match="boom") as info:
        t.engine.run(t.data, max_epochs=1)
    assert not isinstance(info.value, CheckpointWriteError)
    records = write_failures(caplog)
    # ignite fires EXCEPTION_RAISED twice for an exception in a step (the final save is made twice, as MONAI's).
    assert len(records) >= 1, caplog.text
    cause = records[0].exc_info[1].__cause__  # type: ignore[index]
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert len(notes(info.value)) == (len(records) if hasattr(info.value, "add_note") else 0)
    saver.close()
    assert checkpoint_names(tmp_path) == []


@pytest.mark.parametrize("error_type", [RuntimeError, NoNotesError], ids=["with-notes", "without-notes"])
def test_exit_with_a_pending_write_failure_keeps_the_exception_of_the_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error_type: type[RuntimeError]
) -> None:
    """Leaving ``with saver:`` by an exception while a write failure is latched raises that exception, not the
    write failure: attached as a note where the exception takes notes, always logged at ERROR."""
    t = make_training(batches=4)
    saver = iteration_saver(tmp_path, t, storage=NoSpaceStorage())
    caplog.set_level(logging.ERROR)

    def fail(engine: Engine) -> None:
        raise error_type("the step ends training")

    # Iteration 1's checkpoint is queued and fails in the background; iteration 2 raises before any event reports it.
    t.engine.add_event_handler(Events.ITERATION_STARTED(once=2), fail)
    with pytest.raises(error_type, match="ends training") as info, saver:
        saver.attach(t.engine)
        t.engine.run(t.data, max_epochs=1)
    assert not isinstance(info.value, CheckpointWriteError)
    assert len(write_failures(caplog)) == 1, caplog.text
    expected_notes = 0 if error_type is NoNotesError or not hasattr(BaseException, "add_note") else 1
    assert len(notes(info.value)) == expected_notes
    assert checkpoint_names(tmp_path) == []


def test_exit_without_an_exception_still_raises_the_write_failure(tmp_path: Path) -> None:
    """Leaving ``with saver:`` normally raises a latched write failure, as ``close()`` does."""
    t = make_training(batches=4)
    saver = iteration_saver(tmp_path, t, storage=NoSpaceStorage())
    with pytest.raises(CheckpointWriteError), saver:
        saver.attach(t.engine)
        t.engine.state.iteration, t.engine.state.epoch = 1, 1
        saver.interval_completed(t.engine)  # queued; it fails in the background and is reported at exit
