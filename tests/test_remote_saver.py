"""The ignite/MONAI saver on an S3 URL, against a real S3 API (moto's server on loopback, s3fs as the client): the
bucket gets the names and bytes the same saver writes to a local directory, interval retention prunes the bucket
only after a newer publish, the best-metric and final checkpoints are published, the run ends with everything
published, and a run resumed on an empty machine directory continues the bucket's retention."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _s3server import BUCKET, S3, Fault, s3_fixture, s3_module_fixture  # noqa: F401 - fixtures
from conftest import Training, checkpoint_names, make_training, trees_equal
from ignite.engine import Events
from ignite.handlers import Checkpoint

from async_ckpt import AsyncCheckpointSaver, CheckpointWriteError
from async_ckpt.core.uploader import UploadOptions, wait_durable
from async_ckpt.pipeline.remote import RemoteStore

URL = f"s3://{BUCKET}/run1"
FAST = UploadOptions(part_size=5 << 20, concurrency=2, deadline_s=30, backoff_s=0.01, backoff_max_s=0.05)
ARGS: dict[str, Any] = {
    "save_interval": 1,
    "n_saved": 2,
    "save_final": True,
    "save_key_metric": True,
    "key_metric_name": "acc",
    "fsync": False,
}


def remote_saver(s3: S3, t: Training, local: Path, **kwargs: Any) -> AsyncCheckpointSaver:
    return AsyncCheckpointSaver(
        URL, t.save_dict, storage_options=s3.options, local_dir=str(local), upload=FAST, **ARGS, **kwargs
    )


def published(s3: S3) -> list[str]:
    return sorted(RemoteStore(URL, s3.options).manifests())


def test_the_bucket_gets_the_files_of_the_local_case_and_is_pruned(s3: S3, tmp_path: Path) -> None:
    """Same run on two identical engines, one saver local, one on the URL: the bucket publishes exactly the local
    saver's file names, with the same bytes as its own local staging copies and the same tensors as the local run;
    epochs 1-2 were published and then pruned from the bucket (n_saved=2) once newer ones were published."""
    ours, ref = make_training(), make_training()
    remote = remote_saver(s3, ours, tmp_path / "staging")
    remote.attach(ours.engine)
    # Publish each epoch before the next one starts, so that retention has published files to prune (a tier that
    # falls behind skips a file the local retention evicted first, which would leave nothing to prune).
    ours.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: remote.wait())
    local = AsyncCheckpointSaver(str(tmp_path / "plain"), ref.save_dict, **ARGS)
    local.attach(ref.engine)
    with remote, local:
        ours.engine.run(ours.data, max_epochs=4)  # returns once every checkpoint is durable and published
        ref.engine.run(ref.data, max_epochs=4)
        names = checkpoint_names(tmp_path / "plain")
        assert published(s3) == names
        assert checkpoint_names(tmp_path / "staging") == names
        assert "checkpoint_epoch=1.pt" not in names and "checkpoint_epoch=4.pt" in names
    fs = s3.fs()
    for name in names:
        body = fs.cat_file(f"{BUCKET}/run1/{name}")
        assert body == (tmp_path / "staging" / name).read_bytes()
        mine = torch.load(tmp_path / "staging" / name, weights_only=True)
        theirs = torch.load(tmp_path / "plain" / name, weights_only=True)
        assert trees_equal(mine, theirs), name
    uploads = remote.remote.stats.uploads if remote.remote is not None else []
    assert {u.name for u in uploads if u.ok} >= {"checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"}


def test_a_run_resumed_on_an_empty_directory_continues_the_buckets_retention(s3: S3, tmp_path: Path) -> None:
    """A second machine (empty local directory) loads the newest published checkpoint, resumes with resume=True and
    keeps pruning the bucket: the first run's epochs leave it once the resumed run's newer epochs are published."""
    first = make_training()
    with remote_saver(s3, first, tmp_path / "machine1") as saver:
        saver.attach(first.engine)
        first.engine.run(first.data, max_epochs=2)
    assert "checkpoint_epoch=2.pt" in published(s3)

    second = make_training(seed=1)
    staging = tmp_path / "machine2"
    store = RemoteStore(URL, s3.options)
    os.makedirs(staging)
    path = str(staging / "resume.pt")
    with open(path, "wb") as f:
        f.write(store.fs.cat_file(f"{BUCKET}/run1/checkpoint_epoch=2.pt"))
    Checkpoint.load_objects(to_load={**second.save_dict}, checkpoint=path)
    os.unlink(path)
    assert trees_equal(second.net.state_dict(), first.net.state_dict())
    with remote_saver(s3, second, staging, resume=True) as saver:
        saver.attach(second.engine)
        second.engine.state.max_epochs = None
        second.engine.run(second.data, max_epochs=4)
    kept = published(s3)
    assert "checkpoint_epoch=1.pt" not in kept and "checkpoint_epoch=2.pt" not in kept
    assert {"checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"} <= set(kept)


def test_an_upload_failure_is_raised_at_the_next_checkpoint_event(s3: S3, tmp_path: Path) -> None:
    """An upload that keeps failing past its deadline is raised on the training thread at the next checkpoint event
    (as a write failure is), with its cause, and the local file stays; the saver is not left with it unreported."""
    t = make_training()
    options = UploadOptions(part_size=5 << 20, deadline_s=0.5, backoff_s=0.01, backoff_max_s=0.05)
    saver = AsyncCheckpointSaver(
        URL,
        t.save_dict,
        storage_options=s3.proxied,
        local_dir=str(tmp_path / "staging"),
        upload=options,
        save_interval=1,
        fsync=False,
    )
    saver.attach(t.engine)
    assert saver.remote is not None
    tier = saver.remote
    # Each epoch's file is durable and its upload over (failed) before the next epoch's checkpoint event.
    t.engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: wait_durable(saver._pipeline.wait, tier, 30))
    epoch1 = ("checkpoint_epoch=1.pt", "checkpoint_epoch%3D1.pt")  # the key, as sent or percent-encoded
    s3.proxy.add(Fault("unavailable", lambda r: r.method == "PUT" and any(k in r.path for k in epoch1)))
    try:
        with pytest.raises(CheckpointWriteError, match="could not upload") as info:
            t.engine.run(t.data, max_epochs=3)
        assert "unable to handle request" in str(info.value.__cause__)
        assert t.engine.state.epoch == 2  # raised at epoch 2's event, not at the end of the run
        assert (tmp_path / "staging" / "checkpoint_epoch=1.pt").is_file()
    finally:
        s3.proxy.clear()
        saver.close()
