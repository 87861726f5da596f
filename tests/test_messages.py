"""User-facing error messages name the file or setting as the user wrote it, and give advice that fits the case."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import cli
from datamodules.replay import ReplayDataModule
from lightning_td3.config_files import check_config_files
from lightning_td3.envs import CarlaConfig, EnvConfig, RewardConfig
from lightning_td3.envs.carla_servers import process_servers
from lightning_td3.errors import CheckpointError, ConfigError, StorageError
from lightning_td3.replay_file import shard_name
from tests.faults import FaultPlan, install
from tests.tiny_run import TINY_ENV, fit

ROOT = Path(__file__).resolve().parent.parent
BASELINE = str(ROOT / "configs/baselines/random.yaml")

# --------------------------------------------------------------------------- a --config file that is not YAML


def test_a_config_file_that_is_not_yaml_is_named_with_the_line_of_its_problem(tmp_path):
    broken = tmp_path / "bad.yaml"
    broken.write_text("data: {eval_episodes: 3\n")
    with pytest.raises(ConfigError) as raised:
        check_config_files(["validate", "--config", BASELINE, "--config", str(broken)])
    message = str(raised.value)
    assert message.startswith(f"config file {broken} is not valid YAML: ")
    assert "line 2" in message and "\n" not in message


@pytest.mark.parametrize("form", [["--config", "{}"], ["--config={}"], ["-c", "{}"]])
def test_every_way_of_giving_a_config_file_is_checked(tmp_path, form):
    broken = tmp_path / "bad.yaml"
    broken.write_text("data:\n  eval_episodes: 3\n   batch_size: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {broken} is not valid YAML: ") + ".*line 3"):
        check_config_files(["fit", "--config", BASELINE, *(part.format(broken) for part in form)])


def test_valid_config_files_and_other_arguments_pass_the_check():
    check_config_files(["validate", "-c", BASELINE, f"--config={ROOT / 'configs/carla.yaml'}",
                        "--data.env.scenario", "2", "--config"])


# -------------------------------------------------------------- env settings named as the command line names them


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: EnvConfig(scenario=7), "data.env.scenario must be one of 0, 1, 2"),
        (lambda: EnvConfig(layout="spiral"), "data.env.layout must be one of"),
        (lambda: CarlaConfig(port=0), "data.env.carla.port must be a port"),
        (lambda: EnvConfig(carla={"servers": ["sim-a:two"]}), "data.env.carla.servers[0] must be"),
        (lambda: RewardConfig(headway=-1.0), "data.env.reward.headway must be a number >= 0"),
        (lambda: RewardConfig(alongside=-1.0), "data.env.reward.alongside must be a number >= 0"),
        (lambda: process_servers(CarlaConfig(servers=("a:1", "b:2")), 1, 0, 1), "data.env.carla.servers must be 1"),
    ],
)
def test_env_settings_are_named_by_their_full_option_path(build, name):
    with pytest.raises(ConfigError) as raised:
        build()
    assert str(raised.value).startswith(name)


def test_the_cli_names_a_bad_env_setting_as_its_option():
    with pytest.raises(ConfigError) as raised:
        cli.main(["validate", "--config", BASELINE, "--data.env.scenario", "7"])
    assert str(raised.value).startswith("data.env.scenario must be one of 0, 1, 2 (light, medium, dense traffic)")


# ------------------------------------------------------------------- a vector size other than the env's


def test_a_fit_from_scratch_is_told_to_set_the_vector_size_before_any_env_runs(tmp_path, monkeypatch):
    plan = install(monkeypatch, FaultPlan())
    with pytest.raises(ConfigError) as raised:
        # Set, not derived from data.env: the model reads vectors of 14, the env gives 16.
        fit(tmp_path, **{"model.init_args.vector_size": 14, "data.env.num_waypoints": 6})
    assert str(raised.value) == (
        "model.init_args.vector_size is 14 but data.env gives vectors of 16 (4 + 2 x num_waypoints=6, + 2 with "
        "observe_leader=False, + 4 with observe_sides=False); set model.init_args.vector_size: 16"
    )
    assert plan.steps == 0 and plan.resets == 0


def test_a_checkpoint_is_told_to_get_the_env_it_was_trained_on_not_another_vector_size():
    agent = ROOT / "agents/scenario1_curvy_asymmetric.ckpt"  # trained with the car ahead: vectors of 56
    with pytest.raises(ConfigError) as raised:
        # The checkpoint's env goes under the config: taking its car-ahead entries away takes an option.
        cli.main(["validate", "--config", str(ROOT / "configs/experiments/scenario0_straight_capped.yaml"),
                  "--data.env.observe_leader", "false", "--ckpt_path", str(agent)])
    assert str(raised.value) == (
        f"the agent in checkpoint {agent} was trained on vectors of 56 but data.env gives vectors of 54 (4 + 2 x "
        "num_waypoints=25, + 2 with observe_leader=False, + 4 with observe_sides=False): give the env it was trained "
        "on (its run's config), e.g. "
        "--data.env.observe_leader true or --data.env.num_waypoints 26"
    )


# ------------------------------------------------------------------------ a replay file that is not there

OLDER, NEWER = "20260101-120000-000-00001", "20260101-120000-000-00002"


def resume_replay(directory: Path, key: str) -> None:
    """What a resume does with the replay record of a checkpoint whose replay files were written to `directory`."""
    data = ReplayDataModule(env=EnvConfig(**TINY_ENV), num_envs=2, buffer_capacity=100)
    data.setup("fit")
    data.load_state_dict({"replay_file": {"key": key, "world_size": 1, "directory": str(directory)}})


def test_a_replay_file_pruned_for_a_newer_one_is_blamed_on_pruning(tmp_path):
    (tmp_path / shard_name(NEWER, 0, 1)).touch()
    with pytest.raises(CheckpointError) as raised:
        resume_replay(tmp_path, OLDER)
    assert str(raised.value) == (
        f"replay file {tmp_path / shard_name(OLDER, 0, 1)} is missing: only the newest replay file and "
        "data.replay_files_kept=1 before it are kept, so older checkpoints validate and test but cannot resume; "
        "resume from a newer one (e.g. last.ckpt beside it)"
    )


@pytest.mark.parametrize("others", [[], [OLDER]], ids=["no replay file", "only an older one"])
def test_a_lost_newest_replay_file_says_to_keep_replay_with_the_checkpoint(tmp_path, others):
    for key in others:
        (tmp_path / shard_name(key, 0, 1)).touch()
    with pytest.raises(CheckpointError) as raised:
        resume_replay(tmp_path, NEWER)
    message = str(raised.value)
    assert message.startswith(f"replay file {shard_name(NEWER, 0, 1)} of this checkpoint is missing from {tmp_path}: ")
    assert "keep or copy replay/ together with the checkpoint" in message
    assert "replay_files_kept" not in message


def test_resuming_a_run_whose_replay_folder_was_deleted_says_to_keep_it(tmp_path):
    fit(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "replay")
    with pytest.raises(CheckpointError) as raised:
        cli.main(["fit", "--config", str(tmp_path / "tiny.yaml"), "--ckpt_path",
                  str(tmp_path / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "2"])
    message = str(raised.value)
    assert f"of this checkpoint is missing from {tmp_path / 'checkpoints' / 'replay'}: " in message
    assert "keep or copy replay/ together with the checkpoint" in message
    assert "replay_files_kept" not in message


# ---------------------------------------------------------------------------- an output path that is a file


def test_an_output_directory_that_is_a_file_is_named_as_a_file(tmp_path, monkeypatch):
    plan = install(monkeypatch, FaultPlan())
    runs = tmp_path / "runs"
    runs.write_text("")
    with pytest.raises(StorageError) as raised:
        fit(tmp_path, **{"trainer.logger.init_args.save_dir": str(runs)})
    assert str(raised.value).startswith(
        f"the log directory {runs} is not writable: {runs} is a file, not a directory; remove or rename it, or point "
        "the run elsewhere"
    )
    assert plan.steps == 0 and plan.resets == 0
