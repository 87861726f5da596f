"""Replay shards on disk: exact round trip, atomic writes, and a clear error for every kind of damage."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_td3.errors import CheckpointError
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import (
    load_shard,
    read_shard,
    save_shard,
    shard_config,
    shard_name,
    shards_of_rank,
)
from tests.test_replay import VECTOR_SIZE, collect, fill

KEY = "20261126-120000-000-00001"
EXTRA = {"sampler_rng": np.random.default_rng(3).bit_generator.state}


def filled_buffer(steps: int = 40, seed: int = 1) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity=3 * 20, num_envs=3, vector_size=VECTOR_SIZE)
    fill(buffer, collect(num_envs=3, steps=steps, seed=seed))
    return buffer


def empty_buffer() -> ReplayBuffer:
    return ReplayBuffer(capacity=3 * 20, num_envs=3, vector_size=VECTOR_SIZE)


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / shard_name(KEY, rank=1, world_size=2)
    buffer = filled_buffer()
    save_shard(path, buffer, KEY, rank=1, world_size=2, extra=EXTRA)
    return path, buffer


def test_round_trip_restores_contents_and_extra_state_exactly(shard):
    path, original = shard
    restored = empty_buffer()
    extra = load_shard(path, restored, KEY, rank=1, world_size=2)
    assert extra == EXTRA  # a PCG64 state: 128-bit integers survive the JSON header
    assert len(restored) == len(original)
    first, second = np.random.default_rng(5), np.random.default_rng(5)
    batch, restored_batch = original.sample(256, first), restored.sample(256, second)
    for name in batch:
        np.testing.assert_array_equal(restored_batch[name], batch[name], err_msg=name)
    # Both go on identically: ring heads and open episodes came back too.
    calls = collect(num_envs=3, steps=60, seed=1)[40:]
    fill(original, calls)
    fill(restored, calls)
    for name, array in original.state_dict()["storage"].items():
        np.testing.assert_array_equal(restored.state_dict()["storage"][name], array, err_msg=name)


def test_a_shard_is_read_into_a_buffer_of_its_own_shape_whichever_rank_wrote_it(shard):
    path, original = shard  # rank 1 of 2: a buffer of 3 rings of 20 slots
    read = read_shard(path)
    assert (read.num_envs, read.capacity, read.vector_size) == (3, 60, VECTOR_SIZE)
    for name, array in original.state_dict()["storage"].items():
        np.testing.assert_array_equal(read.state_dict()["storage"][name], array, err_msg=name)
    damage_flip_a_payload_bit(path)
    with pytest.raises(CheckpointError, match="damaged"):
        read_shard(path)


def test_a_shards_config_comes_from_its_header_alone_its_size_checked_not_its_checksum(shard):
    path, original = shard
    assert shard_config(path) == read_shard(path).state_dict()["config"]
    assert shard_config(path)["vector_size"] == VECTOR_SIZE
    # A flipped payload bit is for the full read to find; the header still tells the shape of the file.
    damage_flip_a_payload_bit(path)
    assert shard_config(path)["vector_size"] == VECTOR_SIZE
    damage_truncate(path)
    with pytest.raises(CheckpointError, match="truncated"):
        shard_config(path)
    with pytest.raises(CheckpointError, match="missing"):
        shard_config(path.with_name("absent.bin"))


def test_an_empty_buffer_round_trips(tmp_path):
    path = tmp_path / shard_name(KEY, 0, 1)
    save_shard(path, empty_buffer(), KEY, 0, 1, extra={})
    restored = filled_buffer()
    load_shard(path, restored, KEY, 0, 1)
    assert len(restored) == 0


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def damage_flip_a_payload_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage_header(path):
    data = bytearray(path.read_bytes())
    data[25] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))


def damage_magic(path):
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])


@pytest.mark.parametrize(
    "damage, what",
    [
        (damage_truncate, "truncated"),
        (damage_flip_a_payload_bit, "checksum"),
        (damage_header, "damaged"),
        (damage_magic, "not a lightning_td3 replay file"),
        (lambda path: path.unlink(), "missing"),
    ],
)
def test_a_damaged_shard_is_named_and_the_buffer_left_as_it_was(shard, damage, what):
    path, _ = shard
    damage(path)
    target = filled_buffer(steps=10, seed=9)
    before = {name: array.copy() for name, array in target.state_dict()["storage"].items()}
    with pytest.raises(CheckpointError, match=what) as raised:
        load_shard(path, target, KEY, rank=1, world_size=2)
    assert str(path) in str(raised.value)
    for name, array in target.state_dict()["storage"].items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


@pytest.mark.parametrize("field, kwargs", [("rank", dict(rank=0, world_size=2)), ("key", dict(key="other"))])
def test_another_ranks_or_checkpoints_shard_is_refused(shard, field, kwargs):
    path, _ = shard
    arguments = dict(key=KEY, rank=1, world_size=2) | kwargs
    with pytest.raises(CheckpointError, match=f"{field} is"):
        load_shard(path, empty_buffer(), **arguments)


def test_a_shard_of_another_buffer_shape_is_refused_naming_the_difference(shard):
    path, _ = shard
    with pytest.raises(CheckpointError, match="vector_size"):
        load_shard(path, ReplayBuffer(60, 3, VECTOR_SIZE + 1), KEY, rank=1, world_size=2)


def test_a_failure_mid_write_keeps_the_previous_shard_and_leaves_no_partial_file(shard, monkeypatch):
    path, original = shard
    before = path.read_bytes()
    bigger = filled_buffer(steps=60, seed=2)
    written = []

    def crash_after_some_bytes(data, value=0):
        written.append(len(data))
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        return real_crc32(data, value)

    import lightning_td3.replay_file as replay_file

    real_crc32 = replay_file.zlib.crc32
    monkeypatch.setattr(replay_file.zlib, "crc32", crash_after_some_bytes)
    with pytest.raises(OSError, match="No space left"):
        save_shard(path, bigger, KEY, rank=1, world_size=2, extra=EXTRA)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_shards_of_a_rank_are_listed_oldest_first(tmp_path):
    for index, (key, rank) in enumerate([("a", 0), ("b", 1), ("c", 0)]):
        path = tmp_path / shard_name(key, rank, 2)
        save_shard(path, empty_buffer(), key, rank, 2, extra={})
    assert [p.name for p in shards_of_rank(tmp_path, 0, 2)] == [shard_name("a", 0, 2), shard_name("c", 0, 2)]
    assert shards_of_rank(tmp_path / "absent", 0, 2) == []
