"""The replay datamodule: training batches streamed from the replay buffer, evaluation episodes for validation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_td3.checkpointing import arrays_to_tensors, tensors_to_arrays
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import require
from lightning_td3.evaluation import EpisodeSpec
from lightning_td3.replay import ReplayBuffer
from lightning_td3.seeding import stream_rng


class ReplayStream(IterableDataset):
    """An endless stream of uniformly sampled batches; the collector keeps filling the buffer meanwhile.

    Sampling happens when a batch is asked for (the TD3 module pulls it in `training_step`), so every update sees
    the transitions collected just before it and a resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(self, buffer: ReplayBuffer, batch_size: int, rng: np.random.Generator):
        self.buffer = buffer
        self.batch_size = batch_size
        self.rng = rng

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield {key: torch.from_numpy(value) for key, value in self.buffer.sample(self.batch_size, self.rng).items()}


class ReplayDataModule(pl.LightningDataModule):
    """Where the agent's data comes from: `num_envs` training envs feeding a replay buffer, and evaluation episodes.

    Args:
        env: the driving task, shared by the training envs (stepped by the `Collector` callback) and evaluation.
        num_envs: parallel training envs; the buffer keeps one ring per env.
        buffer_capacity: transitions kept in replay (the seed: 1M, about 7.3 KB each).
        batch_size: transitions per TD3 update.
        eval_episodes: episodes per validation run.
        eval_seed: seed of the first evaluation episode; episode i uses eval_seed + i, the same for every policy.
        test_seed: the same for `cli.py test`: held-out seeds, never looked at while tuning on validation.
        pin_memory: page-lock batches for asynchronous host-to-GPU copies (default: when CUDA is available).
    """

    def __init__(
        self,
        env: EnvConfig = EnvConfig(),
        num_envs: int = 1,
        buffer_capacity: int = 1_000_000,
        batch_size: int = 256,
        eval_episodes: int = 10,
        eval_seed: int = 10_000,
        test_seed: int = 20_000,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        for name, value, minimum in (
            ("data.num_envs", num_envs, 1),
            ("data.buffer_capacity", buffer_capacity, 2 * num_envs),
            ("data.batch_size", batch_size, 1),
            ("data.eval_episodes", eval_episodes, 1),
        ):
            require(isinstance(value, int) and value >= minimum, name, f"an integer >= {minimum}", value)
        self.env = env
        self.num_envs = num_envs
        self.buffer_capacity = buffer_capacity
        self.batch_size = batch_size
        self.eval_episodes = eval_episodes
        self.eval_seed = eval_seed
        self.test_seed = test_seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.buffer: ReplayBuffer | None = None
        self._sampler_rng: np.random.Generator | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.buffer is None:
            self.buffer = ReplayBuffer(self.buffer_capacity, self.num_envs, self.env.vector_size)
            self._sampler_rng = stream_rng("replay_sampler", self._rank())

    def train_dataloader(self) -> DataLoader:
        stream = ReplayStream(self.buffer, self.batch_size, self._sampler_rng)
        return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._episodes(self.eval_seed)

    def test_dataloader(self) -> DataLoader:
        return self._episodes(self.test_seed)

    def _episodes(self, first_seed: int) -> DataLoader:
        specs = [EpisodeSpec(env_config=self.env, seed=first_seed + i) for i in range(self.eval_episodes)]
        return DataLoader(specs, batch_size=None)

    def state_dict(self) -> dict:
        if self.buffer is None:
            return {}
        return {
            "buffer": arrays_to_tensors(self.buffer.state_dict()),
            "sampler_rng": self._sampler_rng.bit_generator.state,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict or self.buffer is None:
            return  # validate/test from a training checkpoint: evaluation needs no replay
        self.buffer.load_state_dict(tensors_to_arrays(state_dict["buffer"]))
        self._sampler_rng.bit_generator.state = state_dict["sampler_rng"]

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0
