"""The collector: what it hands the replay buffer at episode ends, its counters, and its settings' checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.profilers import PassThroughProfiler

from lightning_td3.collector import Collector, make_vector_env
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError, TrainingAborted
from lightning_td3.evaluation import EvaluationMetrics
from lightning_td3.replay import ReplayBuffer
from tests.faults import SIMULATOR_TIMEOUT, FaultPlan, install
from tests.tiny_run import fit


class RecordingBuffer(ReplayBuffer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def add(self, obs, action, reward, next_obs, terminated, truncated, mask=None, rings=None):
        self.calls.append({key: _copy(value) for key, value in dict(
            obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated, truncated=truncated,
        ).items()})
        super().add(obs, action, reward, next_obs, terminated, truncated, mask, rings)


class RecordingModule:
    """Only what the collector touches on the TD3 module: counters, acting and the training episode metrics."""

    def __init__(self):
        self.env_steps = self.episodes = self.updates = 0
        self.train_episode_metrics = EvaluationMetrics(prefix="train/")
        self.logged = []

    def act(self, observation):
        return np.zeros((len(observation["vector"]), 2), np.float32)

    def log_vs_env_steps(self, scalars):
        self.logged.append(scalars)


def _copy(value):
    return {k: v.copy() for k, v in value.items()} if isinstance(value, dict) else np.copy(value)


def test_final_observations_go_to_the_buffer_and_episodes_are_counted():
    # Short time-outs and a hard right turn: both truncations and terminations (off-road) happen.
    config = EnvConfig(scenario=0, route_length_m=150.0, max_steps=6, num_waypoints=5)
    collector = Collector(learning_starts=10**6, async_envs=False)
    buffer = RecordingBuffer(400, num_envs=2, vector_size=config.vector_size)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(buffer=buffer, live_envs=[0, 1]), global_rank=0,
                              profiler=PassThroughProfiler())
    module = RecordingModule()
    collector.envs = make_vector_env([config] * 2, asynchronous=False)
    collector._rng = np.random.default_rng(0)
    collector._obs, _ = collector.envs.reset(seed=3)

    returned = []
    for _ in range(20):
        collector._collect(trainer, module)
        returned.append(_copy(collector._obs))
    collector.envs.close()

    dones = 0
    for step, call in enumerate(buffer.calls):
        if step > 0:  # each step acts on exactly what the previous step returned
            assert np.array_equal(call["obs"]["image"], returned[step - 1]["image"])
        for env in range(2):
            done = call["terminated"][env] or call["truncated"][env]
            same_as_returned = np.array_equal(call["next_obs"]["vector"][env], returned[step]["vector"][env])
            # A finished env hands back the next episode's first observation; the buffer must get the final one.
            assert same_as_returned != done
            dones += done
    assert any(call["truncated"].any() for call in buffer.calls), "time-outs expected with max_steps=6"
    assert not any((call["terminated"] & call["truncated"]).any() for call in buffer.calls)
    assert module.env_steps == 40
    assert module.episodes == dones == module.train_episode_metrics.compute()["train/episodes"] > 0
    assert len(buffer) == 40  # every transition is sampleable, episode ends included
    assert_samples_are_stored_transitions(buffer)


def assert_samples_are_stored_transitions(buffer: RecordingBuffer) -> None:
    """Every sampled transition equals, field by field, one the collector handed to the buffer."""
    stored = {}
    for call in buffer.calls:
        for env in range(buffer.num_envs):
            stored[call["action"][env].tobytes()] = {
                "image": call["obs"]["image"][env], "vector": call["obs"]["vector"][env],
                "action": call["action"][env], "reward": np.float32([call["reward"][env]]),
                "next_image": call["next_obs"]["image"][env], "next_vector": call["next_obs"]["vector"][env],
                "terminated": np.float32(call["terminated"][env]),
            }
    batch = buffer.sample(256, np.random.default_rng(0))
    for row in range(256):
        expected = stored[batch["action"][row].tobytes()]
        for name, value in expected.items():
            assert np.array_equal(batch[name][row], value), f"sampled {name} differs from the stored one"


@pytest.mark.parametrize(
    "field,value",
    [("learning_starts", 0), ("exploration_noise", -0.1), ("updates_per_step", 0.0), ("max_env_failures", 0)],
)
def test_bad_collector_settings_are_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"Collector.{field}"):
        Collector(**{field: value})


def collector_on(config, num_envs: int, buffer, module, **settings):
    collector = Collector(learning_starts=10**6, async_envs=False, **settings)
    data = SimpleNamespace(buffer=buffer, env=config, env_configs=[config] * num_envs, live_envs=list(range(num_envs)))
    trainer = SimpleNamespace(datamodule=data, global_rank=0, profiler=PassThroughProfiler())
    collector.envs = make_vector_env(data.env_configs, asynchronous=False)
    collector._rng = np.random.default_rng(0)
    collector._obs, _ = collector.envs.reset(seed=3)
    return collector, trainer


def test_a_simulator_crash_mid_episode_drops_the_open_episodes_rebuilds_the_envs_and_goes_on(monkeypatch):
    plan = install(monkeypatch, FaultPlan(crash_steps={7}))  # vector step 4, env 0: mid-episode
    config = EnvConfig(scenario=0, route_length_m=150.0, max_steps=30, num_waypoints=5)
    buffer, module = RecordingBuffer(400, num_envs=2, vector_size=config.vector_size), RecordingModule()
    collector, trainer = collector_on(config, 2, buffer, module)

    for _ in range(10):
        collector._collect(trainer, module)
    collector.envs.close()

    assert plan.crashes == 1 and collector.env_failures == 1
    assert len(buffer.calls) == 9 and module.env_steps == 18  # the crashed step added and counted nothing
    assert len(buffer) == 18
    assert module.logged[-1] == {"train/env_failures": 1.0}
    # Every transition the buffer hands out is one step an env really made: none bridges the crash, where the
    # next observation would come from the rebuilt env's new episode.
    emitted = {
        (call["obs"]["vector"][env].tobytes(), call["next_obs"]["vector"][env].tobytes())
        for call in buffer.calls for env in range(2)
    }
    batch = buffer.sample(500, np.random.default_rng(1))
    for vector, next_vector in zip(batch["vector"], batch["next_vector"]):
        assert (vector.tobytes(), next_vector.tobytes()) in emitted


def test_a_failing_rebuild_counts_as_another_failure_in_a_row(monkeypatch):
    # Step 3 crashes, then the first reset of the rebuilt envs crashes too; the second rebuild works.
    plan = install(monkeypatch, FaultPlan(crash_steps={3}, crash_resets={3}))
    config = EnvConfig(scenario=0, route_length_m=150.0, max_steps=30, num_waypoints=5)
    buffer, module = RecordingBuffer(400, num_envs=2, vector_size=config.vector_size), RecordingModule()
    collector, trainer = collector_on(config, 2, buffer, module, max_env_failures=3)

    for _ in range(4):
        collector._collect(trainer, module)
    collector.envs.close()

    assert plan.crashes == 2 and collector.env_failures == 2
    assert module.env_steps == 6


def test_failures_in_a_row_stop_the_run_with_a_checkpoint_that_resumes(monkeypatch, tmp_path):
    # The simulator goes away for good after warm-up (30 env steps = 30 backend steps with 2 envs).
    plan = install(monkeypatch, FaultPlan(crash_from_step=36))
    collector_setting = {"trainer.callbacks.0.init_args.max_env_failures": 3}
    with pytest.raises(TrainingAborted, match="failed 3 times in a row .* Checkpoint written to") as aborted:
        fit(tmp_path, **collector_setting)
    assert SIMULATOR_TIMEOUT in str(aborted.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["callbacks"]["Collector"]["per_process"][0]["env_failures"] == 3
    assert 0 < saved["td3_progress"]["updates"] < 6

    plan.crash_from_step = None  # the simulator is back
    result = fit(tmp_path, "--ckpt_path", "last", **collector_setting)
    assert result.model.updates == 6


def test_env_processes_stepping_during_updates_train_exactly_as_envs_stepping_in_this_process(tmp_path):
    """With async envs the vector step runs in the env processes while the learner updates, and is finished before
    the next update (or a checkpoint): the same transitions, counters and weights as envs in this process give."""
    saved = {}
    for name, asynchronous in (("in_process", False), ("processes", True)):
        fit(tmp_path / name, **{"trainer.callbacks.0.init_args.async_envs": asynchronous})
        saved[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    in_process, processes = saved["in_process"], saved["processes"]
    assert processes["td3_progress"]["updates"] == in_process["td3_progress"]["updates"] == 6
    for key in ("env_steps", "episodes"):
        assert processes["td3_progress"][key] == in_process["td3_progress"][key], key
    for name, value in in_process["state_dict"].items():
        assert torch.equal(processes["state_dict"][name], value), name
    collector_states = [saved[name]["callbacks"]["Collector"]["per_process"][0] for name in saved]
    assert torch.equal(collector_states[0]["obs"]["image"], collector_states[1]["obs"]["image"])


@pytest.mark.parametrize("overlap", [True, False])
def test_with_overlap_an_update_sees_every_env_step_but_the_one_under_way(overlap):
    config = EnvConfig(scenario=0, route_length_m=150.0, max_steps=50, num_waypoints=5)
    buffer = ReplayBuffer(400, num_envs=2, vector_size=config.vector_size)
    module = RecordingModule()
    collector, trainer = collector_on(config, 2, buffer, module, overlap=overlap)
    collector.learning_starts = module.env_steps = 2  # as after a warm-up of 2 env steps (one vector step)
    trainer.world_size = 1
    module.run_env_steps = module.run_episodes = 0
    module.log_dict = lambda *args, **kwargs: None
    stored = []
    for update in range(4):  # one update per env step: a vector step of the 2 envs every other update
        module.updates = update
        collector.on_train_batch_start(trainer, module, None, update)
        stored.append(len(buffer))
    collector._close_envs()
    assert module.env_steps == 2 + 2 * 2
    assert stored == ([0, 0, 2, 2] if overlap else [2, 2, 4, 4])
