"""SIGKILL of a writer in the middle of an upload, against a real S3 API on loopback: the previous published
checkpoint stays ``latest``, and the next run aborts the dead multipart upload (or deletes the object that never got
its manifest) and publishes the checkpoint the dead run had made durable locally."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _s3server import BUCKET, S3, Fault, aws_env, s3_fixture, s3_module_fixture  # noqa: F401 - fixtures

from async_ckpt.cli import main as cli
from async_ckpt.core.checkpointer import Checkpointer
from async_ckpt.core.uploader import UploadOptions
from async_ckpt.pipeline.remote import RemoteStore

URL = f"s3://{BUCKET}/run1"
WORKER = os.path.join(os.path.dirname(__file__), "_s3server.py")


def _kill_during(s3: S3, tmp_path: Path, fault: Fault) -> None:
    """Run the worker through the proxy, wait until ``fault`` holds a request of step 2, SIGKILL the worker."""
    s3.proxy.add(fault)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, WORKER, "worker", s3.proxy.endpoint, URL, str(tmp_path / "local")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert fault.seen.wait(120), child.communicate(timeout=60)
        child.kill()
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        fault.release.set()
    assert child.returncode == -9, err
    assert out.splitlines() == ["published 1"], err


@pytest.mark.parametrize("when", ["part", "manifest"])
def test_sigkill_during_an_upload_keeps_the_previous_checkpoint_and_a_restart_cleans_up(
    s3: S3,
    tmp_path: Path,
    when: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed while uploading a part of step 2 (or before its manifest): step 1 stays latest for readers (the CLI
    too); a restart removes the leftover and publishes step 2 from the local copy, with the same bytes."""
    if when == "part":
        fault = Fault("hold", lambda r: "step_00000002.pt" in r.path and "partNumber=2" in r.path, times=1)
    else:
        fault = Fault("hold", lambda r: r.method == "PUT" and "step_00000002.pt.json" in r.path, times=1)
    _kill_during(s3, tmp_path, fault)

    store = RemoteStore(URL, s3.options)
    assert list(store.manifests()) == ["step_00000001.pt"]
    fs = s3.fs()
    if when == "part":
        assert [u["Key"] for u in fs.list_multipart_uploads(BUCKET)] == ["run1/step_00000002.pt"]
    else:
        assert fs.exists(f"{BUCKET}/run1/step_00000002.pt")  # uploaded, never published
    # The CLI, configured the AWS way (environment variables, AWS_ENDPOINT_URL included), sees step 1 as latest.
    aws_env(s3, monkeypatch)
    assert cli(["latest", URL]) == 0
    assert capsys.readouterr().out.strip() == f"{URL}/step_00000001.pt"

    caplog.set_level(logging.INFO, logger="async_ckpt")
    options = UploadOptions(part_size=5 << 20, concurrency=2, deadline_s=60)
    with Checkpointer(URL, storage_options=s3.options, local_dir=tmp_path / "local", keep_last=2, upload=options) as c:
        c.wait(60)
        assert [i.step for i in c.checkpoints()] == [1, 2]
    assert "leftover" in caplog.text
    assert fs.list_multipart_uploads(BUCKET) == []
    local = (tmp_path / "local" / "step_00000002.pt").read_bytes()
    assert fs.cat_file(f"{BUCKET}/run1/step_00000002.pt") == local
    state = torch.load(tmp_path / "local" / "step_00000002.pt", weights_only=True)
    torch.manual_seed(0)
    assert torch.equal(state["w"], torch.randn(3 << 20) + 1)


def test_an_interpreter_exit_without_close_publishes_what_was_saved(s3: S3, tmp_path: Path) -> None:
    """A script that saves to a URL and ends without close() or wait(): the exit hooks make the file durable and
    publish it before the process ends (it used to stay local until a later run on the same machine)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), *sys.path])}
    done = subprocess.run(
        [sys.executable, WORKER, "exit-worker", s3.server.endpoint, URL, str(tmp_path / "local")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["saved 1"], done.stderr
    store = RemoteStore(URL, s3.options)
    assert list(store.manifests()) == ["step_00000001.pt"], done.stderr
    local = (tmp_path / "local" / "step_00000001.pt").read_bytes()
    assert s3.fs().cat_file(f"{BUCKET}/run1/step_00000001.pt") == local
