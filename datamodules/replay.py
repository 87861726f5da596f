"""The replay datamodule: training batches streamed from the replay buffer, evaluation episodes for validation."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, IterableDataset

from lightning_td3.device_replay import DeviceReplay, device_replay_for
from lightning_td3.envs import EnvConfig
from lightning_td3.envs.carla_servers import ring_servers, training_envs
from lightning_td3.errors import CheckpointError, require
from lightning_td3.evaluation import EpisodeSpec
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import load_shard, save_shard, shard_name, shards_of_rank
from lightning_td3.seeding import stream_rng


class ReplayStream(IterableDataset):
    """An endless stream of uniformly sampled batches; the collector keeps filling the buffer meanwhile.

    Sampling happens when a batch is asked for (the TD3 module pulls it in `training_step`), so every update sees
    the transitions collected just before it and a resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(self, buffer: ReplayBuffer | DeviceReplay, batch_size: int, rng: np.random.Generator):
        self.buffer = buffer
        self.batch_size = batch_size
        self.rng = rng

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield {key: torch.as_tensor(value) for key, value in self.buffer.sample(self.batch_size, self.rng).items()}


class ReplayLoader(DataLoader):
    """The replay stream's loader. It has no position to resume: each batch is drawn afresh by the sampler's RNG,
    which is saved with the buffer in the replay file. Its state is therefore empty, and saying so keeps Lightning
    from warning at every mid-epoch resume that the loader cannot resume."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ReplayDataModule(pl.LightningDataModule):
    """Where the agent's data comes from: `num_envs` training envs feeding a replay buffer, and evaluation episodes.

    Args:
        env: the driving task, shared by the training envs (stepped by the `Collector` callback) and evaluation.
        num_envs: parallel training envs (per process under DDP); the buffer keeps one ring per env.
        buffer_capacity: transitions kept in replay (the seed: 1M, about 7.3 KB each); per process under DDP.
        batch_size: transitions per TD3 update.
        n_step: env steps each sampled transition spans (n-step returns): its target sums the discounted rewards of
            up to `n_step` steps of one episode and bootstraps from the observation after them. 1 is TD3's target.
        eval_episodes: episodes per validation run, shared out among the DDP processes (each seed runs once).
        eval_seed: seed of the first evaluation episode; episode i uses eval_seed + i, the same for every policy.
        test_seed: the same for `cli.py test`: held-out seeds, never looked at while tuning on validation.
        pin_memory: page-lock batches for asynchronous host-to-GPU copies (default: when CUDA is available).
        sample_on_device: keep a copy of the replay on the training device and gather batches there: only the
            sampled places cross to the GPU, not 14 MB of pixels per batch of 256. The batches are the same as
            without; the copy takes the buffer's size again in device memory (about 7.3 GB for 1M transitions),
            allocated at setup, before any env runs. On a CPU it would only double the replay's memory: refused there.
            None: on a CUDA device where the copy takes at most half of its free memory (logged).
        replay_files_kept: replay files each rank keeps besides its newest, those of the states checkpointed
            before it: a kill while the newest state's checkpoints are written leaves `last.ckpt` pointing at the one
            before. Replay is saved in its own file per rank (`replay/` next to the checkpoints); a checkpoint whose
            replay file was pruned still validates and tests, but cannot resume training.
    """

    def __init__(
        self,
        env: EnvConfig = EnvConfig(),
        num_envs: int = 1,
        buffer_capacity: int = 1_000_000,
        batch_size: int = 256,
        n_step: int = 1,
        eval_episodes: int = 10,
        eval_seed: int = 10_000,
        test_seed: int = 20_000,
        pin_memory: bool | None = None,
        sample_on_device: bool | None = None,
        replay_files_kept: int = 1,
    ):
        super().__init__()
        for name, value, minimum in (
            ("data.num_envs", num_envs, 1),
            ("data.buffer_capacity", buffer_capacity, 2 * num_envs),
            ("data.batch_size", batch_size, 1),
            ("data.n_step", n_step, 1),
            ("data.eval_episodes", eval_episodes, 1),
            ("data.replay_files_kept", replay_files_kept, 1),
        ):
            require(isinstance(value, int) and value >= minimum, name, f"an integer >= {minimum}", value)
        self.env = env
        self.num_envs = num_envs
        self.buffer_capacity = buffer_capacity
        self.batch_size = batch_size
        self.n_step = n_step
        self.eval_episodes = eval_episodes
        self.eval_seed = eval_seed
        self.test_seed = test_seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.sample_on_device = sample_on_device
        self.replay_files_kept = replay_files_kept
        # This process's training envs, one replay ring each (CARLA: its slice of env.carla.servers), set up by
        # `setup`, and those of them that run (CARLA: whose server answers; the Collector drops those that die).
        self.env_configs: list[EnvConfig] | None = None
        self.live_envs: list[int] = []
        self.buffer: ReplayBuffer | None = None
        self.device_replay: DeviceReplay | None = None  # the buffer's copy on the device (data.sample_on_device)
        self._sampler_rng: np.random.Generator | None = None
        self._replay_session = time.strftime("%Y%m%d-%H%M%S-") + f"{time.time_ns() // 1_000_000 % 1000:03d}"
        self._replay_saves = 0
        self._saved_replay: tuple | None = None  # (fingerprint, key) of the last shard this rank wrote

    def setup(self, stage: str) -> None:
        world_size = self._world_size()
        require(
            self.eval_episodes >= world_size, "data.eval_episodes",
            f">= the number of processes ({world_size}), so that every process evaluates", self.eval_episodes,
        )
        if self.env_configs is None:
            self.env_configs, self.live_envs = training_envs(self.env, self.num_envs, self._rank(), world_size)
        if stage == "fit" and self.buffer is None:
            self.buffer = ReplayBuffer(
                self.buffer_capacity, len(self.env_configs), self.env.vector_size, n_step=self.n_step
            )
            self._sampler_rng = stream_rng("replay_sampler", self._rank())
            self.device_replay = device_replay_for(self.buffer, self._device(), self.sample_on_device)

    def train_dataloader(self) -> DataLoader:
        on_device = self.device_replay is not None
        stream = ReplayStream(self.device_replay if on_device else self.buffer, self.batch_size, self._sampler_rng)
        # Batches gathered on the device have nothing to pin. Each loader has its own generator: making an iterator
        # draws a seed, from torch's global RNG otherwise, and a run resumed from a stop during an evaluation makes
        # them a different number of times than an uninterrupted run (the updates' noise must not depend on that).
        return ReplayLoader(
            stream, batch_size=None, num_workers=0, pin_memory=self.pin_memory and not on_device,
            generator=torch.Generator(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._episodes(self.eval_seed)

    def test_dataloader(self) -> DataLoader:
        return self._episodes(self.test_seed)

    def _episodes(self, first_seed: int) -> DataLoader:
        # Evaluated on this process's first live training server (CARLA), whose world the training envs leave to it
        # meanwhile (`envs.carla_servers.evaluation_shares_world`); the same task, so the same seeds either way.
        env_config = self.env_configs[self.live_envs[0] if self.live_envs else 0]
        specs = [EpisodeSpec(env_config=env_config, seed=first_seed + i) for i in range(self.eval_episodes)]
        # Process r runs episodes r, r + world_size, ...: every seed exactly once (Lightning's default
        # DistributedSampler would repeat some to even out the shares).
        sampler = UnrepeatedDistributedSampler(specs, num_replicas=self._world_size(), rank=self._rank(), shuffle=False)
        return DataLoader(specs, batch_size=None, sampler=sampler, generator=torch.Generator())

    # --- checkpointing: the replay goes to its own file per rank; the checkpoint records which ----------------------

    def state_dict(self) -> dict:
        """Runs on every rank with every checkpoint: writes this rank's replay shard, returns where it lies."""
        if self.buffer is None:
            return {}
        rank, world_size = self._rank(), self._world_size()
        fingerprint = (self.buffer.changes, str(self._sampler_rng.bit_generator.state))
        # Rank 0 names the shards, so all ranks' files of one checkpoint share a key. Two checkpoints of one state
        # (an epoch's and last.ckpt) share one file.
        unchanged = self._saved_replay is not None and self._saved_replay[0] == fingerprint
        if not unchanged:
            self._replay_saves += 1
        key = self.trainer.strategy.broadcast(f"{self._replay_session}-{self._replay_saves:05d}", src=0)
        directory = self.replay_dir()
        path = directory / shard_name(key, rank, world_size)
        if self._saved_replay != (fingerprint, key) or not path.exists():
            save_shard(path, self.buffer, key, rank, world_size, {
                "sampler_rng": self._sampler_rng.bit_generator.state,
                "ring_servers": self._ring_servers(),  # which server filled each ring: a resume must keep that
                "live_envs": list(self.live_envs),
            })
            self._saved_replay = (fingerprint, key)
            # Pruned before this state's checkpoints are on disk: the file the current last.ckpt names must stay.
            for stale in shards_of_rank(directory, rank, world_size)[: -(self.replay_files_kept + 1)]:
                stale.unlink(missing_ok=True)
        return {"replay_file": {"key": key, "world_size": world_size, "directory": str(directory)}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict or self.buffer is None:
            return  # validate/test from a training checkpoint: evaluation needs no replay
        record = state_dict.get("replay_file")
        if record is None:
            raise CheckpointError("this checkpoint records no replay file; it cannot resume training")
        rank, world_size = self._rank(), self._world_size()
        if record["world_size"] != world_size:
            raise CheckpointError(
                f"the checkpoint's replay was saved by {record['world_size']} rank(s), this run has {world_size}; "
                "resume with the same number of devices"
            )
        name = shard_name(record["key"], rank, world_size)
        # Next to the checkpoint first (a run directory may have been moved), else where it was written.
        candidates = [Path(record["directory"]) / name]
        if self.trainer is not None and self.trainer.ckpt_path:
            candidates.insert(0, Path(self.trainer.ckpt_path).parent / "replay" / name)
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            directories = list(dict.fromkeys(candidate.parent for candidate in candidates))
            # Keys (the session's start time, then a save count) sort as they were written: a newer file of this rank
            # means this one was pruned, none means it was lost.
            if any(shard.name > name for d in directories for shard in shards_of_rank(d, rank, world_size)):
                raise CheckpointError(
                    f"replay file {candidates[-1]} is missing: only the newest replay file and data.replay_files_kept="
                    f"{self.replay_files_kept} before it are kept, so older checkpoints validate and test but "
                    "cannot resume; resume from a newer one (e.g. last.ckpt beside it)"
                )
            raise CheckpointError(
                f"replay file {name} of this checkpoint is missing from {' and '.join(map(str, directories))}: a "
                "checkpoint resumes training only with the replay/ folder written beside it; keep or copy replay/ "
                "together with the checkpoint (validate and test need no replay)"
            )
        extra = load_shard(path, self.buffer, record["key"], rank, world_size)
        saved_servers = extra.get("ring_servers")  # absent from shards written before servers were recorded
        if saved_servers is not None and saved_servers != self._ring_servers():
            raise CheckpointError(
                f"process {rank}'s replay rings were filled from the CARLA servers {saved_servers}, and "
                f"data.env.carla.servers now gives it {self._ring_servers()}; resume with the same server list (a dead "
                "server may stay in it: it is left out with a warning)"
            )
        self._sampler_rng.bit_generator.state = extra["sampler_rng"]
        saved_live = extra.get("live_envs")
        if saved_live is not None and saved_live != self.live_envs:
            servers = self._ring_servers()
            warnings.warn(
                f"process {rank} resumes with the CARLA servers {[servers[i] for i in self.live_envs]} live; at the "
                f"checkpoint {[servers[i] for i in saved_live]} were (each ring stays with its server)", stacklevel=2
            )

    def replay_dir(self) -> Path:
        """`replay/` beside the checkpoints (the ModelCheckpoint's directory), else under the trainer's root dir."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / "replay"
        return Path(self.trainer.default_root_dir) / "replay"

    def _ring_servers(self) -> list[str] | None:
        """`carla_servers.ring_servers` of this process's training envs."""
        return ring_servers(self.env, self.env_configs)

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
