"""Reading a run's env from its config file, for the tools that replay a run (figures, crash analysis)."""

from pathlib import Path

import pytest

import cli
from lightning_td3 import crashes, figures
from lightning_td3.errors import ConfigError
from lightning_td3.run_config import env_config_of

ROOT = Path(__file__).resolve().parent.parent


def test_the_env_of_an_experiment_config_is_the_one_it_trains_on():
    env = env_config_of(ROOT / "configs/experiments/scenario1_curvy_asymmetric.yaml")
    assert (env.scenario, env.layout, env.route_length_m, env.max_steps) == (1, "curvy", 300.0, 150)
    assert env.reward.progress_up_to_target_speed and env.reward.headway == 1.0 and env.observe_leader


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "cannot read its data section .*FileNotFoundError"),
        ("trainer:\n  max_epochs: 1\n", "cannot read its data section .there is none"),
        ("data: 3\n", "its data section is not a mapping of settings; got 3"),
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


def test_layered_configs_give_the_env_the_cli_would_build_from_them(tmp_path):
    radar = tmp_path / "radar.yaml"
    radar.write_text("data:\n  env:\n    observe_leader: true\n    reward:\n      headway: 1.0\n")
    layers = [ROOT / "configs/experiments/scenario0_straight_capped.yaml", ROOT / "configs/td3.yaml", radar]
    env = env_config_of(*layers)
    # The first file's task and reward, observe_leader and the headway weight from the last; the second has no data
    # section
    assert (env.scenario, env.layout, env.route_length_m) == (0, "straight", 300.0)
    assert env.reward.progress_up_to_target_speed and env.reward.headway == 1.0 and env.observe_leader
    assert env == cli.main([f"--config={layer}" for layer in layers], run=False).datamodule.env
    assert not env_config_of(*layers[:2]).observe_leader


def test_the_crash_report_answers_a_bad_config_with_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  env:\n    layout: spiral\n")
    args = ["--config", str(config), "--ckpt", str(ROOT / "agents/scenario0_straight_capped.ckpt"), "--seed", "0"]
    with pytest.raises(SystemExit) as stop:
        crashes.main(args)
    assert str(stop.value).startswith("error: data.env.layout must be one of") and "\n" not in str(stop.value)


def test_the_tools_take_layered_configs_and_refuse_an_env_the_agent_cannot_read(tmp_path, capsys):
    agent = str(ROOT / "agents/scenario1_curvy_asymmetric.ckpt")  # its vector has the car ahead: 56 entries
    base, radar = (str(ROOT / "configs/experiments" / f"{name}.yaml")
                   for name in ("scenario0_straight_capped", "scenario1_curvy_asymmetric"))
    gif = tmp_path / "episode.gif"
    for tool, args in (
        (crashes.main, ["--config", base, "--ckpt", agent, "--seed", "50000", "--episodes", "1"]),
        (figures.main, ["episode", "--config", base, "--ckpt", agent, "--seed", "50000", "--out", str(gif)]),
    ):
        with pytest.raises(SystemExit) as stop:
            tool(args)
        message = str(stop.value)
        assert message.startswith("error: the agent in the checkpoint was trained on vectors of 56 but data.env gives "
                                  "vectors of 54")
        assert "observe_leader=False" in message and "--data.env.observe_leader true" in message
        assert "\n" not in message
    assert not gif.exists()
    crashes.main(["--config", base, "--config", radar, "--ckpt", agent, "--seed", "50000", "--episodes", "1"])
    assert capsys.readouterr().out.startswith("collisions: 0 of 1 episodes")
