"""What the tools that replay a run (figures, crash analysis) read from its config file.

That file is a `cli.py --config` YAML, or the config.yaml LightningCLI saves next to a run's events; both hold the
run's `data` section, and within it the env.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError


def data_section(config_path: Path) -> dict:
    """The `data` section of a run config."""
    try:
        return yaml.safe_load(config_path.read_text())["data"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as why:
        raise ConfigError(f"{config_path}: cannot read its data section ({why!r})") from why


def env_config_of(config_path: Path, **overrides) -> EnvConfig:
    """The `data.env` of a run config, with `overrides` (env settings) over it as `--data.env.*` options would be."""
    data = data_section(config_path)
    try:
        return EnvConfig(**{**data["env"], **overrides})
    except (KeyError, TypeError) as why:
        raise ConfigError(f"{config_path}: cannot read data.env from it ({why!r})") from why
