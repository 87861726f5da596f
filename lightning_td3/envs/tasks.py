"""Task distributions: a task setting given as one value, a list to choose from, or a range, drawn per episode.

A setting of `TASK_SETTINGS` (scenario, traffic density, layout, lanes, route length) takes, in a run's config,

    scenario: 1                                  # one value: every episode (as before distributions existed)
    scenario: [0, 1, 2]                          # a list: each episode draws one, all equally likely
    traffic_density: {low: 0.5, high: 2.0}       # a range: each episode draws one uniformly from [low, high]
    lanes: {low: 2, high: 4}                     # (an integer setting: one of the integers low..high)
    max_steps: {per_km: 500}                     # the time-out a varying route needs: it follows each route

`EnvConfig.sample_task` draws an episode's task from the generator `DrivingEnv.reset(seed=...)` seeds, so a seed
always gives the same task (per-seed evaluation stays deterministic) and a checkpointed env state, which holds that
generator's state, resumes into the very tasks it would have drawn. A config whose settings are all single values
draws nothing: its episodes are those it gave before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_td3.errors import require


@dataclass  # not frozen: Lightning copies an evaluation episode's config field by field (`apply_to_collection`)
class Range:
    """Every value from `low` to `high`, both included: a task setting drawn uniformly from it per episode."""

    low: int | float
    high: int | float


@dataclass  # not frozen, as Range
class StepsPerKm:
    """A time-out that follows each episode's route: `per_km` steps per km of it, rounded up."""

    per_km: int | float

    def steps(self, route_length_m: float) -> int:
        return math.ceil(route_length_m * self.per_km / 1000)


@dataclass(frozen=True)
class TaskSetting:
    """One setting that may vary per episode: what a single value of it must be, and whether it is a whole number."""

    name: str
    allowed: str  # the message's "must be ..." of a single value
    valid: Callable[[Any], bool]
    integer: bool = False
    ranged: bool = True  # a {low, high} range is meaningful (numbers, not names)


Distribution = Any  # a single value, a list of values, or a Range of them


def is_distribution(value: Distribution) -> bool:
    return isinstance(value, (list, Range))


def parse(setting: TaskSetting, value: Any) -> Distribution:
    """The value as `EnvConfig` keeps it (a list, a `Range` or a single value), or a one-line `ConfigError` naming
    `data.env.<setting>` and every form it may take. Tuples read as lists, {low, high} mappings as ranges."""
    if isinstance(value, dict):
        value = Range(**value) if set(value) == {"low", "high"} else value
    elif isinstance(value, tuple):
        value = list(value)
    name = f"data.env.{setting.name}"
    if not isinstance(value, (list, Range, dict)):
        require(setting.valid(value), name, setting.allowed, value)
        return value
    forms = "a list of them or a range {low: ..., high: ...} of them" if setting.ranged else "or a list of them"
    allowed = f"{setting.allowed}, {forms}"
    if isinstance(value, list):
        require(bool(value) and all(setting.valid(item) for item in value), name, allowed, value)
        return value
    ranged = setting.ranged and isinstance(value, Range)
    require(ranged and setting.valid(value.low) and setting.valid(value.high), name, allowed, _plain(value))
    require(value.low <= value.high, name, "a range with low <= high", _plain(value))
    return value


def draw(setting: TaskSetting, value: Distribution, rng: np.random.Generator) -> Any:
    """One episode's value of a distribution (`is_distribution`), from `rng`."""
    if isinstance(value, list):
        return value[int(rng.integers(len(value)))]  # an index, so the value keeps its own (Python) type
    if setting.integer:
        return int(rng.integers(value.low, value.high + 1))
    return float(rng.uniform(value.low, value.high))


def choices(value: Distribution) -> list:
    """Every value a list or a range of whole numbers draws, each once, in order; none for a single value."""
    if isinstance(value, list):
        return list(dict.fromkeys(value))
    if isinstance(value, Range):
        return list(range(value.low, value.high + 1))
    return []


def _plain(value: Any) -> Any:
    return {"low": value.low, "high": value.high} if isinstance(value, Range) else value
