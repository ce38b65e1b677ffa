"""``AsyncCheckpointSaver`` as a handler of a MONAI bundle-style config, parsed by ``monai.bundle.ConfigParser``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trees_equal
from ignite.engine import Events
from ignite.handlers import Checkpoint

from async_ckpt import AsyncCheckpointSaver
from async_ckpt.pipeline.integrity import MANIFEST_NAME

bundle = pytest.importorskip("monai.bundle", reason="monai.bundle is not available")
engines = pytest.importorskip("monai.engines", reason="monai.engines is not available")
if not hasattr(engines, "SupervisedTrainer"):  # pragma: no cover - present in every supported MONAI
    pytest.skip("monai.engines.SupervisedTrainer is not available", allow_module_level=True)


def make_config(save_dir: Path, saver_target: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A bundle-style training config: network, optimizer, data, a SupervisedTrainer and one checkpoint handler."""
    return {
        "ckpt_dir": str(save_dir),
        "network": {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.01},
        "loss": {"_target_": "torch.nn.MSELoss"},
        "train_data": "$[{'image': torch.arange(4.0) * i, 'label': torch.ones(2) * (i % 2)} for i in range(6)]",
        "dataloader": {
            "_target_": "monai.data.DataLoader",
            "dataset": "@train_data",
            "batch_size": 2,
            "shuffle": False,
            "num_workers": 0,
        },
        "handlers": [
            {
                "_target_": saver_target,
                "save_dir": "@ckpt_dir",
                "save_dict": {"net": "@network", "opt": "@optimizer"},
                "save_final": True,
                "save_interval": 1,
                "n_saved": 2,
                "save_key_metric": True,
                "key_metric_negative_sign": True,
                **extra,
            }
        ],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "device": "cpu",
            "max_epochs": 3,
            "train_data_loader": "@dataloader",
            "network": "@network",
            "optimizer": "@optimizer",
            "loss_function": "@loss",
            "key_train_metric": {
                "train_mse": {
                    "_target_": "monai.handlers.MeanSquaredError",
                    "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                }
            },
            "train_handlers": "@handlers",
        },
    }


def run_config(config: dict[str, Any]) -> tuple[Any, Any]:
    """Parse and run the config from a fixed seed; return the trainer and the handler instance it used."""
    torch.manual_seed(0)
    parser = bundle.ConfigParser(config)
    trainer = parser.get_parsed_content("trainer")
    handler = parser.get_parsed_content("handlers#0")
    try:
        trainer.run()
    finally:
        if isinstance(handler, AsyncCheckpointSaver):
            handler.close()
    return trainer, handler


def checkpoint_files(path: Path) -> dict[str, Any]:
    return {n: torch.load(path / n, weights_only=True) for n in sorted(os.listdir(path)) if n != MANIFEST_NAME}


def test_bundle_config_runs_async_saver(tmp_path: Path) -> None:
    """A ConfigParser-built SupervisedTrainer with our saver as a handler leaves loadable, MONAI-named checkpoints."""
    save_dir = tmp_path / "ours" / "models"
    trainer, saver = run_config(make_config(save_dir, "async_ckpt.AsyncCheckpointSaver", {"max_pending": 1}))
    assert isinstance(saver, AsyncCheckpointSaver)
    # The handler instance the config gave the trainer is the one we closed.
    completed = [h for h, *_ in trainer._event_handlers[Events.COMPLETED]]
    assert any(getattr(h, "__self__", None) is saver for h in completed)
    assert trainer.state.epoch == 3
    assert trainer.state.key_metric_name == "train_mse"

    files = checkpoint_files(save_dir)
    names = sorted(files)
    assert names[:3] == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "checkpoint_final_iteration=9.pt"]
    assert len(names) == 4
    assert re.fullmatch(r"checkpoint_key_metric=-\d+\.\d{4}\.pt", names[3])
    # The final checkpoint holds the trained weights and loads into fresh objects through ignite.
    net = trainer.network
    assert trees_equal(files["checkpoint_final_iteration=9.pt"]["net"], net.state_dict())
    fresh = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    Checkpoint.load_objects({"net": fresh, "opt": fresh_opt}, str(save_dir / "checkpoint_final_iteration=9.pt"))
    assert trees_equal(fresh.state_dict(), net.state_dict())
    assert trees_equal(fresh_opt.state_dict(), trainer.optimizer.state_dict())


def test_bundle_config_matches_monai_saver(tmp_path: Path) -> None:
    """Swapping MONAI's CheckpointSaver for ours in the same bundle config leaves the same files and contents."""
    run_config(make_config(tmp_path / "monai", "CheckpointSaver", {}))
    run_config(make_config(tmp_path / "ours", "async_ckpt.AsyncCheckpointSaver", {}))
    ref = checkpoint_files(tmp_path / "monai")
    ours = checkpoint_files(tmp_path / "ours")
    assert sorted(ours) == sorted(ref)
    assert len(ref) == 4
    for name in ref:
        assert trees_equal(ours[name], ref[name]), name
