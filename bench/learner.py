"""TD3 learner throughput, ours vs Stable-Baselines3, in the same run, on the same device and thread count.

    python bench/learner.py [--device cpu|cuda] [--rounds 3] [--updates 30] [--batch-size 256]
                            [--no-speedups] [--compile] [--bf16-cnn] [--channels-last] [--cuda-graph] [--skip-sb3]
                            [--fixed-batch | --sample-on-device | --host-sampling] [--profile]

Both learners do the same update (batch 256, twin critics and an actor with separate NatureCNNs of 512
features, heads 256-256, policy delay 2) on image 4x84x84 uint8 + vector (our env's size) observations:
- ours: the real `TD3.training_step` under a Lightning Trainer, fed by the real `ReplayStream` sampling our
  `ReplayBuffer`, its batches gathered where a fit's `data.sample_on_device` would gather them by default (on CUDA:
  on the device, from the buffer's copy there; --host-sampling: on the host, pinned and copied to the device every
  update; --sample-on-device insists on the device);
- SB3: `TD3("MultiInputPolicy", share_features_extractor=False)`'s own `train()`, sampling its own
  `DictReplayBuffer` (SB3 does not clip gradients; ours also clips both, norm 10).
Both buffers hold the same synthetic transitions. The two alternate in rounds (so a neighbour's load on a shared
machine hits both alike); each round times `--updates` updates after `--warmup` untimed ones. `--profile` adds one
round of ours under torch.profiler: how long the device (on a CPU: this process) was busy per update against the
wall time per update, and the operations that took the most of it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import gymnasium as gym
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from common import (
    action_space, add_learner_options, device_name, import_sb3, learner_options, observation_space, quiet_lightning,
    sb3_td3_kwargs, synchronize, synthetic_steps,
)
from datamodules.replay import ReplayStream
from lightning_td3.device_replay import device_replay_for
from lightning_td3.envs import EnvConfig
from lightning_td3.replay import ReplayBuffer
from lightning_td3.td3 import TD3

EPISODE_STEPS = 100


class UpdateClock(pl.Callback):
    """Wall and CPU time of the updates after the first `warmup` of a fit, and of the fit up to them (where
    `torch.compile` compiles)."""

    def __init__(self, device: str, warmup: int):
        self.device = device
        self.warmup = warmup
        self.fit_start = self.start = self.end = (0.0, 0.0)

    def on_train_start(self, trainer, module):
        self.fit_start = now(self.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = now(self.device)

    def on_train_end(self, trainer, module):
        self.end = now(self.device)


def now(device: str) -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time (all threads of this process) suffers less from neighbours' load."""
    synchronize(device)
    return time.perf_counter(), time.process_time()


def rates(updates: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """(updates per wall second, updates per CPU second)."""
    return updates / (end[0] - start[0]), updates / (end[1] - start[1])


class SpacesOnlyEnv(gym.Env):
    """What SB3's constructor reads of an env: its spaces (`train()` never steps it)."""

    def __init__(self, vector_size: int):
        self.observation_space = observation_space(vector_size)
        self.action_space = action_space()


def filled_buffers(transitions: int, vector_size: int, sb3_buffer, seed: int) -> ReplayBuffer:
    """Our buffer filled with synthetic transitions, and SB3's (unless None) with the same ones."""
    ours = ReplayBuffer(capacity=transitions + transitions // EPISODE_STEPS + 1, num_envs=1, vector_size=vector_size)
    rng = np.random.default_rng(seed)
    for obs, action, reward, next_obs, over in synthetic_steps(transitions, vector_size, EPISODE_STEPS, rng):
        batched = {key: value[None] for key, value in obs.items()}
        batched_next = {key: value[None] for key, value in next_obs.items()}
        ours.add(batched, action[None], np.array([reward]), batched_next, np.array([over]), np.array([False]))
        if sb3_buffer is not None:
            sb3_buffer.add(batched, batched_next, action[None], np.array([reward]), np.array([over]), [{}])
    return ours


def time_ours(module: TD3, loader: DataLoader, args) -> tuple[float, float, float]:
    """(updates per wall second, per CPU second, wall seconds of the fit's warm-up updates)."""
    clock = UpdateClock(args.device, args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
        limit_train_batches=args.warmup + args.updates, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    return *rates(args.updates, clock.start, clock.end), clock.start[0] - clock.fit_start[0]


def profile_ours(module: TD3, loader, args) -> None:
    """One more round of ours under torch.profiler. The device's busy time is every kernel's time of the round (its
    warm-up updates, and any graph capture, included) over the round's updates; the wall time is the timed ones'."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        wall_rate, _, _ = time_ours(module, loader, args)
    averages = profiler.key_averages(group_by_input_shape=True)  # each convolution on its own line
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    busy_ms = sum(getattr(event, key) for event in averages) / 1000 / (args.warmup + args.updates)
    where = "device kernels" if on_cuda else "this process's operations"
    print(f"profile: {1000 / wall_rate:.2f} ms wall per update; {where} {busy_ms:.2f} ms per update")
    print(averages.table(sort_by=key, row_limit=15, max_name_column_width=40, max_shapes_column_width=70))


def time_sb3(model, args) -> tuple[float, float]:
    model.train(gradient_steps=args.warmup, batch_size=args.batch_size)
    start = now(args.device)
    model.train(gradient_steps=args.updates, batch_size=args.batch_size)
    return rates(args.updates, start, now(args.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=None, help="timed updates per round (cpu 30, cuda 500)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates per round (cpu 4, cuda 50)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--transitions", type=int, default=2000, help="transitions in each replay buffer")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    add_learner_options(parser)
    parser.add_argument("--skip-sb3", action="store_true", help="time ours only (no ratio)")
    parser.add_argument("--fixed-batch", action="store_true",
                        help="feed ours one sampled batch over and over (still copied to the device each update): "
                             "the update alone, without replay sampling; use with --skip-sb3")
    parser.add_argument("--profile", action="store_true",
                        help="one more round of ours under torch.profiler: busy time per update and its largest parts")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--sample-on-device", action="store_true",
                          help="ours samples from a copy of the replay on the device (data.sample_on_device true)")
    sampling.add_argument("--host-sampling", action="store_true",
                          help="ours samples on the host and copies each batch over (data.sample_on_device false)")
    args = parser.parse_args()
    if args.device == "cpu" and (args.sample_on_device or args.cuda_graph):
        parser.error("--sample-on-device and --cuda-graph need --device cuda")
    args.updates = args.updates or (500 if args.device == "cuda" else 30)
    args.warmup = args.warmup or (50 if args.device == "cuda" else 4)
    sys.stdout.reconfigure(line_buffering=True)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vector_size = EnvConfig().vector_size
    sb3_model = None
    if not args.skip_sb3:
        sb3 = import_sb3()
        sb3_model = sb3.TD3(
            env=SpacesOnlyEnv(vector_size), buffer_size=args.transitions, batch_size=args.batch_size,
            device=args.device, seed=0, **sb3_td3_kwargs(),
        )
        from stable_baselines3.common.logger import Logger

        sb3_model.set_logger(Logger(folder=None, output_formats=[]))
    buffer = filled_buffers(args.transitions, vector_size, sb3_model and sb3_model.replay_buffer, seed=0)
    # A fixed batch is gathered once, on the host, and copied over every update: the update and its input copy.
    requested = True if args.sample_on_device else False if args.host_sampling or args.fixed_batch else None
    device_replay = device_replay_for(buffer, torch.device(args.device), requested)
    stream = ReplayStream(device_replay or buffer, args.batch_size, np.random.default_rng(1))
    loader = DataLoader(stream, batch_size=None, num_workers=0,
                        pin_memory=args.device == "cuda" and device_replay is None)
    if args.fixed_batch:
        loader = itertools.repeat(next(iter(loader)))
    options = learner_options(args)
    module = TD3(vector_size=vector_size, log_every_n_updates=100, log_images_every_n_updates=10**9, **options)
    chosen = module.use_learner_settings(torch.device(args.device))  # what each fit's setup will choose again

    print(f"device: {device_name(args.device)}; batch {args.batch_size}; {args.rounds} rounds x {args.updates} "
          f"timed updates ({args.warmup} warm-up); TD3 options: {options or 'defaults'} -> CNNs: {chosen}"
          + ("; ours on one fixed batch (no replay sampling)" if args.fixed_batch else "")
          + ("; ours samples on the device" if device_replay is not None else ""))
    ours_rates, sb3_rates, compiled = [], [], []
    for round_index in range(args.rounds):
        ours_rates.append(time_ours(module, loader, args))
        line = f"round {round_index + 1}: ours {ours_rates[-1][0]:.2f} updates/s ({ours_rates[-1][1]:.3f} per CPU s)"
        if args.compile:  # frames compiled so far: the first round compiles each part once, later ones recompile
            compiled.append(torch._dynamo.utils.counters["frames"]["total"])
            line += f", {args.warmup} warm-up updates {ours_rates[-1][2]:.1f} s, frames compiled {compiled[-1]}"
        if not args.skip_sb3:
            sb3_rates.append(time_sb3(sb3_model, args))
            line += f", sb3 {sb3_rates[-1][0]:.2f} updates/s ({sb3_rates[-1][1]:.3f} per CPU s)"
        print(line)
    ours = [statistics.median(rate[i] for rate in ours_rates) for i in (0, 1)]
    print(f"updates_per_s: {ours[0]:.2f}")
    if args.compile and args.rounds > 1:
        later_warmup = statistics.median(rate[2] for rate in ours_rates[1:])
        print(f"compile_s: {ours_rates[0][2] - later_warmup:.1f} (the first round's warm-up less the later ones'); "
              f"recompiles after the first round: {compiled[-1] - compiled[0]}")
    if args.profile:
        profile_ours(module, loader, args)
    if sb3_rates:
        sb3 = [statistics.median(rate[i] for rate in sb3_rates) for i in (0, 1)]
        print(f"sb3_updates_per_s: {sb3[0]:.2f}")
        print(f"ratio (ours / sb3): {ours[0] / sb3[0]:.2f} (per CPU second: {ours[1] / sb3[1]:.2f})")


if __name__ == "__main__":
    main()
