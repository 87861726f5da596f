"""Why an agent's evaluation episodes end in collisions, seen through the env's `Scene` (either backend).

    python -m lightning_td3.crashes --config <run config>.yaml --ckpt <checkpoint> --seed 50000 --episodes 100

Runs the evaluation episodes seed, seed + 1, ... through the evaluation harness and, for each that ends in a
collision, prints what the ego saw one second before: its speed, the car ahead in its lane (gap and speed), and the
lane changes of its last four seconds (with `--trace`, those four seconds step by step); and where it was at the
collision: how far from its lane's centre toward a side lane, and whether a car was alongside it (within a metre
lengthwise) in its lane or in that one. Then it counts the rear-end collisions: those where, a second before, a car
was ahead in the ego's lane, slower than the ego and less than a second's drive away, and the ego had not changed
lanes for four seconds; of them, those after a car moved into the ego's lane just ahead of it within those four
seconds (the gap ahead shrank at once), which no following distance prevents; and the side-swipes: those where, at
the collision, the ego was between two lanes (a metre or more off its lane's centre, or in a lane it entered within
the last second) with a car alongside it in one of them, and not a rear-end.

With `--critic` (a training checkpoint: an exported actor has no trained critics) it also prints, for each
collision, what the critics expected a second before (`TD3.value`) against the discounted return that followed, that
error averaged over the collisions at each decision of their last second, and the same error averaged over every
step of the episodes that reached the goal: does the critic see the crash coming?

With `--replay <replay file of the run>` (a training checkpoint too) it prints how the critics fit the crashes the
replay holds, the transitions they learned from: at the last step of each, their value of the action taken against
the reward that came, grouped by when the crashes were collected. Does the critic know the crashes it was shown?
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.envs.contract import LATERAL_SCALE_M, SIDES
from lightning_td3.errors import UserError
from lightning_td3.evaluation import Policy, run_episode
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import read_shard, shard_config
from lightning_td3.run_config import trained_agent

BEFORE_S = 1.0  # how long before the collision the scene is read: the car ahead is still apart from the ego then
LANE_CHANGES_S = 4.0
# A car keeps within about half a metre of its lane's centre: one a metre or more off it is moving to the next lane.
SIDE_SWIPE_OFFSET_M = 1.0
# A car counts as alongside within this bumper-to-bumper gap along the lane: turned toward the next lane, the ego's
# corners reach past where its bumpers are measured.
ALONGSIDE_GAP_M = 1.0
# The gap ahead in the ego's lane shrinking in one step by this much more than the two cars' speeds explain: another
# car came in between (moved into the lane); a car coming into sight counts only this close.
MOVED_IN_JUMP_M = 2.0
MOVED_IN_SIGHT_M = 30.0


@dataclass
class Crash:
    seed: int
    step: int
    speed_kmh: float  # the ego's, BEFORE_S before the collision
    gap_ahead_m: float | None  # to the car ahead in the ego's lane then (None: none in sight)
    speed_ahead_kmh: float | None
    lane_changes: int  # in the last LANE_CHANGES_S
    # At the collision: how far the ego was from its lane's centre toward a side lane ("left"/"right"), and whether a
    # car was alongside it (within ALONGSIDE_GAP_M lengthwise) in its own lane or in that one
    toward_side_m: float = 0.0
    side: str = "left"
    car_alongside: bool = False
    lane_changed_last_s: bool = False  # within the last BEFORE_S
    # How long before the collision a car last moved into the ego's lane just ahead of it, within LANE_CHANGES_S
    # (None: none did)
    moved_in_s: float | None = None
    # The last LANE_CHANGES_S, a step each, oldest first: (speed km/h, lane, gap ahead m, speed ahead km/h)
    recent: tuple[tuple, ...] = ()
    # With a critic: its value of the state BEFORE_S before the collision, and the discounted return that followed
    critic_value: float | None = None
    return_after: float | None = None
    # With a critic: its value minus the return that followed at each decision of the last BEFORE_S, the last first
    critic_errors: tuple[float, ...] | None = None

    @property
    def rear_end(self) -> bool:
        """Into a slower car that was ahead in the ego's lane, within the ego's next BEFORE_S of road, with no lane
        change of the ego's (a car further ahead was not the one hit: another cut in)."""
        return (
            self.gap_ahead_m is not None and self.gap_ahead_m < self.speed_kmh / 3.6 * BEFORE_S
            and self.speed_ahead_kmh < self.speed_kmh and self.lane_changes == 0
        )

    @property
    def side_swipe(self) -> bool:
        """Into a car alongside, between two lanes (the ego's lane switches when it crosses the line between them);
        a rear-end is not also counted as one."""
        between_lanes = self.toward_side_m >= SIDE_SWIPE_OFFSET_M or self.lane_changed_last_s
        return not self.rear_end and self.car_alongside and between_lanes


@dataclass
class Report:
    crashes: list[Crash]
    episodes: int
    # With a critic: its value minus the discounted return that followed, averaged over every step of the episodes
    # that reached the goal (None: no critic, or no such episode)
    critic_error_to_goal: float | None = None
    decision_s: float = 0.0  # simulated seconds between two decisions


@dataclass
class ReplayedCrashes:
    """The crash transitions of one part of a replay (collected at about the same time): how many, the critic's mean
    value of their state and the action taken, and their mean reward (the crash charge and the step's other terms)."""

    count: int
    critic_value: float
    reward: float


def crashes(
    env_config: EnvConfig, policy: Policy, seeds: range,
    critic: Callable[[dict], float] | None = None, gamma: float = 0.99,
) -> Report:
    """The collisions of the episodes with these seeds; `critic(observation)` is read at every step if given."""
    env = DrivingEnv(env_config)
    steps_per_second = round(1.0 / env.backend.dt)
    found, errors_to_goal = [], []
    try:
        for seed in seeds:
            # (speed km/h, lane, gap ahead, speed ahead) of the last LANE_CHANGES_S, newest last
            seen = deque(maxlen=round(LANE_CHANGES_S * steps_per_second) + 1)
            beside = []  # the last step's (offset toward a side lane, that side, a car alongside in either lane)
            values, rewards = [], []  # the critic's value of each observation; each step's reward

            def watch(obs, info):
                scene = env.backend.scene()
                leader = scene.leaders.get(0)
                seen.append((scene.speed_mps * 3.6, scene.lane, leader and leader.gap_m,
                             leader and leader.speed_mps * 3.6))
                offset_m = float(obs["vector"][3]) * LATERAL_SCALE_M  # > 0: left of the lane's centre
                side = SIDES[0] if offset_m > 0 else SIDES[1]
                near = [neighbours.get(lane) for neighbours in (scene.leaders, scene.followers) for lane in (0, side)]
                alongside = any(n is not None and n.gap_m < ALONGSIDE_GAP_M for n in near)
                beside[:] = [abs(offset_m), "left" if side == SIDES[0] else "right", alongside]
                if "reward_terms" in info:  # not after the reset
                    rewards.append(info["reward_terms"]["total"])
                if critic is not None:
                    values.append(critic(obs))

            result = run_episode(env, policy, seed, watch)
            returns_after = _discounted_returns(rewards, gamma)
            if result.collision:
                speed, _, gap, speed_ahead = seen[max(len(seen) - 1 - steps_per_second, 0)]
                lanes = [lane for _, lane, _, _ in seen]
                changes = sum(before != after for before, after in pairwise(lanes))
                changed_last_s = len(set(lanes[-steps_per_second - 1:])) > 1
                crash = Crash(seed, result.episode_length, speed, gap, speed_ahead, changes, *beside, changed_last_s,
                              moved_in_ahead(seen, env.backend.dt), tuple(seen))
                if critic is not None:
                    before = max(len(rewards) - steps_per_second, 0)
                    crash.critic_value, crash.return_after = values[before], float(returns_after[before])
                    last_second = range(len(rewards) - 1, before - 1, -1)
                    crash.critic_errors = tuple(values[step] - float(returns_after[step]) for step in last_second)
                found.append(crash)
            elif result.success and critic is not None:
                errors_to_goal.extend(np.asarray(values[:-1]) - returns_after)
    finally:
        env.close()
    return Report(found, len(seeds), float(np.mean(errors_to_goal)) if errors_to_goal else None, env.backend.dt)


def moved_in_ahead(seen: Sequence[tuple], dt: float) -> float | None:
    """Seconds before the last of `seen`'s steps ((speed km/h, lane, gap ahead m, speed ahead km/h), oldest first,
    `dt` s apart) that a car last moved into the ego's lane ahead of it: between two steps in the same lane, the gap
    ahead shrank by over MOVED_IN_JUMP_M more than the two speeds explain, or a car came into sight under
    MOVED_IN_SIGHT_M. None: none did."""
    for steps_back, (later, earlier) in enumerate(pairwise(reversed(seen))):
        (_, lane, gap, _), (speed_earlier, lane_earlier, gap_earlier, ahead_earlier) = later, earlier
        if lane != lane_earlier or gap is None:
            continue
        if gap_earlier is None:
            moved_in = gap < MOVED_IN_SIGHT_M
        else:
            moved_in = gap < gap_earlier + (ahead_earlier - speed_earlier) / 3.6 * dt - MOVED_IN_JUMP_M
        if moved_in:
            return steps_back * dt
    return None


def replayed_crashes(
    buffer: ReplayBuffer, critic: Callable[[dict, np.ndarray], np.ndarray], crash_reward: float, parts: int = 5,
    batch_size: int = 256,
) -> list[ReplayedCrashes]:
    """The transitions of `buffer` that end an episode with a reward under `crash_reward`, split into `parts` by
    when they were collected (each ring's oldest first), with `critic(observations, actions)` of each."""
    storage = buffer.storage()
    rings, slots = np.nonzero(storage["has_next"] & storage["terminated"] & (storage["rewards"] < crash_reward))
    filled = np.minimum(buffer.written, buffer.slots_per_env)
    oldest = (buffer.written - filled) % buffer.slots_per_env
    collected = ((slots - oldest[rings]) % buffer.slots_per_env) / filled[rings]  # 0 = the ring's oldest
    part_of = np.minimum((collected * parts).astype(int), parts - 1)
    values, rewards = np.zeros(rings.size), np.zeros(rings.size)
    for start in range(0, rings.size, batch_size):
        batch = buffer.transitions_at(rings[start:start + batch_size], slots[start:start + batch_size])
        values[start:start + batch_size] = critic(batch, batch["action"]).reshape(-1)
        rewards[start:start + batch_size] = batch["reward"][:, 0]  # the crash step's own reward
    return [
        ReplayedCrashes(int(mask.sum()), float(values[mask].mean()), float(rewards[mask].mean())) if mask.any()
        else ReplayedCrashes(0, float("nan"), float("nan"))
        for mask in (part_of == part for part in range(parts))
    ]


def _discounted_returns(rewards: list[float], gamma: float) -> np.ndarray:
    """The return that followed each step of an episode that ended there (terminated, nothing to bootstrap)."""
    returns, following = np.zeros(len(rewards)), 0.0
    for step in reversed(range(len(rewards))):
        following = rewards[step] + gamma * following
        returns[step] = following
    return returns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, action="append",
        help="the run's config (its data.env is used); repeat it to layer configs as cli.py does")
    parser.add_argument("--ckpt", type=Path, required=True, help="a training checkpoint or an exported actor")
    parser.add_argument("--seed", type=int, required=True, help="the first evaluation seed")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--critic", action="store_true", help="also read the critics (a training checkpoint only)")
    parser.add_argument("--trace", action="store_true",
                        help=f"also print each collision's last {LANE_CHANGES_S:g} s, a step a line")
    parser.add_argument("--replay", type=Path, help="a replay file of the run (runs/.../checkpoints/replay/*.bin): "
                        "how the critics fit the crashes it holds (a training checkpoint only)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        agent, env_config = trained_agent(args.ckpt, args.config)
        if (args.critic or args.replay) and agent.actor_only:
            raise UserError(f"{args.ckpt} is an exported actor, without the critics that --critic and --replay "
                            "read: give the training checkpoint it was exported from")
        # A crash's transition carries the crash charge; every other step's penalties sum to a few points at most.
        crash_reward = -env_config.reward.crash_penalty * env_config.reward.safety / 2
        replayed = None
        if args.replay:
            # From the header: a file of another run is refused before its gigabytes are read and checksummed.
            replay_vector_size = shard_config(args.replay)["vector_size"]
            if replay_vector_size != agent.hparams.vector_size:
                raise UserError(f"replay file {args.replay} holds vectors of {replay_vector_size} but {args.ckpt} "
                                f"reads vectors of {agent.hparams.vector_size}: give a replay file of its own run")
            replayed = replayed_crashes(read_shard(args.replay), agent.value, crash_reward)
        policy = agent.policy()
        report = crashes(env_config, policy, range(args.seed, args.seed + args.episodes),
                         policy.value if args.critic else None, agent.hparams.gamma)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    for crash in report.crashes:
        ahead = "no car ahead" if crash.gap_ahead_m is None else (
            f"car ahead {crash.gap_ahead_m:.1f} m at {crash.speed_ahead_kmh:.0f} km/h")
        expected = "" if crash.critic_value is None else (
            f"; critic {crash.critic_value:+.1f}, return that followed {crash.return_after:+.1f}")
        beside = "a car alongside" if crash.car_alongside else "no car alongside"
        moved_in = "" if crash.moved_in_s is None else f"; a car moved in ahead {crash.moved_in_s:.1f} s before"
        print(f"seed {crash.seed}: collision at step {crash.step}; {BEFORE_S:g} s before: {crash.speed_kmh:.0f} km/h, "
              f"{ahead}; lane changes in the last {LANE_CHANGES_S:g} s: {crash.lane_changes}; at the collision "
              f"{crash.toward_side_m:.1f} m toward the {crash.side} lane, {beside}{moved_in}{expected}")
        if args.trace:
            for steps_back, (speed, lane, gap, speed_ahead) in zip(range(len(crash.recent) - 1, -1, -1), crash.recent):
                ahead = "no car ahead" if gap is None else f"car ahead {gap:.1f} m at {speed_ahead:.0f} km/h"
                print(f"  {-steps_back * report.decision_s:5.1f} s: {speed:.0f} km/h in lane {lane}, {ahead}")
    rear_end = sum(crash.rear_end for crash in report.crashes)
    moved_in_rear_end = sum(crash.rear_end and crash.moved_in_s is not None for crash in report.crashes)
    side_swipes = sum(crash.side_swipe for crash in report.crashes)
    print(f"collisions: {len(report.crashes)} of {report.episodes} episodes; rear-end (into a slower car ahead in the "
          f"ego's lane, under {BEFORE_S:g} s away, no lane change for {LANE_CHANGES_S:g} s): {rear_end}, of which "
          f"{moved_in_rear_end} after a car moved in ahead within {LANE_CHANGES_S:g} s; side-swipes "
          f"(at least {SIDE_SWIPE_OFFSET_M:g} m off the lane's centre, a car alongside): {side_swipes}")
    if report.crashes and args.critic:
        errors = [crash.critic_value - crash.return_after for crash in report.crashes]
        print(f"critic minus the return that followed, {BEFORE_S:g} s before a collision: mean {np.mean(errors):+.1f}")
        by_decision = [[crash.critic_errors[k] for crash in report.crashes if len(crash.critic_errors) > k]
                       for k in range(max(len(crash.critic_errors) for crash in report.crashes))]
        print("the same at each decision before the collision: " + ", ".join(
            f"{(k + 1) * report.decision_s:.1f} s {np.mean(errors):+.1f}" for k, errors in enumerate(by_decision)))
    if report.critic_error_to_goal is not None:
        print(f"critic minus the return that followed, every step of the episodes that reached the goal: mean "
              f"{report.critic_error_to_goal:+.1f}")
    if replayed is not None:
        print(f"replay {args.replay}: {sum(part.count for part in replayed)} transitions end in a crash (terminated, "
              f"reward under {crash_reward:g}); at each, the critic's value of the action taken against the reward, "
              f"in {len(replayed)} parts by when they were collected, the oldest first:")
        for part in replayed:
            print(f"  {part.count} crashes: critic {part.critic_value:+.1f}, reward {part.reward:+.1f}")


if __name__ == "__main__":
    main()
