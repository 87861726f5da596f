"""Sampling from the replay's copy on the device (`data.sample_on_device`) must give host sampling's very batches.

The copy works on any torch device, so its bookkeeping (which slots changed, reloads) is checked here on the CPU;
`tests/test_gpu.py` runs it on a GPU through a whole fit.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import lightning_td3.device_replay as device_replay_module
from lightning_td3.device_replay import COPIED, DeviceReplay, copy_bytes, device_replay_for
from lightning_td3.errors import ConfigError
from lightning_td3.replay import ReplayBuffer
from tests.test_replay import VECTOR_SIZE, collect


def assert_copy_matches(device_replay: DeviceReplay) -> None:
    """Every written slot of the copy equals the buffer's (the copy is brought up first)."""
    device_replay.sync()
    buffer = device_replay.buffer
    filled = buffer.filled_slots()
    for name, array in buffer.storage().items():
        if name in COPIED:
            expected = torch.from_numpy(array[:, :filled]).to(COPIED[name])
            assert torch.equal(device_replay.storage[name][:, :filled].cpu(), expected), f"copied {name} differs"


def assert_same_batches(buffer: ReplayBuffer, device_replay: DeviceReplay, seed: int, draws: int = 3) -> None:
    host_rng, device_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(draws):
        expected = buffer.sample(64, host_rng)
        batch = device_replay.sample(64, device_rng)
        assert batch.keys() == expected.keys()
        for name, value in batch.items():
            assert value.device == device_replay.device and value.dtype == torch.from_numpy(expected[name]).dtype
            assert torch.equal(value.cpu(), torch.from_numpy(expected[name])), f"sampled {name} differs"
    assert host_rng.bit_generator.state == device_rng.bit_generator.state


@pytest.mark.parametrize("n_step", [1, 3])
def test_the_copy_follows_every_add_through_wrap_around_and_gives_the_host_batches(n_step):
    # 3 envs of 13 slots: episodes of up to 8 steps wrap the rings many times over 120 steps.
    buffer = ReplayBuffer(capacity=3 * 13, num_envs=3, vector_size=VECTOR_SIZE, n_step=n_step)
    device_replay = DeviceReplay(buffer, "cpu")
    for step, call in enumerate(collect(num_envs=3, steps=120, seed=3)):
        buffer.add(**call)
        if step % 3 == 0:  # several adds between two batches, as with more env steps than updates
            assert_copy_matches(device_replay)
            if len(buffer):
                assert_same_batches(buffer, device_replay, seed=step)


def test_the_copy_follows_adds_to_some_rings_and_dropped_episodes():
    calls = collect(num_envs=2, steps=60, seed=5)
    buffer = ReplayBuffer(capacity=3 * 17, num_envs=3, vector_size=VECTOR_SIZE)
    device_replay = DeviceReplay(buffer, "cpu")
    for step, call in enumerate(calls):
        buffer.add(**call, rings=[2, 0])  # ring 1's env is gone
        if step == 30:
            buffer.drop_episode(0)
            assert_copy_matches(device_replay)
            break
        if step % 4 == 0:
            assert_copy_matches(device_replay)
    assert device_replay.storage["frames"][1].count_nonzero() == 0, "ring 1 was never written"
    assert_same_batches(buffer, device_replay, seed=1)


def test_after_a_reload_the_copy_is_taken_afresh():
    calls = collect(num_envs=2, steps=80, seed=9)
    saved = ReplayBuffer(capacity=2 * 25, num_envs=2, vector_size=VECTOR_SIZE)
    for call in calls[:50]:
        saved.add(**call)
    state = copy.deepcopy(saved.state_dict())

    buffer = ReplayBuffer(capacity=2 * 25, num_envs=2, vector_size=VECTOR_SIZE)
    device_replay = DeviceReplay(buffer, "cpu")
    for call in collect(num_envs=2, steps=70, seed=1):  # other content, which the reload replaces
        buffer.add(**call)
    assert_same_batches(buffer, device_replay, seed=0)
    buffer.load_state_dict(state)
    assert_copy_matches(device_replay)
    assert_same_batches(buffer, device_replay, seed=2)
    for call in calls[50:]:
        buffer.add(**call)
    assert_same_batches(buffer, device_replay, seed=3)


def test_a_copy_too_big_for_the_device_is_refused_naming_the_setting(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.06 GiB")

    monkeypatch.setattr(torch, "zeros", out_of_memory)
    with pytest.raises(ConfigError, match="data.sample_on_device: the replay copy .* does not fit on cpu"):
        DeviceReplay(ReplayBuffer(capacity=1000, num_envs=2, vector_size=VECTOR_SIZE), "cpu")


def test_by_default_the_copy_is_made_on_a_cuda_device_only_where_it_takes_at_most_half_its_free_memory(
    monkeypatch, caplog
):
    """data.sample_on_device's default. The copy's allocation is the test above's; here only where it is made, so
    the class is replaced by a recorder and CUDA's free memory is set."""
    buffer = ReplayBuffer(capacity=1000, num_envs=2, vector_size=VECTOR_SIZE)
    needed = copy_bytes(buffer)
    assert needed == sum(storage.nbytes for storage in DeviceReplay(buffer, "cpu").storage.values())
    made = []
    monkeypatch.setattr(device_replay_module, "DeviceReplay", lambda buffer, device: made.append(device) or "copy")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert device_replay_for(buffer, cpu, None) is None and device_replay_for(buffer, cuda, False) is None
    with pytest.raises(ConfigError, match="data.sample_on_device must be false when training on a CPU; got True"):
        device_replay_for(buffer, cpu, True)
    for free, expected in ((2 * needed - 1, None), (2 * needed, "copy")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 4 * needed))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            assert device_replay_for(buffer, cuda, None) == expected
        where = "on cuda from a" if expected else "on the host: a copy on cuda"
        assert f"Replay batches gathered {where}" in caplog.text
    assert made == [cuda]
