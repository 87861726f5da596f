"""LightningModules that drive: every policy (TD3 or a baseline) is validated through the same harness.

Validation data are `EpisodeSpec`s (env config + seed); each validation step runs one evaluation episode, and
`EvaluationMetrics` (a torchmetrics Metric, reduced across ranks) turns the episodes into `eval/*` metrics.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl

from lightning_td3.baselines import IdmMobilPolicy, RandomPolicy
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.errors import require
from lightning_td3.evaluation import EpisodeSpec, EvaluationMetrics, Policy, run_episode


class DrivingModule(pl.LightningModule):
    """Base class: subclasses say how they act (`policy()`); validation and test run evaluation episodes."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_metrics = EvaluationMetrics()
        self._eval_env: DrivingEnv | None = None

    def policy(self) -> Policy:
        raise NotImplementedError

    def validation_step(self, spec: EpisodeSpec, batch_idx: int) -> None:
        self.eval_metrics.update(run_episode(self._env_for(spec.env_config), self.policy(), spec.seed))

    def test_step(self, spec: EpisodeSpec, batch_idx: int) -> None:
        self.validation_step(spec, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation()

    def on_test_epoch_end(self) -> None:
        self._log_evaluation()

    def teardown(self, stage: str) -> None:
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    def _log_evaluation(self) -> dict[str, float]:
        metrics = {name: value.item() for name, value in self.eval_metrics.compute().items()}
        self.eval_metrics.reset()
        # Already reduced over the processes, so every one logs the same values; sync_dist keeps Lightning from
        # warning that they might differ (their mean is the value itself).
        self.log_dict(metrics, sync_dist=True)
        return metrics

    def _env_for(self, config: EnvConfig) -> DrivingEnv:
        # One evaluation env, reused across episodes: building a CARLA world per episode would take minutes.
        if self._eval_env is None or self._eval_env.config != config:
            if self._eval_env is not None:
                self._eval_env.close()
            self._eval_env = DrivingEnv(config)
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
