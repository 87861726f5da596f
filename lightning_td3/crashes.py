"""Why an agent's evaluation episodes end in collisions, seen through the env's `Scene` (either backend).

    python -m lightning_td3.crashes --config <run config>.yaml --ckpt <checkpoint> --seed 50000 --episodes 100

Runs the evaluation episodes seed, seed + 1, ... through the evaluation harness and, for each that ends in a
collision, prints what the ego saw one second before: its speed, the car ahead in its lane (gap and speed), and the
lane changes of its last four seconds. Then it counts the rear-end collisions: those where, a second before, a car
was ahead in the ego's lane, slower than the ego and less than a second's drive away, and the ego had not changed
lanes for four seconds.
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.errors import UserError
from lightning_td3.evaluation import Policy, run_episode
from lightning_td3.run_config import env_config_of

BEFORE_S = 1.0  # how long before the collision the scene is read: the car ahead is still apart from the ego then
LANE_CHANGES_S = 4.0


@dataclass
class Crash:
    seed: int
    step: int
    speed_kmh: float  # the ego's, BEFORE_S before the collision
    gap_ahead_m: float | None  # to the car ahead in the ego's lane then (None: none in sight)
    speed_ahead_kmh: float | None
    lane_changes: int  # in the last LANE_CHANGES_S

    @property
    def rear_end(self) -> bool:
        """Into a slower car that was ahead in the ego's lane, within the ego's next BEFORE_S of road, with no lane
        change of the ego's (a car further ahead was not the one hit: another cut in)."""
        return (
            self.gap_ahead_m is not None and self.gap_ahead_m < self.speed_kmh / 3.6 * BEFORE_S
            and self.speed_ahead_kmh < self.speed_kmh and self.lane_changes == 0
        )


def crashes(env_config: EnvConfig, policy: Policy, seeds: range) -> tuple[list[Crash], int]:
    """The collisions of the episodes with these seeds, and how many episodes ran."""
    env = DrivingEnv(env_config)
    steps_per_second = round(1.0 / env.backend.dt)
    found = []
    try:
        for seed in seeds:
            # (speed km/h, lane, gap ahead, speed ahead) of the last LANE_CHANGES_S, newest last
            seen = deque(maxlen=round(LANE_CHANGES_S * steps_per_second) + 1)

            def watch(obs, info):
                scene = env.backend.scene()
                leader = scene.leaders.get(0)
                seen.append((scene.speed_mps * 3.6, scene.lane, leader and leader.gap_m,
                             leader and leader.speed_mps * 3.6))

            result = run_episode(env, policy, seed, watch)
            if result.collision:
                speed, _, gap, speed_ahead = seen[max(len(seen) - 1 - steps_per_second, 0)]
                lanes = [lane for _, lane, _, _ in seen]
                changes = sum(before != after for before, after in pairwise(lanes))
                found.append(Crash(seed, result.episode_length, speed, gap, speed_ahead, changes))
    finally:
        env.close()
    return found, len(seeds)


def main(argv: list[str] | None = None) -> None:
    from lightning_td3.td3 import TD3

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the run's config (its data.env is used)")
    parser.add_argument("--ckpt", type=Path, required=True, help="a training checkpoint or an exported actor")
    parser.add_argument("--seed", type=int, required=True, help="the first evaluation seed")
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        agent = TD3.load_from_checkpoint(args.ckpt, map_location="cpu")
        agent.eval()
        found, episodes = crashes(env_config_of(args.config), agent.policy(), range(args.seed, args.seed + args.episodes))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    for crash in found:
        ahead = "no car ahead" if crash.gap_ahead_m is None else (
            f"car ahead {crash.gap_ahead_m:.1f} m at {crash.speed_ahead_kmh:.0f} km/h")
        print(f"seed {crash.seed}: collision at step {crash.step}; {BEFORE_S:g} s before: {crash.speed_kmh:.0f} km/h, "
              f"{ahead}; lane changes in the last {LANE_CHANGES_S:g} s: {crash.lane_changes}")
    rear_end = sum(crash.rear_end for crash in found)
    print(f"collisions: {len(found)} of {episodes} episodes; rear-end (into a slower car ahead in the ego's lane, under "
          f"{BEFORE_S:g} s away, no lane change for {LANE_CHANGES_S:g} s): {rear_end}")


if __name__ == "__main__":
    main()
