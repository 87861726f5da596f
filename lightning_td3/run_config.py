"""What the tools that replay a run (figures, crash analysis, the evaluation grid) read from its config file, and the
agent they load from its checkpoint.

That file is a `cli.py --config` YAML, or the config.yaml LightningCLI saves next to a run's events; both hold the
run's `data` section, and within it the env.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError, UserError

if TYPE_CHECKING:
    from lightning_td3.td3 import TD3


def data_section(*config_paths: Path) -> dict:
    """The `data` section of a run config, or of several layered in order as `cli.py --config A --config B` layers
    them (a later file's settings win; a file without a `data` section adds nothing to it)."""
    data: dict = {}
    for config_path in config_paths:
        try:
            section = yaml.safe_load(config_path.read_text()).get("data", {})
        except (OSError, AttributeError, yaml.YAMLError) as why:
            raise ConfigError(f"{config_path}: cannot read its data section ({why!r})") from why
        if not isinstance(section, dict):
            raise ConfigError(f"{config_path}: its data section is not a mapping of settings; got {section!r}")
        data = layered(data, section)
    if not data:
        raise ConfigError(f"{', '.join(map(str, config_paths))}: cannot read its data section (there is none)")
    return data


def layered(below: dict, above: dict) -> dict:
    """Settings `above` over settings `below`, as a later `--config` file's over an earlier one's: a section both
    give (a mapping, e.g. `reward`) merges key by key, any other setting of `above` replaces that of `below`."""
    merged = dict(below)
    for key, value in above.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = layered(merged[key], value) if both_sections else value
    return merged


def env_config_of(*config_paths: Path, **overrides) -> EnvConfig:
    """The `data.env` of a run config (or of layered ones), with `overrides` (env settings) over it as `--data.env.*`
    options would be."""
    return env_config_in(data_section(*config_paths), ", ".join(map(str, config_paths)), **overrides)


def env_config_in(data: dict, source: str, **overrides) -> EnvConfig:
    """The env of a `data` section already read (by `data_section`) from `source`, with `overrides` over it."""
    try:
        return EnvConfig(**{**data["env"], **overrides})
    except (KeyError, TypeError) as why:
        raise ConfigError(f"{source}: cannot read data.env from it ({why!r})") from why


def trained_agent(checkpoint: Path, config_paths: Sequence[Path] = ()) -> tuple[TD3, EnvConfig]:
    """A TD3 checkpoint's agent (a training checkpoint or an exported actor), in evaluation mode on the CPU, and the
    env it drives on: the `data.env` of the run's config(s) when given, else the env the checkpoint records it was
    trained on; an env the agent cannot read is refused (`TD3.require_env`)."""
    from lightning_td3.runs import read_checkpoint
    from lightning_td3.td3 import TD3

    read_checkpoint(checkpoint)  # a missing or unreadable file in one line, before Lightning tries it
    agent = TD3.load_from_checkpoint(checkpoint, map_location="cpu")
    agent.eval()
    # The CNNs' precision and layout that `cli.py validate` gives it on this CPU, so both tools drive alike.
    agent.use_learner_settings(torch.device("cpu"))
    if config_paths:
        env_config = env_config_of(*config_paths)
    elif agent.trained_env is not None:
        env_config = EnvConfig(**agent.trained_env)
    else:
        raise UserError(
            f"{checkpoint} does not record the env it was trained on (it was written before that was kept); "
            "give its run's config with --config"
        )
    agent.require_env(env_config)
    return agent, env_config
