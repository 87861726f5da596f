"""The replay buffer must hand back exactly the transitions a gymnasium vector env emitted.

A fake driving env stacks frames exactly as `DrivingEnv` does (reset pads the stack with the first frame, a
step rolls it left and appends the newest) and draws every frame at random, so a stack mixing in a frame of
another step or episode can never equal an emitted one. Its vector's first entry is the step in the episode.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import SyncVectorEnv

from lightning_td3.replay import ReplayBuffer

VECTOR_SIZE = 6
MAX_EPISODE_STEPS = 8


class FakeDrivingEnv(gym.Env):
    """Episodes of 1..MAX_EPISODE_STEPS steps that end in a termination or a truncation at random."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict(
            image=gym.spaces.Box(0, 255, (4, 84, 84), np.uint8),
            vector=gym.spaces.Box(-np.inf, np.inf, (VECTOR_SIZE,), np.float32),
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._stack = np.zeros((4, 84, 84), np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step = 0
        self._length = int(self.np_random.integers(1, MAX_EPISODE_STEPS + 1))
        self._ends_in_time_out = bool(self.np_random.integers(2))
        self._stack[:] = self._new_frame()
        return self._observation(), {}

    def step(self, action):
        self._step += 1
        self._stack = np.roll(self._stack, -1, axis=0)
        self._stack[-1] = self._new_frame()
        over = self._step == self._length
        reward = float(self.np_random.normal())
        return self._observation(), reward, over and not self._ends_in_time_out, over and self._ends_in_time_out, {}

    def _new_frame(self) -> np.ndarray:
        return self.np_random.integers(0, 256, (84, 84), dtype=np.uint8)

    def _observation(self) -> dict[str, np.ndarray]:
        vector = self.np_random.normal(size=VECTOR_SIZE).astype(np.float32)
        vector[0] = self._step
        return {"image": self._stack.copy(), "vector": vector}


def collect(num_envs: int, steps: int, seed: int) -> list[dict]:
    """`ReplayBuffer.add` arguments for `steps` steps of a NEXT_STEP-autoreset vector env, as a collector makes them."""
    envs = SyncVectorEnv([FakeDrivingEnv for _ in range(num_envs)])
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    autoresetting = np.zeros(num_envs, bool)
    calls = []
    for _ in range(steps):
        action = rng.uniform(-1, 1, (num_envs, 2)).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = envs.step(action)
        calls.append(
            dict(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated,
                 truncated=truncated, mask=~autoresetting)
        )
        autoresetting = terminated | truncated
        obs = next_obs
    envs.close()
    return calls


def fill(buffer: ReplayBuffer, calls: list[dict]) -> None:
    for call in calls:
        buffer.add(**call)


def emitted_transitions(calls: list[dict]) -> list[dict]:
    """Every real (masked-in) transition, in order, as the env emitted it."""
    transitions = []
    for call in calls:
        for env in np.flatnonzero(call["mask"]):
            transitions.append(
                dict(
                    env=env,
                    image=call["obs"]["image"][env],
                    vector=call["obs"]["vector"][env],
                    action=call["action"][env],
                    reward=np.float32([call["reward"][env]]),
                    steps=1,
                    next_image=call["next_obs"]["image"][env],
                    next_vector=call["next_obs"]["vector"][env],
                    terminated=np.float32(call["terminated"][env]),
                    truncated=bool(call["truncated"][env]),
                )
            )
    return transitions


def still_held(transitions: list[dict], num_envs: int, slots_per_env: int) -> list[dict]:
    """The transitions a ring of `slots_per_env` per env still holds whole, counted in slot writes per env.

    An episode's first transition writes two slots (its reset obs and next_obs), any other one slot. A ring
    keeps its last `slots_per_env` writes; a transition needs its obs slot, the min(step, 3) slots before it
    for the stack, and the slot after it.
    """
    writes = np.zeros(num_envs, int)
    placed = []
    for transition in transitions:
        step = int(transition["vector"][0])
        writes[transition["env"]] += 2 if step == 0 else 1
        placed.append((transition, writes[transition["env"]] - 2, step))
    return [t for t, obs_write, step in placed if obs_write - min(step, 3) >= writes[t["env"]] - slots_per_env]


FIELDS = ("image", "vector", "action", "reward", "steps", "next_image", "next_vector", "terminated")


def n_step_transitions(transitions: list[dict], n_step: int) -> list[dict]:
    """Each emitted transition spanning up to `n_step` steps of its episode: the rewards of the steps up to the
    episode's end or the newest collected (0 after), the next_obs and termination of the last of them."""
    by_env = {}
    for transition in transitions:
        by_env.setdefault(transition["env"], []).append(transition)
    spanning = []
    for episode_steps in by_env.values():
        for start, first in enumerate(episode_steps):
            spanned = [first]
            while len(spanned) < n_step and start + len(spanned) < len(episode_steps):
                if spanned[-1]["terminated"] or spanned[-1]["truncated"]:
                    break
                spanned.append(episode_steps[start + len(spanned)])
            last = spanned[-1]
            rewards = np.zeros(n_step, np.float32)
            rewards[: len(spanned)] = [t["reward"][0] for t in spanned]
            spanning.append({
                **first, "reward": rewards, "steps": len(spanned), "next_image": last["next_image"],
                "next_vector": last["next_vector"], "terminated": last["terminated"], "truncated": last["truncated"],
            })
    return spanning


def key(action: np.ndarray) -> bytes:
    return np.asarray(action, np.float32).tobytes()


def sample_counts(buffer: ReplayBuffer, expected: list[dict], draws: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Sample `draws` batches, check each sampled transition equals an expected one; count samples of each."""
    index_of = {key(t["action"]): index for index, t in enumerate(expected)}
    assert len(index_of) == len(expected)
    wanted = {name: np.stack([t[name] for t in expected]) for name in FIELDS}
    counts = np.zeros(len(expected), int)
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        batch = buffer.sample(size, rng)
        assert batch["image"].dtype == batch["next_image"].dtype == np.uint8
        assert batch["image"].shape == batch["next_image"].shape == (size, 4, 84, 84)
        assert batch["vector"].shape == batch["next_vector"].shape == (size, VECTOR_SIZE)
        assert batch["action"].shape == (size, 2) and batch["reward"].shape == (size, buffer.n_step)
        assert batch["steps"].shape == batch["terminated"].shape == (size,)
        floats = [value for name, value in batch.items() if name not in ("image", "next_image", "steps")]
        assert all(value.dtype == np.float32 for value in floats)
        indices = [index_of.get(key(action), -1) for action in batch["action"]]
        assert -1 not in indices, "sampled a transition that is not (or no longer) in the buffer"
        for name in FIELDS:
            assert np.array_equal(batch[name], wanted[name][indices]), f"sampled {name} differs from the emitted one"
        np.add.at(counts, indices, 1)
    return counts


def test_samples_are_exactly_the_emitted_transitions_and_uniform():
    calls = collect(num_envs=3, steps=60, seed=1)
    transitions = emitted_transitions(calls)
    # The data must cover what the buffer has to get right.
    assert any(t["terminated"] for t in transitions) and any(t["truncated"] for t in transitions)
    assert not all(call["mask"].all() for call in calls), "no autoreset steps to mask out"
    assert any(int(t["vector"][0]) == 0 and (t["terminated"] or t["truncated"]) for t in transitions)

    buffer = ReplayBuffer(capacity=3 * 400, num_envs=3, vector_size=VECTOR_SIZE)
    fill(buffer, calls)
    assert len(buffer) == len(transitions)
    counts = sample_counts(buffer, transitions, draws=len(transitions) * 200 // 256, size=256)
    # ~200 draws each: all seen, none far off (binomial sd ~14), whichever ring holds them.
    assert counts.min() > 130 and counts.max() < 270


@pytest.mark.parametrize("n_step", [2, 3, 5])
def test_n_step_samples_span_the_steps_of_one_episode_exactly_and_uniformly(n_step):
    calls = collect(num_envs=3, steps=60, seed=1)
    expected = n_step_transitions(emitted_transitions(calls), n_step)
    # Spans of every length, ended by each thing that ends one early: a termination, a time-out, the newest step.
    assert {t["steps"] for t in expected} == set(range(1, n_step + 1))
    cut_short = [t for t in expected if t["steps"] < n_step]
    assert any(t["terminated"] for t in cut_short) and any(t["truncated"] for t in cut_short)
    assert any(not (t["terminated"] or t["truncated"]) for t in cut_short)

    buffer = ReplayBuffer(capacity=3 * 400, num_envs=3, vector_size=VECTOR_SIZE, n_step=n_step)
    fill(buffer, calls)
    assert len(buffer) == len(expected)
    counts = sample_counts(buffer, expected, draws=len(expected) * 200 // 256, size=256)
    assert counts.min() > 130 and counts.max() < 270


@pytest.mark.parametrize("slots_per_env,n_step", [(2, 1), (3, 1), (4, 1), (5, 1), (13, 1), (3, 3), (5, 3), (13, 4)])
def test_wrap_around_keeps_exact_transitions_and_drops_overwritten_ones(slots_per_env, n_step):
    calls = collect(num_envs=2, steps=120, seed=slots_per_env)
    buffer = ReplayBuffer(capacity=2 * slots_per_env, num_envs=2, vector_size=VECTOR_SIZE, n_step=n_step)
    sampled = 0
    for done, call in enumerate(calls, start=1):
        buffer.add(**call)
        spanning = n_step_transitions(emitted_transitions(calls[:done]), n_step)
        expected = still_held(spanning, num_envs=2, slots_per_env=slots_per_env)
        assert len(buffer) == len(expected)
        if done % 10 == 0 and expected:
            counts = sample_counts(buffer, expected, draws=4, seed=done)
            assert counts.all(), "a transition still held was never sampled"
            sampled += 1
    assert sampled >= 3


def reset_obs(env: FakeDrivingEnv, seed: int) -> dict[str, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    return {name: value[None] for name, value in obs.items()}


def step_once(buffer: ReplayBuffer, env: FakeDrivingEnv, obs: dict, action: float) -> dict[str, np.ndarray]:
    next_obs, reward, terminated, truncated, _ = env.step(np.full(2, action, np.float32))
    next_obs = {name: value[None] for name, value in next_obs.items()}
    buffer.add(obs, np.full((1, 2), action, np.float32), np.array([reward]), next_obs, np.array([terminated]),
               np.array([truncated]))
    return next_obs


def test_drop_episode_closes_the_episode_without_a_sample_start():
    env = FakeDrivingEnv()
    buffer = ReplayBuffer(capacity=50, num_envs=1, vector_size=VECTOR_SIZE)
    obs = reset_obs(env, seed=3)
    env._length = 100  # long enough that the crash comes before the episode's end
    for action in (0.1, 0.2, 0.3):
        obs = step_once(buffer, env, obs, action)
    assert len(buffer) == 3

    crashed_obs = obs
    buffer.drop_episode(0)
    first_obs = reset_obs(env, seed=4)
    env._length = 100
    second_obs = step_once(buffer, env, first_obs, 0.5)
    step_once(buffer, env, second_obs, 0.6)
    assert len(buffer) == 5
    batch = buffer.sample(256, np.random.default_rng(0))
    assert set(batch["action"][:, 0].tolist()) == {np.float32(a).item() for a in (0.1, 0.2, 0.3, 0.5, 0.6)}
    assert not np.all(batch["image"] == crashed_obs["image"], axis=(1, 2, 3)).any()
    # The crashed episode's last obs is only ever a next_obs, of the transition before it, never followed
    # by the new episode's reset obs.
    next_of_crash = np.all(batch["next_image"] == crashed_obs["image"], axis=(1, 2, 3))
    assert next_of_crash.any() and np.all(batch["action"][next_of_crash, 0] == np.float32(0.3))
    # The new episode's stacks hold its own frames only, padded as after a reset.
    for action, obs in ((0.5, first_obs), (0.6, second_obs)):
        assert np.all(batch["image"][batch["action"][:, 0] == np.float32(action)] == obs["image"])


def test_a_reset_outside_an_episode_end_needs_drop_episode():
    env = FakeDrivingEnv()
    buffer = ReplayBuffer(capacity=50, num_envs=1, vector_size=VECTOR_SIZE)
    obs = reset_obs(env, seed=3)
    env._length = 100
    obs = step_once(buffer, env, obs, 0.1)
    obs = step_once(buffer, env, obs, 0.2)
    before = copy.deepcopy(buffer.state_dict())

    with pytest.raises(ValueError, match="drop_episode"):
        step_once(buffer, env, reset_obs(env, seed=5), 0.3)
    after = buffer.state_dict()
    np.testing.assert_array_equal(after["storage"]["frames"], before["storage"]["frames"])
    np.testing.assert_array_equal(after["heads"], before["heads"])


def test_an_episode_must_start_from_a_reset_observation():
    calls = collect(num_envs=2, steps=10, seed=2)
    buffer = ReplayBuffer(capacity=100, num_envs=2, vector_size=VECTOR_SIZE)
    mid_episode = next(i for i, call in enumerate(calls) if call["mask"].all() and call["obs"]["vector"][:, 0].all())
    with pytest.raises(ValueError, match="from their reset"):
        buffer.add(**calls[mid_episode])
    assert len(buffer) == 0


def test_sampling_an_empty_buffer_fails_clearly():
    with pytest.raises(ValueError, match="without complete transitions"):
        ReplayBuffer(capacity=10).sample(4, np.random.default_rng(0))


def test_state_dict_round_trip_gives_identical_future_samples():
    calls = collect(num_envs=3, steps=90, seed=11)
    original = ReplayBuffer(capacity=3 * 20, num_envs=3, vector_size=VECTOR_SIZE)
    fill(original, calls[:50])
    restored = ReplayBuffer(capacity=3 * 20, num_envs=3, vector_size=VECTOR_SIZE)
    fill(restored, collect(num_envs=3, steps=5, seed=99))  # stale content the load must wipe
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    assert len(restored) == len(original)

    fill(original, calls[50:])
    fill(restored, calls[50:])
    first, second = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(5):
        batch, restored_batch = original.sample(128, first), restored.sample(128, second)
        for name in batch:
            np.testing.assert_array_equal(restored_batch[name], batch[name], err_msg=name)


def test_state_dict_of_a_partly_filled_buffer_holds_only_the_written_slots():
    buffer = ReplayBuffer(capacity=1000, num_envs=2, vector_size=VECTOR_SIZE)
    fill(buffer, collect(num_envs=2, steps=10, seed=0))
    frames = buffer.state_dict()["storage"]["frames"]
    assert frames.shape[0] == 2 and frames.shape[1] <= 20


@pytest.mark.parametrize(
    "other, named",
    [
        (dict(capacity=3 * 21, num_envs=3, vector_size=VECTOR_SIZE), "capacity"),
        (dict(capacity=60, num_envs=2, vector_size=VECTOR_SIZE), "num_envs"),
        (dict(capacity=60, num_envs=3, vector_size=VECTOR_SIZE + 1), "vector_size"),
        (dict(capacity=60, num_envs=3, vector_size=VECTOR_SIZE, frame_shape=(64, 64)), "frame_shape"),
    ],
)
def test_loading_another_buffers_state_fails_naming_the_difference(other, named):
    buffer = ReplayBuffer(capacity=60, num_envs=3, vector_size=VECTOR_SIZE)
    fill(buffer, collect(num_envs=3, steps=10, seed=0))
    with pytest.raises(ValueError, match=named):
        ReplayBuffer(**other).load_state_dict(buffer.state_dict())


def test_storage_is_under_7500_bytes_per_transition():
    buffer = ReplayBuffer(capacity=1000, num_envs=4, vector_size=54)
    # newest frame 7056 + vector 216 + step 4 + action 8 + reward 4 + terminated 1 + has_next 1
    assert buffer.bytes_per_transition == 7290 <= 7500


def test_rows_for_some_rings_go_to_those_rings_and_leave_the_others_alone():
    calls = collect(num_envs=2, steps=40, seed=7)
    transitions = emitted_transitions(calls)
    buffer = ReplayBuffer(capacity=3 * 200, num_envs=3, vector_size=VECTOR_SIZE)
    for call in calls:  # a vector env of 2 whose envs fill rings 2 and 0; ring 1's env is gone
        buffer.add(**call, rings=[2, 0])
    assert len(buffer) == len(transitions)
    state = buffer.state_dict()
    assert state["written"][1] == 0 and state["written"][0] > 0 and state["written"][2] > 0
    counts = sample_counts(buffer, transitions, draws=len(transitions) * 100 // 64)
    assert counts.all(), "a transition added through `rings` was never sampled"

    before = copy.deepcopy(buffer.state_dict())
    for bad in ([0, 0], [3], [], [0, 1, 2]):
        with pytest.raises(ValueError, match="rings must be distinct ring indices in 0..2|obs\\['image'\\] must be"):
            buffer.add(**calls[0], rings=bad)
    after = buffer.state_dict()
    assert all(np.array_equal(np.asarray(after[name]), np.asarray(before[name])) for name in ("heads", "written"))
