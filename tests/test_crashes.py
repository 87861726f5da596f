"""The crash report: what the car ahead did a second before each collision of an evaluation episode."""

import numpy as np

from lightning_td3.crashes import Crash, crashes
from lightning_td3.envs import EnvConfig


class FullThrottle:
    """Straight down its lane at full throttle: it runs into the traffic ahead."""

    def reset(self, seed: int) -> None:
        pass

    def act(self, observation, env) -> np.ndarray:
        return np.array([0.0, 1.0], np.float32)


def test_running_into_the_traffic_ahead_is_reported_as_rear_end_collisions():
    config = EnvConfig(scenario=2, route_length_m=300.0, max_steps=80, num_waypoints=5)
    found, episodes = crashes(config, FullThrottle(), range(0, 2))
    assert episodes == 2 and found, "full throttle in dense traffic should collide"
    for crash in found:
        assert crash.lane_changes == 0 and crash.gap_ahead_m is not None and crash.gap_ahead_m < 30.0
        assert crash.speed_ahead_kmh < crash.speed_kmh and crash.rear_end


def test_only_a_collision_into_a_slower_car_close_ahead_without_a_lane_change_is_rear_end():
    assert not Crash(0, 10, 90.0, None, None, 0).rear_end
    assert not Crash(0, 10, 90.0, 5.0, 95.0, 0).rear_end
    assert not Crash(0, 10, 90.0, 5.0, 70.0, 1).rear_end
    assert not Crash(0, 10, 90.0, 40.0, 70.0, 0).rear_end  # 90 km/h covers 25 m in a second: another car cut in
    assert Crash(0, 10, 90.0, 20.0, 70.0, 0).rear_end
