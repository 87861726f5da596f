"""Collection throughput: env steps/s with 1, 2, 4, ... N env processes, and how close N get to N x one.

    python bench/collect.py [--max-procs N] [--seconds 20] [--rounds 5] [--scenario 1] [--layout curvy]

Each setting builds the vector env exactly as the `Collector` does (`make_vector_env`: one env in-process, or
N subprocess envs with SAME_STEP autoreset), steps our `DrivingEnv` (highway backend, 4x84x84 image
observations) with uniform random actions, episode resets included, for `--seconds` after a few untimed steps,
in `--rounds` blocks taken in turns over the N (median block), and prints env steps/s and the scaling ratio
steps/s(N) / (N x steps/s(1)). Only meaningful up to the number of free cores: on a shared machine, other
processes' load lowers the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402

from lightning_td3.collector import make_vector_env  # noqa: E402
from lightning_td3.envs import EnvConfig  # noqa: E402

UNTIMED_STEPS = 5


def random_actions(envs, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, (envs.num_envs, 2)).astype(np.float32)


def steps_per_second(envs, seconds: float, rng: np.random.Generator) -> float:
    steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        envs.step(random_actions(envs, rng))
        steps += envs.num_envs
    return steps / (time.perf_counter() - start)


def process_counts(max_procs: int) -> list[int]:
    """1, 2, 4, ... up to max_procs, and max_procs itself."""
    counts = [1]
    while counts[-1] * 2 <= max_procs:
        counts.append(counts[-1] * 2)
    return counts + [max_procs] if counts[-1] != max_procs else counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-procs", type=int, default=os.cpu_count(),
                        help="largest N (default: the core count); N = 1, 2, 4, ... and this")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per N, in all")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per N, taken in turns")
    parser.add_argument("--scenario", type=int, default=1)
    parser.add_argument("--layout", default="curvy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    config = EnvConfig(scenario=args.scenario, layout=args.layout)

    print(f"DrivingEnv highway scenario {args.scenario} {args.layout}, image obs; {os.cpu_count()} cores; "
          f"{args.seconds:.0f} s per N in {args.rounds} blocks")
    rng = np.random.default_rng(args.seed)
    counts = process_counts(args.max_procs)
    all_envs = {}
    for processes in counts:
        all_envs[processes] = envs = make_vector_env([config] * processes, asynchronous=True)
        envs.reset(seed=args.seed)
        for _ in range(UNTIMED_STEPS):
            envs.step(random_actions(envs, rng))
    # Short blocks in turns, so a change in the machine's load hits every N alike; the median block counts.
    rates = {processes: [] for processes in counts}
    for _ in range(args.rounds):
        for processes in counts:
            rates[processes].append(steps_per_second(all_envs[processes], args.seconds / args.rounds, rng))
    for envs in all_envs.values():
        envs.close()
    single = statistics.median(rates[1])
    for processes in counts:
        rate = statistics.median(rates[processes])
        where = "in-process" if processes == 1 else "subprocesses"
        print(f"envs {processes} ({where}): {rate:.1f} env steps/s, scaling {rate / (processes * single):.2f} "
              f"of {processes} x one")

if __name__ == "__main__":
    main()
