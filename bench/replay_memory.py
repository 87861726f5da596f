"""Memory per transition and sampling time of the frame-deduplicating `ReplayBuffer`, next to SB3's.

1. Fills our buffer and Stable-Baselines3's `DictReplayBuffer` with the same transitions of the real `DrivingEnv`
   (highway backend, random actions, a NEXT_STEP autoreset vector env with the autoreset steps masked out) and
   prints both buffers' exact array bytes per transition and the ratio. Then checks that what our buffer samples
   equals, field by field, what SB3 stored for the same transition.
2. Cross-checks our figure against the growth of this process's resident memory while a bigger buffer fills
   with synthetic frames: the storage is allocated lazily, so RSS grows only as slots are written.
3. Projects a 1M-transition buffer for both.
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

from common import FRAME_SHAPE, FRAME_STACK, import_sb3  # noqa: E402
from lightning_td3.envs import DrivingEnv, EnvConfig  # noqa: E402
from lightning_td3.replay import ReplayBuffer  # noqa: E402

ENV_COUNT = 2
EXACTNESS_SAMPLES = 512
SYNTHETIC_EPISODE_STEPS = 300


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fill_from_driving_env(transitions: int, seed: int, sb3_buffer) -> tuple[ReplayBuffer, int]:
    """Our buffer holding `transitions` real transitions, SB3's (one env: transitions come one at a time) the same
    ones; also returns how many episodes ended meanwhile."""
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
        for env in np.flatnonzero(~autoresetting):
            sb3_buffer.add(
                {key: value[env : env + 1] for key, value in obs.items()},
                {key: value[env : env + 1] for key, value in next_obs.items()},
                action[env : env + 1], reward[env : env + 1], (terminated | truncated)[env : env + 1],
                [{"TimeLimit.truncated": bool(truncated[env])}],
            )
        autoresetting = terminated | truncated
        episodes += int(autoresetting.sum())
        obs = next_obs
    envs.close()
    return buffer, episodes


def sb3_bytes_per_transition(sb3_buffer) -> float:
    """Exact bytes of SB3's storage arrays per transition slot (obs and next_obs stored whole, as float32 the
    action, reward, done and timeout)."""
    arrays = [*sb3_buffer.observations.values(), *sb3_buffer.next_observations.values(), sb3_buffer.actions,
              sb3_buffer.rewards, sb3_buffer.dones, sb3_buffer.timeouts]
    return sum(array.nbytes for array in arrays) / (sb3_buffer.buffer_size * sb3_buffer.n_envs)


def mismatches_with_sb3(buffer: ReplayBuffer, sb3_buffer, samples: int, rng: np.random.Generator) -> int:
    """Sampled transitions of ours that differ in any field from SB3's stored copy (found by its action)."""
    stored = sb3_buffer.size()
    index_of = {sb3_buffer.actions[i, 0].tobytes(): i for i in range(stored)}
    batch = buffer.sample(samples, rng)
    wrong = 0
    for row in range(samples):
        i = index_of[batch["action"][row].tobytes()]
        same = (
            np.array_equal(batch["image"][row], sb3_buffer.observations["image"][i, 0])
            and np.array_equal(batch["vector"][row], sb3_buffer.observations["vector"][i, 0])
            and np.array_equal(batch["next_image"][row], sb3_buffer.next_observations["image"][i, 0])
            and np.array_equal(batch["next_vector"][row], sb3_buffer.next_observations["vector"][i, 0])
            and batch["reward"][row, 0] == sb3_buffer.rewards[i, 0]
            # SB3 stores done = terminated or truncated, and the truncation apart as a timeout
            and batch["terminated"][row] == sb3_buffer.dones[i, 0] * (1 - sb3_buffer.timeouts[i, 0])
        )
        wrong += not same
    return wrong


def fill_synthetic(buffer: ReplayBuffer, transitions: int, rng: np.random.Generator) -> int:
    """One env's episodes of random frames, stacked as `DrivingEnv` stacks them; returns the slots written."""
    stack = np.empty((1, FRAME_STACK, *FRAME_SHAPE), np.uint8)
    vector = np.zeros((1, buffer.vector_size), np.float32)
    action = np.zeros((1, 2), np.float32)
    for step in range(transitions):
        if step % SYNTHETIC_EPISODE_STEPS == 0:
            stack[:] = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
        next_stack = np.roll(stack, -1, axis=1)
        next_stack[0, -1] = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
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

    sb3 = import_sb3()
    from stable_baselines3.common.buffers import DictReplayBuffer

    config = EnvConfig()
    probe = DrivingEnv(config)
    sb3_buffer = DictReplayBuffer(
        args.env_transitions + ENV_COUNT, probe.observation_space, probe.action_space, device="cpu", n_envs=1,
    )
    probe.close()
    start = time.perf_counter()
    env_buffer, episodes = fill_from_driving_env(args.env_transitions, args.seed, sb3_buffer)
    print(f"DrivingEnv (highway, {ENV_COUNT} envs, random actions): {len(env_buffer)} transitions, "
          f"{episodes} episodes ended, {time.perf_counter() - start:.1f} s (stable-baselines3 {sb3.__version__})")
    ours_bytes, sb3_bytes = env_buffer.bytes_per_transition, sb3_bytes_per_transition(sb3_buffer)
    print(f"bytes_per_transition: {ours_bytes:.0f} (exact buffer array bytes / slots)")
    print(f"sb3_bytes_per_transition: {sb3_bytes:.0f} (DictReplayBuffer, exact array bytes / slots)")
    print(f"ratio (sb3 / ours): {sb3_bytes / ours_bytes:.2f}")
    wrong = mismatches_with_sb3(env_buffer, sb3_buffer, EXACTNESS_SAMPLES, rng)
    print(f"exactness: {EXACTNESS_SAMPLES - wrong}/{EXACTNESS_SAMPLES} sampled transitions equal SB3's stored copy")
    if wrong:
        sys.exit("error: our replay buffer sampled transitions that differ from what was stored")
    del env_buffer, sb3_buffer

    rss_before = resident_bytes()
    big = ReplayBuffer(capacity=args.synthetic_transitions, num_envs=1, vector_size=EnvConfig().vector_size)
    rss_allocated = resident_bytes()
    slots_written = min(fill_synthetic(big, args.synthetic_transitions, rng), big.capacity)
    rss_filled = resident_bytes()
    print(f"RSS growth: {(rss_allocated - rss_before) / 2**20:.1f} MiB on allocating {big.capacity} slots, "
          f"{(rss_filled - rss_allocated) / 2**20:.1f} MiB on writing {slots_written} of them "
          f"= {(rss_filled - rss_allocated) / slots_written:.0f} bytes per slot ({len(big)} transitions)")

    print(f"1M transitions: ours {ours_bytes * 1e6 / 1e9:.2f} GB ({ours_bytes * 1e6 / 2**30:.2f} GiB), "
          f"SB3 {sb3_bytes * 1e6 / 1e9:.1f} GB ({sb3_bytes * 1e6 / 2**30:.1f} GiB)")

    seconds = time_sampling(big, 256, repeats=200, rng=rng)
    print(f"sample(256) on {len(big)} transitions: median {np.median(seconds) * 1e3:.2f} ms, "
          f"p90 {np.percentile(seconds, 90) * 1e3:.2f} ms, min {seconds.min() * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
