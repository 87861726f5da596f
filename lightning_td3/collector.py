"""The collector callback: steps the training envs and fills the replay buffer the learner samples from.

Warm-up: uniform random actions until `learning_starts` env steps (done before the first update). Then before every
update it steps the envs with the actor plus Gaussian noise until `updates_per_step` updates per env step hold.
Env processes step while the learner updates (`overlap`): before an update the step under way is finished (its
transitions stored) and the next one started, so an update sees every step but the one under way. Evaluation and
checkpoints finish that step first, so a resumed run goes on exactly as an uninterrupted one. Where evaluation runs
in the training envs' world (a CARLA server), the training envs make way for it: they are closed, their open
episodes closed in replay, and new ones start before the next update.
Time-outs are stored as truncations (the target still bootstraps); only collisions, leaving the road and reaching
the goal are terminal.

Under DDP every process runs its own Collector: its own envs, replay shard, warm-up and updates-per-step ratio,
counted in its own env steps; the module sums the counters over the processes when it logs them.

A simulator that fails mid-episode (a CARLA time-out, any exception from an env's step or reset) costs the open
episodes of the vector env: they are closed in replay without a next observation (so no target bootstraps across
the gap), the envs are rebuilt and collection goes on. With a list of CARLA servers, those that no longer answer
are left out of the rebuilt envs, with a warning naming them (`envs.carla_servers`): their replay rings keep what
they hold, and the process goes on with the envs it has left. After `max_env_failures` failures in a row, or with
no server left, the process collects no more and the run stops at the next safe point with `last.ckpt` and
`TrainingAborted`.

The safe points are the Collector's (`fault_tolerance.stop_together`): before every update, after collecting,
between warm-up steps, and before each evaluation episode while fitting (the resumed run evaluates again, whole).
Under DDP every process reaches them at the same update, so a stop signal or a failure on one process stops all of
them there, with one checkpoint; the warm-up runs in lockstep for that (a process whose envs failed needs more
vector steps to finish it).
"""

from __future__ import annotations

import pickle
import time
import warnings
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from typing import Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from lightning_td3.checkpointing import arrays_to_tensors, tensors_to_arrays
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.envs.carla_backend import CarlaConnectionError
from lightning_td3.envs.carla_servers import evaluation_shares_world, live_envs
from lightning_td3.errors import ConfigError, require
from lightning_td3.evaluation import EpisodeResult, EvaluationMetrics
from lightning_td3.fault_tolerance import stop_together
from lightning_td3.per_process import gather_per_process, own_state
from lightning_td3.replay import ReplayBuffer
from lightning_td3.seeding import stream_rng, stream_seed

WARMUP_REPORT_EVERY = 1000  # env steps between warm-up progress lines
# What the Collector shows in the progress bar that counts: Lightning logs every value as a float, the bar shows
# these as whole numbers (`lightning_td3.progress.ProgressBar`).
COUNTERS = ("env_steps", "episodes")
EPISODE_INFO = [field.name for field in fields(EpisodeResult)]  # what a finished env's final info must carry
# What the Collector times with the trainer's profiler (`--trainer.profiler simple`; bench/breakdown.py reads them):
# the policy's actions, the envs' step (with env processes, the wait for it), storing the transitions.
PROFILED = {"act": "collector.act", "step": "collector.env_step", "store": "collector.store"}


class CollectingModule(Protocol):
    """What the Collector needs of the learner it feeds (`TD3`, which keeps these counters in its `RunProgress`).

    The Collector advances this process's `env_steps` and `episodes`, hands every finished training episode and its
    task to `train_episode_metrics` (grouped by the training env's tasks, `EvaluationMetrics.by_task`), and reads
    the rest.
    """

    env_steps: int  # this process's, counted when a vector step is taken: warm-up and the updates-per-step ratio
    episodes: int  # this process's finished training episodes
    updates: int  # the learner's updates so far: the other side of the updates-per-step ratio
    run_env_steps: int  # the run's totals as of the learner's last sync: the progress bar and its speed
    run_episodes: int
    train_episode_metrics: EvaluationMetrics  # holds the training episodes until the learner logs them
    device: torch.device  # where the stop vote's tensors go (`fault_tolerance.stop_together`)

    def act(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """Deterministic actions in [-1, 1] for a batch of observations (the Collector adds the noise)."""

    def log_vs_env_steps(self, scalars: dict[str, float]) -> None:
        """Log scalars against the run's env steps."""

    # Lightning's logging: the progress bar's counters and the data-wait fraction.
    def log(self, name: str, value: float, **options) -> None: ...

    def log_dict(self, dictionary: dict[str, float], **options) -> None: ...


class CollectorData(Protocol):
    """What the Collector needs of the datamodule (`datamodules.replay.ReplayDataModule`): the replay it fills and
    the training envs it steps."""

    buffer: ReplayBuffer  # one ring per training env
    env: EnvConfig
    env_configs: list[EnvConfig]  # one per training env (and replay ring)
    live_envs: list[int]  # the envs that run, by index into env_configs: the Collector leaves out those that die
    eval_episodes: int  # per evaluation, shared out among the DDP processes


def make_vector_env(configs: Sequence[EnvConfig], asynchronous: bool) -> VectorEnv:
    """One env per config (configs differ only in the CARLA server they use)."""
    env_fns = [partial(DrivingEnv, config) for config in configs]
    # SAME_STEP: a finished env resets inside the same step and hands its final observation back in `info`,
    # so every returned observation is one the policy acts on.
    if asynchronous and len(env_fns) > 1:
        return AsyncVectorEnv(env_fns, context="spawn", autoreset_mode=AutoresetMode.SAME_STEP)
    return SyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)


class Collector(pl.Callback):
    """Feeds the TD3 learner.

    Args (per process under DDP):
        learning_starts: env steps of uniform random actions before the first update (the seed: 25k).
        exploration_noise: std of the Gaussian noise added to the actor's actions.
        updates_per_step: TD3 updates per env step (of this process's envs) after warm-up.
        async_envs: step the envs in subprocesses (one per env) when there are several.
        overlap: env processes step while the learner updates; an update then does not see the one vector step
            under way. False: every update waits for the envs and sees every step taken before it.
        max_env_failures: env failures in a row (rebuilds included) after which the run stops with a checkpoint.
    """

    def __init__(
        self,
        learning_starts: int = 25_000,
        exploration_noise: float = 0.1,
        updates_per_step: float = 1.0,
        async_envs: bool = True,
        overlap: bool = True,
        max_env_failures: int = 5,
    ) -> None:
        require(
            isinstance(learning_starts, int) and learning_starts >= 1,
            "Collector.learning_starts", "an integer >= 1", learning_starts,
        )
        require(exploration_noise >= 0, "Collector.exploration_noise", ">= 0", exploration_noise)
        require(updates_per_step > 0, "Collector.updates_per_step", "> 0", updates_per_step)
        require(
            isinstance(max_env_failures, int) and max_env_failures >= 1,
            "Collector.max_env_failures", "an integer >= 1", max_env_failures,
        )
        self.learning_starts = learning_starts
        self.exploration_noise = exploration_noise
        self.updates_per_step = updates_per_step
        self.async_envs = async_envs
        self.overlap = overlap
        self.max_env_failures = max_env_failures
        self.env_failures = 0  # in all, this process's; saved with the checkpoint
        self._failures_in_a_row = 0
        self._gave_up: str | None = None  # why this process's envs collect no more, until the run stops
        self.envs: VectorEnv | None = None
        self._obs: dict[str, np.ndarray] | None = None
        self._in_flight: tuple | None = None  # (actions, results or None while env processes step) until finished
        self._fit: tuple[pl.Trainer, CollectingModule] | None = None  # for a checkpoint to finish that step first
        self._made_way = False  # the envs were closed for evaluation in their world; reopened before the next update
        self._rng: np.random.Generator | None = None
        self._restored: list[dict] | None = None  # every process's saved state, until on_fit_start
        self._last_return = 0.0
        self._clock = (0.0, 0)  # (time, env_steps) at the last speed measurement
        self._sps = 0.0
        # Seconds since warm-up: stepping envs and storing transitions (the learner waits meanwhile), and whole
        # train batches (that, the policy's actions and the update), from on_train_batch_start to _end.
        self._env_seconds = 0.0
        self._batch_seconds = 0.0
        self._batch_started = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, module: CollectingModule) -> None:
        data: CollectorData = trainer.datamodule
        if data is None or getattr(data, "buffer", None) is None:
            raise ConfigError("the Collector needs data: datamodules.replay.ReplayDataModule (it holds the replay)")
        self.envs = self._make_envs(data)
        self._fit = (trainer, module)
        module.train_episode_metrics.by_task(data.env)  # per scenario and layout too, where they vary
        self._rng = stream_rng("exploration", trainer.global_rank)
        if self._restored is not None:
            self._resume(own_state(trainer, self._restored, "the training envs"), data.buffer, trainer.global_rank)
            self._restored = None
        else:
            self._obs, _ = self.envs.reset(seed=stream_seed("train_envs", trainer.global_rank) % 2**31)
        self._clock = (time.perf_counter(), module.run_env_steps)
        # Warm-up can take hours, so a stop must not wait for its end: a safe point after every vector step.
        warming = True
        while stop_together(trainer, module, self._gave_up, busy=warming):
            warming = module.env_steps < self.learning_starts and self._gave_up is None
            if warming:
                self._collect(trainer, module)
                if self.envs is not None and module.env_steps % WARMUP_REPORT_EVERY < self.envs.num_envs:
                    rank_zero_info(f"warm-up: {module.env_steps}/{self.learning_starts} random env steps")
        self._env_seconds = self._batch_seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: CollectingModule, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()
        if self._made_way:
            # Reopened here, not when validation ends: Lightning ends it for the callbacks before the module, whose
            # evaluation env still holds the world then.
            self._made_way = False
            self._reopen_envs(trainer, module)
        while self._gave_up is None and (
            (module.env_steps - self.learning_starts) * self.updates_per_step < module.updates + 1
        ):
            self._collect(trainer, module, wait=not self.overlap)
        stop_together(trainer, module, self._gave_up)  # between updates: the last one complete, the next not begun
        module.log_dict(
            {"env_steps": float(module.run_env_steps), "episodes": float(module.run_episodes),  # see COUNTERS
             "sps": self._steps_per_second(module), "last_return": self._last_return},
            prog_bar=True, on_step=True, on_epoch=False, batch_size=1,
        )

    def on_validation_start(self, trainer: pl.Trainer, module: CollectingModule) -> None:
        # Evaluation, what the module logs with it and the checkpoints after it see every env step taken.
        self._finish_step(trainer, module)
        if self.envs is not None and evaluation_shares_world(trainer.datamodule.env):
            self._make_way_for_evaluation(trainer.datamodule)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, module: CollectingModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # A stop does not wait for the evaluation's other episodes (minutes on long routes; a cluster's grace
        # period after SIGTERM may be shorter): a safe point before each. Under DDP only before the episodes that
        # every process runs, since they may hold one episode more or less, and each safe point is collective.
        fitting = trainer.state.fn == TrainerFn.FITTING  # (`validate` installs no stop signal handlers)
        if fitting and batch_idx < trainer.datamodule.eval_episodes // trainer.world_size:
            stop_together(trainer, module, self._gave_up)

    def _make_way_for_evaluation(self, data: CollectorData) -> None:
        """Close the training envs, so that evaluation in their world meets none of their actors: their ego would
        hold its last control while evaluation ticks the world, their traffic would drive in its episodes, and
        their episodes would go on from a state they did not produce. Their open episodes are closed in replay
        without a next observation, as after a failure."""
        for ring in range(data.buffer.num_envs):
            data.buffer.drop_episode(ring)
        self._close_envs()
        self._made_way = True

    def on_train_batch_end(self, trainer: pl.Trainer, module: CollectingModule, outputs, batch, batch_idx: int) -> None:
        self._batch_seconds += time.perf_counter() - self._batch_started
        module.log("perf/data_wait_fraction", self.data_wait_fraction, on_step=True, on_epoch=False, batch_size=1)

    @property
    def data_wait_fraction(self) -> float:
        """Share of training time (since warm-up) the learner spends on collection: choosing actions, sending
        them, waiting for the envs (env processes step during the update before) and storing transitions."""
        return self._env_seconds / self._batch_seconds if self._batch_seconds else 0.0

    def teardown(self, trainer: pl.Trainer, module: CollectingModule, stage: str) -> None:
        self._close_envs()
        self._fit = None

    # --- collection --------------------------------------------------------------------------------------------

    def _collect(self, trainer: pl.Trainer, module: CollectingModule, wait: bool = True) -> None:
        """Finish the vector step under way (if any) and start the next; with `wait`, finish that one too."""
        self._finish_step(trainer, module)
        self._start_step(trainer, module)
        if wait:
            self._finish_step(trainer, module)

    def _start_step(self, trainer: pl.Trainer, module: CollectingModule) -> None:
        """Send the envs their next actions: env processes step while the learner updates, until `_finish_step`.

        Envs in this process step here, and their results wait for `_finish_step` all the same.
        """
        if self.envs is None or self._gave_up is not None:
            return
        num_envs = self.envs.num_envs
        if module.env_steps < self.learning_starts:
            actions = self._rng.uniform(-1.0, 1.0, (num_envs, 2)).astype(np.float32)
        else:
            noise = self._rng.normal(0.0, self.exploration_noise, (num_envs, 2))
            with trainer.profiler.profile(PROFILED["act"]):
                actions = np.clip(module.act(self._obs) + noise, -1.0, 1.0).astype(np.float32)
        started = time.perf_counter()
        try:
            with trainer.profiler.profile(PROFILED["step"]):
                if isinstance(self.envs, AsyncVectorEnv):
                    self.envs.step_async(actions)
                    outcome = None  # step_wait brings it
                else:
                    outcome = self.envs.step(actions)
        except Exception as error:  # whatever the simulator raised: the run goes on without this step
            self._recover(trainer, module, error)
            return
        self._env_seconds += time.perf_counter() - started
        self._in_flight = (actions, outcome)
        module.env_steps += num_envs  # counted when taken: the updates-per-step ratio counts the step under way

    def _finish_step(self, trainer: pl.Trainer, module: CollectingModule) -> None:
        """Take the results of the step under way into the replay buffer and the counters."""
        if self._in_flight is None:
            return
        (actions, outcome), self._in_flight = self._in_flight, None
        started = time.perf_counter()
        try:
            if outcome is None:  # env processes: wait for them (envs in this process stepped in _start_step)
                with trainer.profiler.profile(PROFILED["step"]):
                    outcome = self.envs.step_wait()
            obs, reward, terminated, truncated, info = outcome
        except Exception as error:  # whatever the simulator raised: the run goes on without this step
            module.env_steps -= len(actions)
            self._recover(trainer, module, error)
            return
        self._failures_in_a_row = 0
        done = terminated | truncated
        next_obs = _with_final_observations(obs, info, done)
        # Live env i writes ring live_envs[i]; the rings of envs left out (their server died) keep what they hold.
        data: CollectorData = trainer.datamodule
        with trainer.profiler.profile(PROFILED["store"]):
            data.buffer.add(self._obs, actions, reward, next_obs, terminated, truncated, rings=data.live_envs)
        self._env_seconds += time.perf_counter() - started
        self._obs = obs
        if done.any():
            self._record_episodes(module, info["final_info"], np.flatnonzero(done))

    def _recover(self, trainer: pl.Trainer, module: CollectingModule, error: Exception) -> None:
        """Drop the open episodes, rebuild the envs and reset them; give up after too many failures in a row.

        The whole vector env is rebuilt: a vector step is all or nothing, so the envs that did step are out of
        step with what the buffer holds, as is the one that crashed.
        """
        data: CollectorData = trainer.datamodule
        for env_index in range(data.buffer.num_envs):
            data.buffer.drop_episode(env_index)
        while True:
            self.env_failures += 1
            self._failures_in_a_row += 1
            module.log_vs_env_steps({"train/env_failures": float(self.env_failures)})
            self._close_envs()
            try:
                data.live_envs = live_envs(data.env, data.env_configs, data.live_envs)  # a dead server is left out
            except CarlaConnectionError as none_left:
                self._gave_up = (
                    f"{none_left} (after a training env failed at env step {module.env_steps}: "
                    f"{type(error).__name__}: {error})"
                )
                return
            if self._failures_in_a_row >= self.max_env_failures:
                # The next safe point stops the run (every process, under DDP) with a checkpoint.
                self._gave_up = (
                    f"the training envs failed {self._failures_in_a_row} times in a row (Collector.max_env_failures="
                    f"{self.max_env_failures}) at env step {module.env_steps}; last error: "
                    f"{type(error).__name__}: {error}"
                )
                return
            # Every process's own warning: under DDP the failing one may not be rank 0.
            warnings.warn(
                f"training env failed at env step {module.env_steps} ({type(error).__name__}: {error}); open episodes "
                f"dropped, envs rebuilt ({self._failures_in_a_row}/{self.max_env_failures} failures in a row)",
                stacklevel=2,
            )
            try:
                self._open_envs(data)
                return
            except Exception as rebuild_error:
                error = rebuild_error

    def _reopen_envs(self, trainer: pl.Trainer, module: CollectingModule) -> None:
        """Build the envs again after evaluation (`_make_way_for_evaluation`); a failure is an env failure."""
        try:
            self._open_envs(trainer.datamodule)
        except Exception as error:  # whatever the simulator raised: as a failed step
            self._recover(trainer, module, error)

    def _open_envs(self, data: CollectorData) -> None:
        self.envs = self._make_envs(data)
        self._obs, _ = self.envs.reset(seed=int(self._rng.integers(2**31)))

    def _make_envs(self, data: CollectorData) -> VectorEnv:
        return make_vector_env([data.env_configs[index] for index in data.live_envs], self.async_envs)

    def _close_envs(self) -> None:
        if self.envs is None:
            return
        try:
            if self._in_flight is not None and self._in_flight[1] is None:
                self.envs.step_wait()  # its results are not wanted any more, but closing must not wait on it
            self.envs.close()
        except Exception as why:  # a crashed simulator may not close cleanly; its replacement is built anyway
            warnings.warn(f"closing the failed training envs raised {type(why).__name__}: {why}", stacklevel=2)
        self.envs = None
        self._in_flight = None

    def _record_episodes(self, module: CollectingModule, final_info: dict, finished: np.ndarray) -> None:
        for index in finished:
            result = EpisodeResult.from_info({name: final_info[name][index] for name in EPISODE_INFO})
            # A vector env hands the task, as every dict in an info, as one array per field (and a "_<field>" mask).
            task = {name: values[index] for name, values in final_info["task"].items() if not name.startswith("_")}
            module.episodes += 1
            module.train_episode_metrics.update(result, task)
            self._last_return = result.episode_return

    def _steps_per_second(self, module: CollectingModule) -> float:
        # The run's env steps per second, measured between the module's syncs of the run totals.
        now = time.perf_counter()
        then, steps_then = self._clock
        if now - then < 1.0 or module.run_env_steps == steps_then:
            return self._sps
        self._sps = (module.run_env_steps - steps_then) / (now - then)
        self._clock = (now, module.run_env_steps)
        return self._sps

    # --- checkpointing: Lightning saves callback state_dicts with every checkpoint ---------------------------------

    def state_dict(self) -> dict:
        """Every process's envs, observations and noise RNG (each process its own), in rank order."""
        if self._rng is None:
            return {}
        if self._fit is not None:
            # Lightning takes the callbacks' state before the datamodule's (the replay) and the module's own
            # (its episodes): finishing the step under way here puts it in all of them.
            self._finish_step(*self._fit)
        return {"per_process": gather_per_process(self._own_state())}

    def _own_state(self) -> dict:
        env_states = None  # no envs (they failed and were closed): a resumed run starts new episodes
        if self.envs is not None:
            # Asked first: an env that raised inside an asynchronous vector env's worker would end that worker.
            if all(self.envs.get_attr("can_snapshot")):
                # Pickled: simulator objects are not tensors, and bytes pass Lightning's weights_only loading.
                env_states = pickle.dumps(list(self.envs.get_attr("simulator_state")))
            else:
                warnings.warn("env state is not saved (the simulator cannot snapshot its world, as a CARLA server "
                              "cannot); a resumed run restarts its training episodes", stacklevel=2)
        return {
            "obs": arrays_to_tensors(self._obs),
            "env_states": env_states,
            "rng": self._rng.bit_generator.state,
            "last_return": self._last_return,
            "env_failures": self.env_failures,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Envs do not exist yet at restore time; they are built and put back in on_fit_start.
        self._restored = state_dict["per_process"] if state_dict else None

    def _resume(self, state: dict, buffer: ReplayBuffer, rank: int) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._last_return = state["last_return"]
        self.env_failures = state["env_failures"]
        env_states = None if state["env_states"] is None else pickle.loads(state["env_states"])
        if env_states is None or len(env_states) != self.envs.num_envs:  # (or other servers answer now)
            for ring in range(buffer.num_envs):
                buffer.drop_episode(ring)
            self._obs, _ = self.envs.reset(seed=stream_seed("train_envs_resumed", rank) % 2**31)
            return
        self.envs.reset()
        self.envs.set_attr("simulator_state", env_states)
        self._obs = tensors_to_arrays(state["obs"])


def _with_final_observations(obs: dict[str, np.ndarray], info: dict, done: np.ndarray) -> dict[str, np.ndarray]:
    """The true next observations: for finished envs the final one, not the first of the next episode."""
    if not done.any():
        return obs
    next_obs = {key: value.copy() for key, value in obs.items()}
    for index in np.flatnonzero(done):
        for key in next_obs:
            next_obs[key][index] = info["final_obs"][index][key]
    return next_obs
