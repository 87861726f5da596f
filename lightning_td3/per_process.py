"""State that differs between DDP processes, kept in the one checkpoint that rank 0 writes.

Lightning builds every checkpoint on all processes and writes rank 0's, so whatever is one process's own (its
counters, its envs' state, its RNG streams) is gathered into a list by rank when saving, and each process takes
its entry back when resuming. Resuming needs the same number of processes.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_td3.errors import CheckpointError


def gather_per_process(state: Any) -> list[Any]:
    """Every process's `state` in rank order. A collective: all processes call it (they all build each checkpoint)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def own_state(trainer, states: list[Any], what: str) -> Any:
    """This process's entry of a list saved by `gather_per_process`, or a `CheckpointError` if the number of
    processes changed."""
    if len(states) != trainer.world_size:
        raise CheckpointError(
            f"this checkpoint holds {what} of {len(states)} process(es) and this run has {trainer.world_size}; "
            "resume with the same number of processes (trainer.devices x trainer.num_nodes)"
        )
    return states[trainer.global_rank]
