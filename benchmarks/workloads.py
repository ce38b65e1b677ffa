"""Workloads of the benchmarks: the model, its optimizer and data, the training step, and state sampling.

Every benchmark trains the same MLP with a fused Adam optimizer, sized so that parameters plus Adam's ``exp_avg`` and
``exp_avg_sq`` come to a requested number of MiB, with a compute-bound step (a fixed loop of matrix products whose
count does not depend on the state size). :func:`lightning_module` wraps the same model for a ``lightning.Trainer``.
The sampling helpers take a strided sample of every tensor at a checkpoint event, so that a file can later be
checked bit for bit against the state it should hold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from benchmarks.common import MiB, describe_machine, machine_info, median


class Workload:
    """An MLP whose parameters plus Adam's ``exp_avg``/``exp_avg_sq`` hold about ``size_mib`` MiB, and its step.

    The step runs a fixed matmul loop (``compute_iters`` products of 256x1024 by 1024x1024, the same for every
    size) and a forward/backward of a batch of 8 through the big layers, then a fused ``Adam.step``.
    """

    def __init__(self, size_mib: float, compute_iters: int, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        target = size_mib * MiB
        width, layers = 256, 1
        for w in (256, 512, 1024, 2048, 4096):
            n = round(target / (12 * (w * w + w)))
            if n >= 4 or w == 256:
                width, layers = w, max(1, n)
        mods: list[torch.nn.Module] = []
        for i in range(layers):
            mods.append(torch.nn.Linear(width, width))
            if i < layers - 1:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        try:  # fused: one pass over the state, so the step stays compute-bound rather than optimizer-bound
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True)
            self.optimizer_kind = "fused Adam"
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
            self.optimizer_kind = "Adam"
        self.width, self.layers = width, layers
        self.x = torch.randn(8, width)
        self.compute_iters = compute_iters
        self._a = torch.randn(256, 1024)
        self._b = torch.randn(1024, 1024) / 32
        self._c = torch.empty(256, 1024)
        self.step()  # materialize Adam's state so every checkpoint has its full size
        self.state_bytes = sum(t.numel() * t.element_size() for t in state_tensors(self.state_dicts()))

    def compute(self) -> None:
        """The fixed matmul loop of a step: the same work at every state size."""
        import torch

        with torch.no_grad():
            for _ in range(self.compute_iters):
                torch.mm(self._a, self._b, out=self._c)

    def loss(self) -> Any:
        """The forward pass of the fixed batch through the model, as a scalar loss."""
        return self.model(self.x).pow(2).mean()

    def step(self, engine: Any = None, batch: Any = None) -> float:
        """One training step (compute, forward, backward, ``Adam.step``); also an ignite ``Engine`` process function."""
        self.compute()
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def save_dict(self) -> dict[str, Any]:
        """The objects a checkpoint holds, by name (as MONAI's and ignite's savers take them)."""
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's ``state_dict()``, the pair the sampling helpers take."""
        return self.model.state_dict(), self.optimizer.state_dict()

    def describe(self) -> str:
        """One line for the report: layers, width, batch, optimizer, compute per step."""
        return (
            f"MLP {self.layers}x{self.width}x{self.width}, batch 8, {self.optimizer_kind}, "
            f"{self.compute_iters} fixed matmuls/step"
        )


def calibrate_compute_iters(compute_ms: float) -> tuple[int, float]:
    """How many fixed 256x1024x1024 matmuls take about ``compute_ms`` on this machine now."""
    import torch

    a, b, c = torch.randn(256, 1024), torch.randn(1024, 1024), torch.empty(256, 1024)
    for _ in range(5):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b, out=c)
        times.append((time.perf_counter() - t0) / 5)
    per = median(times)
    return max(0, round(compute_ms / 1e3 / per)), per


# -- state sampling for the correctness check ---------------------------------------------------------------------
def state_tensors(dicts: tuple[dict[str, Any], dict[str, Any]]) -> list[Any]:
    """The tensors of (model state_dict, optimizer state_dict) in a fixed order."""
    import torch

    model_sd, optim_sd = dicts
    out = [t for _, t in sorted(model_sd.items())]
    for idx in sorted(optim_sd["state"]):
        entry = optim_sd["state"][idx]
        out.extend(entry[k] for k in sorted(entry) if isinstance(entry[k], torch.Tensor))
    return out


def sample_state(dicts: tuple[dict[str, Any], dict[str, Any]], per_tensor: int = 2048) -> list[Any]:
    """A strided sample (about ``per_tensor`` elements) of every tensor, cloned: cheap, but a torn copy shows."""
    out = []
    for t in state_tensors(dicts):
        flat = t.detach().reshape(-1)
        out.append(flat[:: max(1, flat.numel() // per_tensor)].clone())
    return out


def same_samples(expected: list[Any], got: list[Any]) -> bool:
    """Bitwise equality of two sample lists (NaN-safe)."""
    import torch

    if len(expected) != len(got):
        return False
    for a, b in zip(expected, got, strict=True):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            return False
    return True


def lightning_module(wl: Workload) -> Any:
    """A ``LightningModule`` that trains ``wl``'s model and optimizer with the same step as :meth:`Workload.step`.

    ``training_step`` runs the fixed matmul loop and returns the loss of the forward pass on ``wl.x``; Lightning
    does ``zero_grad``, ``backward`` and ``optimizer.step`` (automatic optimization), so the work per step matches
    the plain loop's. The batch is ignored: the data is :func:`index_loader`'s indices.
    """
    import lightning.pytorch as pl

    class MLPModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = wl.model
            self.on_batch_end: Any = None  # set by the runner: the end of its step clock

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            wl.compute()
            return wl.loss()

        def configure_optimizers(self) -> Any:
            return wl.optimizer

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            # Lightning calls the module's hook after every callback's, so this is the end of the whole step.
            if self.on_batch_end is not None:
                self.on_batch_end()

    return MLPModule()


def index_loader(steps: int) -> Any:
    """A ``DataLoader`` of ``steps`` one-element batches (their content is ignored by the module)."""
    import torch

    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(steps)), batch_size=1)


def prepare_run(args: argparse.Namespace, prefix: str) -> tuple[str, str, dict[str, Any], int, float]:
    """Set up a benchmark run from its options (``out``, ``ckpt_dir``, ``compute_iters``, ``compute_ms``): make the
    results directory and a checkpoint directory of this run alone (removed at the end by the caller), print the
    machine, and calibrate the fixed compute per step.

    Returns:
        (results directory, checkpoint directory, machine info, matmuls per step, seconds per matmul or NaN).
    """
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ckpt_parent = os.path.abspath(args.ckpt_dir or os.path.join(out, "ckpt-tmp"))
    os.makedirs(ckpt_parent, exist_ok=True)
    ckpt_root = tempfile.mkdtemp(prefix=f"{prefix}-", dir=ckpt_parent)
    info = machine_info(ckpt_root)
    print("## Machine\n")
    print(describe_machine(info), flush=True)
    if args.compute_iters is not None:
        return out, ckpt_root, info, args.compute_iters, float("nan")
    compute_iters, per = calibrate_compute_iters(args.compute_ms)
    return out, ckpt_root, info, compute_iters, per
