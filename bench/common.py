"""What the ours-vs-SB3 benchmarks share: the SB3 import, SB3's TD3 built like ours, and synthetic episodes.

Benchmarks run as scripts (`python bench/learner.py`), so this module is imported as `common` from bench/.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_td3.envs.config import FRAME_STACK, IMAGE_SIZE  # noqa: E402

FRAME_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
ACTION_SIZE = 2


def import_sb3():
    """The stable_baselines3 module, or exit with how to install it (it is a bench-only dependency)."""
    try:
        import stable_baselines3
    except ImportError:
        sys.exit('error: this benchmark compares against Stable-Baselines3; install it with pip install -e ".[bench]"')
    return stable_baselines3


def quiet_lightning() -> None:
    """Keep Lightning's banners and experimental-API warnings out of benchmark output."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


def observation_space(vector_size: int) -> gym.spaces.Dict:
    """`DrivingEnv`'s observation space for a given vector size."""
    return gym.spaces.Dict(
        image=gym.spaces.Box(0, 255, (FRAME_STACK, *FRAME_SHAPE), np.uint8),
        vector=gym.spaces.Box(-5.0, 5.0, (vector_size,), np.float32),
    )


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (ACTION_SIZE,), np.float32)


def sb3_td3_kwargs(hidden_sizes: tuple[int, ...] = (256, 256), feature_size: int = 512) -> dict:
    """SB3 TD3 settings that match our TD3: separate actor / critic NatureCNNs of `feature_size` features
    (MultiInputPolicy's CombinedExtractor: NatureCNN on the image, the vector passed through), the same heads,
    lr 3e-4, gamma 0.99, tau 0.005, policy delay 2, target smoothing 0.2 clipped at 0.5."""
    return dict(
        policy="MultiInputPolicy",
        learning_rate=3e-4,
        gamma=0.99,
        tau=0.005,
        policy_delay=2,
        target_policy_noise=0.2,
        target_noise_clip=0.5,
        policy_kwargs=dict(
            net_arch=list(hidden_sizes),
            share_features_extractor=False,
            features_extractor_kwargs=dict(cnn_output_dim=feature_size),
        ),
    )


def synthetic_steps(
    steps: int, vector_size: int, episode_steps: int, rng: np.random.Generator
) -> Iterator[tuple[dict, np.ndarray, float, dict, bool]]:
    """One env's (obs, action, reward, next_obs, episode_over) of random frames, stacked as `DrivingEnv` stacks
    them (reset pads with the first frame; each step rolls left and appends a new frame)."""
    stack = np.empty((FRAME_STACK, *FRAME_SHAPE), np.uint8)
    vector = rng.standard_normal(vector_size).astype(np.float32)
    for step in range(steps):
        if step % episode_steps == 0:
            stack[:] = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
        next_stack = np.roll(stack, -1, axis=0)
        next_stack[-1] = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
        next_vector = rng.standard_normal(vector_size).astype(np.float32)
        action = rng.uniform(-1.0, 1.0, ACTION_SIZE).astype(np.float32)
        yield ({"image": stack, "vector": vector}, action, float(rng.standard_normal()),
               {"image": next_stack, "vector": next_vector}, (step + 1) % episode_steps == 0)
        stack, vector = next_stack, next_vector


def add_learner_options(parser) -> None:
    """The TD3 options our side of a benchmark takes: by default the learner's own choice for the device
    (`TD3(speedups=True)`); each flag forces one option on, `--no-speedups` turns the choice off."""
    parser.add_argument("--no-speedups", action="store_true",
                        help="TD3(speedups=False): float32 CNNs in the default layout unless a flag below says")
    parser.add_argument("--compile", action="store_true", help="TD3(compile=True): torch.compile the networks")
    parser.add_argument("--bf16-cnn", action="store_true", help="TD3(bf16_cnn=True): bf16 autocast CNNs")
    parser.add_argument("--channels-last", action="store_true", help="TD3(channels_last=True)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="TD3(cuda_graph=True): replay the update from CUDA graphs (CUDA only)")


def learner_options(args) -> dict:
    """TD3 keyword arguments from `add_learner_options`' flags (only those given)."""
    forced = {name: True for name in ("compile", "bf16_cnn", "channels_last", "cuda_graph") if getattr(args, name)}
    return forced | ({"speedups": False} if args.no_speedups else {})


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
