"""Checkpointer on an S3 URL against a real S3 API (moto's server on loopback, s3fs as the client): same files as
the local case, published atomically, pruned after a newer publish, coalesced when behind, faults retried within the
deadline or raised, expired credentials refreshed, resumed from the bucket into an empty local directory."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _s3server import BUCKET, S3, Fault, aws_env, s3_fixture, s3_module_fixture  # noqa: F401 - fixtures
from conftest import checkpoint_names, trees_equal

from async_ckpt.core.checkpointer import Checkpointer
from async_ckpt.core.uploader import UPLOAD_THREAD_NAME, UploadOptions
from async_ckpt.errors import CheckpointWriteError
from async_ckpt.pipeline.remote import MANIFEST_DIR, RemoteIntegrityError, RemoteStore, default_local_dir, is_url

URL = f"s3://{BUCKET}/run1"
FAST = UploadOptions(part_size=5 << 20, concurrency=2, deadline_s=30, backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture(autouse=True)
def no_leaked_uploader() -> Iterator[None]:
    """Fail a test that leaves an uploader thread running (a Checkpointer on a URL that was not closed)."""
    yield
    alive = [t for t in threading.enumerate() if t.name == UPLOAD_THREAD_NAME]
    for t in alive:
        t.join(timeout=10)
    assert not [t for t in alive if t.is_alive()], "uploader thread left running"


def state_at(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(64, 32), "b": torch.randn(32)}, "step": step}


def remote(s3: S3, tmp_path: Path, sub: str = "local", **kwargs: Any) -> Checkpointer:
    kwargs.setdefault("upload", FAST)
    kwargs.setdefault("storage_options", s3.options)
    return Checkpointer(URL, local_dir=tmp_path / sub, fsync=False, **kwargs)


def objects(s3: S3, prefix: str = "run1") -> list[str]:
    fs = s3.fs()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/{prefix}") if f"/{MANIFEST_DIR}/" not in p)


def published(s3: S3) -> list[str]:
    return list(RemoteStore(URL, s3.options).manifests())


def test_files_and_contents_equal_the_local_case(s3: S3, tmp_path: Path) -> None:
    """The bucket holds the same names and bytes as a local Checkpointer's directory, each with a manifest."""
    with remote(s3, tmp_path, keep_last=2) as ours, Checkpointer(tmp_path / "plain", keep_last=2, fsync=False) as ref:
        for step in range(4):
            ours.save(step, state_at(step), metrics={"loss": 1.0 / (step + 1)})
            ref.save(step, state_at(step), metrics={"loss": 1.0 / (step + 1)})
    names = checkpoint_names(tmp_path / "plain")
    assert objects(s3) == names == published(s3)
    fs = s3.fs()
    for name in names:
        assert fs.cat_file(f"{BUCKET}/run1/{name}") == (tmp_path / "plain" / name).read_bytes()
    again = remote(s3, tmp_path, "other")
    try:
        assert [c.step for c in again.checkpoints()] == [2, 3]
        assert again.checkpoints()[-1].metrics == {"loss": 0.25}
        assert again.latest() == f"{URL}/step_00000003.pt"
        assert trees_equal(again.load(), torch.load(tmp_path / "plain" / names[-1], weights_only=True))
    finally:
        again.close()


def test_remote_retention_prunes_only_after_a_newer_publish(s3: S3, tmp_path: Path) -> None:
    """With keep_last=1 only the newest checkpoint stays in the bucket; upload stats count every publish."""
    with remote(s3, tmp_path, keep_last=1) as ckpt:
        for step in range(3):
            ckpt.save(step, state_at(step))
            ckpt.wait()
            assert published(s3) == [f"step_{step:08d}.pt"]
        stats = ckpt.upload_stats
        assert stats is not None
        assert stats.summary()["published"] == 3
        assert stats.pending == 0
        assert all(u.nbytes > 0 and u.ok for u in stats.uploads)
    assert objects(s3) == ["step_00000002.pt"]


def test_resume_from_the_bucket_into_an_empty_local_directory(s3: S3, tmp_path: Path) -> None:
    """A new machine (empty local_dir) lists and loads the published checkpoints, and retention continues from them."""
    with remote(s3, tmp_path, "first", keep_last=2) as ckpt:
        for step in range(3):
            ckpt.save(step, state_at(step))
    with remote(s3, tmp_path, "second", keep_last=2) as ckpt:
        assert [c.step for c in ckpt.checkpoints()] == [1, 2]
        assert os.listdir(tmp_path / "second") == []
        assert trees_equal(ckpt.load(), state_at(2))
        assert trees_equal(ckpt.load(1), state_at(1))
        ckpt.save(3, state_at(3))
    assert published(s3) == ["step_00000002.pt", "step_00000003.pt"]


def test_uploads_coalesce_to_the_newest_when_behind(s3: S3, tmp_path: Path) -> None:
    """While an upload is stuck, waiting checkpoints beyond max_behind are skipped oldest first; keep_best's are not."""
    hold = s3.proxy.add(Fault("hold", lambda r: r.method == "PUT" and "step_00000000.pt" in r.path, times=1))
    options = UploadOptions(part_size=5 << 20, max_behind=2, deadline_s=30, backoff_s=0.01)
    ckpt = remote(s3, tmp_path, storage_options=s3.proxied, upload=options, keep_last=5, keep_best=1, metric="acc")
    try:
        ckpt.save(0, state_at(0), metrics={"acc": 0.1}).result(30)
        assert hold.seen.wait(30)
        for step, acc in ((1, 0.9), (2, 0.2), (3, 0.3), (4, 0.4)):
            ckpt.save(step, state_at(step), metrics={"acc": acc}).result(30)
        hold.release.set()
        ckpt.wait(60)
    finally:
        ckpt.close()
    stats = ckpt.upload_stats
    assert stats is not None
    assert {u.name: u.skipped for u in stats.uploads if u.skipped} == {
        "step_00000002.pt": "coalesced: a newer one waits",
        "step_00000003.pt": "coalesced: a newer one waits",
    }
    # The best (step 1) and the newest (step 4) are never dropped.
    assert published(s3) == ["step_00000000.pt", "step_00000001.pt", "step_00000004.pt"]


@pytest.mark.parametrize("action", ["slowdown", "unavailable", "reset"])
def test_transient_faults_end_in_success(s3: S3, tmp_path: Path, action: str) -> None:
    """503 SlowDown / ServiceUnavailable and connection resets on the upload are retried until it is published."""
    fault = s3.proxy.add(Fault(action, lambda r: r.method == "PUT" and r.path.endswith(".pt"), times=3))
    with remote(s3, tmp_path, storage_options=s3.proxied) as ckpt:
        ckpt.save(0, state_at(0))
        ckpt.wait(60)
    assert fault.hits == 3
    assert published(s3) == ["step_00000000.pt"]
    assert s3.fs().cat_file(f"{BUCKET}/run1/step_00000000.pt") == (tmp_path / "local" / "step_00000000.pt").read_bytes()


def test_a_fault_past_the_deadline_is_raised_and_the_local_copy_kept(s3: S3, tmp_path: Path) -> None:
    """An upload that keeps failing raises CheckpointWriteError (cause kept) at wait(); the previous publish stays
    latest and the local file stays."""
    options = UploadOptions(part_size=5 << 20, deadline_s=0.5, backoff_s=0.01, backoff_max_s=0.05)
    ckpt = remote(s3, tmp_path, storage_options=s3.proxied, upload=options)
    try:
        ckpt.save(0, state_at(0))
        ckpt.wait(30)
        s3.proxy.add(Fault("unavailable", lambda r: r.method == "PUT" and "step_00000001" in r.path))
        ckpt.save(1, state_at(1))
        with pytest.raises(CheckpointWriteError, match="could not upload") as info:
            ckpt.wait(30)
        assert "unable to handle request" in str(info.value.__cause__)
        assert ckpt.latest() == f"{URL}/step_00000000.pt"
        assert (tmp_path / "local" / "step_00000001.pt").is_file()
    finally:
        s3.proxy.clear()
        ckpt.close()


def test_expired_credentials_are_refreshed(s3: S3, tmp_path: Path) -> None:
    """When the store answers ExpiredToken, the credentials provider is called again and the upload succeeds."""
    calls: list[str] = []

    def provider() -> dict[str, str]:
        calls.append("call")
        return {"key": "stale" if len(calls) == 1 else "fresh", "secret": "testing"}

    fault = s3.proxy.add(Fault("expired", lambda r: r.access_key == "stale"))
    options = UploadOptions(part_size=5 << 20, deadline_s=30, backoff_s=0.01, credentials=provider)
    with remote(s3, tmp_path, storage_options=s3.proxied, upload=options) as ckpt:
        ckpt.save(0, state_at(0))
        ckpt.wait(30)
        assert ckpt.remote is not None and ckpt.remote.store.refreshes == 1
    assert fault.hits >= 1 and len(calls) == 2
    assert published(s3) == ["step_00000000.pt"]
    assert {r.access_key for r in s3.proxy.log[-3:]} == {"fresh"}


def test_expired_credentials_without_a_provider_are_raised(s3: S3, tmp_path: Path) -> None:
    """Without a credentials provider, ExpiredToken is not retried: it is raised at once, as a clear error."""
    s3.proxy.add(Fault("expired", lambda r: r.method == "PUT"))
    ckpt = remote(s3, tmp_path, storage_options=s3.proxied)
    try:
        ckpt.save(0, state_at(0))
        with pytest.raises(CheckpointWriteError, match="could not upload"):
            ckpt.wait(30)
    finally:
        ckpt.close()


def test_a_multipart_upload_publishes_the_same_bytes(s3: S3, tmp_path: Path) -> None:
    """A checkpoint larger than two parts goes up in parts, and a load from the URL returns the same tensors."""
    state = {"w": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: 3 parts of 5 MiB
    with remote(s3, tmp_path) as ckpt:
        ckpt.save(0, state)
    parts = [r for r in s3.proxy.log if "partNumber" in r.path]
    assert parts == []  # went straight to moto, not through the proxy
    with remote(s3, tmp_path, "other", storage_options=s3.proxied) as again:
        assert trees_equal(again.load(), state)
    name = "step_00000000.pt"
    assert (tmp_path / "other" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_saving_the_same_step_again_publishes_the_new_bytes(s3: S3, tmp_path: Path) -> None:
    """A second save of a step replaces the published checkpoint: the manifest and object then hold the new state."""
    with remote(s3, tmp_path) as ckpt:
        ckpt.save(0, state_at(0))
        ckpt.wait(30)
        ckpt.save(0, state_at(1))
    assert published(s3) == ["step_00000000.pt"]
    with remote(s3, tmp_path, "other") as again:
        assert trees_equal(again.load(), state_at(1))


def test_a_damaged_object_fails_its_download(s3: S3, tmp_path: Path) -> None:
    """An object whose bytes no longer match its manifest is refused at load, and no file is left under its name."""
    with remote(s3, tmp_path) as ckpt:
        ckpt.save(0, state_at(0))
    key = f"{BUCKET}/run1/step_00000000.pt"
    fs = s3.fs()
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with remote(s3, tmp_path, "other") as again, pytest.raises(RemoteIntegrityError, match="CRC-32"):
        again.load()
    assert not (tmp_path / "other" / "step_00000000.pt").exists()


def test_a_restart_uploads_what_the_previous_run_left_local_only(s3: S3, tmp_path: Path) -> None:
    """A checkpoint durable locally but never published (the run stopped first) is uploaded by the next run."""
    with Checkpointer(tmp_path / "local", fsync=False) as plain:
        plain.save(0, state_at(0))
    with remote(s3, tmp_path) as ckpt:
        ckpt.wait(30)
        assert [c.step for c in ckpt.checkpoints()] == [0]


def test_url_helpers_and_bad_arguments(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """URL detection, the default cache directory, and arguments that only make sense with a URL are refused."""
    assert is_url("s3://b/p") and not is_url("runs/ckpt") and not is_url("/abs/path")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_local_dir("s3://b/p/q") == str(tmp_path / "cache" / "async_ckpt" / "s3" / "b" / "p" / "q")
    with pytest.raises(ValueError, match="apply to a URL directory"):
        Checkpointer(tmp_path / "x", storage_options={"anon": True})
    with pytest.raises(ValueError, match="part_size"):
        UploadOptions(part_size=1024)
    with pytest.raises(ValueError, match="deadline_s"):
        UploadOptions(deadline_s=0)
    with pytest.raises(ValueError, match="names no bucket"):
        RemoteStore("s3://")


def test_a_missing_fsspec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fsspec installed, a URL raises ImportError naming the extra to install (import time stays free)."""
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ImportError, match=r"async-ckpt\[s3\]"):
        RemoteStore("s3://bucket/prefix")


def test_importing_async_ckpt_does_not_import_s3fs() -> None:
    """fsspec and s3fs are imported only when a URL is used."""
    import subprocess

    code = "import sys, async_ckpt, async_ckpt.core.checkpointer; print('s3fs' in sys.modules, 'fsspec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_lists_verifies_and_finds_the_latest_on_a_url(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls/verify/latest on a URL see the published checkpoints, with the exit status of the local case; a damaged
    object fails verify (1) and latest --full skips it; an object without a manifest is named, never listed."""
    from async_ckpt.cli import main

    with remote(s3, tmp_path) as ckpt:
        for step in range(2):
            ckpt.save(step, state_at(step))
    s3.fs().pipe_file(f"{BUCKET}/run1/step_00000009.pt", b"cut off")  # an upload that never got its manifest
    aws_env(s3, monkeypatch)
    capsys.readouterr()
    assert main(["ls", URL, "--json"]) == 0
    out, err = capsys.readouterr()
    rows = __import__("json").loads(out)
    assert [(r["name"], r["step"], r["verified"]) for r in rows] == [
        ("step_00000000.pt", 0, True),
        ("step_00000001.pt", 1, True),
    ]
    assert "step_00000009.pt" in err and "without a manifest" in err
    assert main(["verify", URL]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out
    assert main(["verify", f"{URL}/step_00000001.pt"]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out
    assert main(["latest", URL]) == 0
    assert capsys.readouterr().out.strip() == f"{URL}/step_00000001.pt"

    key = f"{BUCKET}/run1/step_00000001.pt"
    data = bytearray(s3.fs().cat_file(key))
    data[-100] ^= 0xFF
    s3.fs().pipe_file(key, bytes(data))
    assert main(["verify", URL]) == 1
    assert "CRC-32" in capsys.readouterr().out
    assert main(["latest", URL, "--full"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{URL}/step_00000000.pt" and "skipped" in err
    assert main(["latest", f"s3://{BUCKET}/empty"]) == 1
    assert "no published checkpoint" in capsys.readouterr().err
    assert main(["ls", "s3://no-such-bucket/x"]) == 2
    assert main(["ls", URL, "--storage-option", "nonsense"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_remote_tier_for_another_owner(s3: S3, tmp_path: Path) -> None:
    """The tier as an integration (the ignite saver) wires it: submit_unpublished at start, saved_items for its
    retention, evicted() from the pipeline's on_evicted, prune after the next publish, close joins the thread."""
    from async_ckpt.core.uploader import RemoteTier
    from async_ckpt.pipeline.integrity import entry_for, update_manifest
    from async_ckpt.pipeline.storage import FileStorage

    local = tmp_path / "saver"
    local.mkdir()

    def write(name: str, info: dict[str, Any]) -> str:
        path = str(local / name)
        torch.save(state_at(len(name)), path)
        update_manifest(FileStorage(fsync=False), str(local), {name: entry_for(path, info)}, [])
        return path

    first = write("checkpoint_epoch=1.pt", {"reason": "interval", "score": 1})
    write("checkpoint_key_metric=0.5.pt", {"reason": "key_metric", "score": 0.5})
    tier = RemoteTier(URL, storage_options=s3.options, local_dir=local, options=FAST)
    try:
        queued = tier.submit_unpublished(protected=lambda e: e.get("reason") in ("key_metric", "final"))
        assert [os.path.basename(p) for p in queued] == ["checkpoint_epoch=1.pt", "checkpoint_key_metric=0.5.pt"]
        tier.start()
        assert tier.wait(30)
        assert tier.saved_items("interval", "checkpoint") == [(1, "checkpoint_epoch=1.pt")]
        second = write("checkpoint_epoch=2.pt", {"reason": "interval", "score": 2})
        os.unlink(first)
        tier.evicted([first])  # what SavePipeline.on_evicted reports once epoch 2 is durable
        tier.submit(second)
        assert tier.wait(30)
        assert tier.take_errors() == []
    finally:
        tier.close()
    assert published(s3) == ["checkpoint_key_metric=0.5.pt", "checkpoint_epoch=2.pt"]
    assert objects(s3) == ["checkpoint_epoch=2.pt", "checkpoint_key_metric=0.5.pt"]


def test_errors_are_classified_for_retry() -> None:
    """Throttling, 5xx and dropped connections retry; expired credentials refresh; anything else is raised at once,
    also when s3fs wrapped the botocore error in an OSError."""
    from botocore.exceptions import ClientError

    from async_ckpt.pipeline.remote import classify

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    wrapped = OSError("translated by s3fs")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert classify(wrapped) == "transient"
    assert classify(client_error("InternalError", 500)) == "transient"
    assert classify(client_error("ExpiredToken", 400)) == "expired"
    assert classify(ConnectionResetError()) == "transient"
    assert classify(client_error("AccessDenied", 403)) == "permanent"
    assert classify(ValueError("bad")) == "permanent"


def test_close_with_a_timeout_does_not_hang_on_a_stalled_request(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the store never answers: close(timeout) gives up and returns after a bounded wait for the request
    in flight (it used to join the uploader thread without limit), logging that the thread was left behind."""
    import async_ckpt.core.uploader as uploader

    monkeypatch.setattr(uploader, "_ABANDON_JOIN_S", 0.05)
    hold = s3.proxy.add(Fault("hold", lambda r: r.method == "PUT" and "step_00000000.pt" in r.path, times=1))
    ckpt = remote(s3, tmp_path, storage_options=s3.proxied)
    tier = ckpt.remote
    assert tier is not None
    ckpt.save(0, state_at(0))
    ckpt._pipeline.wait(30)  # the local file is durable, its upload queued
    assert hold.seen.wait(30)
    closed: list[bool] = []
    closer = threading.Thread(target=lambda: closed.append(tier.close(timeout=0.05)), name="test-closer")
    try:
        closer.start()
        closer.join(60)  # a liveness bound, not a timing assertion: without the fix it never ends
        assert not closer.is_alive(), "close(timeout) hung on the request in flight"
        assert closed == [False]
        assert "left behind" in caplog.text
    finally:
        hold.release.set()
        s3.proxy.clear()
        closer.join(60)
        ckpt.close()  # joins the uploader once the released request has ended
