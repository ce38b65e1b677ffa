"""A Lightning run for the SIGKILL test: ``python tests/_lightning_worker.py DIR DURABLE``.

It trains a tiny model with ``AsyncCheckpointIO`` and a checkpoint at every step (top 2 by loss, and
``last.ckpt``). After ``DURABLE`` checkpoints are durable, the next one is held after its bytes are written and before
its rename; the worker prints ``HELD <name>`` and waits there until it is killed.
"""

from __future__ import annotations

import os
import sys
import threading

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from async_ckpt.lightning import AsyncCheckpointIO
from async_ckpt.pipeline.storage import FileStorage


class Tiny(LightningModule):
    """A linear layer trained to output zeros, logging its loss as ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[torch.Tensor]:
        data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(list(data), batch_size=2)


class HoldBeforeRename(FileStorage):
    """Renames ``durable`` checkpoint files into place, then holds the next one before its rename."""

    def __init__(self, durable: int) -> None:
        super().__init__(fsync=True)
        self.left = durable

    def _replace(self, src: str, dst: str) -> None:
        if dst.endswith(".ckpt"):
            if self.left == 0:
                print(f"HELD {os.path.basename(dst)}", flush=True)
                threading.Event().wait()
            self.left -= 1
        super()._replace(src, dst)


def main() -> None:
    directory, durable = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    trainer = Trainer(
        max_steps=10_000,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=directory, save_top_k=2, monitor="loss", save_last=True, every_n_train_steps=1)
        ],
        plugins=[AsyncCheckpointIO(storage=HoldBeforeRename(durable))],
    )
    trainer.fit(Tiny())


if __name__ == "__main__":
    main()
