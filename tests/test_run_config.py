"""Reading a run's env from its config file, for the tools that replay a run (figures, crash analysis)."""

from pathlib import Path

import pytest

from lightning_td3 import crashes
from lightning_td3.errors import ConfigError
from lightning_td3.run_config import env_config_of

ROOT = Path(__file__).resolve().parent.parent


def test_the_env_of_an_experiment_config_is_the_one_it_trains_on():
    env = env_config_of(ROOT / "configs/experiments/h100.yaml")
    assert (env.scenario, env.layout, env.route_length_m, env.max_steps) == (1, "curvy", 300.0, 150)
    assert env.reward.progress_up_to_target_speed and env.reward.headway == 0.0


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "cannot read its data section .*FileNotFoundError"),
        ("trainer:\n  max_epochs: 1\n", "cannot read its data section .*KeyError"),
        ("data: [unclosed\n", "cannot read its data section .*Error"),
        ("data:\n  num_envs: 1\n", "cannot read data.env from it .*KeyError"),
        ("data:\n  env:\n    scenario: 7\n", "env.scenario must be one of 0, 1, 2"),
        ("data:\n  env:\n    speed: 3\n", "cannot read data.env from it .*speed"),
    ],
)
def test_a_config_without_a_usable_env_is_refused_naming_the_file_or_the_setting(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        env_config_of(config)


def test_the_crash_report_answers_a_bad_config_with_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  env:\n    layout: spiral\n")
    args = ["--config", str(config), "--ckpt", str(ROOT / "agents/td3_cpu_scenario0.ckpt"), "--seed", "0"]
    with pytest.raises(SystemExit) as stop:
        crashes.main(args)
    assert str(stop.value).startswith("error: env.layout must be one of") and "\n" not in str(stop.value)
