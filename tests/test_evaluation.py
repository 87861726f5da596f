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

METRIC_KEYS = {
    "eval/success_rate",
    "eval/collision_rate",
    "eval/avg_speed_kmh",
    "eval/episode_return",
    "eval/episode_length",
    "eval/route_completion",
    "eval/episodes",
}


def _result(success: bool, collision: bool, speed: float, ret: float, length: int, completion: float) -> EpisodeResult:
    reason = "goal" if success else ("collision" if collision else "time_out")
    return EpisodeResult(success, collision, speed, ret, length, completion, reason)


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
    }
    assert EpisodeResult.from_info(info) == EpisodeResult(True, False, 77.0, 12.5, 42, 1.0, "goal")


# ---------------------------------------------------------------------------- on the real highway env

SHORT_ROUTE = dict(route_length_m=200.0, max_steps=150)


def test_run_episode_is_reproducible_per_seed_and_ends_with_a_reason():
    env = DrivingEnv(EnvConfig(**SHORT_ROUTE))
    try:
        first = run_episode(env, RandomPolicy(), seed=3)
        again = run_episode(env, RandomPolicy(), seed=3)
    finally:
        env.close()
    assert first == again
    assert first.reason in ("collision", "off_road", "goal", "time_out")
    assert first.episode_length >= 1
    assert 0.0 <= first.route_completion <= 1.0


def test_evaluate_returns_float_metrics_for_episode_specs():
    specs = [EpisodeSpec(EnvConfig(**SHORT_ROUTE), seed) for seed in (0, 1)]
    values = evaluate(RandomPolicy(), specs[0].env_config, [spec.seed for spec in specs])
    assert set(values) == METRIC_KEYS
    assert all(isinstance(value, float) and math.isfinite(value) for value in values.values())
    assert 0.0 <= values["eval/success_rate"] <= 1.0
    assert values["eval/episode_length"] >= 1.0


def test_empty_metrics_report_nan_not_a_made_up_number():
    with pytest.warns(UserWarning):  # torchmetrics warns that compute ran before any update
        values = EvaluationMetrics().compute()
    assert values.pop("eval/episodes") == 0
    assert all(torch.isnan(value) for value in values.values())
    assert np.isnan(values["eval/success_rate"].item())
