"""What the tools that replay a run (figures, crash analysis) read from its config file.

That file is a `cli.py --config` YAML, or the config.yaml LightningCLI saves next to a run's events; both hold the
run's `data` section, and within it the env.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError


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
        data = _layered(data, section)
    if not data:
        raise ConfigError(f"{', '.join(map(str, config_paths))}: cannot read its data section (there is none)")
    return data


def _layered(below: dict, above: dict) -> dict:
    merged = dict(below)
    for key, value in above.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _layered(merged[key], value) if both_sections else value
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
