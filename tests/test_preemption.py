"""Preemption: a real signal sent to a real training process becomes a durable final checkpoint, then is handed on.

A child (``_preempt_worker.py``) prints ``step N`` at the start of each step and waits for a line on stdin before it
goes on, so the parent can send the signal while the child is inside step N: reading the child's output is the only
synchronization. The saver must write ``checkpoint_final_iteration=N.pt`` at the end of that iteration, make it
durable, and then let the process end the way it would have without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_training
from ignite.engine import Engine, Events

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.integrity import read_manifest, verify
from async_ckpt.pipeline.storage import TMP_MARKER

WORKER = Path(__file__).with_name("_preempt_worker.py")
CHILD_TIMEOUT_S = 120
SIGNAL_AT_STEP = 5
TOTAL_ITERATIONS = 12  # 4 epochs of 3 iterations in the worker


@dataclass
class Child:
    """What a child printed and how it ended."""

    returncode: int
    lines: list[str]
    stderr: str
    timed_out: bool
    done: dict[int, list[float]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for line in self.lines:
            kind, _, rest = line.partition(" ")
            if kind == "done":
                n, _, values = rest.partition(" ")
                self.done[int(n)] = json.loads(values)
            elif kind == "step":
                self.steps.append(int(rest))

    def tagged(self, kind: str) -> list[str]:
        return [line.partition(" ")[2] for line in self.lines if line.partition(" ")[0] == kind]


def is_gate(line: str) -> bool:
    """Whether the child waits for an answer after printing ``line``."""
    return line.startswith(("step ", "epoch ")) or line == "ran"


def drive(
    mode: str, save_dir: Path, signum: int, trigger: str = f"step {SIGNAL_AT_STEP}", env: dict[str, str] | None = None
) -> Child:
    """Run the worker in ``mode``, answer every gate, and send ``signum`` while the child waits at gate ``trigger``."""
    stderr_path = save_dir.parent / f"{mode}.stderr"
    timed_out = threading.Event()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(save_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )

    def _kill() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(CHILD_TIMEOUT_S, _kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if not is_gate(line):
                continue
            if line == trigger:
                os.kill(proc.pid, signum)  # the child is blocked reading stdin at this gate
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            except BrokenPipeError:
                break
        returncode = proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except BrokenPipeError:
                pass
    return Child(returncode, lines, stderr_path.read_text(), timed_out.is_set())


SCENARIOS: dict[str, tuple[int, str]] = {
    "term": (signal.SIGTERM, f"step {SIGNAL_AT_STEP}"),
    "term-chain": (signal.SIGTERM, f"step {SIGNAL_AT_STEP}"),
    "usr1-ignored": (signal.SIGUSR1, f"step {SIGNAL_AT_STEP}"),
    "term-last-epoch": (signal.SIGTERM, "epoch 4"),
    "term-after-run": (signal.SIGTERM, "ran"),
    "abrt-foreign": (signal.SIGABRT, f"step {SIGNAL_AT_STEP}"),
}
# faulthandler installs its C handlers before Python's signal table is filled, which then says None for them.
ENV: dict[str, dict[str, str]] = {"abrt-foreign": {"PYTHONFAULTHANDLER": "1"}}
Children = dict[str, "Future[tuple[Path, Child]]"]


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Children]:
    """Every scenario's child, run a few at a time from the start (most of a child's time is importing torch)."""
    base = tmp_path_factory.mktemp("preempt")

    def scenario(mode: str) -> tuple[Path, Child]:
        signum, trigger = SCENARIOS[mode]
        (base / mode).mkdir()
        save_dir = base / mode / "ckpt"
        return save_dir, drive(mode, save_dir, signum, trigger, ENV.get(mode))

    with ThreadPoolExecutor(max_workers=min(len(SCENARIOS), max(2, os.cpu_count() or 2))) as pool:
        yield {mode: pool.submit(scenario, mode) for mode in SCENARIOS}


def final_files(save_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(save_dir) if n.startswith("checkpoint_final_iteration="))


def assert_final_checkpoint(save_dir: Path, iteration: int, expected_params: list[float]) -> None:
    """``checkpoint_final_iteration=<iteration>.pt`` is the only final file, complete, recorded, with those weights."""
    name = f"checkpoint_final_iteration={iteration}.pt"
    assert final_files(save_dir) == [name]
    result = verify(str(save_dir / name))
    assert result.ok, result.problems
    assert result.checked == ["manifest", "records"]
    entry = read_manifest(str(save_dir))["files"][name]
    assert (entry["reason"], entry["iteration"]) == ("final", iteration)
    state = torch.load(save_dir / name, weights_only=True)
    saved = torch.cat([state["net"]["weight"].flatten(), state["net"]["bias"].flatten()]).tolist()
    assert saved == expected_params, "the final checkpoint does not hold the weights of that iteration"
    assert [n for n in os.listdir(save_dir) if TMP_MARKER in n] == []


def test_sigterm_writes_the_final_checkpoint_and_the_process_dies_by_sigterm(children: Children) -> None:
    """SIGTERM inside step N: the final checkpoint of iteration N is durable and the child is killed by SIGTERM."""
    save_dir, child = children["term"].result()
    assert not child.timed_out, child.stderr
    assert child.returncode == -signal.SIGTERM, (child.returncode, child.stderr)
    assert "exit 0" not in child.lines
    # The signal was handled at the end of the step it arrived in: nothing ran after that iteration.
    assert max(child.done) == SIGNAL_AT_STEP
    assert max(child.steps) == SIGNAL_AT_STEP
    assert f"SIGTERM received; writing the final checkpoint at iteration {SIGNAL_AT_STEP}" in child.stderr
    assert_final_checkpoint(save_dir, SIGNAL_AT_STEP, child.done[SIGNAL_AT_STEP])


def test_sigterm_is_chained_to_the_previous_python_handler_after_the_checkpoint_is_durable(children: Children) -> None:
    """A SIGTERM handler installed before the saver runs after the final checkpoint is durable, and decides the exit."""
    save_dir, child = children["term-chain"].result()
    assert not child.timed_out, child.stderr
    assert child.returncode == 3, (child.returncode, child.stderr)
    reports = child.tagged("previous")
    assert len(reports) == 1, child.lines
    report = json.loads(reports[0])
    name = f"checkpoint_final_iteration={SIGNAL_AT_STEP}.pt"
    assert report == {
        "signum": int(signal.SIGTERM),
        "finals": [name],
        "verified": [True],
        "checked": [["manifest", "records"]],
    }
    assert max(child.done) == SIGNAL_AT_STEP
    assert "exit 0" not in child.lines
    assert_final_checkpoint(save_dir, SIGNAL_AT_STEP, child.done[SIGNAL_AT_STEP])


def test_sigusr1_over_sig_ign_saves_and_training_continues(children: Children) -> None:
    """SIGUSR1 over ``SIG_IGN``: the preemption checkpoint is written, training runs to the end, exit status 0."""
    save_dir, child = children["usr1-ignored"].result()
    assert not child.timed_out, child.stderr
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert child.lines[-1] == "exit 0"
    assert child.steps == list(range(1, TOTAL_ITERATIONS + 1))
    assert f"SIGUSR1 received; writing the final checkpoint at iteration {SIGNAL_AT_STEP}" in child.stderr
    finals = [(int(n), json.loads(names)) for n, _, names in (r.partition(" ") for r in child.tagged("finals"))]
    preempted = f"checkpoint_final_iteration={SIGNAL_AT_STEP}.pt"
    assert finals == [(i, [] if i < SIGNAL_AT_STEP else [preempted]) for i in range(1, TOTAL_ITERATIONS + 1)]
    # At COMPLETED the final checkpoint replaces the preemption one, as MONAI replaces an earlier final file.
    assert_final_checkpoint(save_dir, TOTAL_ITERATIONS, child.done[TOTAL_ITERATIONS])
    assert sorted(read_manifest(str(save_dir))["files"]) == [f"checkpoint_final_iteration={TOTAL_ITERATIONS}.pt"]


def test_signal_over_a_handler_installed_outside_python_gets_the_default_action(children: Children) -> None:
    """A previous handler Python reports as ``None`` (installed in C) is replaced by ``SIG_DFL`` when handing on."""
    save_dir, child = children["abrt-foreign"].result()
    assert not child.timed_out, child.stderr
    assert child.returncode == -signal.SIGABRT, (child.returncode, child.stderr)
    assert "installed outside Python and cannot be put back" in child.stderr
    assert max(child.done) == SIGNAL_AT_STEP
    assert "exit 0" not in child.lines
    assert_final_checkpoint(save_dir, SIGNAL_AT_STEP, child.done[SIGNAL_AT_STEP])


def test_sigterm_after_the_last_iteration_still_ends_the_process(children: Children) -> None:
    """SIGTERM in the last epoch's validation (no iteration follows): final checkpoint durable, then SIGTERM kills."""
    save_dir, child = children["term-last-epoch"].result()
    assert not child.timed_out, child.stderr
    assert_final_checkpoint(save_dir, TOTAL_ITERATIONS, child.done[TOTAL_ITERATIONS])
    code, tail = child.returncode, child.lines[-2:]
    assert code == -signal.SIGTERM, f"exit status {code}, last lines {tail}: the pending SIGTERM was dropped"


def test_sigterm_after_the_run_is_not_swallowed_without_close(children: Children) -> None:
    """Used like MONAI's saver (never closed), the saver must not keep SIGTERM from ending the process after the run."""
    save_dir, child = children["term-after-run"].result()
    assert not child.timed_out, child.stderr
    assert_final_checkpoint(save_dir, TOTAL_ITERATIONS, child.done[TOTAL_ITERATIONS])
    alive = "still alive" in child.lines
    assert not alive, "SIGTERM was swallowed after engine.run returned"
    assert child.returncode == -signal.SIGTERM


def test_preempt_signal_without_save_final_is_refused(tmp_path: Path) -> None:
    """``preempt_signal`` without ``save_final=True`` raises ValueError at construction and installs nothing."""
    t = make_training()
    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(ValueError, match="save_final=True"):
        AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_interval=1, preempt_signal=signal.SIGUSR2)
    assert signal.getsignal(signal.SIGUSR2) == before


def test_handler_is_installed_at_attach_and_restored_at_close(tmp_path: Path) -> None:
    """The saver takes the signal over at ``attach`` and gives the previous handler back at ``close``."""
    t = make_training()

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not expected to run")

    before = signal.signal(signal.SIGUSR2, mine)
    try:
        saver = AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_final=True, preempt_signal=signal.SIGUSR2)
        with saver:
            assert signal.getsignal(signal.SIGUSR2) is mine  # nothing before attach
            saver.attach(t.engine)
            assert signal.getsignal(signal.SIGUSR2) is not mine
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_attach_outside_the_main_thread_is_refused(tmp_path: Path) -> None:
    """Signals are only handled in the main thread, so attaching a preemption saver elsewhere raises ValueError."""
    t = make_training()
    errors: list[BaseException] = []
    before = signal.getsignal(signal.SIGUSR2)
    with AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_final=True, preempt_signal=signal.SIGUSR2) as saver:

        def attach() -> None:
            try:
                saver.attach(t.engine)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=attach)
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ValueError), errors
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGUSR2) == before


def test_a_nested_evaluator_run_does_not_give_the_signal_back(tmp_path: Path) -> None:
    """With the saver on both trainer and evaluator, the evaluator's COMPLETED leaves the handler installed; the
    trainer's COMPLETED gives it back."""
    t = make_training(batches=1)
    evaluator = Engine(lambda e, b: None)
    before = signal.getsignal(signal.SIGUSR1)
    seen: list[object] = []
    with AsyncCheckpointSaver(str(tmp_path), t.save_dict, save_final=True, preempt_signal=signal.SIGUSR1) as saver:
        saver.attach(t.engine)
        saver.attach(evaluator)
        t.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
        t.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(signal.getsignal(signal.SIGUSR1)))
        t.engine.run(t.data, max_epochs=2)
        after_run = signal.getsignal(signal.SIGUSR1)
    guard = saver._preemption
    assert guard is not None
    assert all(h == guard._on_signal for h in seen) and len(seen) == 2
    assert after_run == before
