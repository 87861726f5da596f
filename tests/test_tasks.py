"""Task distributions: settings given as lists or ranges, one task drawn per episode from the env's seeded generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import SyncVectorEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torch

import cli
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.envs.highway_backend import _traffic_count
from lightning_td3.envs.tasks import Range
from lightning_td3.errors import ConfigError
from lightning_td3.export import ACTOR_ONLY_KEY
from tests.tiny_run import fit

ROOT = Path(__file__).resolve().parent.parent
# Episodes of single-value configs as `trace` recorded them at commit 0fdabfd, before tasks could vary.
SINGLE_TASK_TRACES = Path(__file__).parent / "data" / "single_task_traces.npz"
SINGLE_TASKS = {
    "default": {},
    "dense_curvy_four_lanes": dict(scenario=2, layout="curvy", lanes=4, route_length_m=300.0, max_steps=10,
                                   traffic_density=1.5, observe_leader=True),
}
TRACE_SEEDS = (3, 11)
GENERALIST = dict(
    scenario=[0, 1, 2], traffic_density={"low": 0.5, "high": 2.0}, layout=["straight", "curvy"],
    lanes={"low": 2, "high": 4}, route_length_m={"low": 300, "high": 2000}, max_steps={"per_km": 500},
)
SHORT_ROUTES = dict(GENERALIST, route_length_m={"low": 100, "high": 150})  # cheap to build


def trace(settings: dict, seed: int, steps: int = 12) -> dict[str, np.ndarray]:
    """An episode's newest frames, vectors, rewards and ends under fixed pseudo-random actions, and its traffic."""
    env = DrivingEnv(EnvConfig(**settings))
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(seed).uniform(-0.3, 1.0, (steps, 2)).astype(np.float32)
    actions[:, 0] *= 0.1
    frames, vectors, rewards, ends = [obs["image"][-1]], [obs["vector"]], [], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(obs["image"][-1])
        vectors.append(obs["vector"])
        rewards.append(reward)
        ends.append((terminated, truncated))
        if terminated or truncated:
            break
    env.close()
    return {"frames": np.stack(frames), "vectors": np.stack(vectors), "rewards": np.array(rewards),
            "ends": np.array(ends), "vehicles": np.array(env.backend.vehicle_count)}


@pytest.mark.parametrize("name", SINGLE_TASKS)
def test_a_config_of_single_values_gives_the_episodes_it_gave_before_tasks_could_vary(name):
    recorded = np.load(SINGLE_TASK_TRACES)
    for seed in TRACE_SEEDS:
        for key, value in trace(SINGLE_TASKS[name], seed).items():
            np.testing.assert_array_equal(value, recorded[f"{name}/{seed}/{key}"], err_msg=f"{name}, seed {seed}: {key}")


def test_a_config_of_single_values_is_its_own_task_and_draws_nothing():
    config = EnvConfig(scenario=2, lanes=4)
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert config.sample_task(rng) is config
    assert rng.bit_generator.state == before
    assert config.varying == ()


def test_draws_cover_every_listed_value_and_stay_in_every_range():
    config = EnvConfig(**GENERALIST)
    rng = np.random.default_rng(0)
    tasks = [config.sample_task(rng).task() for _ in range(300)]
    assert Counter(t["scenario"] for t in tasks).keys() == {0, 1, 2}
    assert Counter(t["layout"] for t in tasks).keys() == {"straight", "curvy"}
    assert Counter(t["lanes"] for t in tasks).keys() == {2, 3, 4}  # an integer range includes both ends
    assert all(type(t["scenario"]) is int and type(t["lanes"]) is int for t in tasks)
    densities, routes = np.array([t["traffic_density"] for t in tasks]), np.array([t["route_length_m"] for t in tasks])
    assert 0.5 <= densities.min() < 0.6 and 1.9 < densities.max() <= 2.0
    assert 300 <= routes.min() < 400 and 1900 < routes.max() <= 2000
    assert all(t["max_steps"] == np.ceil(t["route_length_m"] / 2) for t in tasks)  # 500 steps per km


def test_the_time_out_follows_the_route():
    assert EnvConfig(route_length_m=300, max_steps={"per_km": 500}).sample_task(None).max_steps == 150
    assert EnvConfig(route_length_m=2000, max_steps={"per_km": 500}).sample_task(None).max_steps == 1000


def test_a_seed_always_gives_the_same_task_and_episode_and_other_seeds_other_tasks():
    env = DrivingEnv(EnvConfig(**SHORT_ROUTES))
    tasks = {}
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        tasks[seed] = info["task"]
    again, info = env.reset(seed=5)
    env.close()
    assert info["task"] == tasks[5]
    first = DrivingEnv(EnvConfig(**SHORT_ROUTES))
    obs, _ = first.reset(seed=5)
    np.testing.assert_array_equal(obs["image"], again["image"])
    np.testing.assert_array_equal(obs["vector"], again["vector"])
    assert len({tuple(task.values()) for task in tasks.values()}) == len(tasks)


@pytest.mark.filterwarnings("ignore:.*alternative render modes:UserWarning")  # needs gymnasium.make
def test_an_env_of_varying_tasks_passes_gymnasium_checker():
    # It resets with the same seed twice and wants the same observation: the same task.
    check_env(DrivingEnv(EnvConfig(**SHORT_ROUTES)), skip_render_check=True)


def test_the_drawn_task_is_the_one_the_highway_env_builds_and_ends_by():
    env = DrivingEnv(EnvConfig(**SHORT_ROUTES, num_waypoints=25))
    for seed in range(6):
        obs, info = env.reset(seed=seed)
        task = info["task"]
        assert env.scene().lanes == task["lanes"]
        assert env.backend.measure().route_length_m == pytest.approx(task["route_length_m"])
        curvy = any(lane.__class__.__name__ == "CircularLane" for lane in env.backend._track.network.lanes_list())
        assert curvy == (task["layout"] == "curvy")
        assert obs["vector"].shape == (54,)  # the same observation whatever the lanes or the route
        steps, done = 0, False
        while not done:  # standing still: only the time-out ends it
            _, _, terminated, truncated, final = env.step([0.0, -1.0])
            steps, done = steps + 1, terminated or truncated
        assert final["reason"] == "time_out" and steps == task["max_steps"] and final["task"] == task
    env.close()


def test_the_drawn_scenario_and_density_set_the_traffic():
    env = DrivingEnv(EnvConfig(scenario=[0, 2], traffic_density={"low": 0.0, "high": 2.0}, route_length_m=1000.0))
    counts = {}
    for seed in range(6):
        env.reset(seed=seed)
        counts[env.task.scenario, env.task.traffic_density] = env.backend.vehicle_count
        # as many as the drawn task puts on the road: vehicles per km per lane of its scenario, times its density
        assert env.backend.vehicle_count == _traffic_count(env.task, env.backend._track.end_m) > 0
    env.close()
    assert {scenario for scenario, _ in counts} == {0, 2} and len(set(counts.values())) > 3


def test_an_env_state_carries_its_task_and_the_tasks_to_come():
    env = DrivingEnv(EnvConfig(**SHORT_ROUTES))
    env.reset(seed=1)
    env.step([0.0, 0.5])
    state = env.get_state()
    other = DrivingEnv(EnvConfig(**SHORT_ROUTES))
    other.reset(seed=99)
    other.set_state(state)
    assert other.task == env.task
    assert other.reset()[1]["task"] == env.reset()[1]["task"]  # the next episode's draw too


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(scenario=[0, 7]), "data.env.scenario must be one of 0, 1, 2 (light, medium, dense traffic), a list of "
                                "them or a range {low: ..., high: ...} of them; got [0, 7]"),
        (dict(scenario=[]), "data.env.scenario must be one of 0, 1, 2"),
        (dict(lanes={"low": 4, "high": 2}), "data.env.lanes must be a range with low <= high; got {'low': 4, 'high': 2}"),
        (dict(lanes={"low": 2.5, "high": 4}), "data.env.lanes must be an integer in 1..6, a list of them or a range"),
        (dict(traffic_density={"min": 0.5, "max": 2}), "data.env.traffic_density must be a number >= 0, a list of"),
        (dict(layout={"low": "straight", "high": "curvy"}), "data.env.layout must be one of ('straight', 'curvy'), or "
                                                            "a list of them; got"),
        (dict(layout=["straight", "spiral"]), "data.env.layout must be one of"),
        (dict(route_length_m={"low": 50, "high": 300}, max_steps={"per_km": 500}),
         "data.env.route_length_m must be >= 100"),
        (dict(route_length_m=[300, 2000]), "data.env.max_steps must be {per_km: N} when data.env.route_length_m varies"),
        (dict(max_steps={"per_km": -1}), "data.env.max_steps must be an integer > 0, or {per_km: N} for N > 0 steps "
                                         "per km of route; got {'per_km': -1}"),
        (dict(max_steps={"per_m": 1}), "data.env.max_steps must be an integer > 0, or {per_km: N}"),
    ],
)
def test_a_bad_distribution_is_refused_in_one_line_naming_its_option(settings, message):
    with pytest.raises(ConfigError) as raised:
        EnvConfig(**settings)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_run_config_gives_distributions_in_yaml_and_its_settings_read_back(tmp_path):
    config_file = tmp_path / "tasks.yaml"
    config_file.write_text(
        "data:\n  env:\n    scenario: [0, 1, 2]\n    traffic_density: {low: 0.5, high: 2.0}\n"
        "    layout: [straight, curvy]\n    lanes: {low: 2, high: 4}\n    route_length_m: {low: 300, high: 2000}\n"
        "    max_steps: {per_km: 500}\n"
    )
    parsed = cli.main(["--config", str(ROOT / "configs/baselines/random.yaml"), "--config",
                       str(config_file)], run=False)
    env = parsed.datamodule.env
    assert env == EnvConfig(**GENERALIST)
    assert env.traffic_density == Range(0.5, 2.0) and env.scenario == [0, 1, 2]
    assert EnvConfig(**env.settings()) == env  # what a checkpoint keeps of its task


def test_an_agent_trained_on_distributions_is_validated_on_them_from_its_checkpoint_alone(tmp_path):
    checkpoint = torch.load(ROOT / "agents/scenario0_straight_capped.ckpt", weights_only=True)
    trained_on = EnvConfig(**{**checkpoint[ACTOR_ONLY_KEY]["env"], **SHORT_ROUTES, "max_steps": {"per_km": 80}})
    checkpoint[ACTOR_ONLY_KEY]["env"] = trained_on.settings()
    torch.save(checkpoint, tmp_path / "agent.ckpt")
    result = cli.main(["validate", "--ckpt_path", str(tmp_path / "agent.ckpt"), "--data.eval_episodes", "2"])
    assert result.datamodule.env == trained_on
    assert result.trainer.callback_metrics["eval/episodes"] == 2


def test_a_fit_over_scenarios_logs_each_scenarios_training_episodes_against_env_steps(tmp_path, monkeypatch):
    finished = []  # (scenario, success, collision, return) of every training episode, as the vector env ended it
    step = SyncVectorEnv.step

    def step_and_record(envs, actions):
        outcome = step(envs, actions)
        _, _, terminated, truncated, info = outcome
        final = info.get("final_info", {})
        for index in np.flatnonzero(terminated | truncated):
            finished.append((int(final["task"]["scenario"][index]), bool(final["success"][index]),
                             bool(final["collision"][index]), float(final["episode_return"][index])))
        return outcome

    monkeypatch.setattr(SyncVectorEnv, "step", step_and_record)  # the training envs' (evaluation drives one env)
    # Six-step episodes: enough of them in a tiny fit, all time-outs (`tests/test_evaluation.py` checks the groups'
    # success and collision rates on episodes that reach the goal or crash).
    fit(tmp_path, **{"data.env.scenario": [0, 1], "data.env.max_steps": 6})

    (event_dir,) = {path.parent for path in (tmp_path / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0, "histograms": 0}).Reload()

    def per_log(name: str) -> dict[int, float]:  # env step -> value (summed where two logs share a step)
        logged = Counter()
        for event in events.Scalars(f"{name}_vs_env_steps"):
            logged[event.step] += event.value
        return logged

    def totals(group: str, metric: str) -> float:  # a mean times its episode count, over every log
        counts = [event.value for event in events.Scalars(f"{group}/episodes_vs_env_steps")]
        means = [event.value for event in events.Scalars(f"{group}/{metric}_vs_env_steps")]
        return sum(mean * count for mean, count in zip(means, counts))

    assert {scenario for scenario, *_ in finished} == {0, 1}
    # Each log's episodes split over the two scenarios, and none is lost or counted twice.
    assert per_log("train_by_task/scenario_0/episodes") + per_log("train_by_task/scenario_1/episodes") == per_log(
        "train/episodes")
    assert sum(per_log("train/episodes").values()) == len(finished)
    for scenario in (0, 1):
        results = [result for drawn, *result in finished if drawn == scenario]
        group = f"train_by_task/scenario_{scenario}"
        assert sum(per_log(f"{group}/episodes").values()) == len(results)
        for column, metric in enumerate(("success_rate", "collision_rate", "episode_return")):
            assert totals(group, metric) == pytest.approx(sum(result[column] for result in results), abs=1e-3)
    tags = events.Tags()["scalars"]
    assert not any(tag.startswith(("train_by_task/straight", "train_by_task/curvy")) for tag in tags)  # one layout
