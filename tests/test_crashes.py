"""The crash report: what the car ahead did a second before each collision of an evaluation episode."""

from pathlib import Path

import numpy as np
import pytest

from lightning_td3.crashes import Crash, crashes, main, moved_in_ahead, replayed_crashes
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parent.parent


class FullThrottle:
    """Straight down its lane at full throttle: it runs into the traffic ahead."""

    def reset(self, seed: int) -> None:
        pass

    def act(self, observation, env) -> np.ndarray:
        return np.array([0.0, 1.0], np.float32)


def test_running_into_the_traffic_ahead_is_reported_as_rear_end_collisions():
    config = EnvConfig(scenario=2, route_length_m=300.0, max_steps=80, num_waypoints=5)
    report = crashes(config, FullThrottle(), range(0, 2))
    assert report.episodes == 2 and report.crashes, "full throttle in dense traffic should collide"
    for crash in report.crashes:
        assert crash.lane_changes == 0 and crash.gap_ahead_m is not None and crash.gap_ahead_m < 30.0
        assert crash.speed_ahead_kmh < crash.speed_kmh and crash.rear_end and not crash.side_swipe
        # The last four seconds (or the whole episode, if shorter), a step each, the collision's step last.
        assert len(crash.recent) == min(crash.step + 1, 4 * 5 + 1)  # 5 decisions a second
        assert crash.recent[-1][2] < crash.gap_ahead_m < crash.recent[0][2]


class SwerveIntoTheCarBeside:
    """Straight on until a car is alongside in a side lane, then steering hard into that lane."""

    def reset(self, seed: int) -> None:
        self.side = None

    def act(self, observation, env) -> np.ndarray:
        scene = env.scene()
        for side in (-1, 1):
            beside = scene.followers.get(side) or scene.leaders.get(side)
            if self.side is None and beside is not None and beside.gap_m == 0.0:
                self.side = side
        return np.array([0.0 if self.side is None else 0.5 * self.side, 0.0], np.float32)  # steer > 0: right


def test_swerving_into_a_car_alongside_is_reported_as_a_side_swipe():
    config = EnvConfig(scenario=2, traffic_density=2.0, route_length_m=300.0, max_steps=80, num_waypoints=5)
    report = crashes(config, SwerveIntoTheCarBeside(), [2, 4])
    assert [crash.seed for crash in report.crashes] == [2, 4]
    for crash, side in zip(report.crashes, ("right", "left"), strict=True):
        # It crossed into the car's lane (from the right in seed 2) and hit it there: the lane changed in the last
        # second, and the car is alongside in the ego's new lane.
        assert crash.car_alongside and crash.lane_changed_last_s and crash.side == side
        assert crash.side_swipe and not crash.rear_end


def test_a_side_swipe_is_a_car_alongside_while_between_two_lanes_and_not_a_rear_end():
    assert Crash(0, 10, 90.0, None, None, 1, 1.2, "left", True).side_swipe
    assert Crash(0, 10, 90.0, None, None, 1, 0.4, "left", True, lane_changed_last_s=True).side_swipe
    assert not Crash(0, 10, 90.0, None, None, 1, 0.4, "left", True).side_swipe  # near its lane's centre
    assert not Crash(0, 10, 90.0, None, None, 1, 1.2, "left", False).side_swipe  # no car alongside
    assert not Crash(0, 10, 90.0, 20.0, 70.0, 0, 1.2, "left", True).side_swipe  # a rear-end


def test_only_a_collision_into_a_slower_car_close_ahead_without_a_lane_change_is_rear_end():
    assert not Crash(0, 10, 90.0, None, None, 0).rear_end
    assert not Crash(0, 10, 90.0, 5.0, 95.0, 0).rear_end
    assert not Crash(0, 10, 90.0, 5.0, 70.0, 1).rear_end
    assert not Crash(0, 10, 90.0, 40.0, 70.0, 0).rear_end  # 90 km/h covers 25 m in a second: another car cut in
    assert Crash(0, 10, 90.0, 20.0, 70.0, 0).rear_end


def test_a_car_moving_in_ahead_is_a_gap_that_shrinks_at_once_not_one_the_speeds_close():
    """Steps 0.1 s apart, (ego km/h, lane, gap ahead m, car ahead km/h): closing at 36 km/h shrinks the gap 1 m a
    step."""
    closing = [(72.0, 1, 20.0 - step, 36.0) for step in range(5)]
    assert moved_in_ahead(closing, dt=0.1) is None
    cut = closing + [(72.0, 1, 8.0, 60.0), (72.0, 1, 7.7, 60.0), (72.0, 1, 7.4, 60.0)]  # 16 m to 8 m in one step
    assert moved_in_ahead(cut, dt=0.1) == pytest.approx(0.2)
    assert moved_in_ahead(closing + [(72.0, 0, 8.0, 60.0)], dt=0.1) is None  # the ego changed lanes: a new car ahead
    assert moved_in_ahead([(72.0, 1, None, None), (72.0, 1, 12.0, 60.0)], dt=0.1) == 0.0  # into an empty road ahead
    assert moved_in_ahead([(72.0, 1, None, None), (72.0, 1, 80.0, 60.0)], dt=0.1) is None  # came into sight far off


def test_the_critic_is_read_a_second_before_each_collision_against_the_return_that_followed():
    config = EnvConfig(scenario=2, route_length_m=300.0, max_steps=80, num_waypoints=5)
    observed = []

    def critic(observation) -> float:  # a stand-in critic: its value is the step's index, so the step read shows
        observed.append(observation)
        return float(len(observed) - 1)

    report = crashes(config, FullThrottle(), range(1), critic, gamma=0.9)
    (crash,) = report.crashes
    rewards = _rewards_of(config, seed=0)
    assert len(rewards) == crash.step and len(observed) == crash.step + 1  # every observation, the last one too
    before = crash.step - 5  # a second at 5 decisions per second
    assert crash.critic_value == before
    assert crash.return_after == pytest.approx(sum(0.9**k * reward for k, reward in enumerate(rewards[before:])))
    # each decision of the last second, the last one (a decision before the collision) first
    returns_after = [sum(0.9**k * reward for k, reward in enumerate(rewards[step:])) for step in range(crash.step)]
    last_second = range(crash.step - 1, before - 1, -1)
    assert crash.critic_errors == pytest.approx([step - returns_after[step] for step in last_second])
    assert report.decision_s == pytest.approx(0.2)
    assert report.critic_error_to_goal is None  # no episode reached the goal


def test_the_critic_error_on_the_way_to_the_goal_averages_every_step():
    config = EnvConfig(scenario=0, traffic_density=0.0, route_length_m=100.0, max_steps=80, num_waypoints=5)
    report = crashes(config, FullThrottle(), range(1), critic=lambda observation: 10.0, gamma=0.9)
    rewards = _rewards_of(config, seed=0)
    returns_after = [sum(0.9**k * reward for k, reward in enumerate(rewards[start:])) for start in range(len(rewards))]
    assert not report.crashes
    assert report.critic_error_to_goal == pytest.approx(10.0 - np.mean(returns_after))


def test_the_replayed_crashes_are_the_crash_transitions_still_held_grouped_by_when_they_were_collected():
    """Ten episodes of ten steps into a ring of 60 slots: each writes 11 (its reset observation and ten more), so
    the ring holds write positions 50..109. The even episodes end in a crash; episodes 4, 6 and 8 are still held,
    their crash transitions starting at positions 53, 75 and 97, i.e. at 5 %, 42 % and 78 % of what the ring holds.
    Each odd one ends at the goal (terminated too, with a positive reward)."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(capacity=60, num_envs=1, vector_size=3)
    for episode in range(10):
        stack = np.repeat(rng.integers(0, 256, (1, 1, 84, 84), np.uint8), 4, axis=1)
        for step in range(10):
            next_stack = np.concatenate([stack[:, 1:], rng.integers(0, 256, (1, 1, 84, 84), np.uint8)], axis=1)
            last = step == 9
            reward = (-50.0 if episode % 2 == 0 else 3.0) if last else 0.0
            buffer.add({"image": stack, "vector": np.full((1, 3), episode, np.float32)},
                       np.array([[episode / 100, 0.0]], np.float32), np.array([reward]),
                       {"image": next_stack, "vector": np.full((1, 3), episode, np.float32)},
                       np.array([last]), np.array([False]))
            stack = next_stack

    def critic(observations, actions):  # names the episode of each observation, and the action that came with it
        return observations["vector"][:, 0] * 10 + actions[:, 0]

    oldest_half, newest_half = replayed_crashes(buffer, critic, crash_reward=-25.0, parts=2)
    assert (oldest_half.count, newest_half.count) == (2, 1)
    assert oldest_half.critic_value == pytest.approx((40.04 + 60.06) / 2)
    assert newest_half.critic_value == pytest.approx(80.08)
    assert oldest_half.reward == newest_half.reward == -50.0


def test_reading_the_critic_of_an_exported_actor_is_refused_naming_the_file():
    shipped = ROOT / "agents/scenario1_curvy_asymmetric.ckpt"
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(ROOT / "configs/experiments/scenario1_curvy_asymmetric.yaml"), "--ckpt", str(shipped), "--seed", "0",
              "--critic"])
    assert "exported actor" in str(stopped.value.code) and str(shipped) in str(stopped.value.code)
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(ROOT / "configs/experiments/scenario1_curvy_asymmetric.yaml"), "--ckpt", str(shipped), "--seed", "0",
              "--replay", str(ROOT / "no-such-replay.bin")])
    assert "exported actor" in str(stopped.value.code) and str(shipped) in str(stopped.value.code)


def _rewards_of(config: EnvConfig, seed: int) -> list[float]:
    """The episode's rewards, from the env itself."""
    env = DrivingEnv(config)
    env.reset(seed=seed)
    rewards, done = [], False
    while not done:
        _, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0], np.float32))
        rewards.append(reward)
        done = terminated or truncated
    env.close()
    assert info["reason"] in ("collision", "goal"), "the return that followed needs an episode that ended there"
    return rewards


def test_trace_prints_each_step_of_a_collisions_last_seconds_and_the_moved_in_count(monkeypatch, capsys):
    """Through the command: the shipped agent and its recipe, with the episodes replaced by one known collision."""
    import lightning_td3.crashes as crashes_module

    recent = ((90.0, 1, 12.0, 60.0), (88.0, 1, 4.0, 60.0), (80.0, 1, 2.5, 60.0))  # a car moved in 0.2 s before
    crash = Crash(7, 30, 88.0, 4.0, 60.0, 0, moved_in_s=moved_in_ahead(recent, dt=0.2), recent=recent)
    report = crashes_module.Report([crash], episodes=1, decision_s=0.2)
    monkeypatch.setattr(crashes_module, "crashes", lambda *args: report)
    main(["--config", str(ROOT / "configs/experiments/scenario1_curvy_asymmetric.yaml"),
          "--ckpt", str(ROOT / "agents/scenario1_curvy_asymmetric.ckpt"), "--seed", "7", "--episodes", "1", "--trace"])
    lines = capsys.readouterr().out.splitlines()
    assert "a car moved in ahead 0.2 s before" in lines[0]
    assert lines[1:4] == [
        "   -0.4 s: 90 km/h in lane 1, car ahead 12.0 m at 60 km/h",
        "   -0.2 s: 88 km/h in lane 1, car ahead 4.0 m at 60 km/h",
        "    0.0 s: 80 km/h in lane 1, car ahead 2.5 m at 60 km/h",
    ]
    assert "rear-end (into a slower car ahead" in lines[4] and "): 1, of which 1 after a car moved in ahead" in lines[4]
