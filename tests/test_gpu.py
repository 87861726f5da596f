"""CUDA paths: batches pinned and moved without blocking, updates on the GPU, checkpoints that load on a CPU."""

import pytest
import torch

from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.td3 import TD3
from tests.tiny_run import TINY_ENV, fit

pytestmark = pytest.mark.gpu


def test_fit_on_gpu_then_act_on_cpu(tmp_path):
    fit(tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--data.pin_memory", "true")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["td3_progress"]["updates"] == 6
    assert checkpoint["td3_progress"]["rng"]["cuda"], "the CUDA RNG state must be saved for an exact resume"

    module = TD3(vector_size=14, hidden_sizes=(16,))
    module.load_state_dict(checkpoint["state_dict"])
    env = DrivingEnv(EnvConfig(**TINY_ENV))
    observation, _ = env.reset(seed=0)
    action = module.policy().act(observation, env)
    assert action.shape == (2,) and abs(action).max() <= 1.0


def test_actor_acts_on_gpu_batches():
    module = TD3(vector_size=14, hidden_sizes=(16,)).cuda()
    observation = {
        "image": torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8).numpy(),
        "vector": torch.randn(3, 14).numpy(),
    }
    actions = module.act(observation)
    assert actions.shape == (3, 2) and abs(actions).max() <= 1.0
