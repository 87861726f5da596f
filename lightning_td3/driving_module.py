"""LightningModules that drive: every policy (TD3 or a baseline) is validated through the same harness.

Validation data are `EpisodeSpec`s (env config + seed); each validation step runs one evaluation episode, and
`EvaluationMetrics` (a torchmetrics Metric, reduced across ranks) turns the episodes into `eval/*` metrics.

The evaluation env lives for one validation (or test) run: on CARLA it shares the training server, and must leave it
to the training envs afterwards (`collector.Collector` closes them meanwhile). While fitting, an episode whose env
fails (a CARLA time-out) is left out with a warning and counted in `eval/failed_episodes`, and the run goes on;
`validate` and `test` stop with the env's error.
"""

from __future__ import annotations

import warnings
from typing import Literal

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from torchmetrics import SumMetric

from lightning_td3.baselines import IdmMobilPolicy, RandomPolicy
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.errors import require
from lightning_td3.evaluation import EnvFailure, EpisodeSpec, EvaluationMetrics, Policy, env_call, run_episode


class DrivingModule(pl.LightningModule):
    """Base class: subclasses say how they act (`policy()`); validation and test run evaluation episodes."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_metrics = EvaluationMetrics()
        self.eval_failures = SumMetric()  # evaluation episodes left out because their env failed, over all ranks
        self._eval_env: DrivingEnv | None = None

    def policy(self) -> Policy:
        raise NotImplementedError

    def validation_step(self, spec: EpisodeSpec, batch_idx: int) -> None:
        try:
            result = run_episode(self._env_for(spec.env_config), self.policy(), spec.seed)
        except EnvFailure as failure:
            if self.trainer.state.fn != TrainerFn.FITTING:
                raise failure.__cause__ from None
            warnings.warn(
                f"evaluation episode with seed {spec.seed} failed ({failure}); it is left out of the eval/* means and "
                "counted in eval/failed_episodes, and the next episode gets a new env", stacklevel=2,
            )
            self._close_eval_env()
            self.eval_failures.update(1.0)
            return
        self.eval_failures.update(0.0)
        self.eval_metrics.update(result)

    def test_step(self, spec: EpisodeSpec, batch_idx: int) -> None:
        self.validation_step(spec, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation()

    def on_test_epoch_end(self) -> None:
        self._log_evaluation()

    def on_validation_end(self) -> None:
        self._close_eval_env()

    def on_test_end(self) -> None:
        self._close_eval_env()

    def teardown(self, stage: str) -> None:
        self._close_eval_env()

    def _close_eval_env(self) -> None:
        if self._eval_env is not None:
            env, self._eval_env = self._eval_env, None
            try:
                env.close()
            except Exception as why:  # a failed simulator may not close cleanly
                warnings.warn(f"closing the evaluation env raised {type(why).__name__}: {why}", stacklevel=2)

    def _log_evaluation(self) -> dict[str, float]:
        metrics = {name: value.item() for name, value in self.eval_metrics.compute().items()}
        metrics[self.eval_metrics.prefix + "failed_episodes"] = self.eval_failures.compute().item()
        self.eval_metrics.reset()
        self.eval_failures.reset()
        # Already reduced over the processes, so every one logs the same values; sync_dist keeps Lightning from
        # warning that they might differ (their mean is the value itself).
        self.log_dict(metrics, sync_dist=True)
        return metrics

    def _env_for(self, config: EnvConfig) -> DrivingEnv:
        # One evaluation env, reused across episodes: building a CARLA world per episode would take minutes.
        if self._eval_env is None or self._eval_env.config != config:
            self._close_eval_env()
            self._eval_env = env_call(DrivingEnv, config)
        return self._eval_env


BASELINES = {"random": RandomPolicy, "idm_mobil": IdmMobilPolicy}


class BaselineDriver(DrivingModule):
    """A classical driver evaluated exactly like the agent: `random` or `idm_mobil` (IDM + MOBIL + pure pursuit)."""

    def __init__(self, policy: Literal["random", "idm_mobil"] = "idm_mobil") -> None:
        super().__init__()
        require(policy in BASELINES, "model.policy", f"one of {sorted(BASELINES)}", policy)
        self.save_hyperparameters()
        self._policy = BASELINES[policy]()

    def policy(self) -> Policy:
        return self._policy
