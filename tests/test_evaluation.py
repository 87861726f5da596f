"""The evaluation harness: metric aggregation (incl. a DDP-style merge) and episodes on the real highway env."""

import math

import numpy as np
import pytest
import torch

from lightning_td3.baselines import RandomPolicy
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.evaluation import (
    EpisodeResult,
    EpisodeSpec,
    EvaluationMetrics,
    evaluate,
    run_episode,
)
from tests.test_highway_backend import drive_along_lane, steer_off_the_road

METRIC_KEYS = {
    "eval/success_rate",
    "eval/collision_rate",
    "eval/avg_speed_kmh",
    "eval/episode_return",
    "eval/episode_length",
    "eval/route_completion",
    "eval/infraction_penalty",
    "eval/driving_score",
    "eval/episodes",
}


def _result(success: bool, collision: bool, speed: float, ret: float, length: int, completion: float) -> EpisodeResult:
    reason = "goal" if success else ("collision" if collision else "time_out")
    return EpisodeResult(success, collision, speed, ret, length, completion, reason, "vehicle" if collision else None, 0.0)


GOAL = _result(True, False, 90.0, 100.0, 60, 1.0)
CRASH = _result(False, True, 60.0, -40.0, 20, 0.3)
TIMEOUT = _result(False, False, 30.0, 10.0, 300, 0.6)


def _values(metrics: EvaluationMetrics) -> dict[str, float]:
    return {name: value.item() for name, value in metrics.compute().items()}


def test_metrics_are_means_over_episodes():
    metrics = EvaluationMetrics()
    for result in (GOAL, CRASH, TIMEOUT):
        metrics.update(result)
    values = _values(metrics)
    assert set(values) == METRIC_KEYS
    assert values["eval/success_rate"] == pytest.approx(1 / 3)
    assert values["eval/collision_rate"] == pytest.approx(1 / 3)
    assert values["eval/avg_speed_kmh"] == pytest.approx(60.0)
    assert values["eval/episode_return"] == pytest.approx(70 / 3)
    assert values["eval/episode_length"] == pytest.approx(380 / 3)
    assert values["eval/route_completion"] == pytest.approx(1.9 / 3)
    assert values["eval/infraction_penalty"] == pytest.approx((1 + 0.6 + 1) / 3)
    assert values["eval/driving_score"] == pytest.approx((1.0 + 0.3 * 0.6 + 0.6) / 3)
    assert values["eval/episodes"] == 3


def test_the_prefix_names_training_episode_metrics():
    metrics = EvaluationMetrics(prefix="train/")
    metrics.update(CRASH)
    assert set(_values(metrics)) == {key.replace("eval/", "train/") for key in METRIC_KEYS}


def test_metrics_merge_like_ddp_gives_the_mean_over_all_ranks_episodes():
    rank0, rank1 = EvaluationMetrics(), EvaluationMetrics()
    rank0.update(GOAL)
    rank1.update(CRASH)
    rank1.update(CRASH)
    rank1.update(TIMEOUT)
    rank0.merge_state(rank1)  # the same "sum" reduction DDP's sync applies
    values = _values(rank0)
    assert values["eval/success_rate"] == pytest.approx(0.25)  # not the mean of per-rank rates (0.5)
    assert values["eval/collision_rate"] == pytest.approx(0.5)
    assert values["eval/avg_speed_kmh"] == pytest.approx((90 + 60 + 60 + 30) / 4)
    assert values["eval/episode_length"] == pytest.approx((60 + 20 + 20 + 300) / 4)
    assert values["eval/episodes"] == 4


def test_by_task_averages_each_listed_scenario_and_layout_and_merges_like_ddp():
    env = EnvConfig(scenario={"low": 0, "high": 2}, layout=["straight", "curvy"])
    rank0, rank1 = EvaluationMetrics(prefix="train/"), EvaluationMetrics(prefix="train/")
    for metrics in (rank0, rank1):  # as every process does: the same groups, from the config alone
        metrics.by_task(env)
    rank0.update(GOAL, {"scenario": 0, "layout": "straight"})
    rank1.update(CRASH, {"scenario": np.int64(0), "layout": "curvy"})  # as a vector env's info hands them
    rank1.update(TIMEOUT, {"scenario": 2, "layout": "curvy"})
    rank0.merge_state(rank1)  # the same "sum" reduction DDP's sync applies
    values = _values(rank0)
    assert values["train/episodes"] == 3 and values["train/success_rate"] == pytest.approx(1 / 3)
    assert values["train_by_task/scenario_0/episodes"] == 2
    assert values["train_by_task/scenario_0/success_rate"] == pytest.approx(0.5)
    assert values["train_by_task/scenario_0/collision_rate"] == pytest.approx(0.5)
    assert values["train_by_task/scenario_0/episode_return"] == pytest.approx(30.0)
    assert values["train_by_task/scenario_2/episode_length"] == 300
    assert values["train_by_task/curvy/episodes"] == 2 and values["train_by_task/curvy/collision_rate"] == 0.5
    assert values["train_by_task/straight/driving_score"] == 1.0
    # Scenario 1 is listed but drove no episode: it has no mean to log, rather than a NaN.
    assert not any(name.startswith("train_by_task/scenario_1/") for name in values)
    rank0.reset()  # as after every log: the groups start again from nothing
    rank0.update(TIMEOUT, {"scenario": 1, "layout": "straight"})
    assert {name for name in _values(rank0) if name.endswith("/episodes")} == {
        "train/episodes", "train_by_task/scenario_1/episodes", "train_by_task/straight/episodes"}


def test_by_task_makes_no_groups_for_settings_given_one_value():
    metrics = EvaluationMetrics(prefix="train/")
    metrics.by_task(EnvConfig(scenario=1, layout="curvy", lanes=[2, 3]))  # only lanes vary: not grouped
    metrics.update(CRASH, {"scenario": 1, "layout": "curvy", "lanes": 2})
    assert set(_values(metrics)) == {key.replace("eval/", "train/") for key in METRIC_KEYS}


def test_metrics_reset_forgets_episodes():
    metrics = EvaluationMetrics()
    metrics.update(GOAL)
    metrics.reset()
    metrics.update(CRASH)
    assert _values(metrics)["eval/success_rate"] == 0.0
    assert _values(metrics)["eval/collision_rate"] == 1.0


def test_result_from_final_info():
    info = {
        "reason": "goal",
        "success": True,
        "collision": False,
        "speed_kmh": 80.0,
        "route_completion": 1.0,
        "episode_return": 12.5,
        "episode_length": 42,
        "avg_speed_kmh": 77.0,
        "collision_with": None,
        "route_outside_lanes": 0.0,
    }
    assert EpisodeResult.from_info(info) == EpisodeResult(True, False, 77.0, 12.5, 42, 1.0, "goal", None, 0.0)


# ------------------------------------------------------------------- the CARLA Leaderboard's driving score


@pytest.mark.parametrize(("hit", "coefficient"), [("pedestrian", 0.50), ("vehicle", 0.60), ("static", 0.65),
                                                  ("other", 1.0), (None, 1.0)])
def test_a_collision_costs_the_leaderboards_coefficient_of_what_was_hit(hit, coefficient):
    # leaderboard/utils/statistics_manager.py, PENALTY_VALUE_DICT; "other" is what its collision criterion ignores.
    result = EpisodeResult(False, hit is not None, 30.0, -5.0, 40, 0.4, "collision" if hit else "time_out", hit, 0.0)
    assert result.infraction_penalty == pytest.approx(coefficient)
    assert result.driving_score == pytest.approx(0.4 * coefficient)


def test_driving_off_the_road_costs_the_share_of_the_driven_route_it_covers():
    # PENALTY_PERC_DICT[OUTSIDE_ROUTE_LANES_INFRACTION] = [0, 'increases']: the penalty is times 1 - percentage / 100.
    result = EpisodeResult(False, False, 30.0, -5.0, 40, 0.5, "off_road", None, 0.04)
    assert result.infraction_penalty == pytest.approx(0.96)
    assert result.driving_score == pytest.approx(0.5 * 0.96)


def test_a_reached_goal_counts_as_a_complete_route():
    # RouteCompletionTest sets 100 % at the target, though the goal radius leaves a few metres undriven.
    assert _result(True, False, 90.0, 100.0, 60, 0.994).driving_score == 1.0


def test_a_highway_crash_ends_with_what_the_score_needs_in_its_final_info():
    env = DrivingEnv(EnvConfig(scenario=2, traffic_density=3.0, route_length_m=200.0, max_steps=100))
    info = drive_along_lane(env, target_mps=40.0)  # flat out into dense traffic
    result = EpisodeResult.from_info(info)
    assert info["reason"] == "collision" and info["collision_with"] == "vehicle"
    assert result.infraction_penalty == pytest.approx(0.6)
    assert result.driving_score == pytest.approx(0.6 * info["route_completion"]) and result.driving_score > 0


def test_leaving_the_highway_charges_the_route_driven_off_it():
    info = steer_off_the_road()
    result = EpisodeResult.from_info(info)
    assert info["reason"] == "off_road" and info["collision_with"] is None
    assert 0.0 < info["route_outside_lanes"] < 1.0  # the progress of the step that left the road
    assert result.infraction_penalty == pytest.approx(1.0 - info["route_outside_lanes"])
