"""Replay buffer that stores every 84x84 frame once and rebuilds the 4-frame stacks when sampling.

A transition's obs and next_obs stacks share 7 of their 8 frames, and consecutive transitions share most of
the rest, so storing stacks (as SB3 does: obs + next_obs, 56,888 bytes per transition) keeps each frame 8
times. Here each env has its own ring of slots; a slot holds one observation's newest frame and vector, and
the transition taken from it. A stack is rebuilt from the slot and the up to 3 slots before it in the same
ring, which belong to the same episode because an env writes its episodes one after another.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_td3.envs.config import FRAME_STACK


class ReplayBuffer:
    """Uniform replay over transitions collected from `num_envs` envs stepped together.

    Args:
        capacity: transitions to keep in all; rounded up to a multiple of `num_envs` (one ring per env).
        num_envs: envs of the vector env the collector steps; `add` takes batches of this size.
        vector_size: size of the observation's `vector`.
        action_size: size of an action.
        frame_shape: (height, width) of one grayscale frame.
        n_step: env steps a sampled transition spans: its rewards are those of up to `n_step` steps of one
            episode, and its next_obs the observation after the last of them (fewer where the episode ends first,
            or where its newest step is the newest collected).
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int = 1,
        vector_size: int = 54,
        action_size: int = 2,
        frame_shape: tuple[int, int] = (84, 84),
        n_step: int = 1,
    ):
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1; got {n_step}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1; got {num_envs}")
        if capacity < 2 * num_envs:
            raise ValueError(f"capacity must be >= 2 * num_envs = {2 * num_envs} (2 slots per env); got {capacity}")
        self.num_envs = num_envs
        self.slots_per_env = math.ceil(capacity / num_envs)
        self.vector_size = vector_size
        self.action_size = action_size
        self.frame_shape = tuple(frame_shape)
        self.n_step = n_step
        self.changes = 0  # counts add and drop_episode calls: tells whether the contents changed since a look
        self.generation = 0  # counts storage (re)allocations: a copy of the storage must then be taken afresh
        self._allocate()

    def _allocate(self) -> None:
        """Empty storage and rings. np.zeros maps pages lazily: a 1M buffer costs memory only as it fills."""
        rings = (self.num_envs, self.slots_per_env)
        self.generation += 1
        self._frames = np.zeros(rings + self.frame_shape, np.uint8)  # each slot's observation's newest frame
        self._vectors = np.zeros(rings + (self.vector_size,), np.float32)
        self._steps = np.zeros(rings, np.int32)  # step of the slot's observation in its episode, 0 = reset obs
        self._actions = np.zeros(rings + (self.action_size,), np.float32)
        self._rewards = np.zeros(rings, np.float32)
        self._terminated = np.zeros(rings, bool)
        self._has_next = np.zeros(rings, bool)  # the next slot holds this one's next_obs: a transition starts here
        self._heads = np.zeros(self.num_envs, np.int64)  # slot each ring writes next
        self._written = np.zeros(self.num_envs, np.int64)  # slots each ring has ever written
        self._episode_open = np.zeros(self.num_envs, bool)  # the ring's newest slot may still get a next_obs
        self._transitions = np.zeros(self.num_envs, np.int64)  # has_next slots per ring, kept up to date by writes

    @property
    def capacity(self) -> int:
        """Slots in all rings: the transitions the buffer can hold (minus one per episode end)."""
        return self.num_envs * self.slots_per_env

    @property
    def bytes_per_transition(self) -> float:
        """Bytes of all storage arrays per slot."""
        return sum(array.nbytes for array in self.storage().values()) / self.capacity

    def __len__(self) -> int:
        return int(self._transitions.sum() - self._stale_starts().sum())

    def add(
        self,
        obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: dict[str, np.ndarray],
        terminated: np.ndarray,
        truncated: np.ndarray,
        mask: np.ndarray | None = None,
        rings: np.ndarray | None = None,
    ) -> None:
        """Add one vector-env step: arrays batched over envs, `image` (N, 4, H, W) uint8, `vector` (N, V).

        `mask` (N,) marks the envs whose transition is real; pass False for gymnasium's NEXT_STEP autoreset
        steps, where obs is a final observation and next_obs a reset one. An env without an open episode
        starts one from `obs`, which must therefore be a reset observation (a stack of 4 equal frames).
        Truncation closes the episode like termination but keeps `terminated` False, so TD targets still
        bootstrap through a time-out.

        `rings` (N,) names the ring of each row when the vector env steps only some of the buffer's envs (the
        others' simulators are gone): those rings get the step, the others keep what they hold. Default: row i is
        ring i, for all `num_envs` rings.
        """
        rings = np.arange(self.num_envs) if rings is None else self._checked_rings(rings)
        self._check_batch(obs, "obs", rings.size)
        self._check_batch(next_obs, "next_obs", rings.size)
        rows = np.arange(rings.size) if mask is None else np.flatnonzero(np.asarray(mask, bool))
        envs = rings[rows]
        starts = ~self._episode_open[envs]
        starting, continuing = envs[starts], envs[~starts]
        self._check_episode_starts(obs["image"][rows[starts]], starting)
        self._check_continuations(obs["image"][rows[~starts]], continuing)

        reset_steps = np.zeros(starting.size, np.int32)
        self._write_slots(starting, obs["image"][rows[starts], -1], obs["vector"][rows[starts]], reset_steps)
        self._episode_open[starting] = True
        current = (self._heads[envs] - 1) % self.slots_per_env
        self._actions[envs, current] = np.asarray(action, np.float32)[rows]
        self._rewards[envs, current] = np.asarray(reward, np.float32)[rows]
        self._terminated[envs, current] = np.asarray(terminated, bool)[rows]
        self._has_next[envs, current] = True
        self._transitions[envs] += 1
        next_steps = self._steps[envs, current] + 1
        self._write_slots(envs, next_obs["image"][rows, -1], next_obs["vector"][rows], next_steps)
        episode_over = np.asarray(terminated, bool)[rows] | np.asarray(truncated, bool)[rows]
        self._episode_open[envs[episode_over]] = False
        self.changes += 1

    def drop_episode(self, env_index: int) -> None:
        """Close env `env_index`'s open episode without a next_obs, e.g. after its simulator crashed.

        Its newest observation stays a possible next_obs of the transition before it but never starts one, and
        the env's next `add` must start a new episode from a reset observation.
        """
        self._episode_open[env_index] = False
        self.changes += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`batch_size` transitions drawn uniformly (with replacement) from all valid ones in all rings.

        `reward` is (B, n_step): the rewards of the steps the transition spans, 0 after its last; `steps` (B,) is
        how many it spans, and `terminated` whether its last step ended the episode.
        """
        return self.transitions_at(*self._sample_starts(batch_size, rng))

    def transitions_at(self, rings: np.ndarray, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The transitions that start at these (ring, slot) places (valid starts, e.g. where `has_next` is set), as
        `sample` returns them."""
        batch = gather_transitions(self.storage(), *self._transition_slots(rings, slots))
        batch["terminated"] = batch["terminated"].astype(np.float32)
        return batch

    def sample_slots(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Where `sample` takes its transitions from: rings (B,), the slots of obs and next_obs stacks (B, 4), and
        the slots of the rewards (B, n_step) with which of them the transition spans (bool)."""
        return self._transition_slots(*self._sample_starts(batch_size, rng))

    def _transition_slots(self, rings: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, ...]:
        reward_slots = (slots[:, None] + np.arange(self.n_step)) % self.slots_per_env
        # A step is spanned while each slot up to it began a transition: has_next chains the slots of one episode
        # and stops at its end and at the ring's newest slot, so the walk never reaches an overwritten slot.
        spanned = np.logical_and.accumulate(self._has_next[rings[:, None], reward_slots], axis=1)
        next_slots = (slots + spanned.sum(axis=1)) % self.slots_per_env
        # The next slot holds the same episode `steps` later, so its own step rebuilds the env's next stack.
        return rings, self._stack_slots(rings, slots), self._stack_slots(rings, next_slots), reward_slots, spanned

    @property
    def written(self) -> np.ndarray:
        """Slots each ring has ever written (a copy)."""
        return self._written.copy()

    def slots_changed_since(self, written_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rings, slots) whose contents changed since the rings had written `written_before` slots.

        Those are the slots written since, and the newest slot before them: an `add` writes a slot's action,
        reward and termination one step after its observation.
        """
        rings, slots = [], []
        for ring in np.flatnonzero(self._written != written_before):
            count = min(self._written[ring] - written_before[ring] + 1, self._written[ring], self.slots_per_env)
            rings.append(np.full(count, ring))
            slots.append(np.arange(self._heads[ring] - count, self._heads[ring]) % self.slots_per_env)
        if not rings:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(rings), np.concatenate(slots)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the written part of the storage, ring heads and open episodes.

        The storage entries are views of the live arrays, not copies (a full buffer is gigabytes): save or copy
        them before the next `add`.
        """
        filled = self.filled_slots()
        return {
            "config": self._config(),
            "storage": {name: array[:, :filled] for name, array in self.storage().items()},
            "heads": self._heads.copy(),
            "written": self._written.copy(),
            "episode_open": self._episode_open.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s state; raises ValueError naming what differs if it is another buffer's."""
        saved_config, config = state["config"], self._config()
        mismatches = [
            f"{name} saved {saved_config.get(name)!r}, this buffer {value!r}"
            for name, value in config.items()
            if not np.array_equal(saved_config.get(name), value)
        ]
        if mismatches:
            raise ValueError("replay buffer state does not fit this buffer: " + "; ".join(mismatches))
        filled = int(min(np.max(state["written"]), self.slots_per_env))
        for name, array in self.storage().items():
            saved = np.asarray(state["storage"][name])
            expected_shape = (self.num_envs, filled) + array.shape[2:]
            if saved.shape != expected_shape or saved.dtype != array.dtype:
                raise ValueError(
                    f"replay buffer state: storage {name!r} is {saved.dtype} {saved.shape}, "
                    f"expected {array.dtype} {expected_shape}"
                )
        # Fresh arrays rather than overwriting: slots beyond the saved part must be empty, and zeroing them in
        # place would touch every page of a big buffer.
        self._allocate()
        for name, array in self.storage().items():
            array[:, :filled] = state["storage"][name]
        self._heads[:] = state["heads"]
        self._written[:] = state["written"]
        self._episode_open[:] = state["episode_open"]
        self._transitions[:] = self._has_next.sum(axis=1)
        self.changes += 1

    def _config(self) -> dict:
        return {
            "num_envs": self.num_envs,
            "capacity": self.capacity,
            "vector_size": self.vector_size,
            "action_size": self.action_size,
            "frame_shape": self.frame_shape,
        }

    def storage(self) -> dict[str, np.ndarray]:
        """The storage arrays, (num_envs, slots_per_env, ...) each: the live arrays, not copies."""
        return {
            "frames": self._frames,
            "vectors": self._vectors,
            "steps": self._steps,
            "actions": self._actions,
            "rewards": self._rewards,
            "terminated": self._terminated,
            "has_next": self._has_next,
        }

    def filled_slots(self) -> int:
        """Slots per ring that any ring has written (rings fill from slot 0)."""
        return int(min(self._written.max(), self.slots_per_env))

    def _checked_rings(self, rings) -> np.ndarray:
        rings = np.asarray(rings)
        if (
            rings.ndim != 1 or rings.size == 0 or not np.issubdtype(rings.dtype, np.integer)
            or rings.min() < 0 or rings.max() >= self.num_envs or np.unique(rings).size != rings.size
        ):
            raise ValueError(
                f"rings must be distinct ring indices in 0..{self.num_envs - 1}, one per row; got {rings.tolist()}"
            )
        return rings

    def _check_batch(self, obs: dict[str, np.ndarray], name: str, rows: int) -> None:
        image, vector = obs["image"], obs["vector"]
        image_shape = (rows, FRAME_STACK) + self.frame_shape
        if image.shape != image_shape or image.dtype != np.uint8:
            raise ValueError(f"{name}['image'] must be uint8 {image_shape}; got {image.dtype} {image.shape}")
        if vector.shape != (rows, self.vector_size):
            raise ValueError(f"{name}['vector'] must be {(rows, self.vector_size)}; got {vector.shape}")

    def _check_episode_starts(self, images: np.ndarray, envs: np.ndarray) -> None:
        not_reset = envs[~np.all(images == images[:, :1], axis=(1, 2, 3))]
        if not_reset.size:
            raise ValueError(
                f"env(s) {not_reset.tolist()} start an episode in the replay buffer from an observation that is "
                "not a reset one (its 4 frames differ); the buffer needs episodes from their reset: mask out "
                "autoreset steps and call drop_episode before resetting an env by hand"
            )

    def _check_continuations(self, images: np.ndarray, envs: np.ndarray) -> None:
        newest = self._frames[envs, (self._heads[envs] - 1) % self.slots_per_env]
        broken = envs[~np.all(images[:, -1] == newest, axis=(1, 2))]
        if broken.size:
            raise ValueError(
                f"env(s) {broken.tolist()}: obs is not the next_obs of the previous add; if an env was reset "
                "outside an episode end, call drop_episode first"
            )

    def _write_slots(self, envs: np.ndarray, frames: np.ndarray, vectors: np.ndarray, steps: np.ndarray) -> None:
        slots = self._heads[envs]
        self._transitions[envs] -= self._has_next[envs, slots]  # the overwritten slot's transition is gone
        self._frames[envs, slots] = frames
        self._vectors[envs, slots] = vectors
        self._steps[envs, slots] = steps
        self._has_next[envs, slots] = False
        self._heads[envs] = (slots + 1) % self.slots_per_env
        self._written[envs] += 1

    def _intact_older_slots(self, rings: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """How many slots written before each given slot still hold their data (not yet overwritten)."""
        age = (self._heads[rings] - 1 - slots) % self.slots_per_env  # 0 = the ring's newest slot
        return np.minimum(self._written[rings], self.slots_per_env) - 1 - age

    def _is_valid_start(self, rings: np.ndarray, slots: np.ndarray) -> np.ndarray:
        # A slot's next slot is always intact when has_next is set: writing a slot clears its has_next and only
        # writing its successor sets it, so the newest slot (whose successor is the oldest) never has it.
        # Its stack needs min(step, 3) older slots; after a wrap the oldest slots' ones are overwritten.
        needed = np.minimum(self._steps[rings, slots], FRAME_STACK - 1)
        return self._has_next[rings, slots] & (self._intact_older_slots(rings, slots) >= needed)

    def _stale_starts(self) -> np.ndarray:
        """Per ring, has_next slots that are no valid start; only a ring's 3 oldest intact slots can be such."""
        filled = np.minimum(self._written, self.slots_per_env)[:, None]
        nth_oldest = np.arange(FRAME_STACK - 1)[None, :]
        slots = (self._heads[:, None] - filled + nth_oldest) % self.slots_per_env
        rings = np.broadcast_to(np.arange(self.num_envs)[:, None], slots.shape)
        stale = (nth_oldest < filled) & self._has_next[rings, slots] & ~self._is_valid_start(rings, slots)
        return stale.sum(axis=1)

    def _sample_starts(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Uniform over valid starts by rejection: draw uniformly over written slots, keep the valid ones.

        Invalid slots are few (an episode's last observation, the ring's 3 oldest), so this rarely redraws,
        and it needs no index of valid slots to maintain.
        """
        if len(self) == 0:
            raise ValueError("cannot sample from a replay buffer without complete transitions")
        filled_per_ring = np.minimum(self._written, self.slots_per_env)
        ring_starts = np.cumsum(filled_per_ring) - filled_per_ring
        rings, slots = np.empty(0, np.int64), np.empty(0, np.int64)
        while rings.size < batch_size:
            flat = rng.integers(filled_per_ring.sum(), size=2 * batch_size)
            draw_rings = np.searchsorted(ring_starts, flat, side="right") - 1
            draw_slots = flat - ring_starts[draw_rings]
            valid = self._is_valid_start(draw_rings, draw_slots)
            rings = np.concatenate([rings, draw_rings[valid]])
            slots = np.concatenate([slots, draw_slots[valid]])
        return rings[:batch_size], slots[:batch_size]

    def _stack_slots(self, rings: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(B, 4) slots of the frame stacks: position j is min(3 - j, step) slots back, the env's reset padding."""
        frames_back = np.arange(FRAME_STACK - 1, -1, -1)
        back = np.minimum(frames_back[None, :], self._steps[rings, slots][:, None])
        return (slots[:, None] - back) % self.slots_per_env


def gather_transitions(storage: dict, rings, stack_slots, next_stack_slots, reward_slots, spanned) -> dict:
    """The transitions at `ReplayBuffer.sample_slots`'s places, from storage arrays (numpy) or tensors (torch).

    `terminated` comes back in the storage's dtype.
    """
    slots, next_slots = stack_slots[:, -1], next_stack_slots[:, -1]
    last_slots = (next_slots - 1) % storage["terminated"].shape[1]  # the slot of the last step spanned
    frames = storage["frames"]
    return {
        "image": frames[rings[:, None], stack_slots],
        "vector": storage["vectors"][rings, slots],
        "action": storage["actions"][rings, slots],
        "reward": storage["rewards"][rings[:, None], reward_slots] * spanned,
        "steps": spanned.sum(1),
        "next_image": frames[rings[:, None], next_stack_slots],
        "next_vector": storage["vectors"][rings, next_slots],
        "terminated": storage["terminated"][rings, last_slots],
    }
