"""Baselines: IDM / MOBIL / pure pursuit against hand computations, then driving the real highway env."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from lightning_td3.baselines import (
    IdmMobilPolicy,
    IdmParams,
    MobilParams,
    RandomPolicy,
    idm_acceleration,
    lane_change_gain,
    lookahead_point,
    mobil_gain,
    pure_pursuit_steering_angle,
    steer_action,
    throttle_brake_action,
)
from lightning_td3.envs import DrivingEnv, EnvConfig, Neighbour, Scene, VehicleLimits
from lightning_td3.envs.contract import LATERAL_SCALE_M
from lightning_td3.evaluation import evaluate

# a_max = b = 1 makes the IDM's sqrt(a b) = 1, so the hand computations stay short.
UNIT_IDM = IdmParams(time_headway_s=1.5, min_gap_m=2.0, max_accel_mps2=1.0, comfortable_decel_mps2=1.0)
DESIRED = 25.0
LIMITS = VehicleLimits(max_steer_rad=0.5, max_accel_mps2=4.0, max_brake_mps2=8.0, wheelbase_m=5.0)


# ------------------------------------------------------------------------------------------------ IDM


def test_idm_free_road():
    # 1 - (20/25)^4 = 1 - 0.4096
    assert idm_acceleration(20.0, DESIRED, UNIT_IDM) == pytest.approx(0.5904)
    assert idm_acceleration(DESIRED, DESIRED, UNIT_IDM) == pytest.approx(0.0)


def test_idm_approaching_a_slower_leader_brakes():
    # s* = 2 + 20 * 1.5 + 20 * 5 / (2 * 1) = 82;  a = 0.5904 - (82 / 40)^2 = 0.5904 - 4.2025
    assert idm_acceleration(20.0, DESIRED, UNIT_IDM, gap_m=40.0, leader_speed_mps=15.0) == pytest.approx(-3.6121)


def test_idm_dynamic_gap_never_below_jam_distance():
    # dynamic part 10 * 1.5 + 10 * (-20) / 2 = -85 clips to 0, so s* = s0 = 2;  a = (1 - 0.4^4) - (2 / 10)^2
    assert idm_acceleration(10.0, DESIRED, UNIT_IDM, gap_m=10.0, leader_speed_mps=30.0) == pytest.approx(0.9344)


def test_idm_with_touching_leader_brakes_hard_but_finitely():
    accel = idm_acceleration(20.0, DESIRED, UNIT_IDM, gap_m=0.0, leader_speed_mps=20.0)
    assert math.isfinite(accel) and accel < -100.0


# ---------------------------------------------------------------------------------------------- MOBIL


def test_mobil_gain_formula():
    # own (0.5 - -1) + 0.5 * [(-0.8 - 0.2) + (0.3 - -0.5)] = 1.5 - 0.1
    gain = mobil_gain(-1.0, 0.5, 0.2, -0.8, -0.5, 0.3, politeness=0.5)
    assert gain == pytest.approx(1.4)
    assert mobil_gain(-1.0, 0.5, 0.2, -0.8, -0.5, 0.3, politeness=0.0) == pytest.approx(1.5)


def _scene(leaders, followers, lane=1, speed=20.0, lanes=3) -> Scene:
    straight = np.stack([np.arange(1.0, 51.0, 2.0), np.zeros(25)], axis=1)
    waypoints = {offset: straight + [0.0, -4.0 * offset] for offset in leaders}
    return Scene(speed, lane, lanes, leaders, followers, waypoints)


SLOW_LEADER = Neighbour(gap_m=40.0, speed_mps=15.0)
MOBIL = MobilParams(politeness=0.5, threshold_mps2=0.2, safe_braking_mps2=4.0)


def test_lane_change_gain_to_an_empty_lane_escapes_a_slow_leader():
    scene = _scene({-1: None, 0: SLOW_LEADER, 1: None}, {-1: None, 0: None, 1: None})
    # ego now -3.6121 behind the slow leader, 0.5904 on the free lane; no followers: gain 4.2025
    assert lane_change_gain(scene, -1, DESIRED, UNIT_IDM, MOBIL) == pytest.approx(4.2025)


def test_lane_change_gain_counts_the_old_follower():
    old_follower = Neighbour(gap_m=10.0, speed_mps=20.0)
    scene = _scene({-1: None, 0: SLOW_LEADER, 1: None}, {-1: None, 0: old_follower, 1: None})
    # old follower now: s* = 2 + 30 = 32, a = 0.5904 - 3.2^2 = -9.6496
    # after: gap 10 + 5 (ego length) + 40 = 55 to the slow leader, s* = 82, a = 0.5904 - (82/55)^2
    old_follower_after = 0.5904 - (82 / 55) ** 2
    expected = 4.2025 + 0.5 * (old_follower_after - -9.6496)
    assert lane_change_gain(scene, -1, DESIRED, UNIT_IDM, MOBIL) == pytest.approx(expected)


def test_lane_change_is_unsafe_when_the_new_follower_would_brake_hard():
    fast_close_follower = Neighbour(gap_m=3.0, speed_mps=25.0)
    scene = _scene({-1: None, 0: SLOW_LEADER, 1: None}, {-1: fast_close_follower, 0: None, 1: None})
    # new follower behind the ego: s* = 2 + 37.5 + 25 * 5 / 2 = 102, a = 0 - (102/3)^2 = -1156 < -4
    assert lane_change_gain(scene, -1, DESIRED, UNIT_IDM, MOBIL) is None


def test_lane_change_is_unsafe_with_a_car_alongside():
    alongside = Neighbour(gap_m=-2.0, speed_mps=20.0)
    scene = _scene({-1: alongside, 0: SLOW_LEADER, 1: None}, {-1: alongside, 0: None, 1: None})
    assert lane_change_gain(scene, -1, DESIRED, UNIT_IDM, MOBIL) is None


# --------------------------------------------------------------------------------------- pure pursuit


def test_lookahead_point_interpolates_on_the_circle():
    waypoints = np.array([[3.0, 0.0], [3.0, 8.0], [3.0, 12.0]])
    # |(3, 0)| = 3 < 5 <= |(3, 8)|: the segment crosses the circle of radius 5 at (3, 4)
    np.testing.assert_allclose(lookahead_point(waypoints, 5.0), [3.0, 4.0])
    np.testing.assert_allclose(lookahead_point(waypoints, 2.0), [3.0, 0.0])  # first point already outside
    np.testing.assert_allclose(lookahead_point(waypoints, 50.0), [3.0, 12.0])  # never leaves: last point


def test_pure_pursuit_straight_lane_needs_no_steering():
    waypoints = np.stack([np.arange(1.0, 30.0), np.zeros(29)], axis=1)
    assert pure_pursuit_steering_angle(waypoints, 10.0, wheelbase_m=5.0) == pytest.approx(0.0)


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_pure_pursuit_on_a_circle_steers_its_curvature(side):
    radius, wheelbase = 50.0, 5.0
    angles = np.linspace(0.02, 0.6, 30)
    waypoints = np.stack([radius * np.sin(angles), side * radius * (1.0 - np.cos(angles))], axis=1)
    lookahead = 2.0 * radius * math.sin(angles[10] / 2.0)  # chord to a waypoint: the point lies on the circle
    # the arc through the ego tangent to its heading and through a point of the circle is the circle itself
    expected = side * math.atan(wheelbase / radius)
    assert pure_pursuit_steering_angle(waypoints, lookahead, wheelbase) == pytest.approx(expected)


def test_pure_pursuit_to_a_point_beside_and_ahead():
    # point (4, 3): d^2 = 25, kappa = 2 * 3 / 25 = 0.24, delta = atan(2 * 0.24)
    waypoints = np.array([[4.0, 3.0], [8.0, 6.0]])
    assert pure_pursuit_steering_angle(waypoints, 5.0, wheelbase_m=2.0) == pytest.approx(math.atan(0.48))


def test_controls_become_actions_with_the_contract_signs():
    assert steer_action(0.25, LIMITS) == pytest.approx(-0.5)  # left wheel angle is a negative (left) steer
    assert steer_action(-0.25, LIMITS) == pytest.approx(0.5)
    assert steer_action(2.0, LIMITS) == -1.0
    assert throttle_brake_action(2.0, LIMITS) == pytest.approx(0.5)
    assert throttle_brake_action(-4.0, LIMITS) == pytest.approx(-0.5)
    assert throttle_brake_action(-100.0, LIMITS) == -1.0


# ------------------------------------------------------------------------------- policies on fake scenes


class FakeEnv:
    """Just what the rule-based policy reads: a scene, the limits, the target speed and the step length."""

    def __init__(self, scene: Scene):
        self.current_scene = scene
        self.limits = LIMITS
        self.config = SimpleNamespace(target_speed_mps=DESIRED)
        self.backend = SimpleNamespace(dt=0.2)

    def scene(self) -> Scene:
        return self.current_scene


def _act(policy, scene_or_env) -> np.ndarray:
    env = scene_or_env if isinstance(scene_or_env, FakeEnv) else FakeEnv(scene_or_env)
    action = policy.act({}, env)
    assert action.shape == (2,) and np.all(np.abs(action) <= 1.0)
    return action


def test_idm_mobil_overtakes_a_slow_leader_on_a_free_lane():
    policy = IdmMobilPolicy(idm=UNIT_IDM, mobil=MOBIL)
    policy.reset(0)
    scene = _scene({-1: None, 0: SLOW_LEADER}, {-1: None, 0: None}, lane=1, lanes=2)
    steer, _ = _act(policy, scene)
    assert steer < 0.0  # toward the left lane (action steer < 0 turns left)


def test_idm_mobil_stays_in_lane_and_brakes_when_the_neighbour_lane_is_taken():
    policy = IdmMobilPolicy(idm=UNIT_IDM, mobil=MOBIL)
    policy.reset(0)
    alongside = Neighbour(gap_m=-1.0, speed_mps=20.0)
    scene = _scene({-1: alongside, 0: SLOW_LEADER, 1: alongside}, {-1: alongside, 0: None, 1: alongside})
    steer, throttle_brake = _act(policy, scene)
    assert steer == pytest.approx(0.0)
    assert throttle_brake < 0.0


def test_idm_mobil_holds_its_decision_instead_of_dithering():
    policy = IdmMobilPolicy(idm=UNIT_IDM, mobil=MobilParams(politeness=0.0, min_hold_s=2.0))
    policy.reset(0)
    slow_left = _scene({-1: None, 0: SLOW_LEADER}, {-1: None, 0: None}, lane=1, lanes=2)
    env = FakeEnv(slow_left)
    _act(policy, env)  # decides to go left
    # one step later the change is complete and the new lane (now lane 0) got a slow leader, the right lane
    # is free: MOBIL would want to go back, but the decision is held
    env.current_scene = _scene({0: SLOW_LEADER, 1: None}, {0: None, 1: None}, lane=0, lanes=2)
    steer, _ = _act(policy, env)
    assert steer == pytest.approx(0.0)
    for _ in range(10):  # 2 s later it may decide again, and goes right
        steer, _ = _act(policy, env)
    assert steer > 0.0


def test_random_policy_is_reproducible_per_seed_and_uniform_in_the_box():
    policy = RandomPolicy()
    policy.reset(7)
    first = np.stack([policy.act({}, None) for _ in range(500)])
    policy.reset(7)
    again = np.stack([policy.act({}, None) for _ in range(500)])
    policy.reset(8)
    other = np.stack([policy.act({}, None) for _ in range(500)])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and np.all(np.abs(first) <= 1.0)
    assert np.all(first.min(axis=0) < -0.9) and np.all(first.max(axis=0) > 0.9)


# --------------------------------------------------------------------------------- on the real highway env

LATERAL_OFFSET_INDEX = 3  # in the vector observation: speed, distance to goal, heading error, lateral offset


@pytest.mark.parametrize("layout", ["straight", "curvy"])
def test_idm_mobil_drives_an_empty_road_to_the_goal_in_its_lane(layout):
    env = DrivingEnv(EnvConfig(layout=layout, traffic_density=0.0, route_length_m=250.0))
    policy = IdmMobilPolicy()
    lateral_offsets = []
    try:
        for seed in (0, 1):
            obs, _ = env.reset(seed=seed)
            policy.reset(seed)
            terminated = truncated = False
            while not (terminated or truncated):
                obs, _, terminated, truncated, info = env.step(policy.act(obs, env))
                lateral_offsets.append(abs(obs["vector"][LATERAL_OFFSET_INDEX]) * LATERAL_SCALE_M)
            assert info["reason"] == "goal", f"{layout} seed {seed}: {info['reason']}"
    finally:
        env.close()
    # pure pursuit cuts the bends' corners a little; a lane is 4 m wide
    assert max(lateral_offsets) < 0.3


def test_idm_mobil_beats_random_on_medium_traffic():
    config = EnvConfig(scenario=1, route_length_m=300.0)
    seeds = range(100, 104)
    idm = evaluate(IdmMobilPolicy(), config, seeds)
    random = evaluate(RandomPolicy(), config, seeds)
    assert idm["eval/success_rate"] >= random["eval/success_rate"] + 0.5
    assert idm["eval/collision_rate"] <= random["eval/collision_rate"]
    assert idm["eval/collision_rate"] <= 0.25
    assert idm["eval/route_completion"] > random["eval/route_completion"]
    assert idm["eval/driving_score"] >= random["eval/driving_score"] + 0.5  # the CARLA Leaderboard's, on highway
