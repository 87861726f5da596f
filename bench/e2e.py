"""End to end: wall time of the same training work, ours (`cli.py fit`) vs Stable-Baselines3 TD3 `learn()`.

    python bench/e2e.py [--device cpu|cuda] [--learning-starts 200] [--updates 60] [--num-envs 1]
                        [--batch-size 256] [--buffer-size 20000] [--no-speedups] [--compile] [--bf16-cnn] [--channels-last]
                        [--cuda-graph] [--sample-on-device]

Both train TD3 on our `DrivingEnv` (highway backend, image 4x84x84 + vector) from scratch: `--learning-starts`
uniform random env steps, then one update per env step (SB3: train_freq 1, gradient_steps -1, i.e. as many
updates as env steps) for `--updates` updates, Gaussian exploration noise 0.1, the same batch size, replay size,
networks (separate actor / critic NatureCNNs) and hyper-parameters. With `--num-envs N` both step N envs in
subprocesses (ours: the Collector's AsyncVectorEnv; SB3: SubprocVecEnv). Neither evaluates, logs to disk or
saves checkpoints. Ours runs the real `cli.py fit` (LightningCLI, Trainer, Collector, replay datamodule, TD3).
Prints wall and CPU seconds (this process and its reaped children; less sensitive to a shared machine's load),
the env steps and updates each side did, and the wall-time ratio.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from common import add_learner_options, device_name, import_sb3, learner_options, quiet_lightning, sb3_td3_kwargs
from lightning_td3.collector import Collector
from lightning_td3.envs import ENV_ID, EnvConfig


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fit_config(args, env: dict, vector_size: int, folder: str) -> dict:
    return {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
            "default_root_dir": folder, "max_epochs": 1, "limit_train_batches": args.updates, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning_td3.collector.Collector", "init_args": {
                "learning_starts": args.learning_starts, "exploration_noise": 0.1, "updates_per_step": 1.0,
                "async_envs": True}}],
        },
        "model": {"class_path": "lightning_td3.td3.TD3", "init_args": {
            "vector_size": vector_size, "log_every_n_updates": 100, "log_images_every_n_updates": 10**9,
            **learner_options(args)}},
        "data": {"num_envs": args.num_envs, "buffer_capacity": args.buffer_size, "batch_size": args.batch_size,
                 "eval_episodes": 1, "sample_on_device": args.sample_on_device or None, "env": env},
    }


def run_ours(args, env: dict, vector_size: int) -> tuple[float, float, int, int]:
    import cli

    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "e2e.yaml"
        config.write_text(yaml.safe_dump(fit_config(args, env, vector_size, folder)))
        wall, cpu = time.perf_counter(), cpu_seconds()
        trainer = cli.main(["fit", "--config", str(config)]).trainer
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    (collector,) = [callback for callback in trainer.callbacks if isinstance(callback, Collector)]
    print(f"ours: the learner waited for env steps {collector.data_wait_fraction:.0%} of the training time")
    return wall, cpu, trainer.lightning_module.env_steps, trainer.lightning_module.updates


def run_sb3(args, env: dict) -> tuple[float, float, int, int]:
    sb3 = import_sb3()
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    wall, cpu = time.perf_counter(), cpu_seconds()
    envs = make_vec_env(ENV_ID, n_envs=args.num_envs, seed=args.seed, env_kwargs=env,
                        vec_env_cls=SubprocVecEnv if args.num_envs > 1 else DummyVecEnv)
    model = sb3.TD3(
        env=envs, buffer_size=args.buffer_size, learning_starts=args.learning_starts, batch_size=args.batch_size,
        train_freq=1, gradient_steps=-1, action_noise=NormalActionNoise(np.zeros(2), np.full(2, 0.1)),
        device=args.device, seed=args.seed, verbose=0, **sb3_td3_kwargs(),
    )
    model.learn(total_timesteps=args.learning_starts + args.updates)
    envs.close()
    return time.perf_counter() - wall, cpu_seconds() - cpu, model.num_timesteps, model._n_updates


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the fit that `fit_config` builds (bench/overlap.py runs the same fit)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--learning-starts", type=int, default=200)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--num-envs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--buffer-size", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    add_learner_options(parser)
    parser.add_argument("--sample-on-device", action="store_true",
                        help="data.sample_on_device true (without: as a fit chooses, on CUDA where the copy fits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(parser)
    parser.add_argument("--scenario", type=int, default=1)
    parser.add_argument("--layout", default="curvy")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    import_sb3()  # fail before the first run if SB3 is missing
    env = {"scenario": args.scenario, "layout": args.layout}
    vector_size = EnvConfig(**env).vector_size

    print(f"device: {device_name(args.device)}; {args.num_envs} env(s), {args.learning_starts} warm-up env steps + "
          f"{args.updates} updates at batch {args.batch_size}, buffer {args.buffer_size}")
    ours = run_ours(args, env, vector_size)
    print(f"ours: {ours[0]:.1f} s wall, {ours[1]:.1f} s CPU, {ours[2]} env steps, {ours[3]} updates")
    sb3 = run_sb3(args, env)
    print(f"sb3:  {sb3[0]:.1f} s wall, {sb3[1]:.1f} s CPU, {sb3[2]} env steps, {sb3[3]} updates")
    print(f"wall_s: {ours[0]:.1f}")
    print(f"sb3_wall_s: {sb3[0]:.1f}")
    print(f"speed-up (sb3 wall / ours wall): {sb3[0] / ours[0]:.2f}")


if __name__ == "__main__":
    main()
