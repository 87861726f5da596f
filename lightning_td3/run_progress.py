"""How far a TD3 run has come: the counters that schedules, logs, stops and checkpoints go by.

`TD3` owns one `RunProgress`: its `Collector` advances the env steps and episodes, `training_step` the updates,
the logging syncs the run's totals (`td3_logging.sync_run_totals_and_log_episodes`) and checkpoints keep it all
(`td3_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunProgress:
    """This process's counters and the run's totals over all processes.

    Under DDP every process collects its own env steps and episodes; updates are the same on all of them.
    """

    env_steps: int = 0  # this process's, counted when its Collector takes a vector step
    episodes: int = 0  # this process's finished training episodes
    # Update steps, skipped ones included: the policy delay runs on it, and whether an update was skipped is known
    # on the device only (`nonfinite`, which counts those).
    updates: int = 0
    # The whole run's env steps and episodes (summed over processes) as of the last time scalars were logged.
    run_env_steps: int = 0
    run_episodes: int = 0


class ProgressField:
    """A `RunProgress` counter read and written as an attribute of the object holding it as `progress`: the names
    the Collector (`collector.CollectingModule`), the stop vote, tools and tests use (`module.env_steps`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, holder, owner: type | None = None):
        return self if holder is None else getattr(holder.progress, self.name)

    def __set__(self, holder, value: int) -> None:
        setattr(holder.progress, self.name, value)
