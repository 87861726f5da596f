"""What TD3 logs: update scalars, training episodes and visuals, each scalar also against the run's env steps.

Lightning's `global_step` counts optimizer steps (1.5 per update with a policy delay of 2), which mean little to an
RL reader, so every scalar goes to TensorBoard a second time as `<name>_vs_env_steps`, against the run's env steps:
the processes' total at the last sync of the counters (`sync_run_totals_and_log_episodes`, every
`log_every_n_updates` updates and at every evaluation). Training episodes are logged as means over those finished
since the last log: `train/success_rate`, ..., and, when the training env draws its scenario or layout per episode,
the same per scenario and per layout (`train_by_task/scenario_2/success_rate`, `train_by_task/curvy/...`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from pytorch_lightning.loggers import TensorBoardLogger

if TYPE_CHECKING:
    from lightning_td3.td3 import TD3, UpdateStats


def log_update(module: TD3, update: int, stats: UpdateStats) -> None:
    """Losses, Q statistics, grad norms, learning rates and counters of update `update` (a host sync)."""
    sync_run_totals_and_log_episodes(module)
    scalars = {
        "train/critic_loss": stats.critic_loss.item(),
        "train/q_mean": stats.q1.mean().item(),
        "train/q_max": stats.q1.max().item(),
        "train/critic_grad_norm": stats.critic_grad_norm.item(),
        "train/updates": float(update),
        "train/skipped_updates": float(module.skipped_updates),
    }
    actor_optimizer, critic_optimizer = module.optimizers()
    scalars["train/actor_lr"] = float(actor_optimizer.optimizer.param_groups[0]["lr"])
    scalars["train/critic_lr"] = float(critic_optimizer.optimizer.param_groups[0]["lr"])
    if stats.actor_loss is not None:
        scalars["train/actor_loss"] = stats.actor_loss.item()
        scalars["train/actor_grad_norm"] = stats.actor_grad_norm.item()
    module.log_dict(scalars, batch_size=1)  # the dataloader_iter step flavour makes Lightning ask
    log_vs_env_steps(module, scalars)


def sync_run_totals_and_log_episodes(module: TD3) -> None:
    """The run's totals brought up to date (a collective), then the training episodes finished since last logged."""
    if _sync_run_totals(module):
        _log_training_episodes(module)


def _sync_run_totals(module: TD3) -> int:
    """Sum env steps, episodes and unlogged training episodes over the processes into the run's totals.

    A collective under DDP: every process calls it at the same update. Returns the run's unlogged episodes.
    """
    counts = torch.tensor(
        [module.env_steps, module.episodes, int(module.train_episode_metrics.episodes)], device=module.device
    )
    module.run_env_steps, module.run_episodes, unlogged_episodes = module.trainer.strategy.reduce(
        counts, reduce_op="sum"
    ).tolist()
    return unlogged_episodes


def _log_training_episodes(module: TD3) -> None:
    with warnings.catch_warnings():
        # A process that finished no episode since the last log still takes part in the reduction.
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        metrics = {name: value.item() for name, value in module.train_episode_metrics.compute().items()}
    module.train_episode_metrics.reset()
    log_vs_env_steps(module, metrics)


def log_vs_env_steps(module: TD3, scalars: dict[str, float]) -> None:
    # The x value is the total at the last sync of the counters (every `log_every_n_updates`).
    experiment = _tensorboard(module)
    if experiment is not None:
        for name, value in scalars.items():
            experiment.add_scalar(f"{name}_vs_env_steps", value, module.run_env_steps)


def log_visuals(module: TD3, image: torch.Tensor) -> None:
    """A batch's first camera stack, weight and gradient histograms, and CNN feature statistics."""
    experiment = _tensorboard(module)
    if experiment is None:
        return
    step = module.run_env_steps
    # The four stacked frames of one sample, side by side, as the CNNs see them.
    experiment.add_image("obs/camera_stack", torch.cat(list(image[0]), dim=1).unsqueeze(0), step)
    for name, network in (("actor", module.actor), ("critic", module.critic)):
        for param_name, param in network.named_parameters():
            for kind, values in (("weights", param.detach()), ("grads", param.grad)):
                # A skipped update leaves its NaN/Inf gradients in place, and those make no histogram.
                if values is not None and values.isfinite().all():
                    experiment.add_histogram(f"{kind}/{name}.{param_name}", values.float().cpu(), step)
        with torch.no_grad():
            features = network.cnn(image)
        experiment.add_scalar(f"cnn/{name}_feature_mean", features.mean().item(), step)
        experiment.add_scalar(f"cnn/{name}_feature_std", features.std().item(), step)
        experiment.add_scalar(f"cnn/{name}_feature_negative_fraction", (features < 0).float().mean().item(), step)


def _tensorboard(module: TD3):
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
