"""The reward's terms: progress per step, and the optional cap that stops paying for speed past the target."""

import numpy as np
import pytest

from lightning_td3.envs.config import RewardConfig
from lightning_td3.envs.reward import compute_reward

TARGET_MPS, DT = 25.0, 0.2


def progress_at(speed_factor: float, **weights) -> float:
    terms = compute_reward(
        RewardConfig(**weights),
        speed_mps=speed_factor * TARGET_MPS,
        target_speed_mps=TARGET_MPS,
        progress_step_m=speed_factor * TARGET_MPS * DT,
        dt=DT,
        lateral_offset_m=0.0,
        off_road_distance_m=2.5,
        heading_error_rad=0.0,
        action_change=np.zeros(2),
        crashed=False,
    )
    return terms.progress


@pytest.mark.parametrize("speed_factor", [0.5, 1.0])
def test_the_cap_leaves_progress_up_to_the_target_speed_alone(speed_factor):
    assert progress_at(speed_factor, progress_up_to_target_speed=True) == pytest.approx(3.0 * speed_factor)
    assert progress_at(speed_factor) == pytest.approx(3.0 * speed_factor)


def test_the_cap_stops_paying_for_speed_past_the_target():
    assert progress_at(1.3) == pytest.approx(3.0 * 1.3)
    assert progress_at(1.3, progress_up_to_target_speed=True) == pytest.approx(3.0)
