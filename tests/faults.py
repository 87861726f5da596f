"""Test doubles that inject faults: a highway backend failing as a dying CARLA server would, stop signals, NaNs."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from lightning_td3.envs import carla_backend, contract
from lightning_td3.envs.config import EnvConfig
from lightning_td3.envs.contract import DrivingEnv
from lightning_td3.envs.highway_backend import HighwayBackend
from lightning_td3.replay import ReplayBuffer
from tests.test_carla_backend import FakeCarlaClient, FakeCarlaWorld

SIMULATOR_TIMEOUT = "time-out of 10000ms while waiting for the simulator (raised by the CrashingBackend test double)"


@dataclass
class FaultPlan:
    """Which backend calls fail, counted over all backends of the process (calls are numbered from 1).

    crash_steps / crash_resets: the step / reset calls that raise; crash_from_step: every step call from this one
    on raises, and so does every reset after it (a simulator that is gone for good); step_crash_rate: each
    step raises with this probability (drawn from `seed`).
    """

    crash_steps: set[int] = field(default_factory=set)
    crash_resets: set[int] = field(default_factory=set)
    crash_from_step: int | None = None
    step_crash_rate: float = 0.0
    seed: int = 0
    steps: int = 0
    resets: int = 0
    crashes: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def step(self) -> None:
        self.steps += 1
        gone = self.crash_from_step is not None and self.steps >= self.crash_from_step
        if self.steps in self.crash_steps or gone or self._rng.random() < self.step_crash_rate:
            self._crash()

    def reset(self) -> None:
        self.resets += 1
        gone = self.crash_from_step is not None and self.steps >= self.crash_from_step
        if self.resets in self.crash_resets or gone:
            self._crash()

    def _crash(self) -> None:
        self.crashes += 1
        raise RuntimeError(SIMULATOR_TIMEOUT)


class CrashingBackend(HighwayBackend):
    """Test double: the real highway backend, except that the calls its `FaultPlan` names raise."""

    def __init__(self, config, plan: FaultPlan):
        super().__init__(config)
        self.plan = plan

    def reset(self, seed: int) -> None:
        self.plan.reset()
        super().reset(seed)

    def step(self, steer: float, throttle_brake: float) -> None:
        self.plan.step()
        super().step(steer, throttle_brake)


def install(monkeypatch, plan: FaultPlan) -> FaultPlan:
    """Every DrivingEnv built from now on (in this process) gets a CrashingBackend following `plan`."""
    monkeypatch.setattr("lightning_td3.envs.contract.make_backend", lambda config: CrashingBackend(config, plan))
    return plan


class RandomStops(pl.Callback):
    """Test double of an operator: after a training batch, with probability `rate`, sends this process SIGTERM."""

    def __init__(self, rate: float = 0.0, seed: int = 0):
        self.rate = rate
        self.rng = np.random.default_rng(seed)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.rng.random() < self.rate:
            signal.raise_signal(signal.SIGTERM)


@dataclass
class PoisonedBatches:
    """Replaces a sampled batch's first reward by NaN with probability `rate`, as a corrupted observation would."""

    rate: float
    seed: int = 0
    poisoned: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def install(self, monkeypatch) -> PoisonedBatches:
        sample = ReplayBuffer.sample

        def poisoned_sample(buffer, batch_size, rng):
            batch = sample(buffer, batch_size, rng)
            if self._rng.random() < self.rate:
                batch["reward"][0] = np.nan
                self.poisoned += 1
            return batch

        monkeypatch.setattr(ReplayBuffer, "sample", poisoned_sample)
        return self


class CrashOnRank(pl.Callback):
    """Test double for a DDP run started as a real command: on process `rank` only, every env built from setup on
    gets a CrashingBackend whose simulator is gone for good from backend step `crash_from_step` (of that process)."""

    def __init__(self, rank: int, crash_from_step: int):
        self.rank = rank
        self.crash_from_step = crash_from_step

    def setup(self, trainer, module, stage: str) -> None:
        if trainer.global_rank == self.rank:
            plan = FaultPlan(crash_from_step=self.crash_from_step)
            contract.make_backend = lambda config: CrashingBackend(config, plan)


class DyingCarlaWorld(FakeCarlaWorld):
    """Server-side test double: the fixture world of one CARLA server, whose ticks time out once it is killed
    (by `kill`, or at its tick number `dies_at_tick`), or just once (`time_out_next_tick`)."""

    def __init__(self, dies_at_tick: int | None = None):
        super().__init__()
        self.killed = False
        self.dies_at_tick = dies_at_tick
        self._time_outs = 0

    def time_out_next_tick(self) -> None:
        self._time_outs += 1

    def tick(self, seconds: float = 10.0) -> int:
        if self.dies_at_tick is not None and self.ticks + 1 >= self.dies_at_tick:
            self.killed = True
        if self.killed or self._time_outs:
            self._time_outs = max(self._time_outs - 1, 0)
            raise RuntimeError(f"time-out of {seconds * 1000:.0f}ms while waiting for the simulator")
        return super().tick(seconds)


class DyingCarlaServers:
    """Server-side test double: a CARLA server (a `DyingCarlaWorld`) per "host:port" address; a killed one stops
    answering: its world's ticks and any new client's version query time out, as a crashed server's do."""

    def __init__(self, addresses: list[str], dies_at_tick: dict[str, int] | None = None):
        self.worlds = {
            _address(a): DyingCarlaWorld((dies_at_tick or {}).get(a)) for a in addresses
        }

    def kill(self, address: str) -> None:
        self.worlds[_address(address)].killed = True

    def client(self, host: str, port: int) -> "DyingCarlaServers.Client":
        return DyingCarlaServers.Client(self.worlds[host, port])

    def install(self) -> None:
        """Every CARLA client made from now on (in this process) talks to these servers."""
        carla_backend.carla.Client = self.client

    class Client(FakeCarlaClient):
        def get_server_version(self) -> str:
            if self.world.killed:
                raise RuntimeError("time-out of 500ms while waiting for the simulator")
            return "0.9.16"


def driving_env_on_doubles(addresses: list[str], config: EnvConfig) -> DrivingEnv:
    """A `DrivingEnv` whose CARLA clients talk to `DyingCarlaServers(addresses)` of this process: picklable (with
    `functools.partial`), so an asynchronous vector env's worker process builds its env against the doubles too."""
    DyingCarlaServers(addresses).install()
    return DrivingEnv(config)


def _address(address: str) -> tuple[str, int]:
    host, port = address.split(":")[:2]
    return host, int(port)


class CarlaServerDoubles(pl.Callback):
    """For a run started through the CLI: installs `DyingCarlaServers` (kept in `servers`) as the config is read,
    before the datamodule asks its servers (callbacks are built first; their hooks would come too late); in every
    process of a DDP run. With `time_out_in_validation` = n, the first tick of validation run n (from 0) times out
    on every server."""

    def __init__(self, servers: list[str], dies_at_tick: dict[str, int] | None = None,
                 time_out_in_validation: int | None = None):
        self.servers = DyingCarlaServers(servers, dies_at_tick)
        self.servers.install()
        self.time_out_in_validation = time_out_in_validation
        self.validations = 0

    def on_validation_start(self, trainer, module) -> None:
        if self.validations == self.time_out_in_validation:
            for world in self.servers.worlds.values():
                world.time_out_next_tick()
        self.validations += 1


class StopInEvaluation(pl.Callback):
    """Test double of an operator: sends its process SIGTERM as evaluation episode `after` (from 0) of the first
    evaluation ends there (only on the process of global rank `rank`, if given); appends each evaluation episode a
    process drives to `log` ("<rank> <epoch> <episode>" lines)."""

    def __init__(self, log: str, after: int = 0, rank: int | None = None):
        self.episode_log = Path(log)
        self.after = after
        self.rank = rank
        self.sent = False

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        with self.episode_log.open("a") as log:
            log.write(f"{trainer.global_rank} {trainer.current_epoch} {batch_idx}\n")
        if batch_idx == self.after and not self.sent and self.rank in (None, trainer.global_rank):
            self.sent = True
            signal.raise_signal(signal.SIGTERM)
