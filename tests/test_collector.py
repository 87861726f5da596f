"""The collector: what it hands the replay buffer at episode ends, its counters, and its settings' checks."""

from types import SimpleNamespace

import numpy as np
import pytest

from lightning_td3.collector import Collector, make_vector_env
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError
from lightning_td3.evaluation import EvaluationMetrics
from lightning_td3.replay import ReplayBuffer


class RecordingBuffer(ReplayBuffer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def add(self, obs, action, reward, next_obs, terminated, truncated, mask=None):
        self.calls.append({key: _copy(value) for key, value in dict(
            obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated, truncated=truncated,
        ).items()})
        super().add(obs, action, reward, next_obs, terminated, truncated, mask)


class RecordingModule:
    """Only what the collector touches on the TD3 module: counters, acting and the training episode metrics."""

    def __init__(self):
        self.env_steps = self.episodes = self.updates = 0
        self.train_episode_metrics = EvaluationMetrics(prefix="train/")

    def act(self, observation):
        return np.zeros((len(observation["vector"]), 2), np.float32)


def _copy(value):
    return {k: v.copy() for k, v in value.items()} if isinstance(value, dict) else np.copy(value)


def test_final_observations_go_to_the_buffer_and_episodes_are_counted():
    # Short time-outs and a hard right turn: both truncations and terminations (off-road) happen.
    config = EnvConfig(scenario=0, route_length_m=150.0, max_steps=6, num_waypoints=5)
    collector = Collector(learning_starts=10**6, async_envs=False)
    buffer = RecordingBuffer(400, num_envs=2, vector_size=config.vector_size)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(buffer=buffer), global_rank=0)
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
                "action": call["action"][env], "reward": np.float32(call["reward"][env]),
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
    [("learning_starts", 0), ("exploration_noise", -0.1), ("updates_per_step", 0.0)],
)
def test_bad_collector_settings_are_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"Collector.{field}"):
        Collector(**{field: value})
