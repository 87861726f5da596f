"""Where the time of a real training run goes: a short `cli.py fit` of a recipe under Lightning's SimpleProfiler.

    python bench/breakdown.py [--config configs/experiments/scenario1_curvy_asymmetric.yaml] [--epochs 2]
                              [--updates-per-epoch 500] [--learning-starts 1000] [--eval-episodes 5]
                              [--threads N] [--no-speedups] [--compile] [--bf16-cnn] [--channels-last]
                              [--set key=value ...]

The recipe runs as written (its envs, networks, replay, evaluation and checkpoints) with a shorter schedule: the
given warm-up, epochs, updates per epoch and evaluation episodes, logs and checkpoints in a temporary folder.
`--set trainer.callbacks.0.init_args.async_envs=false` style overrides reach any other key of the config.
Prints, for each part of the fit, its seconds, its share of the fit's wall time and its calls:
- warm-up: the random env steps before the first update (the Collector's on_fit_start);
- env stepping: sending actions and waiting for the envs (with env processes, only the wait the learner sees);
- action selection: the actor's forward pass for the exploration actions;
- replay store / replay sample: adding transitions; drawing a batch and moving it to the device;
- update: the TD3 update;
- evaluation: the validation episodes;
- checkpoints: writing checkpoints (replay files included);
- other: the rest of the fit's wall time (Lightning's loop, logging, the progress bar, process start of envs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from common import add_learner_options, learner_options, quiet_lightning
from lightning_td3.collector import PROFILED as COLLECTOR_PROFILED
from lightning_td3.td3 import PROFILED as TD3_PROFILED

RECIPE = "configs/experiments/scenario1_curvy_asymmetric.yaml"


class TrainingStart(pl.Callback):
    """How many durations of each profiled action the warm-up left (its env steps are the warm-up's, not training's)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def on_train_start(self, trainer, module):
        self.counts = {name: len(times) for name, times in trainer.profiler.recorded_durations.items()}


def parts(durations: dict[str, list[float]], warmup_counts: dict[str, int]) -> dict[str, tuple[float, int]]:
    """(seconds, calls) of each part, from SimpleProfiler's recorded durations by action name; every part but the
    warm-up counts the training phase only."""

    def total(predicate) -> tuple[float, int]:
        chosen = [times[warmup_counts.get(name, 0):] for name, times in durations.items() if predicate(name)]
        return sum(sum(times) for times in chosen), sum(len(times) for times in chosen)

    def named(name: str):
        return lambda action: action == name

    warmup = durations.get("[Callback]Collector.on_fit_start", [])
    return {
        "warm-up": (sum(warmup), len(warmup)),
        "env stepping": total(named(COLLECTOR_PROFILED["step"])),
        "action selection": total(named(COLLECTOR_PROFILED["act"])),
        "replay store": total(named(COLLECTOR_PROFILED["store"])),
        "replay sample": total(named(TD3_PROFILED["sample"])),
        "update": total(named(TD3_PROFILED["update"])),
        "evaluation": total(lambda action: action.endswith(".validation_step")),
        "checkpoints": total(named("save_checkpoint")),
    }


def breakdown_config(args, folder: str) -> dict:
    config = yaml.safe_load(Path(args.config).read_text())
    trainer = config["trainer"]
    trainer.update(max_epochs=args.epochs, limit_train_batches=args.updates_per_epoch, max_time=None,
                   profiler="simple", default_root_dir=folder)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = folder
    (collector,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("Collector")]
    collector["init_args"]["learning_starts"] = args.learning_starts
    trainer["callbacks"].append({"class_path": "breakdown.TrainingStart"})
    config["data"]["eval_episodes"] = args.eval_episodes
    config["model"].setdefault("init_args", {}).update(learner_options(args))
    for assignment in args.set:
        key, value = assignment.split("=", 1)
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=RECIPE)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--updates-per-epoch", type=int, default=500)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the learner")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config key, dotted (list items by index)")
    add_learner_options(parser)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    import cli

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "breakdown.yaml"
        path.write_text(yaml.safe_dump(breakdown_config(args, folder)))
        started = time.perf_counter()
        trainer = cli.main(["fit", "--config", str(path)]).trainer
        wall = time.perf_counter() - started
    module = trainer.lightning_module
    print(f"{args.config}: {args.learning_starts} warm-up env steps, {args.epochs} epochs x {args.updates_per_epoch} "
          f"updates, {args.eval_episodes} evaluation episodes per epoch; {torch.get_num_threads()} torch threads; "
          f"{module.env_steps} env steps, {module.updates} updates in {wall:.1f} s")
    # The config names it as `breakdown.TrainingStart`: another copy of this module's class than __main__'s.
    (start,) = [callback for callback in trainer.callbacks if type(callback).__name__ == TrainingStart.__name__]
    measured = parts(trainer.profiler.recorded_durations, start.counts)
    measured["other"] = (wall - sum(seconds for seconds, _ in measured.values()), 0)
    print(f"{'part':<18} {'seconds':>8} {'share':>7} {'calls':>7} {'ms/call':>8}")
    for name, (seconds, calls) in measured.items():
        per_call = f"{1000 * seconds / calls:8.2f}" if calls else " " * 8
        print(f"{name:<18} {seconds:8.1f} {seconds / wall:7.1%} {calls:7d} {per_call}")
    print(f"fit_wall_s: {wall:.1f}")


if __name__ == "__main__":
    main()
