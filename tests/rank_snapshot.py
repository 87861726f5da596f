"""A test probe for DDP runs: every process writes what it holds, so a test can compare the processes."""

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

NETWORKS = ("actor", "critic", "actor_target", "critic_target")


def _weights(module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in NETWORKS
        for key, value in getattr(module, name).state_dict().items()
    }


class RankSnapshot(pl.Callback):
    """Writes `rank<r>.pt` into `dirpath` at the end of fit: weights before the first and after the last update,
    this process's counters, the run totals, a replay sample and the evaluation seeds this process ran."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.initial: dict[str, torch.Tensor] = {}
        self.eval_seeds: list[int] = []

    def on_train_start(self, trainer, module) -> None:
        self.initial = _weights(module)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.eval_seeds.append(batch.seed)

    def on_train_end(self, trainer, module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        replay_sample = trainer.datamodule.buffer.sample(8, np.random.default_rng(0))["vector"]
        torch.save(
            {
                "world_size": trainer.world_size,
                "initial": self.initial,
                "final": _weights(module),
                "env_steps": module.env_steps,
                "episodes": module.episodes,
                "updates": module.updates,
                "run_env_steps": module.run_env_steps,
                "run_episodes": module.run_episodes,
                "replay_sample": torch.from_numpy(replay_sample),
                "eval_seeds": self.eval_seeds,
            },
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )
