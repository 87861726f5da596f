"""Env processes stepping while the learner updates (`Collector.overlap`, the default) vs taking turns with it.

    python bench/overlap.py [--device cpu|cuda] [--rounds 2] [--num-envs 2] [--learning-starts 200] [--updates 60]
                            [--batch-size 32] [--cuda-graph] [--sample-on-device]

Runs the same `cli.py fit` as `bench/e2e.py` (same env, networks and settings, async env processes, one update per
env step) with `overlap` true and false in alternating rounds, and prints for each the share of the training time
the learner spent on collection (`perf/data_wait_fraction`: choosing actions, waiting for the envs, storing) and the
seconds of the training phase (warm-up and process start left out), then the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from common import device_name, quiet_lightning
from e2e import add_fit_arguments, fit_config
from lightning_td3.collector import Collector
from lightning_td3.envs import EnvConfig


def train(args, env: dict, overlap: bool) -> tuple[float, float]:
    """(seconds of the training phase, share of it spent on collection) of one fit."""
    import cli

    with tempfile.TemporaryDirectory() as folder:
        config = fit_config(args, env, EnvConfig(**env).vector_size, folder)
        config["trainer"]["callbacks"][0]["init_args"]["overlap"] = overlap
        path = Path(folder) / "overlap.yaml"
        path.write_text(yaml.safe_dump(config))
        trainer = cli.main(["fit", "--config", str(path)]).trainer
    (collector,) = [callback for callback in trainer.callbacks if isinstance(callback, Collector)]
    return collector._batch_seconds, collector.data_wait_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(parser)
    parser.set_defaults(num_envs=2, batch_size=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    quiet_lightning()
    env = {"scenario": 1, "layout": "curvy"}

    print(f"device: {device_name(args.device)}; {args.num_envs} env processes, {args.learning_starts} warm-up env "
          f"steps, then {args.updates} updates at batch {args.batch_size}, one per env step")
    results = {True: [], False: []}
    for round_index in range(args.rounds):
        for overlap in (False, True):
            seconds, waited = train(args, env, overlap)
            results[overlap].append((seconds, waited))
            print(f"round {round_index + 1}, overlap {str(overlap).lower()}: training {seconds:.2f} s, "
                  f"the learner waited for collection {waited:.1%} of it")
    medians = {overlap: [statistics.median(run[i] for run in runs) for i in (0, 1)] for overlap, runs in results.items()}
    print(f"overlap_train_s: {medians[True][0]:.2f} (waited {medians[True][1]:.1%})")
    print(f"turns_train_s: {medians[False][0]:.2f} (waited {medians[False][1]:.1%})")
    print(f"speed-up (turns / overlap): {medians[False][0] / medians[True][0]:.2f}")


if __name__ == "__main__":
    main()
