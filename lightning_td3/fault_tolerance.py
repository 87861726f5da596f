"""Run-level protection that the CLI adds to every run: atomic checkpoint files."""

from __future__ import annotations

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_td3.checkpointing import AtomicCheckpointIO


class FaultTolerance(pl.Callback):
    """Makes checkpoint writes atomic and loads of damaged checkpoints a clear error."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Only Lightning's default is replaced: a CheckpointIO the user chose stays.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
