"""The reward's terms: progress per step, and the optional cap that stops paying for speed past the target."""

import numpy as np
import pytest

from lightning_td3.envs.config import RewardConfig
from lightning_td3.envs.reward import RewardTerms, compute_reward

TARGET_MPS, DT = 25.0, 0.2


def terms_at(speed_mps=20.0, lateral_offset_m=0.0, scene=None, **weights) -> RewardTerms:
    """The reward of one step at `speed_mps` on the target line but for `lateral_offset_m`, with the other cars as
    `scene` (compute_reward's gap and speed keywords); its total checked against its terms."""
    terms = compute_reward(
        RewardConfig(**weights), speed_mps=speed_mps, target_speed_mps=TARGET_MPS, progress_step_m=speed_mps * DT,
        dt=DT, lateral_offset_m=lateral_offset_m, off_road_distance_m=2.5, heading_error_rad=0.0,
        action_change=np.zeros(2), crashed=False, **(scene or {}),
    )
    assert terms.total == pytest.approx(sum(value for name, value in terms.as_dict().items() if name != "total"))
    return terms


def progress_at(speed_factor: float, **weights) -> float:
    return terms_at(speed_factor * TARGET_MPS, **weights).progress


@pytest.mark.parametrize("speed_factor", [0.5, 1.0])
def test_the_cap_leaves_progress_up_to_the_target_speed_alone(speed_factor):
    assert progress_at(speed_factor, progress_up_to_target_speed=True) == pytest.approx(3.0 * speed_factor)
    assert progress_at(speed_factor) == pytest.approx(3.0 * speed_factor)


def test_the_cap_stops_paying_for_speed_past_the_target():
    assert progress_at(1.3) == pytest.approx(3.0 * 1.3)
    assert progress_at(1.3, progress_up_to_target_speed=True) == pytest.approx(3.0)


def headway_at(gap_ahead_m, speed_mps=20.0, **weights) -> float:
    return terms_at(speed_mps, scene={"gap_ahead_m": gap_ahead_m}, **weights).headway


def test_the_headway_term_charges_a_time_gap_below_headway_s_in_proportion():
    # 20 m/s with headway_s 1.5: the penalty starts under a 30 m gap.
    assert headway_at(None, headway=2.0) == 0.0  # no car ahead
    assert headway_at(45.0, headway=2.0) == 0.0
    assert headway_at(30.0, headway=2.0) == 0.0
    assert headway_at(15.0, headway=2.0) == pytest.approx(-1.0)  # half the time gap: half the weight
    assert headway_at(0.0, headway=2.0) == pytest.approx(-2.0)
    assert headway_at(15.0, headway=2.0, headway_s=3.0) == pytest.approx(-1.5)
    assert headway_at(5.0, speed_mps=0.0, headway=2.0) == 0.0  # standing: no time gap to close
    assert headway_at(0.0) == 0.0  # off by default, as the seed's reward


def test_the_env_charges_the_headway_and_the_closing_speed_to_the_car_ahead_in_its_lane():
    from lightning_td3.envs import DrivingEnv, EnvConfig

    env = DrivingEnv(EnvConfig(scenario=2, route_length_m=300.0, max_steps=60, num_waypoints=5,
                               reward=RewardConfig(headway=1.0, headway_s=3.0, closing=1.0)))
    env.reset(seed=4)
    charged, closing_charged = [], []
    for _ in range(40):  # full throttle down the lane: it closes in on the traffic ahead
        _, _, terminated, truncated, info = env.step(np.array([0.0, 1.0], np.float32))
        if terminated or truncated:
            break
        leader, speed = env.backend.scene().leaders.get(0), info["speed_kmh"] / 3.6
        expected = 0.0 if leader is None else -min(max(1.0 - leader.gap_m / (speed * 3.0), 0.0), 1.0)
        assert info["reward_terms"]["headway"] == pytest.approx(expected, abs=1e-6)
        charged.append(expected)
        closing_mps = 0.0 if leader is None else speed - leader.speed_mps
        closing = -min(max(1.0 - leader.gap_m / (closing_mps * 4.0), 0.0), 1.0) if closing_mps > 0 else 0.0
        assert info["reward_terms"]["closing"] == pytest.approx(closing, abs=1e-5)
        closing_charged.append(closing)
    assert min(charged) < -0.1, "the ego never came close to a car ahead: the test shows nothing"
    assert min(closing_charged) < -0.1, "the ego never closed in on a car ahead: the test shows nothing"
    with pytest.raises(ValueError, match="env.reward.headway_s must be > 0 seconds"):
        RewardConfig(headway_s=0.0)


def closing_at(gap_ahead_m, speed_ahead_mps, speed_mps=20.0, **weights) -> float:
    scene = {"gap_ahead_m": gap_ahead_m, "speed_ahead_mps": speed_ahead_mps}
    return terms_at(speed_mps, scene=scene, **weights).closing


def test_the_closing_term_charges_a_time_to_collision_below_closing_s_whatever_the_time_gap():
    # 20 m/s on a car at 10 m/s: closing at 10 m/s, so with closing_s 4 the charge starts under a 40 m gap, where the
    # time gap (2 s) is above headway_s and the headway term charges nothing.
    assert closing_at(40.0, 10.0, closing=2.0) == 0.0
    assert closing_at(20.0, 10.0, closing=2.0) == pytest.approx(-1.0)  # half the time to collision: half the weight
    assert closing_at(0.0, 10.0, closing=2.0) == pytest.approx(-2.0)
    assert closing_at(20.0, 10.0, closing=2.0, closing_s=8.0) == pytest.approx(-1.5)
    assert closing_at(20.0, 15.0, closing=2.0) == pytest.approx(0.0)  # closing at 5 m/s: 4 s to go
    assert closing_at(10.0, 15.0, closing=2.0) == pytest.approx(-1.0)
    assert closing_at(5.0, 20.0, closing=2.0) == 0.0  # as fast as the ego: not closing, however near
    assert closing_at(5.0, 25.0, closing=2.0) == 0.0  # pulling away
    assert closing_at(None, None, closing=2.0) == 0.0  # no car ahead
    assert closing_at(20.0, 10.0) == 0.0  # off by default
    with pytest.raises(ValueError, match="env.reward.closing_s must be > 0 seconds"):
        RewardConfig(closing_s=0.0)


def alongside_at(lateral_offset_m, gaps_beside_m, speed_mps=20.0, **weights) -> float:
    terms = terms_at(speed_mps, lateral_offset_m, scene={"gaps_beside_m": gaps_beside_m}, **weights)
    assert terms.headway == 0.0  # the lanes beside are not the ego's: the headway charge does not read them
    return terms.alongside


def test_the_alongside_term_charges_moving_toward_a_lane_with_a_car_near():
    # 20 m/s with headway_s 1.5: a car in the lane beside counts under a 30 m gap, fully when they overlap; the
    # charge grows with the ego's offset toward that lane (> 0: left), whole at 1.5 m.
    car_left = (0.0, None)
    assert alongside_at(1.5, car_left, alongside=2.0) == pytest.approx(-2.0)
    assert alongside_at(3.0, car_left, alongside=2.0) == pytest.approx(-2.0)  # capped: a crash charges more
    assert alongside_at(0.75, car_left, alongside=2.0) == pytest.approx(-1.0)
    assert alongside_at(0.75, (15.0, None), alongside=2.0) == pytest.approx(-0.5)  # half the time gap
    assert alongside_at(1.5, (30.0, None), alongside=2.0) == 0.0
    assert alongside_at(0.0, car_left, alongside=2.0) == 0.0  # centred in its own lane
    assert alongside_at(-1.5, car_left, alongside=2.0) == 0.0  # moving away from it, toward an empty lane
    assert alongside_at(-1.5, (None, 0.0), alongside=2.0) == pytest.approx(-2.0)  # toward a car on the right
    assert alongside_at(-0.75, (0.0, 15.0), alongside=2.0) == pytest.approx(-0.5)
    assert alongside_at(1.5, car_left, speed_mps=0.0, alongside=2.0) == 0.0  # standing: no time gap to close
    assert alongside_at(1.5, car_left) == 0.0  # off by default
