"""Independent, reproducible random streams derived from the one `--seed_everything` seed.

Lightning's `seed_everything` seeds torch, numpy and python and records the seed in `PL_GLOBAL_SEED`.
Envs, action noise and replay sampling each get their own stream from it, so adding draws to one
(say, more envs) does not shift the others.
"""

import os
import zlib

import numpy as np


def stream_seed(name: str, rank: int = 0) -> int:
    base = os.environ.get("PL_GLOBAL_SEED", "0")
    return zlib.crc32(f"{base}:{rank}:{name}".encode())


def stream_rng(name: str, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng(stream_seed(name, rank))
