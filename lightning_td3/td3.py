"""TD3 (Fujimoto et al., 2018) from pixels as a LightningModule with manual optimization.

The actor and the twin critics each own a NatureCNN, trained end-to-end from the RL losses. Data come from the
replay datamodule; the `Collector` callback steps the envs and advances `env_steps`, the counter that logs and
schedules use (Lightning's `global_step` counts optimizer steps: 1.5 per update with a policy delay of 2).

This file holds the TD3 math and the update (`TD3._update`, read top to bottom); the module's other concerns each
have their own file, which its hooks call:
- `run_progress`: the counters (env steps, episodes, updates, the run's totals);
- `nonfinite`: the skip of updates with a NaN/Inf loss or gradient, decided on the device;
- `td3_logging`: what is logged, and against the run's env steps;
- `td3_checkpoint`: what checkpoints hold beyond Lightning's own, and whether a checkpoint and an env fit the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info

from lightning_td3 import nonfinite, td3_checkpoint, td3_logging
from lightning_td3.cuda_graph import GraphedUpdate
from lightning_td3.driving_module import DrivingModule
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.envs.config import IMAGE_SIZE
from lightning_td3.errors import CheckpointError, require
from lightning_td3.evaluation import EvaluationMetrics, Policy
from lightning_td3.networks import Actor, Frames, TwinCritic
from lightning_td3.run_progress import ProgressField, RunProgress


# What training_step times with the trainer's profiler (`--trainer.profiler simple`; bench/breakdown.py reads them):
# drawing the batch from replay and moving it to the device; the update (on a GPU without a sync, so there it times
# the launch, and the wait shows in the next host read).
PROFILED = {"sample": "td3.sample_batch", "update": "td3.update"}


@dataclass
class UpdateStats:
    """What an update leaves for logging, as device tensors (read on logging steps only)."""

    critic_loss: torch.Tensor
    q1: torch.Tensor
    critic_grad_norm: torch.Tensor
    actor_loss: torch.Tensor | None = None
    actor_grad_norm: torch.Tensor | None = None


def clipped_double_q_target(
    reward: torch.Tensor,
    steps: torch.Tensor,
    terminated: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """y = Σ_k γ^k r_k + γ^steps (1 − terminated) min(Q1', Q2') over the (B, n) rewards of the steps to next_obs
    (0 after the last): with n = 1, TD3's r + γ (1 − terminated) min(Q1', Q2'). A time-out is not terminal, so it
    still bootstraps."""
    discounts = gamma ** torch.arange(reward.shape[1], device=reward.device)
    return (reward * discounts).sum(1) + gamma**steps * (1.0 - terminated) * torch.minimum(next_q1, next_q2)


def decayed_lr_fraction(update: int, decay_updates: int, final_fraction: float) -> float:
    """The fraction of its starting learning rate that update `update` (from 0) runs at: linear to
    `final_fraction` at `decay_updates`, then held."""
    return 1.0 - (1.0 - final_fraction) * min(update, decay_updates) / decay_updates


def smoothed_target_action(
    target_action: torch.Tensor, noise_std: float, noise_clip: float
) -> torch.Tensor:
    """Target policy smoothing: clipped Gaussian noise keeps the critic from exploiting sharp Q peaks."""
    noise = (torch.randn_like(target_action) * noise_std).clamp(-noise_clip, noise_clip)
    return (target_action + noise).clamp(-1.0, 1.0)


def fast_settings(device: torch.device, graph_fits: bool = True) -> dict[str, bool]:
    """The learner settings `TD3(speedups=True)` turns on for `device`: those measured faster there
    (`bench/learner.py`) that leave what is learned unchanged (docs/performance.md).

    A CPU with bf16 arithmetic (AVX512-BF16 or AMX): bf16 CNNs in channels-last. Elsewhere on a CPU bf16 is emulated.
    A CUDA device where the update's graphs fit (`graph_fits`: one device, a float32 trainer, no `compile`): the
    update replayed from CUDA graphs, with bf16 CNNs in channels-last inside them. Where they do not fit, nothing:
    the eager update is bound by the host's kernel launches, and bf16 was measured faster only inside the graphs.
    """
    if device.type == "cpu":
        return {"bf16_cnn": True, "channels_last": True} if _cpu_has_bf16() else {}
    if device.type == "cuda" and graph_fits:
        return {"bf16_cnn": True, "channels_last": True, "cuda_graph": True}
    return {}


def _cpu_has_bf16() -> bool:
    # torch.cpu's probes are private: a torch without them is taken for a CPU without bf16.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each stack of a (B, C, H, W) batch moved by its own random whole-pixel offset in [-max_shift, max_shift] on
    both axes, the edge pixels repeated into the gap (DrQ's pad-and-crop). The frames of one stack move together,
    so the motion between them stays as recorded."""
    batch, channels, height, width = images.shape
    span = 2 * max_shift + 1  # the rows (and columns) where a crop of the padded stack may start
    offsets = torch.randint(0, span, (batch, 2), device=images.device)  # where each crop starts
    padded = _edge_padded(images, max_shift)
    # Every crop of the padded stacks as a strided view (batch, channels, row start, column start, height, width),
    # from which one indexing copy takes each stack's own crop: no index tensor the size of the images (building
    # one cost more than the copy), the offsets stay on the device (no host sync: a CUDA graph can hold it).
    batch_stride, channel_stride, row_stride, column_stride = padded.stride()
    crops = padded.as_strided(
        (batch, channels, span, span, height, width),
        (batch_stride, channel_stride, row_stride, column_stride, row_stride, column_stride),
    )
    return crops[torch.arange(batch, device=images.device), :, offsets[:, 0], offsets[:, 1]]


def _edge_padded(images: torch.Tensor, pad: int) -> torch.Tensor:
    """`images` with their edge rows and columns repeated `pad` times outward (F.pad's "replicate", for uint8)."""
    rows = torch.cat([images[:, :, :1].expand(-1, -1, pad, -1), images, images[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    return torch.cat([rows[..., :1].expand(-1, -1, -1, pad), rows, rows[..., -1:].expand(-1, -1, -1, pad)], 3)


class TD3(DrivingModule):
    """TD3 with separate actor and critic NatureCNNs.

    Args:
        vector_size: length of the vector observation, `data.env`'s (checked before any env runs); cli.py derives it
            from `data.env` when it is not given.
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
        speedups: let the learner pick, for the device it runs on, the settings measured faster there without
            changing what is learned (`fast_settings`, docs/performance.md); `channels_last`, `bf16_cnn` and
            `cuda_graph` left at None follow it. False: the eager float32 update in the default layout unless those
            three say otherwise. The choice is logged when the module is set up.
        channels_last: keep conv weights (and so activations) channels-last, the layout fast conv kernels want.
            None: as `speedups` chooses.
        compile: `torch.compile` the CNNs and heads (the first updates pay for compilation; not chosen by
            `speedups`: on a 2-core CPU it did not pay back its compile time at batch 64).
        bf16_cnn: run the CNNs under bfloat16 autocast; heads, Q values, targets and losses stay float32, where
            bf16's 8-bit mantissa would blur TD targets. None: as `speedups` chooses.
        max_nonfinite_updates: updates in a row skipped for a NaN/Inf loss or gradient (a NaN/Inf in the batch
            shows there too) after which the run writes a checkpoint and stops. A skipped update steps no optimizer
            and no target (an actor failure comes after the critic's step, which stays). The skip is decided on the
            device, without a host sync; the streak is read on logging steps, so the stop comes at the first
            logging step after the streak reached this length (up to `log_every_n_updates` updates later).
        image_shift: each update sees its obs and next_obs stacks moved by up to this many pixels (independently
            per stack): DrQ's augmentation, against CNNs that learn states pixel by pixel. 0: off (the seed). Acting
            and evaluation always see the frames as they are.
        lr_decay_updates: decay both learning rates linearly over this many updates (by the run's update count, so a
            resumed run goes on where it stood) to `final_lr_fraction` of `actor_lr` and `critic_lr`, then hold
            them there. 0: constant learning rates (the seed).
        final_lr_fraction: where the decay ends, as a fraction of the starting learning rates.
        critic_only_vector: the vector's last this many entries are read by the critics only (asymmetric
            actor-critic): with `data.env.observe_leader`, 2 lets the critics judge the gap to the car ahead while
            the actor, the policy that drives and is shipped, sees the frames and the route alone. 0: the actor
            reads the whole vector (the seed).
        cuda_graph: record the whole update (forward, backward, clipping, Adam, Polyak, skip counters) as CUDA
            graphs after a few eager warm-up updates and replay them: a handful of host calls per update instead
            of hundreds of kernel launches. One CUDA device only; not with `compile` or mixed-precision trainers.
            None: as `speedups` chooses (on where it can serve); True where it cannot is refused.
    """

    # The counters of `progress` as the module's own attributes: the Collector's `CollectingModule` contract.
    env_steps = ProgressField()
    episodes = ProgressField()
    updates = ProgressField()
    run_env_steps = ProgressField()
    run_episodes = ProgressField()

    def __init__(
        self,
        vector_size: int | None = None,
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
        speedups: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        bf16_cnn: bool | None = None,
        max_nonfinite_updates: int = 100,
        cuda_graph: bool | None = None,
        image_shift: int = 0,
        lr_decay_updates: int = 0,
        final_lr_fraction: float = 0.1,
        critic_only_vector: int = 0,
    ) -> None:
        super().__init__()
        require(
            isinstance(vector_size, int) and vector_size >= 1, "model.init_args.vector_size",
            "an integer >= 1 (cli.py derives it from data.env)", vector_size,
        )
        require(0.0 <= gamma < 1.0, "model.gamma", "in [0, 1)", gamma)
        require(0.0 < tau <= 1.0, "model.tau", "in (0, 1]", tau)
        require(
            isinstance(policy_delay, int) and policy_delay >= 1, "model.policy_delay", "an integer >= 1", policy_delay
        )
        require(
            isinstance(max_nonfinite_updates, int) and max_nonfinite_updates >= 1,
            "model.max_nonfinite_updates", "an integer >= 1", max_nonfinite_updates,
        )
        require(
            isinstance(image_shift, int) and 0 <= image_shift < IMAGE_SIZE // 2, "model.image_shift",
            f"an integer in 0..{IMAGE_SIZE // 2 - 1} (pixels)", image_shift,
        )
        require(
            isinstance(lr_decay_updates, int) and lr_decay_updates >= 0, "model.lr_decay_updates",
            "an integer >= 0 (0: constant learning rates)", lr_decay_updates,
        )
        require(0.0 <= final_lr_fraction <= 1.0, "model.final_lr_fraction", "in [0, 1]", final_lr_fraction)
        require(
            isinstance(critic_only_vector, int) and 0 <= critic_only_vector <= vector_size, "model.critic_only_vector",
            f"an integer in 0..vector_size={vector_size}", critic_only_vector,
        )
        # torch.compile brings its own CUDA graphs (mode="reduce-overhead"); the two do not nest.
        require(not (cuda_graph and compile), "model.cuda_graph", "false when model.compile is true", cuda_graph)
        self.save_hyperparameters()
        self.automatic_optimization = False
        sizes = dict(vector_size=vector_size, hidden_sizes=tuple(hidden_sizes), layer_norm=layer_norm)
        # Float32 in the default layout until `setup` knows the device (`use_learner_settings`).
        self.actor = Actor(**sizes, critic_only_vector=critic_only_vector)
        self.critic = TwinCritic(**sizes)
        self.actor_target = _frozen_copy(self.actor)
        self.critic_target = _frozen_copy(self.critic)
        if compile:
            # In place (Module.compile), so state_dict keys and checkpoints stay those of the eager modules.
            for network in (self.actor, self.critic, self.actor_target, self.critic_target):
                for part in network.children():
                    part.compile()
        # Advanced by the Collector and by training_step, saved with every checkpoint (as td3_progress).
        self.progress = RunProgress()
        # On the device so that an update never waits for the host; not in the state_dict (saved as td3_progress).
        self.register_buffer("skip_record", nonfinite.new_record(), persistent=False)
        self._graphed_update: GraphedUpdate | None = None
        # Whether fit replays the update from CUDA graphs: `cuda_graph` as resolved for the trainer by `setup`.
        self.graphs_update = False
        # Loaded from an exported actor: the critics are as built, untrained, and have nothing to say.
        self.actor_only = False
        # The env's `camera` the networks learned from: set by fit, kept in checkpoints and exports (None: unknown,
        # e.g. a checkpoint written before it was kept).
        self.trained_camera: dict | None = None
        # Every setting of the env it was trained on (`EnvConfig.settings`), kept likewise: what evaluating a
        # checkpoint alone runs on (`lightning_td3.export.trained_settings`).
        self.trained_env: dict | None = None
        # The weights (and vector_size, with them) are a checkpoint's: an env that does not fit them is the env's
        # fault, not the setting's.
        self.from_checkpoint = False
        # The Collector's training episodes finished since they were last logged.
        self.train_episode_metrics = EvaluationMetrics(prefix="train/")

    def require_env(self, env: EnvConfig) -> None:
        """Refuse an env whose vector these networks cannot read, or whose frames they did not learn from, before
        any episode runs."""
        td3_checkpoint.require_env(self, env)

    def setup(self, stage: str) -> None:
        # The env is checked later (`td3_checkpoint.require_attached_env`): with --ckpt_path, the weights it must fit
        # are read after setup, and the CLI has taken vector_size from the checkpoint.
        env = td3_checkpoint.attached_env(self)
        if env is not None and stage == "fit":
            # A resumed checkpoint's records replace these (and its camera is checked).
            self.trained_camera, self.trained_env = env.camera, env.settings()
        misfit = self._cuda_graph_misfit()
        if self.hparams.cuda_graph and stage == "fit":
            require(misfit is None, "model.cuda_graph", f"false {misfit}", True)
        chosen = self.use_learner_settings(self.trainer.strategy.root_device, graph_misfit=misfit)
        self.graphs_update = chosen["cuda_graph"] and stage == "fit"
        if isinstance(self.trainer.strategy, DDPStrategy):
            _let_ddp_find_unused_parameters(self.trainer.strategy)

    def use_learner_settings(self, device: torch.device, graph_misfit: str | None = None) -> dict[str, bool]:
        """Set the CNNs' precision and layout for `device` (what `speedups` picks there, unless `bf16_cnn`,
        `channels_last` or `cuda_graph` say), log the choice and return it. `graph_misfit`: why the update's CUDA
        graphs cannot serve the trainer (`_cuda_graph_misfit`), None where they can."""
        hp = self.hparams
        graph_fits = graph_misfit is None and hp.cuda_graph is not False and not hp.compile
        fast = fast_settings(device, graph_fits) if hp.speedups else {}
        chosen = {
            name: bool(fast.get(name, False)) if hp[name] is None else hp[name]
            for name in ("bf16_cnn", "channels_last", "cuda_graph")
        }
        layout = torch.channels_last if chosen["channels_last"] else torch.contiguous_format
        for network in (self.actor, self.critic, self.actor_target, self.critic_target):
            network.cnn.bf16 = chosen["bf16_cnn"]
            network.to(memory_format=layout)
        on = [name for name, value in chosen.items() if value]
        picked = any(hp[name] is None and fast.get(name) for name in chosen)
        eager_why = (
            f" (the update stays eager {graph_misfit})"
            if hp.speedups and device.type == "cuda" and graph_misfit is not None and hp.cuda_graph is None else ""
        )
        rank_zero_info(
            f"TD3 learner on {device.type}: {', '.join(on) if on else 'float32 CNNs, default layout, eager update'}"
            + (f" (chosen by model.speedups for this {device.type}; false turns them off)" if picked else "")
            + eager_why
        )
        return chosen

    def configure_optimizers(self):
        # Fit's env check (see `setup`): its first hook after any checkpoint is restored, before the Collector steps
        # an env.
        td3_checkpoint.require_attached_env(self)
        # Fused Adam (one kernel for all parameters) exists for CUDA and CPU tensors alike; whether its step may be
        # recorded in a CUDA graph (capturable) is set by `on_train_start`, after any checkpoint is restored.
        return (
            torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr, fused=True),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, fused=True),
        )

    def on_train_start(self) -> None:
        # The device's count of updates starts where the host's stands.
        self.skip_record[nonfinite.UPDATE] = self.updates
        if self.hparams.lr_decay_updates:
            # A tensor on the device, decayed in place (`_decay_learning_rates`) so that the CUDA graphs recorded
            # below read it at every replay; its value comes from the update count, not from a resumed optimizer.
            for optimizer in self.optimizers():
                for group in optimizer.optimizer.param_groups:
                    group["lr"] = torch.empty((), dtype=torch.float32, device=self.device)
            self._decay_learning_rates(self.updates)
        # Capturable: Adam's step may be recorded in a CUDA graph (its step counts live on the device either way). Set
        # here, not when the optimizers are built: a restored optimizer state brings the flag of the fit that wrote it.
        for optimizer in self.optimizers():
            for group in optimizer.optimizer.param_groups:
                group["capturable"] = self.graphs_update
        # Graphs hold this fit's optimizer state and parameters: recorded afresh in every fit (after a resume too).
        self._graphed_update = GraphedUpdate(self._update, self.optimizers()) if self.graphs_update else None

    def training_step(self, dataloader_iter: Iterator) -> None:
        hp = self.hparams
        update = self.updates
        actor_step = update % hp.policy_delay == 0  # the delayed actor and target updates
        profiler = self.trainer.profiler
        with profiler.profile(PROFILED["sample"]):
            batch = self._next_batch(dataloader_iter)
        if 0 < update <= hp.lr_decay_updates:  # past its end the rates hold: nothing to set on the hot path
            self._decay_learning_rates(update)
        with profiler.profile(PROFILED["update"]):
            if self._graphed_update is not None:
                stats = self._graphed_update(batch, actor_step)
            else:
                stats = self._update(batch, self.optimizers(), actor_step)
        self.updates = update + 1

        # Logging on multiples of the policy delay catches an actor update too.
        if update % hp.log_every_n_updates == 0:
            td3_logging.log_update(self, update, stats)
            nonfinite.stop_after_too_many_skipped(self, update)
        if update % hp.log_images_every_n_updates == 0:
            td3_logging.log_visuals(self, batch["image"])

    def _update(self, batch: dict[str, torch.Tensor], optimizers: Sequence, actor_step: bool) -> UpdateStats:
        """One TD3 update (the critics, then on `actor_step` the actor and the targets) without a host sync, so that
        it can also be recorded as a CUDA graph.

        A NaN/Inf loss or gradient (from the batch or a diverging network) makes its optimizer step and the Polyak
        update no-ops on the device (`ok`), and is counted there (`nonfinite`).
        """
        hp = self.hparams
        world_size = self.trainer.world_size
        actor_optimizer, critic_optimizer = optimizers
        image, vector, action = batch["image"], batch["vector"], batch["action"]
        next_image, next_vector = batch["next_image"], batch["next_vector"]
        if hp.image_shift:
            image, next_image = random_shift(image, hp.image_shift), random_shift(next_image, hp.image_shift)
        image, next_image = Frames(image), Frames(next_image)  # each scaled once for all the CNNs that read it

        # Critic: regress both Q heads onto the clipped double-Q target of the smoothed target policy.
        with torch.no_grad():
            next_action = smoothed_target_action(
                self.actor_target(next_image, next_vector), hp.policy_noise, hp.noise_clip
            )
            next_q1, next_q2 = self.critic_target(next_image, next_vector, next_action)
            target_q = clipped_double_q_target(
                batch["reward"], batch["steps"], batch["terminated"], next_q1, next_q2, hp.gamma
            )
        q1, q2 = self.critic(image, vector, action)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        critic_grad_norm = self._backward(critic_optimizer, critic_loss, self.critic)
        ok = nonfinite.all_finite(critic_loss, critic_grad_norm, world_size)
        nonfinite.clip_and_step(self, critic_optimizer, ok)
        stats = UpdateStats(critic_loss, q1, critic_grad_norm)

        # Actor (delayed): follow the first critic's gradient, then let the targets trail the online nets.
        if actor_step:
            with self.toggled_optimizer(actor_optimizer):  # the critic is followed here, not trained: no grads
                stats.actor_loss = -self.critic.q1(image, vector, self.actor(image, vector)).mean()
                stats.actor_grad_norm = self._backward(actor_optimizer, stats.actor_loss, self.actor)
                # And no actor step after a skipped critic step.
                ok = ok & nonfinite.all_finite(stats.actor_loss, stats.actor_grad_norm, world_size)
                nonfinite.clip_and_step(self, actor_optimizer, ok)
            _polyak_update(self.actor, self.actor_target, hp.tau, ok)
            _polyak_update(self.critic, self.critic_target, hp.tau, ok)
        nonfinite.count_skipped(self.skip_record, ok, hp.max_nonfinite_updates)
        return stats

    # --- acting ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """Deterministic actions for a batch of observations (numpy in, numpy out)."""
        return self.actor(*self._on_device(observation)).float().cpu().numpy()

    @torch.no_grad()
    def value(self, observation: dict[str, np.ndarray], action: np.ndarray | None = None) -> np.ndarray:
        """What the critics expect of `action` (default: the actor's), for a batch of observations: the smaller of
        the twin Q values, as in the TD3 target (for reading the critic, e.g. `python -m lightning_td3.crashes`)."""
        if self.actor_only:
            raise CheckpointError(
                "an exported actor has no trained critics to read: load the training checkpoint it was exported from"
            )
        image, vector = self._on_device(observation)
        action = self.actor(image, vector) if action is None else torch.as_tensor(action, device=self.device)
        return torch.minimum(*self.critic(image, vector, action)).float().cpu().numpy()

    def policy(self) -> Policy:
        return _ActorPolicy(self)

    def _on_device(self, observation: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(observation["image"], device=self.device),
                torch.as_tensor(observation["vector"], device=self.device))

    @property
    def skipped_updates(self) -> int:
        """Update steps that changed nothing for a NaN/Inf loss or gradient (a host sync: not for every update)."""
        return int(self.skip_record[nonfinite.SKIPPED])

    @skipped_updates.setter
    def skipped_updates(self, value: int) -> None:
        self.skip_record[nonfinite.SKIPPED] = value

    # --- checkpoints, evaluation and logging: see td3_checkpoint and td3_logging ---------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        td3_checkpoint.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        td3_checkpoint.load(self, checkpoint)

    def on_validation_start(self) -> None:
        td3_checkpoint.require_attached_env(self)  # validate: after the checkpoint is restored, before any episode

    def on_test_start(self) -> None:
        td3_checkpoint.require_attached_env(self)

    def on_validation_epoch_end(self) -> None:
        metrics = self._log_evaluation()
        td3_logging.sync_run_totals_and_log_episodes(self)  # every training episode is logged before a stop
        self.log_vs_env_steps(metrics)

    def log_vs_env_steps(self, scalars: dict[str, float]) -> None:
        td3_logging.log_vs_env_steps(self, scalars)

    # --- helpers -----------------------------------------------------------------------------------------------

    def _next_batch(self, dataloader_iter: Iterator) -> dict[str, torch.Tensor]:
        batch, _, _ = next(dataloader_iter)
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _backward(self, optimizer, loss: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        # Zeroed in place, not set to None: a CUDA graph needs the same .grad tensors on every replay.
        optimizer.zero_grad(set_to_none=False)
        self.manual_backward(loss)
        # Measured before clipping, so the log shows how hard clipping works.
        return torch.nn.utils.get_total_norm([p.grad for p in network.parameters() if p.grad is not None])

    def _decay_learning_rates(self, update: int) -> None:
        hp = self.hparams
        fraction = decayed_lr_fraction(update, hp.lr_decay_updates, hp.final_lr_fraction)
        for optimizer, start_lr in zip(self.optimizers(), (hp.actor_lr, hp.critic_lr)):
            for group in optimizer.optimizer.param_groups:
                group["lr"].fill_(start_lr * fraction)

    def _cuda_graph_misfit(self) -> str | None:
        """Why the update's CUDA graphs cannot serve this trainer (they serve one CUDA device in full precision),
        worded to follow 'model.cuda_graph must be false'; None where they can."""
        trainer = self.trainer
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return f"on {'a CPU' if device.type == 'cpu' else device.type} (it needs trainer.accelerator: gpu)"
        if trainer.world_size != 1 or isinstance(trainer.strategy, DDPStrategy):
            return (
                f"under trainer.strategy {type(trainer.strategy).__name__} with {trainer.world_size} processes "
                "(its graphs serve one device; DDP runs the eager update)"
            )
        if str(trainer.precision) not in ("32-true", "32"):
            return (
                f"with trainer.precision {trainer.precision} (its autocast cache cannot be recorded in a graph; "
                "model.bf16_cnn can)"
            )
        return None


class _ActorPolicy:
    """The deterministic actor behind the evaluation harness's `Policy` interface."""

    def __init__(self, module: TD3):
        self.module = module

    def reset(self, seed: int) -> None:
        pass

    def act(self, observation: dict[str, np.ndarray], env: DrivingEnv) -> np.ndarray:
        return self.module.act(_batch_of_one(observation))[0]

    def value(self, observation: dict[str, np.ndarray]) -> float:
        """`TD3.value` of this one observation."""
        return float(self.module.value(_batch_of_one(observation))[0])


def _batch_of_one(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value[None] for key, value in observation.items()}


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


@torch.no_grad()
def _polyak_update(online: torch.nn.Module, target: torch.nn.Module, tau: float, ok: torch.Tensor) -> None:
    """target += tau (online - target) where `ok`; selected rather than weighted by `ok`, since 0 x NaN is NaN."""
    targets = list(target.parameters())
    for old, new in zip(targets, torch._foreach_lerp(targets, list(online.parameters()), tau)):
        torch.where(ok, new, old, out=old)
