"""TD3's guard against NaN/Inf: an update whose loss or gradient is not finite changes nothing, decided on the device.

An update never waits for the host, so that it can be recorded as a CUDA graph (`cuda_graph.py`). Whether its
losses and gradients are finite therefore stays a device bool (`all_finite`), which turns the optimizer steps
(`clip_and_step`) and the Polyak updates into no-ops, and is counted in a device record (`count_skipped`). The host
reads that record on logging steps only: the skipped updates for the logs and the checkpoint, and whether a streak of
them reached `model.max_nonfinite_updates` (`stop_after_too_many_skipped`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_td3.checkpointing import save_last_checkpoint
from lightning_td3.errors import TrainingAborted

if TYPE_CHECKING:
    from lightning_td3.td3 import TD3

# The device-side record of skipped updates (`TD3.skip_record`), one int64 each: skipped updates in all, the
# current streak of them, the update where that streak began, the start of the first streak that reached
# `max_nonfinite_updates` (-1: none yet), and the update under way.
SKIPPED, STREAK, STREAK_START, TRIPPED_START, UPDATE = range(5)


def new_record() -> torch.Tensor:
    """The record of a run that has skipped nothing yet."""
    return torch.tensor([0, 0, 0, -1, 0])


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, world_size: int) -> torch.Tensor:
    """Whether the loss and gradient are finite, as a device bool (reading it would be a host sync).

    Under DDP the processes agree (a MIN all-reduce), so that their weights and skip counters stay identical.
    """
    ok = torch.isfinite(loss.detach() + grad_norm)
    if world_size > 1:
        agreed = ok.float()
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        ok = agreed.bool()
    return ok


def clip_and_step(module: TD3, optimizer, ok: torch.Tensor) -> None:
    """Clip and step, or leave the weights, moments and step count alone where `ok` is false.

    Fused Adam reads `found_inf` on the device, the way GradScaler skips steps: its kernel returns at once and
    the step count it advanced is taken back.
    """
    module.clip_gradients(optimizer, gradient_clip_val=module.hparams.max_grad_norm, gradient_clip_algorithm="norm")
    getattr(optimizer, "optimizer", optimizer).found_inf = (~ok).float()  # on the torch optimizer itself
    optimizer.step()


@torch.no_grad()
def count_skipped(record: torch.Tensor, ok: torch.Tensor, limit: int) -> None:
    """Count the update under way in `record`: skipped unless `ok`, and a streak of `limit` skips noted."""
    skipped, streak, streak_start, tripped_start, update = record.unbind()  # views, updated in place
    streak_start.copy_(torch.where(streak == 0, update, streak_start))  # a streak, if any, begins here
    streak.add_(1).mul_((~ok).long())
    skipped.add_((~ok).long())
    tripped = (streak >= limit) & (tripped_start < 0)
    tripped_start.copy_(torch.where(tripped, streak_start, tripped_start))
    update.add_(1)


def stop_after_too_many_skipped(module: TD3, update: int) -> None:
    """On logging steps: stop the run with a checkpoint if a streak of skipped updates reached the limit since."""
    tripped_start = int(module.skip_record[TRIPPED_START])
    if tripped_start < 0:
        return
    path = save_last_checkpoint(module.trainer)
    limit = module.hparams.max_nonfinite_updates
    raise TrainingAborted(
        f"{limit} updates in a row had a NaN/Inf loss or gradient (model.max_nonfinite_updates={limit}), "
        f"starting at update {tripped_start}; seen at update {update}, env step {module.env_steps} (checked every "
        f"model.log_every_n_updates={module.hparams.log_every_n_updates} updates). Skipped updates change no "
        f"weights. Checkpoint written to {path}. Look for NaN/Inf in observations or rewards, or lower the "
        "learning rates, then resume with `fit --ckpt_path last`"
    )
