"""The one evaluation harness: every policy (random, IDM+MOBIL, the TD3 agent) is scored the same way.

A policy drives `DrivingEnv` episodes through the action space only; each episode's final `info` becomes an
`EpisodeResult`, and `EvaluationMetrics` averages them. Its states are sums with `dist_reduce_fx="sum"`, so
results gathered on several DDP ranks reduce to the mean over all episodes. Under a task distribution it can also
average them per scenario and per layout (`EvaluationMetrics.by_task`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torchmetrics import Metric

from lightning_td3.envs import tasks
from lightning_td3.envs.config import EnvConfig
from lightning_td3.envs.contract import DrivingEnv


class Policy(Protocol):
    def reset(self, seed: int) -> None:
        """Called at the start of every episode, after the env reset with the same seed."""

    def act(self, obs: dict[str, np.ndarray], env: DrivingEnv) -> np.ndarray:
        """Action [steer, throttle_brake] in [-1, 1]^2. Learned agents ignore `env`; rule-based ones read the
        world from `env.scene()` and `env.limits` but act only through the returned action."""


# The CARLA Leaderboard's infraction coefficients (carla-simulator/leaderboard, leaderboard/utils/statistics_manager.py,
# PENALTY_VALUE_DICT, at aec8131): each collision multiplies the episode's infraction penalty by its kind's. The
# leaderboard's collision criterion counts no other kind ("other": contract.COLLISION_KINDS), so it costs nothing here.
COLLISION_PENALTY = {"pedestrian": 0.50, "vehicle": 0.60, "static": 0.65, "other": 1.0}


@dataclass
class EpisodeResult:
    success: bool
    collision: bool
    avg_speed_kmh: float
    episode_return: float
    episode_length: int
    route_completion: float
    reason: str | None  # contract.TERMINAL_REASONS, "time_out", or None
    collision_with: str | None  # what the ego hit (contract.COLLISION_KINDS), or None
    route_outside_lanes: float  # share of the route driven so far that was off the road

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EpisodeResult:
        """Build from the `info` of an episode's last `DrivingEnv.step`."""
        return cls(
            success=bool(info["success"]),
            collision=bool(info["collision"]),
            avg_speed_kmh=float(info["avg_speed_kmh"]),
            episode_return=float(info["episode_return"]),
            episode_length=int(info["episode_length"]),
            route_completion=float(info["route_completion"]),
            reason=info["reason"],
            collision_with=info["collision_with"],
            route_outside_lanes=float(info["route_outside_lanes"]),
        )

    @property
    def infraction_penalty(self) -> float:
        """The CARLA Leaderboard's infraction penalty (statistics_manager.py, `compute_route_statistics`): 1 times
        each infraction's coefficient: a collision's (COLLISION_PENALTY), and for driving outside the route's lanes
        1 - the share of the driven route it covers (PENALTY_PERC_DICT: [0, 'increases']). The leaderboard's other
        infractions (red lights, stop signs, scenario time-outs, minimum speed, emergency vehicles) need traffic
        rules neither backend models; they are not charged."""
        penalty = COLLISION_PENALTY[self.collision_with] if self.collision_with else 1.0
        return penalty * (1.0 - self.route_outside_lanes)

    @property
    def driving_score(self) -> float:
        """The CARLA Leaderboard's driving score of one route, on a 0..1 scale (the leaderboard's is 0..100): route
        completion times the infraction penalty. A route whose goal was reached counts as complete, as the
        leaderboard's RouteCompletionTest sets 100 % at its target."""
        return (1.0 if self.success else self.route_completion) * self.infraction_penalty


@dataclass
class EpisodeSpec:
    """One evaluation episode: which task and which seed (an item of a validation dataloader)."""

    env_config: EnvConfig
    seed: int


class EnvFailure(RuntimeError):
    """An env call raised: its simulator failed (a CARLA time-out, a server gone). Raised from the env's exception,
    so that a caller tells it from the policy's own errors."""


def env_call(call: Callable, *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, an env's construction, reset or step; whatever it raises comes as `EnvFailure`."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        raise EnvFailure(f"{type(error).__name__}: {error}") from error


def run_episode(
    env: DrivingEnv, policy: Policy, seed: int, watch: Callable[[dict, dict], None] | None = None
) -> EpisodeResult:
    """One episode; `watch(obs, info)` sees every observation (after the reset and each step), e.g. to film it.
    What the env raises comes as `EnvFailure`."""
    obs, info = env_call(env.reset, seed=seed)
    policy.reset(seed)
    terminated = truncated = False
    while True:
        if watch is not None:
            watch(obs, info)
        if terminated or truncated:
            return EpisodeResult.from_info(info)
        action = policy.act(obs, env)
        obs, _, terminated, truncated, info = env_call(env.step, action)


# Metric name (after the prefix) -> the EpisodeResult field averaged into it.
METRIC_FIELDS = {
    "success_rate": "success",
    "collision_rate": "collision",
    "avg_speed_kmh": "avg_speed_kmh",
    "episode_return": "episode_return",
    "episode_length": "episode_length",
    "route_completion": "route_completion",
    "infraction_penalty": "infraction_penalty",
    "driving_score": "driving_score",
}

# The task settings whose episodes `EvaluationMetrics.by_task` also averages apart, and each group's name: a scenario's
# number needs the setting's name to mean anything, a layout names itself (`train_by_task/scenario_2/...`,
# `train_by_task/curvy/...`).
TASK_GROUPS = {"scenario": "scenario_{}", "layout": "{}"}


class EvaluationMetrics(Metric):
    """Means over episodes of success, collision, speed, return, length, route completion, infraction penalty and
    driving score (the CARLA Leaderboard's, see `EpisodeResult`), and the episode count.

    Args:
        prefix: put before every metric name: "eval/" for evaluation episodes, "train/" for the collector's
            (and, with `by_task`, "train_by_task/" before its groups').
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, prefix: str = "eval/", **kwargs: Any):
        super().__init__(**kwargs)
        self.prefix = prefix
        for field_name in METRIC_FIELDS.values():
            self.add_state(_sum_state(field_name), torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.groups: list[tuple[str, Any, str]] = []  # (setting, value, name) per group of `by_task`

    def by_task(self, env: EnvConfig) -> None:
        """Also average the episodes of each scenario and each layout that `env` draws per episode, under
        `<prefix>_by_task/<group>/` ("train/" gives `train_by_task/scenario_2/success_rate`); a setting given as one
        value makes no groups: they would repeat the overall means. Call it before the first episode.

        The groups come from the config, one per value it lists, never from the episodes that happened to arrive:
        every DDP process then holds the same states in the same order, and their sums reduce as the overall ones.
        """
        self.groups = [
            (setting, value, name.format(value))
            for setting, name in TASK_GROUPS.items()
            for value in tasks.choices(getattr(env, setting))
        ]
        if self.groups:  # per group, the sum of every field (in METRIC_FIELDS' order) and the episode count
            sums = torch.zeros(len(self.groups), len(METRIC_FIELDS), dtype=torch.float64, device=self.device)
            self.add_state("group_sums", sums, dist_reduce_fx="sum")
            counts = torch.zeros(len(self.groups), dtype=torch.long, device=self.device)
            self.add_state("group_episodes", counts, dist_reduce_fx="sum")

    def update(self, result: EpisodeResult, task: dict[str, Any] | None = None) -> None:
        """Count one episode; `task` is its `info["task"]`, which the groups of `by_task` need."""
        for field_name in METRIC_FIELDS.values():
            state_name = _sum_state(field_name)
            setattr(self, state_name, getattr(self, state_name) + float(getattr(result, field_name)))
        self.episodes += 1
        if self.groups:
            member = [bool(task[setting] == value) for setting, value, _ in self.groups]
            member = torch.tensor(member, device=self.device)
            values = [float(getattr(result, field_name)) for field_name in METRIC_FIELDS.values()]
            values = torch.tensor(values, dtype=torch.float64, device=self.device)
            self.group_sums = self.group_sums + member[:, None] * values
            self.group_episodes = self.group_episodes + member

    def compute(self) -> dict[str, torch.Tensor]:
        # With no episodes every mean is 0/0; report NaN rather than a made-up number.
        count = self.episodes.to(torch.float64)
        means = {
            self.prefix + metric_name: (getattr(self, _sum_state(field_name)) / count).to(torch.float32)
            for metric_name, field_name in METRIC_FIELDS.items()
        }
        # The count shows that every episode was counted once, however many processes ran them.
        means |= {self.prefix + "episodes": count.to(torch.float32)}
        if not self.groups:
            return means
        counts = self.group_episodes.to(torch.float64)
        group_means = (self.group_sums / counts[:, None]).to(torch.float32)
        for index, ((_, _, name), group_count) in enumerate(zip(self.groups, counts.tolist())):
            # A group without episodes has no mean: it is left out, not logged as NaN. (The counts are reduced
            # ones here, so every process leaves out the same groups.)
            if group_count:
                group = f"{self.prefix.rstrip('/')}_by_task/{name}/"
                means |= {group + metric_name: group_means[index, column]
                          for column, metric_name in enumerate(METRIC_FIELDS)}
                means[group + "episodes"] = counts[index].to(torch.float32)
        return means


def _sum_state(field_name: str) -> str:
    return f"sum_{field_name}"


def evaluate(policy: Policy, env_config: EnvConfig, seeds: Iterable[int]) -> dict[str, float]:
    """Run one episode per seed on a fresh env and return the mean metrics (keys as `EvaluationMetrics`)."""
    env = DrivingEnv(env_config)
    metrics = EvaluationMetrics()
    try:
        for seed in seeds:
            metrics.update(run_episode(env, policy, int(seed)))
    finally:
        env.close()
    return {name: value.item() for name, value in metrics.compute().items()}
