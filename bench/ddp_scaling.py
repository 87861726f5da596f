"""DDP scaling: TD3 updates/s and env steps/s of a real `cli.py fit`, with 1, 2, ... processes.

    python bench/ddp_scaling.py [--accelerator cpu|gpu] [--processes 1 2] [--updates 100] [--repeats 3]

Each process count runs the real CLI (Collector, replay, TD3 under Lightning's DDP strategy; one process runs
without DDP) on the quickstart's env, and the `Throughput` callback below times the updates after warm-up.
Per process: its own envs (`--num-envs`), warm-up, replay and one update per env step, so N processes do N times
the env steps and N times the samples per update (an update averages N batches). Printed per process count:
updates/s (of the shared model), env steps/s (all processes together) and samples/s, each the median of
`--repeats` runs (the counts take turns, so a noisy neighbour hits them alike), and the ratio to the first count.
On CPU every process gets `--threads-per-process` torch threads (one core each, as one GPU each would be).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


class Throughput(pl.Callback):
    """Times fit from the first update (after the Collector's warm-up) to the last; rank 0 writes the result."""

    def __init__(self, result_path: str):
        self.result_path = Path(result_path)
        self.started = 0.0
        self.start_counts: torch.Tensor | None = None

    def _run_counts(self, trainer, module) -> torch.Tensor:
        local = torch.tensor([module.env_steps, module.updates], device=module.device)
        return trainer.strategy.reduce(local, reduce_op="sum")  # a collective: every process calls it

    def on_train_start(self, trainer, module) -> None:
        self.start_counts = self._run_counts(trainer, module)
        self._sync(module)
        self.started = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self._sync(module)
        seconds = time.perf_counter() - self.started
        env_steps, summed_updates = (self._run_counts(trainer, module) - self.start_counts).tolist()
        updates = summed_updates // trainer.world_size  # every process makes the same updates
        if trainer.global_rank == 0:
            batch_size = trainer.datamodule.batch_size
            self.result_path.write_text(json.dumps({
                "processes": trainer.world_size,
                "seconds": seconds,
                "updates_per_s": updates / seconds,
                "env_steps_per_s": env_steps / seconds,
                "samples_per_s": updates * batch_size * trainer.world_size / seconds,
            }))

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)


def config(args, processes: int, result_path: Path, run_dir: Path) -> dict:
    trainer = {
        "accelerator": args.accelerator,
        "devices": processes,
        "max_epochs": 1,
        "limit_train_batches": args.updates,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(run_dir),
        "callbacks": [
            {"class_path": "lightning_td3.collector.Collector",
             "init_args": {"learning_starts": args.learning_starts, "updates_per_step": 1.0,
                           "async_envs": args.num_envs > 1}},
            {"class_path": "bench.ddp_scaling.Throughput",  # imported by the CLI processes, run from the root
             "init_args": {"result_path": str(result_path)}},
        ],
    }
    if processes > 1:
        trainer["strategy"] = "ddp"
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "lightning_td3.td3.TD3", "init_args": {"vector_size": 54}},
        "data": {
            "num_envs": args.num_envs,
            "buffer_capacity": args.learning_starts + args.updates + 1000,
            "batch_size": args.batch_size,
            "eval_episodes": processes,
            "env": {"backend": "highway", "scenario": 0, "layout": "curvy", "route_length_m": 300.0},
        },
    }


def run(args, processes: int, work_dir: Path) -> dict:
    result_path = work_dir / f"result_{processes}.json"
    config_path = work_dir / f"config_{processes}.yaml"
    config_path.write_text(yaml.safe_dump(config(args, processes, result_path, work_dir / f"run_{processes}")))
    env = dict(os.environ)
    if args.accelerator == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads_per_process)
    completed = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", str(config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{completed.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (the first: anchor)")
    parser.add_argument("--updates", type=int, default=100, help="timed updates per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per process count (the median is printed)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--num-envs", type=int, default=1, help="training envs per process")
    parser.add_argument("--learning-starts", type=int, default=200, help="warm-up env steps per process (not timed)")
    parser.add_argument("--threads-per-process", type=int, default=1, help="CPU: torch threads of each process")
    args = parser.parse_args()

    print(f"accelerator={args.accelerator} cores={os.cpu_count()} batch_size={args.batch_size} "
          f"num_envs={args.num_envs} updates={args.updates} threads_per_process={args.threads_per_process}")
    runs: dict[int, list[dict]] = {processes: [] for processes in args.processes}
    with tempfile.TemporaryDirectory() as work_dir:
        for _ in range(args.repeats):
            for processes in args.processes:
                result = run(args, processes, Path(work_dir))
                print(f"  run: processes={processes} " + " ".join(f"{k}={v:.2f}" for k, v in result.items()
                                                                   if k != "processes"), flush=True)
                runs[processes].append(result)
    rates = ("updates_per_s", "env_steps_per_s", "samples_per_s")
    medians = {
        processes: {rate: statistics.median(result[rate] for result in results) for rate in rates}
        for processes, results in runs.items()
    }
    anchor_count = args.processes[0]
    anchor = medians[anchor_count]
    for processes, median in medians.items():
        print(
            f"processes={processes} updates_per_s={median['updates_per_s']:.2f} "
            f"env_steps_per_s={median['env_steps_per_s']:.2f} samples_per_s={median['samples_per_s']:.1f} "
            f"ratio_vs_{anchor_count}: updates {median['updates_per_s'] / anchor['updates_per_s']:.2f}x, "
            f"env_steps {median['env_steps_per_s'] / anchor['env_steps_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
