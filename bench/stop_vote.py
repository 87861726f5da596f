"""The cost of the stop vote: the one extra collective every update makes under DDP (`fault_tolerance.stop_together`).

    python bench/stop_vote.py [--device cpu|cuda] [--processes 2] [--rounds 5] [--calls 200]

Each process times, in alternating rounds, the vote exactly as `stop_together` makes it (an all-reduce of four
integers, read back to the host) and its anchor: one all-reduce of a flat float32 buffer the size of TD3's
trainable parameters (actor + critic at the default config), which DDP already moves for every backward pass
(1.5 per update with policy_delay 2), so the anchor understates what an update communicates. Printed: the median
time per call of each and their ratio. CPU uses gloo, CUDA NCCL (one GPU per process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_td3.td3 import TD3  # noqa: E402


def timed(call, device: torch.device, calls: int) -> float:
    """Seconds per call, the work finished on the device."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / calls


def worker(rank: int, args, parameters: int) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=args.processes)
    gradients = torch.ones(parameters, device=device)

    def vote() -> None:  # as stop_together: build the tensor, all-reduce it, read it back
        votes = torch.tensor([0, 0, 0, 12345], device=device)
        dist.all_reduce(votes)
        votes.tolist()

    def gradient_all_reduce() -> None:
        dist.all_reduce(gradients)

    vote_s, anchor_s = [], []
    for round_index in range(args.rounds + 1):  # the first round warms up, untimed
        vote_time = timed(vote, device, args.calls)
        anchor_time = timed(gradient_all_reduce, device, max(1, args.calls // 10))
        if round_index:
            vote_s.append(vote_time)
            anchor_s.append(anchor_time)
    if rank == 0:
        vote_median, anchor_median = statistics.median(vote_s), statistics.median(anchor_s)
        print(f"stop vote (4 x int64 all-reduce + host read): {vote_median * 1e6:9.1f} us per update")
        print(f"gradient all-reduce ({parameters / 1e6:.2f} M float32): {anchor_median * 1e6:9.1f} us per backward")
        print(f"ratio vote / gradient all-reduce: {vote_median / anchor_median:.4f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="votes per round (a tenth as many anchors)")
    args = parser.parse_args()
    model = TD3()
    parameters = sum(p.numel() for net in (model.actor, model.critic) for p in net.parameters() if p.requires_grad)
    print(f"device={args.device} processes={args.processes} cores={os.cpu_count()} torch={torch.__version__}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    mp.spawn(worker, args=(args, parameters), nprocs=args.processes)


if __name__ == "__main__":
    main()
