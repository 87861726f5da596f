"""The replay buffer on disk: one self-checking file per rank, next to the checkpoints that refer to it.

Replay stays out of the Lightning checkpoint: a 1M buffer is about 7 GB, which `torch.save` would first copy into
memory, and under DDP only rank 0 writes the checkpoint while every rank holds its own buffer. Each rank writes its
shard itself, straight from the buffer's arrays (ring by ring, no copy of the whole buffer), atomically; the
checkpoint records the shards' key and the world size.

Layout: MAGIC, an 8-byte header length, a JSON header (key, rank, world size, buffer config, ring counters, the
rank's extra state, the arrays' names/dtypes/shapes), the arrays' bytes, then a CRC-32 of everything before it and
END. A truncated, cut-short or bit-flipped file fails the size or checksum test and is named in the error.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lightning_td3.checkpointing import atomic_write
from lightning_td3.errors import CheckpointError
from lightning_td3.replay import ReplayBuffer

MAGIC = b"LTD3REPLAY\x00\x01"
END = b"LTD3END\x00"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
CHUNK_BYTES = 64 * 2**20


def shard_name(key: str, rank: int, world_size: int) -> str:
    return f"replay-{key}-rank{rank}-of{world_size}.bin"


def shards_of_rank(directory: Path, rank: int, world_size: int) -> list[Path]:
    """This rank's shard files in `directory`, oldest first (by modification time)."""
    pattern = re.compile(rf"^replay-.+-rank{rank}-of{world_size}\.bin$")
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if pattern.match(p.name)), key=lambda p: p.stat().st_mtime_ns)


def save_shard(path: Path, buffer: ReplayBuffer, key: str, rank: int, world_size: int, extra: dict) -> None:
    """Write `buffer` (and `extra`, this rank's JSON-able state) to `path` atomically."""
    state = buffer.state_dict()  # views of the live storage, not copies
    arrays = state["storage"]
    header = {
        "format": FORMAT_VERSION,
        "key": key,
        "rank": rank,
        "world_size": world_size,
        "config": state["config"],
        "heads": state["heads"].tolist(),
        "written": state["written"].tolist(),
        "episode_open": state["episode_open"].tolist(),
        "extra": extra,
        "arrays": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()],
    }
    header_bytes = json.dumps(header).encode()
    with atomic_write(path) as file:
        crc = 0
        for piece in (MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes):
            file.write(piece)
            crc = zlib.crc32(piece, crc)
        for array in arrays.values():
            for ring in array:  # each ring's filled part is contiguous: written without a copy
                data = memoryview(np.ascontiguousarray(ring).reshape(-1).view(np.uint8))
                file.write(data)
                crc = zlib.crc32(data, crc)
        file.write(_CRC.pack(crc) + END)


def load_shard(path: Path, buffer: ReplayBuffer, key: str, rank: int, world_size: int) -> dict:
    """Fill `buffer` from the shard at `path` and return its extra state; `CheckpointError` if it cannot serve.

    The whole file is checked before the buffer is touched, so a damaged file leaves the buffer as it was.
    """
    header, payload_offset = _checked_header(path)
    for name, value in {"key": key, "rank": rank, "world_size": world_size}.items():
        if header.get(name) != value:
            raise CheckpointError(f"replay file {path}: {name} is {header.get(name)!r}, expected {value!r}")
    _fill(buffer, path, header, payload_offset)
    return header["extra"]


def read_shard(path: Path) -> ReplayBuffer:
    """A buffer holding what the shard at `path` holds, whichever run, rank and key wrote it (to inspect a run's
    replay, e.g. `python -m lightning_td3.crashes --replay`)."""
    header, payload_offset = _checked_header(path)
    buffer = ReplayBuffer(**_buffer_config(header))
    _fill(buffer, path, header, payload_offset)
    return buffer


def _buffer_config(header: dict) -> dict:
    return dict(header["config"], frame_shape=tuple(header["config"]["frame_shape"]))


def _fill(buffer: ReplayBuffer, path: Path, header: dict, payload_offset: int) -> None:
    """Load the checked shard's arrays into `buffer`."""
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"replay file {path}: format is {header.get('format')!r}, expected {FORMAT_VERSION!r}")
    offset = payload_offset
    storage = {}
    for entry in header["arrays"]:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        # Memory-mapped: the buffer copies page by page from the file, no second in-memory copy of the replay.
        storage[entry["name"]] = np.memmap(path, dtype, "r", offset, shape) if np.prod(shape) else np.zeros(shape, dtype)
        offset += dtype.itemsize * int(np.prod(shape))
    try:
        buffer.load_state_dict({
            "config": _buffer_config(header),
            "storage": storage,
            "heads": np.asarray(header["heads"], np.int64),
            "written": np.asarray(header["written"], np.int64),
            "episode_open": np.asarray(header["episode_open"], bool),
        })
    except ValueError as why:
        raise CheckpointError(f"replay file {path} does not fit this run: {why}") from None


def shard_config(path: Path) -> dict:
    """The buffer config of the shard at `path` (capacity, vector size, ...), from its header alone: the file's size
    is checked against the header, its checksum is not read (a caller can refuse a file of the wrong shape without
    reading gigabytes; `read_shard` and `load_shard` check everything)."""
    with _opened(path) as file:
        header, *_ = _sized_header(file, path)
    return _buffer_config(header)


def _checked_header(path: Path) -> tuple[dict, int]:
    """The header of a complete, undamaged shard file, and where its arrays start."""
    with _opened(path) as file:
        header, header_bytes, payload_offset, payload = _sized_header(file, path)
        crc = zlib.crc32(header_bytes, zlib.crc32(MAGIC + _LENGTH.pack(len(header_bytes))))
        remaining = payload
        while remaining:
            chunk = file.read(min(CHUNK_BYTES, remaining))
            crc = zlib.crc32(chunk, crc)
            remaining -= len(chunk)
        (saved_crc,) = _CRC.unpack(file.read(_CRC.size))
        if file.read() != END or saved_crc != crc:
            raise CheckpointError(f"replay file {path} is damaged: its checksum does not match its contents")
    return header, payload_offset


@contextmanager
def _opened(path: Path):
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"replay file {path} is missing") from None
    with file:
        yield file


def _sized_header(file, path: Path) -> tuple[dict, bytes, int, int]:
    """Read the header from the open shard `file`, leaving it at the arrays: the header, its bytes, where the arrays
    start and their length. The file's size must be the one the header promises."""
    size = path.stat().st_size
    if file.read(len(MAGIC)) != MAGIC:
        raise CheckpointError(f"replay file {path} is not a lightning_td3 replay file (bad magic bytes)")
    (header_length,) = _LENGTH.unpack(_read_exactly(file, _LENGTH.size, path))
    if header_length > size:
        raise CheckpointError(f"replay file {path} is damaged: header length {header_length} > file size")
    header_bytes = _read_exactly(file, header_length, path)
    try:
        header = json.loads(header_bytes)
        payload = sum(np.dtype(a["dtype"]).itemsize * int(np.prod(a["shape"])) for a in header["arrays"])
        _buffer_config(header)
    except (ValueError, KeyError, TypeError) as why:
        raise CheckpointError(f"replay file {path} is damaged: unreadable header ({why})") from None
    payload_offset = len(MAGIC) + _LENGTH.size + header_length
    expected_size = payload_offset + payload + _CRC.size + len(END)
    if size != expected_size:
        raise CheckpointError(
            f"replay file {path} is truncated or damaged: {size} bytes, its header promises {expected_size}"
        )
    return header, header_bytes, payload_offset, payload


def _read_exactly(file, count: int, path: Path) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise CheckpointError(f"replay file {path} is truncated: it ends inside its header")
    return data
