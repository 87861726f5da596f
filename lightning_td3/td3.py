"""TD3 (Fujimoto et al., 2018) from pixels as a LightningModule with manual optimization.

The actor and the twin critics each own a NatureCNN, trained end-to-end from the RL losses. Data come from the
replay datamodule; the `Collector` callback steps the envs and advances `env_steps`, the counter that logs and
schedules use (Lightning's `global_step` counts optimizer steps: 1.5 per update with a policy delay of 2).
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from lightning_td3.checkpointing import arrays_to_tensors, save_last_checkpoint, tensors_to_arrays
from lightning_td3.driving_module import DrivingModule
from lightning_td3.envs import DrivingEnv
from lightning_td3.errors import CheckpointError, ConfigError, TrainingAborted, require
from lightning_td3.evaluation import EvaluationMetrics, Policy
from lightning_td3.export import ACTOR_ONLY_KEY
from lightning_td3.networks import Actor, TwinCritic
from lightning_td3.per_process import gather_per_process, own_state

CHECKPOINT_KEY = "td3_progress"
ARCHITECTURE_HPARAMS = ("vector_size", "hidden_sizes", "layer_norm")  # what decides the weights' shapes


def clipped_double_q_target(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """y = r + γ (1 − terminated) min(Q1', Q2'); a time-out is not terminal, so it still bootstraps."""
    return reward + gamma * (1.0 - terminated) * torch.minimum(next_q1, next_q2)


def smoothed_target_action(
    target_action: torch.Tensor, noise_std: float, noise_clip: float
) -> torch.Tensor:
    """Target policy smoothing: clipped Gaussian noise keeps the critic from exploiting sharp Q peaks."""
    noise = (torch.randn_like(target_action) * noise_std).clamp(-noise_clip, noise_clip)
    return (target_action + noise).clamp(-1.0, 1.0)


class TD3(DrivingModule):
    """TD3 with separate actor and critic NatureCNNs.

    Args:
        vector_size: length of the vector observation (linked from `data.env` by the CLI).
        hidden_sizes: hidden layers of the actor and critic heads.
        layer_norm: LayerNorm in the heads (stabilises Q-learning from pixels).
        actor_lr: Adam learning rate of the actor (and its CNN).
        critic_lr: Adam learning rate of the twin critics (and their CNN).
        gamma: discount.
        tau: Polyak averaging rate of the target networks.
        policy_noise: std of the target policy smoothing noise.
        noise_clip: clip of that noise.
        policy_delay: critic updates per actor (and target) update.
        max_grad_norm: gradient clipping (L2 norm) for both optimizers.
        log_every_n_updates: how often losses, Q statistics and grad norms are logged.
        log_images_every_n_updates: how often camera stacks, histograms and CNN feature statistics are logged.
        channels_last: keep conv weights (and so activations) channels-last, the layout fast conv kernels want.
        compile: `torch.compile` the CNNs and heads (the first updates pay for compilation).
        bf16_cnn: run the CNNs under bfloat16 autocast (meant for CUDA); heads, Q values, targets and losses stay
            float32, where bf16's 8-bit mantissa would blur TD targets.
        max_nonfinite_updates: updates in a row skipped for a NaN/Inf loss or gradient (a NaN/Inf in the batch
            shows there too) after which the run writes a checkpoint and stops. A skipped update steps no optimizer
            and no target (an actor failure comes after the critic's step, which stays).
    """

    def __init__(
        self,
        vector_size: int = 54,
        hidden_sizes: tuple[int, ...] = (256, 256),
        layer_norm: bool = False,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_delay: int = 2,
        max_grad_norm: float = 10.0,
        log_every_n_updates: int = 100,
        log_images_every_n_updates: int = 5000,
        channels_last: bool = False,
        compile: bool = False,
        bf16_cnn: bool = False,
        max_nonfinite_updates: int = 100,
    ) -> None:
        super().__init__()
        require(0.0 <= gamma < 1.0, "model.gamma", "in [0, 1)", gamma)
        require(0.0 < tau <= 1.0, "model.tau", "in (0, 1]", tau)
        require(
            isinstance(policy_delay, int) and policy_delay >= 1, "model.policy_delay", "an integer >= 1", policy_delay
        )
        require(
            isinstance(max_nonfinite_updates, int) and max_nonfinite_updates >= 1,
            "model.max_nonfinite_updates", "an integer >= 1", max_nonfinite_updates,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False
        sizes = dict(vector_size=vector_size, hidden_sizes=tuple(hidden_sizes), layer_norm=layer_norm)
        self.actor = Actor(**sizes, bf16_cnn=bf16_cnn)
        self.critic = TwinCritic(**sizes, bf16_cnn=bf16_cnn)
        if channels_last:
            self.actor.to(memory_format=torch.channels_last)
            self.critic.to(memory_format=torch.channels_last)
        self.actor_target = _frozen_copy(self.actor)
        self.critic_target = _frozen_copy(self.critic)
        if compile:
            # In place (Module.compile), so state_dict keys and checkpoints stay those of the eager modules.
            for network in (self.actor, self.critic, self.actor_target, self.critic_target):
                for part in network.children():
                    part.compile()
        # This process's progress, advanced by its Collector and by training_step, saved with every checkpoint.
        # Under DDP every process collects its own env steps and episodes; updates are the same on all of them.
        self.env_steps = 0
        self.episodes = 0
        self.updates = 0
        self.skipped_updates = 0
        # Updates skipped in a row, and the update and env step where that streak began.
        self._skipped_in_a_row, self._streak_start = 0, (0, 0)
        # The whole run's env steps and episodes (summed over processes) as of the last time scalars were logged.
        self.run_env_steps = 0
        self.run_episodes = 0
        # The Collector's training episodes finished since they were last logged.
        self.train_episode_metrics = EvaluationMetrics(prefix="train/")

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        env = getattr(data, "env", None)
        if env is not None and env.vector_size != self.hparams.vector_size:
            raise ConfigError(
                f"model.init_args.vector_size is {self.hparams.vector_size} but data.env gives vectors of "
                f"{env.vector_size} (4 + 2 x num_waypoints={env.num_waypoints}); set vector_size: {env.vector_size}"
            )
        if isinstance(self.trainer.strategy, DDPStrategy):
            _let_ddp_find_unused_parameters(self.trainer.strategy)

    def configure_optimizers(self):
        # Fused Adam (one kernel for all parameters) exists for CUDA and CPU tensors alike.
        return (
            torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr, fused=True),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, fused=True),
        )

    def training_step(self, dataloader_iter: Iterator) -> None:
        hp = self.hparams
        actor_optimizer, critic_optimizer = self.optimizers()
        batch = self._next_batch(dataloader_iter)
        image, vector, action = batch["image"], batch["vector"], batch["action"]

        # Critic: regress both Q heads onto the clipped double-Q target of the smoothed target policy.
        with torch.no_grad():
            next_action = smoothed_target_action(
                self.actor_target(batch["next_image"], batch["next_vector"]), hp.policy_noise, hp.noise_clip
            )
            next_q1, next_q2 = self.critic_target(batch["next_image"], batch["next_vector"], next_action)
            target_q = clipped_double_q_target(batch["reward"], batch["terminated"], next_q1, next_q2, hp.gamma)
        q1, q2 = self.critic(image, vector, action)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        critic_grad_norm = self._backward(critic_optimizer, critic_loss, self.critic)
        # A NaN/Inf in the batch or a diverging critic must not reach the weights (one host sync).
        if not _finite(critic_loss, critic_grad_norm):
            self._skip_update(critic_optimizer)
            return
        self._clip_and_step(critic_optimizer)

        # Actor (delayed): follow the first critic's gradient, then let the targets trail the online nets.
        actor_loss = actor_grad_norm = None
        if self.updates % hp.policy_delay == 0:
            with self.toggled_optimizer(actor_optimizer):  # the critic is followed here, not trained: no grads
                actor_loss = -self.critic.q1(image, vector, self.actor(image, vector)).mean()
                actor_grad_norm = self._backward(actor_optimizer, actor_loss, self.actor)
                if not _finite(actor_loss, actor_grad_norm):  # a second sync, on actor updates only
                    self._skip_update(actor_optimizer)
                    return
                self._clip_and_step(actor_optimizer)
            _polyak_update(self.actor, self.actor_target, hp.tau)
            _polyak_update(self.critic, self.critic_target, hp.tau)
        self._skipped_in_a_row = 0

        # Logging on multiples of the policy delay catches an actor update too.
        if self.updates % hp.log_every_n_updates == 0:
            self._log_update(critic_loss, actor_loss, q1, critic_grad_norm, actor_grad_norm)
        if self.updates % hp.log_images_every_n_updates == 0:
            self._log_visuals(image)
        self.updates += 1

    # --- acting ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """Deterministic actions for a batch of observations (numpy in, numpy out)."""
        image = torch.as_tensor(observation["image"], device=self.device)
        vector = torch.as_tensor(observation["vector"], device=self.device)
        return self.actor(image, vector).float().cpu().numpy()

    def policy(self) -> Policy:
        return _ActorPolicy(self)

    # --- checkpoint: what Lightning does not save itself --------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # (env steps, episodes) of every process; the run's totals are their sums.
        per_process = gather_per_process((self.env_steps, self.episodes))
        checkpoint[CHECKPOINT_KEY] = {
            "env_steps": sum(env_steps for env_steps, _ in per_process),
            "episodes": sum(episodes for _, episodes in per_process),
            "per_process": per_process,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            # The same on every process: seeded alike and drawn from alike (the target smoothing noise).
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": arrays_to_tensors(np.random.get_state(legacy=False)),
                "python": random.getstate(),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if ACTOR_ONLY_KEY in checkpoint:
            self._load_shipped_actor(checkpoint)
            return
        progress = checkpoint.get(CHECKPOINT_KEY)
        if progress is None:
            raise CheckpointError(
                f"{self._checkpoint_name()} has no '{CHECKPOINT_KEY}' entry: it was not written by "
                "lightning_td3.td3.TD3 (nor by `python -m lightning_td3.export`)"
            )
        self._check_fits(checkpoint["state_dict"], checkpoint.get("hyper_parameters", {}))
        self.run_env_steps = progress["env_steps"]
        self.run_episodes = progress["episodes"]
        self.updates = progress["updates"]
        self.skipped_updates = progress.get("skipped_updates", 0)  # absent from checkpoints before it was counted
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:  # evaluation needs no more
            self.env_steps, self.episodes = own_state(self.trainer, progress["per_process"], "the counters")
        rng = progress["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(tensors_to_arrays(rng["numpy"]))
        random.setstate(rng["python"])

    def on_validation_epoch_end(self) -> None:
        metrics = self._log_evaluation()
        if self._sync_run_totals():
            self._log_training_episodes()  # those since the last update log, so every one is logged before a stop
        self.log_vs_env_steps(metrics)

    def _load_shipped_actor(self, checkpoint: dict) -> None:
        # An exported actor holds no critic, optimizer or replay: it can be evaluated, not trained further.
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            raise CheckpointError(
                f"{self._checkpoint_name()} holds only an actor's weights, for validate/test; to train, resume "
                "from a full training checkpoint (e.g. --ckpt_path last) or start without --ckpt_path"
            )
        shipped = checkpoint[ACTOR_ONLY_KEY]
        self._check_fits(checkpoint["state_dict"], shipped["hyper_parameters"], part="actor.")
        self.run_env_steps = shipped["env_steps"]  # where its evaluation goes on the env-step axis
        # The critic stays as built; filling it in keeps Lightning's strict loading, which still guards the actor.
        own = self.state_dict()
        checkpoint["state_dict"] = {
            **own, **{name: value.to(own[name].dtype) for name, value in checkpoint["state_dict"].items()}
        }

    def _check_fits(self, state_dict: dict[str, torch.Tensor], trained_with: dict, part: str = "") -> None:
        """A clear error instead of PyTorch's size-mismatch wall when the checkpoint was built differently.

        `part` limits the comparison to the parameters whose names start with it (an exported actor: "actor.").
        """
        own = {name: value for name, value in self.state_dict().items() if name.startswith(part)}
        problem = next((f"lacks '{name}'" for name in own if name not in state_dict), None)
        for name, value in state_dict.items():
            if problem is not None:
                break
            if name not in own:
                problem = f"has '{name}', which this model lacks"
            elif value.shape != own[name].shape:
                problem = f"has '{name}' of shape {tuple(value.shape)}, this model {tuple(own[name].shape)}"
        if problem is None:
            return
        built = {name: trained_with[name] for name in ARCHITECTURE_HPARAMS if name in trained_with}
        here = {name: self.hparams[name] for name in ARCHITECTURE_HPARAMS}
        raise CheckpointError(
            f"{self._checkpoint_name()} does not fit this model: it {problem}. It was trained with {built}; "
            f"this model is built with {here}; set the same model.init_args"
        )

    def _checkpoint_name(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return f"checkpoint {path}" if path else "the checkpoint"

    # --- helpers -----------------------------------------------------------------------------------------------

    def _next_batch(self, dataloader_iter: Iterator) -> dict[str, torch.Tensor]:
        batch, _, _ = next(dataloader_iter)
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _backward(self, optimizer, loss: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        # Measured before clipping, so the log shows how hard clipping works.
        return torch.nn.utils.get_total_norm([p.grad for p in network.parameters() if p.grad is not None])

    def _clip_and_step(self, optimizer) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    def _skip_update(self, optimizer) -> None:
        """No (further) optimizer step, no target update; counted and logged; too many in a row stop the run."""
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        if self._skipped_in_a_row == 0:
            self._streak_start = (self.updates, self.env_steps)
        self._skipped_in_a_row += 1
        self.log_vs_env_steps({"train/skipped_updates": float(self.skipped_updates)})
        if self._skipped_in_a_row >= self.hparams.max_nonfinite_updates:
            path = save_last_checkpoint(self.trainer)
            update, env_step = self._streak_start
            raise TrainingAborted(
                f"{self._skipped_in_a_row} updates in a row had a NaN/Inf loss or gradient "
                f"(model.max_nonfinite_updates={self.hparams.max_nonfinite_updates}), starting at update {update}, "
                f"env step {env_step}; the weights are those before it. Checkpoint written to {path}. Look for "
                "NaN/Inf in observations or rewards, or lower the learning rates, then resume with `fit --ckpt_path last`"
            )

    def _log_update(self, critic_loss, actor_loss, q1, critic_grad_norm, actor_grad_norm) -> None:
        unlogged_episodes = self._sync_run_totals()
        scalars = {
            "train/critic_loss": critic_loss.item(),
            "train/q_mean": q1.mean().item(),
            "train/q_max": q1.max().item(),
            "train/critic_grad_norm": critic_grad_norm.item(),
            "train/updates": float(self.updates),
        }
        if actor_loss is not None:
            scalars["train/actor_loss"] = actor_loss.item()
            scalars["train/actor_grad_norm"] = actor_grad_norm.item()
        self.log_dict(scalars, batch_size=1)  # the dataloader_iter step flavour makes Lightning ask
        self.log_vs_env_steps(scalars)
        if unlogged_episodes:
            self._log_training_episodes()

    def _sync_run_totals(self) -> int:
        """Sum env steps, episodes and unlogged training episodes over the processes into the run's totals.

        A collective under DDP: every process calls it at the same update. Returns the run's unlogged episodes.
        """
        counts = torch.tensor(
            [self.env_steps, self.episodes, int(self.train_episode_metrics.episodes)], device=self.device
        )
        self.run_env_steps, self.run_episodes, unlogged_episodes = self.trainer.strategy.reduce(
            counts, reduce_op="sum"
        ).tolist()
        return unlogged_episodes

    def _log_training_episodes(self) -> None:
        with warnings.catch_warnings():
            # A process that finished no episode since the last log still takes part in the reduction.
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            metrics = {name: value.item() for name, value in self.train_episode_metrics.compute().items()}
        self.train_episode_metrics.reset()
        self.log_vs_env_steps(metrics)

    def log_vs_env_steps(self, scalars: dict[str, float]) -> None:
        # Logged against the run's env steps too: global_step counts optimizer steps, which mean little to an RL
        # reader. The x value is the total at the last sync of the counters (every `log_every_n_updates`).
        experiment = self._tensorboard()
        if experiment is not None:
            for name, value in scalars.items():
                experiment.add_scalar(f"{name}_vs_env_steps", value, self.run_env_steps)

    def _log_visuals(self, image: torch.Tensor) -> None:
        experiment = self._tensorboard()
        if experiment is None:
            return
        step = self.run_env_steps
        # The four stacked frames of one sample, side by side, as the CNNs see them.
        experiment.add_image("obs/camera_stack", torch.cat(list(image[0]), dim=1).unsqueeze(0), step)
        for name, network in (("actor", self.actor), ("critic", self.critic)):
            for param_name, param in network.named_parameters():
                experiment.add_histogram(f"weights/{name}.{param_name}", param.detach().float().cpu(), step)
                if param.grad is not None:
                    experiment.add_histogram(f"grads/{name}.{param_name}", param.grad.float().cpu(), step)
            with torch.no_grad():
                features = network.cnn(image)
            experiment.add_scalar(f"cnn/{name}_feature_mean", features.mean().item(), step)
            experiment.add_scalar(f"cnn/{name}_feature_std", features.std().item(), step)
            experiment.add_scalar(f"cnn/{name}_feature_negative_fraction", (features < 0).float().mean().item(), step)

    def _tensorboard(self):
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None


class _ActorPolicy:
    """The deterministic actor behind the evaluation harness's `Policy` interface."""

    def __init__(self, module: TD3):
        self.module = module

    def reset(self, seed: int) -> None:
        pass

    def act(self, observation: dict[str, np.ndarray], env: DrivingEnv) -> np.ndarray:
        batched = {key: value[None] for key, value in observation.items()}
        return self.module.act(batched)[0]


def _let_ddp_find_unused_parameters(strategy: DDPStrategy) -> None:
    """Tell DDP that a backward pass may leave parameters without gradients, as each of TD3's does.

    The critic loss never reaches the actor, and the actor loss (under `toggled_optimizer`) leaves the critic
    alone. Unless DDP looks for unused parameters it waits for their gradients forever; this is Lightning's own
    remedy for manual optimization with several optimizers (`ddp_find_unused_parameters_true`), applied here so
    `strategy: ddp` works. A static graph does not fit: the set of parameters alternates between passes.
    """
    # Read by the strategy when it wraps the module, which happens after the setup hooks.
    ddp_kwargs = strategy._ddp_kwargs
    require(
        not ddp_kwargs.get("static_graph", False),
        "trainer.strategy.init_args.static_graph", "false (TD3's backward passes use different parameters)", True,
    )
    if not ddp_kwargs.get("find_unused_parameters", False):
        rank_zero_info("DDP: find_unused_parameters=True, since each TD3 backward pass updates one network only")
        ddp_kwargs["find_unused_parameters"] = True


def _frozen_copy(network: torch.nn.Module) -> torch.nn.Module:
    target = copy.deepcopy(network)
    target.requires_grad_(False)
    return target


def _finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss.detach() + grad_norm).item())


@torch.no_grad()
def _polyak_update(online: torch.nn.Module, target: torch.nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)
