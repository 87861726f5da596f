"""Memory per transition and sampling time of the frame-deduplicating `ReplayBuffer`.

1. Fills a buffer with transitions of the real `DrivingEnv` (highway backend, random actions, a NEXT_STEP
   autoreset vector env with the autoreset steps masked out) and prints its exact bytes per transition.
2. Cross-checks that figure against the growth of this process's resident memory while a bigger buffer fills
   with synthetic frames: the storage is allocated lazily, so RSS grows only as slots are written.
3. Projects a 1M-transition buffer, next to SB3's layout (obs and next_obs stacks stored whole).
4. Times `sample(256)` on the big buffer.

Usage: python bench/replay_memory.py [--env-transitions N] [--synthetic-transitions N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from lightning_td3.envs import DrivingEnv, EnvConfig  # noqa: E402
from lightning_td3.replay import ReplayBuffer  # noqa: E402

# SB3's DictReplayBuffer (optimize_memory_usage is not available for dict observations): obs and next_obs
# (2 x (4*84*84 uint8 + 54 float32)), action 2 float32, then reward, done and timeout as float32.
SB3_BYTES_PER_TRANSITION = 2 * (4 * 84 * 84 + 54 * 4) + 2 * 4 + 4 + 4 + 4
ENV_COUNT = 2
SYNTHETIC_EPISODE_STEPS = 300


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fill_from_driving_env(transitions: int, seed: int) -> tuple[ReplayBuffer, int]:
    """A buffer holding `transitions` real transitions; also returns how many episodes ended meanwhile."""
    config = EnvConfig()
    envs = gym.vector.SyncVectorEnv([lambda: DrivingEnv(config) for _ in range(ENV_COUNT)])
    # Room to spare: every episode also takes a slot for its final observation, which starts no transition.
    buffer = ReplayBuffer(capacity=2 * transitions, num_envs=ENV_COUNT, vector_size=config.vector_size)
    obs, _ = envs.reset(seed=seed)
    autoresetting = np.zeros(ENV_COUNT, bool)
    episodes = 0
    while len(buffer) < transitions:
        action = envs.action_space.sample()
        next_obs, reward, terminated, truncated, _ = envs.step(action)
        buffer.add(obs, action, reward, next_obs, terminated, truncated, mask=~autoresetting)
        autoresetting = terminated | truncated
        episodes += int(autoresetting.sum())
        obs = next_obs
    envs.close()
    return buffer, episodes


def fill_synthetic(buffer: ReplayBuffer, transitions: int, rng: np.random.Generator) -> int:
    """One env's episodes of random frames, stacked as `DrivingEnv` stacks them; returns the slots written."""
    stack = np.empty((1, 4, 84, 84), np.uint8)
    vector = np.zeros((1, buffer.vector_size), np.float32)
    action = np.zeros((1, 2), np.float32)
    for step in range(transitions):
        if step % SYNTHETIC_EPISODE_STEPS == 0:
            stack[:] = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        next_stack = np.roll(stack, -1, axis=1)
        next_stack[0, -1] = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        episode_over = np.array([(step + 1) % SYNTHETIC_EPISODE_STEPS == 0])
        buffer.add({"image": stack, "vector": vector}, action, np.zeros(1), {"image": next_stack, "vector": vector},
                   episode_over, np.zeros(1, bool))
        stack = next_stack
    episodes_started = -(-transitions // SYNTHETIC_EPISODE_STEPS)
    return transitions + episodes_started  # an episode writes its reset obs and then one slot per step


def time_sampling(buffer: ReplayBuffer, batch_size: int, repeats: int, rng: np.random.Generator) -> np.ndarray:
    buffer.sample(batch_size, rng)  # warm-up
    seconds = np.empty(repeats)
    for repeat in range(repeats):
        start = time.perf_counter()
        buffer.sample(batch_size, rng)
        seconds[repeat] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-transitions", type=int, default=2000)
    parser.add_argument("--synthetic-transitions", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each result shows as soon as it is measured
    rng = np.random.default_rng(args.seed)

    start = time.perf_counter()
    env_buffer, episodes = fill_from_driving_env(args.env_transitions, args.seed)
    print(f"DrivingEnv (highway, {ENV_COUNT} envs, random actions): {len(env_buffer)} transitions, "
          f"{episodes} episodes ended, {time.perf_counter() - start:.1f} s")
    print(f"bytes_per_transition: {env_buffer.bytes_per_transition:.0f} (exact buffer array bytes / slots)")
    del env_buffer

    rss_before = resident_bytes()
    big = ReplayBuffer(capacity=args.synthetic_transitions, num_envs=1, vector_size=EnvConfig().vector_size)
    rss_allocated = resident_bytes()
    slots_written = min(fill_synthetic(big, args.synthetic_transitions, rng), big.capacity)
    rss_filled = resident_bytes()
    print(f"RSS growth: {(rss_allocated - rss_before) / 2**20:.1f} MiB on allocating {big.capacity} slots, "
          f"{(rss_filled - rss_allocated) / 2**20:.1f} MiB on writing {slots_written} of them "
          f"= {(rss_filled - rss_allocated) / slots_written:.0f} bytes per slot ({len(big)} transitions)")

    projected = big.bytes_per_transition * 1_000_000
    print(f"1M transitions: {projected / 1e9:.2f} GB ({projected / 2**30:.2f} GiB); "
          f"SB3 dict layout {SB3_BYTES_PER_TRANSITION} B/transition: {SB3_BYTES_PER_TRANSITION * 1e6 / 1e9:.1f} GB "
          f"({SB3_BYTES_PER_TRANSITION / big.bytes_per_transition:.1f}x)")

    seconds = time_sampling(big, 256, repeats=200, rng=rng)
    print(f"sample(256) on {len(big)} transitions: median {np.median(seconds) * 1e3:.2f} ms, "
          f"p90 {np.percentile(seconds, 90) * 1e3:.2f} ms, min {seconds.min() * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
