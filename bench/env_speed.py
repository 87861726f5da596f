"""Env steps per second of our `DrivingEnv` (highway backend) against raw highway-env, configured alike.

Both run in this one process, pinned to one CPU core, in alternating blocks of steps (the order flips every
round) fed the same fixed random actions, so drifts in machine load hit both equally. Only `step` calls are
timed: resets (episode ends) are excluded for both. The headline numbers are wall-clock; the CPU-time line
below them is the same comparison immune to other processes sharing the core.

Usage: python bench/env_speed.py [--steps N] [--block B] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
from highway_env.envs.highway_env import HighwayEnv  # noqa: E402

from lightning_td3.envs import DrivingEnv, EnvConfig, VehicleLimits  # noqa: E402
from lightning_td3.envs import highway_backend as hb  # noqa: E402

MEDIUM_TRAFFIC = 1


def raw_env(config: EnvConfig, vehicles: int, limits: VehicleLimits) -> HighwayEnv:
    """highway-v0 with our lane count, traffic count, frequencies, camera and continuous control ranges."""
    return HighwayEnv(
        config={
            "observation": {
                "type": "GrayscaleObservation",
                "observation_shape": (config.image_size, config.image_size),
                "stack_size": 4,
                "weights": hb.GRAYSCALE_WEIGHTS.tolist(),
                "scaling": config.pixels_per_meter,
                "centering_position": hb.view_centering(config.frame_ego_position),
            },
            "action": {
                "type": "ContinuousAction",
                "acceleration_range": (-limits.max_brake_mps2, limits.max_accel_mps2),
                "steering_range": (-limits.max_steer_rad, limits.max_steer_rad),
            },
            "lanes_count": config.lanes,
            "vehicles_count": vehicles,
            "simulation_frequency": hb.SIMULATION_FREQUENCY_HZ,
            "policy_frequency": config.policy_frequency_hz,
            "duration": config.max_steps / config.policy_frequency_hz,
            "offroad_terminal": True,
        }
    )


def enable_raw_rendering(env: HighwayEnv) -> None:
    # highway-env's viewer silently draws nothing under SDL_VIDEODRIVER=dummy; our backend always draws,
    # so the raw env must draw too for a fair comparison. Its reset builds a new viewer each time.
    env.observation_type.viewer.enabled = True


class Runner:
    """Steps one env through the shared action sequence, resetting at episode ends outside the timer."""

    def __init__(self, env, reset, to_action, seed: int):
        self.env, self._reset, self._to_action = env, reset, to_action
        self.seed = seed
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.steps = 0
        self.episodes = 0
        self._reset_now()

    def _reset_now(self) -> None:
        self._reset(self.env, self.seed + self.episodes)
        self.episodes += 1

    def run(self, actions: np.ndarray) -> None:
        for action in actions:
            start, cpu_start = time.perf_counter(), time.process_time()
            _, _, terminated, truncated, _ = self.env.step(self._to_action(action))
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.steps += 1
            if terminated or truncated:
                self._reset_now()

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def steps_per_cpu_s(self) -> float:
        return self.steps / self.cpu_seconds


def overhead_pct(ours: float, raw: float) -> float:
    """Extra time per step of ours over raw highway-env, in percent (negative: ours is faster)."""
    return 100.0 * (raw / ours - 1.0)


def reset_ours(env: DrivingEnv, seed: int) -> None:
    env.reset(seed=seed)


def reset_raw(env: HighwayEnv, seed: int) -> None:
    env.reset(seed=seed)
    enable_raw_rendering(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="timed steps per env")
    parser.add_argument("--block", type=int, default=50, help="steps per env before switching to the other")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    config = EnvConfig(backend="highway", layout="straight", scenario=MEDIUM_TRAFFIC)
    ours = Runner(DrivingEnv(config), reset_ours, lambda a: a, args.seed)
    vehicles = ours.env.backend.vehicle_count
    # highway-env's ContinuousAction is ordered [acceleration, steering]; ours is [steer, throttle_brake].
    raw = Runner(raw_env(config, vehicles, ours.env.limits), reset_raw, lambda a: a[::-1], args.seed)

    actions = np.random.default_rng(args.seed).uniform(-1.0, 1.0, (args.steps, 2)).astype(np.float32)
    runners = [ours, raw]
    for round_index, first in enumerate(range(0, args.steps, args.block)):
        block = actions[first : first + args.block]
        for runner in runners if round_index % 2 == 0 else runners[::-1]:
            runner.run(block)

    print(
        f"config: straight layout, {config.lanes} lanes, scenario {MEDIUM_TRAFFIC}, {vehicles} IDM vehicles, "
        f"{hb.SIMULATION_FREQUENCY_HZ:g} Hz simulation, {config.policy_frequency_hz:g} Hz policy, 84x84 grayscale x4"
    )
    print(f"episodes: ours {ours.episodes}, raw {raw.episodes}; timed steps each: {ours.steps}")
    print(f"ours_steps_per_s: {ours.steps_per_s:.1f}")
    print(f"raw_highway_env_steps_per_s: {raw.steps_per_s:.1f}")
    print(f"overhead_pct: {overhead_pct(ours.steps_per_s, raw.steps_per_s):.1f}")
    print(
        f"cpu-time basis: ours {ours.steps_per_cpu_s:.1f}, raw {raw.steps_per_cpu_s:.1f} steps/s, "
        f"overhead {overhead_pct(ours.steps_per_cpu_s, raw.steps_per_cpu_s):.1f} %"
    )


if __name__ == "__main__":
    main()
