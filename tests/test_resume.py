"""Resume: fit to N, stop, `fit --ckpt_path last` to 2N equals one uninterrupted run to 2N."""

import pickle

import numpy as np
import torch

from lightning_td3.envs import DrivingEnv, EnvConfig
from tests.tiny_run import TINY_ENV, fit


def load(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    fit(tmp_path / "straight_through", **{"trainer.max_epochs": 2})
    fit(tmp_path / "interrupted", **{"trainer.max_epochs": 1})
    first_half = load(tmp_path / "interrupted")
    fit(tmp_path / "interrupted", "--ckpt_path", "last", **{"trainer.max_epochs": 2})

    expected, resumed = load(tmp_path / "straight_through"), load(tmp_path / "interrupted")
    assert first_half["td3_progress"]["updates"] == 6
    assert resumed["td3_progress"]["updates"] == expected["td3_progress"]["updates"] == 12
    assert resumed["td3_progress"]["env_steps"] == expected["td3_progress"]["env_steps"]
    assert resumed["td3_progress"]["episodes"] == expected["td3_progress"]["episodes"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), f"{name} differs after resume"
    for expected_opt, resumed_opt in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for key, state in expected_opt["state"].items():
            for field, tensor in state.items():
                assert torch.equal(tensor, resumed_opt["state"][key][field]), f"optimizer state {field} differs"
    assert_same_tree(expected["ReplayDataModule"], resumed["ReplayDataModule"], "replay")
    expected_collector, resumed_collector = expected["callbacks"]["Collector"], resumed["callbacks"]["Collector"]
    assert_same_tree(
        {k: v for k, v in expected_collector.items() if k != "env_states"},
        {k: v for k, v in resumed_collector.items() if k != "env_states"},
        "collector",
    )
    assert_same_futures(expected_collector["env_states"], resumed_collector["env_states"])


def assert_same_futures(expected_states: bytes, resumed_states: bytes) -> None:
    """The training envs were left in the same state: the same actions from here give the same observations."""
    config = EnvConfig(**TINY_ENV)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 2))
    for expected_state, resumed_state in zip(pickle.loads(expected_states), pickle.loads(resumed_states)):
        rollouts = []
        for state in (expected_state, resumed_state):
            env = DrivingEnv(config)
            env.reset(seed=0)
            env.set_state(state)
            rollouts.append([env.step(action)[:2] for action in actions])
            env.close()
        for (obs_a, reward_a), (obs_b, reward_b) in zip(*rollouts):
            assert np.array_equal(obs_a["image"], obs_b["image"]) and np.array_equal(obs_a["vector"], obs_b["vector"])
            assert reward_a == reward_b


def assert_same_tree(expected, actual, where: str) -> None:
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tree(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs after resume"
    else:
        assert expected == actual, f"{where} differs after resume"
