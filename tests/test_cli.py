"""The CLI end to end: fit writes TensorBoard events and checkpoints, validate evaluates agents and baselines alike."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
from lightning_td3.errors import ConfigError
from tests.faults import FaultPlan, install
from tests.tiny_run import fit

ROOT = Path(__file__).resolve().parent.parent
EVAL_KEYS = {
    "eval/success_rate", "eval/collision_rate", "eval/avg_speed_kmh",
    "eval/episode_return", "eval/episode_length", "eval/route_completion",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny")
    fit(run_dir, **{"model.init_args.log_images_every_n_updates": 3, "trainer.log_every_n_steps": 1})
    return run_dir


def test_fit_writes_tensorboard_events_vs_env_steps_and_checkpoints(tiny_run):
    (event_dir,) = {path.parent for path in (tiny_run / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0, "histograms": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("train/critic_loss", "train/actor_loss", "train/q_mean", "train/q_max",
                 "train/critic_grad_norm", "train/actor_grad_norm", "train/episode_return", "eval/success_rate"):
        assert f"{name}_vs_env_steps" in scalars, name
    assert EVAL_KEYS <= scalars
    # A config of single values has one task: no per-task means (`tests/test_tasks.py` has a fit over several).
    assert not any(name.startswith("train_by_task/") for name in scalars)
    assert "obs/camera_stack" in events.Tags()["images"]
    assert any(tag.startswith("grads/critic.cnn") for tag in events.Tags()["histograms"])
    assert any(tag.startswith("cnn/actor_feature_std") for tag in scalars)
    # Logged against env steps: the last critic loss point sits past warm-up, at the env step it was logged.
    steps = [event.step for event in events.Scalars("train/critic_loss_vs_env_steps")]
    assert steps == sorted(steps) and steps[0] >= 30
    progress = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)["td3_progress"]
    # One update per env step after the 30 warm-up steps (two envs step together, so within one vector step).
    assert progress["updates"] == 6 and 0 <= progress["env_steps"] - 30 - progress["updates"] < 2


def test_fit_logs_the_share_of_training_time_the_learner_waits_for_env_steps(tiny_run):
    (event_dir,) = {path.parent for path in (tiny_run / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0, "histograms": 0}).Reload()
    fractions = [event.value for event in events.Scalars("perf/data_wait_fraction")]
    # Every update steps the envs first (one update per env step), so the learner waits a real, partial share.
    assert fractions and all(0.0 < fraction < 1.0 for fraction in fractions)


def test_validate_a_checkpoint_through_the_evaluation_harness(tiny_run):
    result = cli.main(["validate", "--config", str(tiny_run / "tiny.yaml"),
                       "--ckpt_path", str(tiny_run / "checkpoints" / "last.ckpt")])
    metrics = result.trainer.callback_metrics
    assert EVAL_KEYS <= set(metrics)
    assert 0.0 <= float(metrics["eval/route_completion"]) <= 1.0


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_baseline_evaluation_prints_every_metric(subcommand):
    completed = subprocess.run(
        [sys.executable, "cli.py", subcommand, "--config", "configs/baselines/idm_mobil.yaml",
         "--data.eval_episodes", "2", "--data.env.route_length_m", "150"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    for key in EVAL_KEYS:
        assert key in completed.stdout


def test_a_bad_setting_stops_the_cli_process_with_one_clear_line():
    completed = subprocess.run(
        [sys.executable, "cli.py", "validate", "--config", "configs/baselines/random.yaml", "--data.env.scenario", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1].startswith("error: data.env.scenario must be one of 0, 1, 2")
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        (["--data.env.traffic_density", "-1"], "env.traffic_density must be a number >= 0"),
        (["--data.env.backend", "unreal"], "env.backend must be one of"),
        (["--data.env.image_size", "96"], "env.image_size must be 84"),
        (["--data.env.max_steer_rad", "2"], "env.max_steer_rad must be in (0, 0.6] radians"),
        (["--data.env.frame_ego_position", "1"], "env.frame_ego_position must be in (0, 1)"),
        (["--data.batch_size", "0"], "data.batch_size must be an integer >= 1"),
        (["--data.n_step", "0"], "data.n_step must be an integer >= 1"),
        (["--model.policy", "psychic"], "Expected a typing.Literal['random', 'idm_mobil']"),
    ],
)
def test_bad_settings_are_refused_naming_them(override, message):
    # In this process (the process's own exit path is checked above): what cli.py prints is the error's text.
    with pytest.raises((SystemExit, ConfigError)) as stopped:
        cli.main(["validate", "--config", str(ROOT / "configs/baselines/random.yaml"), *override])
    assert message in str(stopped.value.code if isinstance(stopped.value, SystemExit) else stopped.value)


def test_carla_without_a_server_fails_fast_naming_the_address():
    completed = subprocess.run(
        [sys.executable, "cli.py", "validate", "--config", "configs/baselines/idm_mobil.yaml",
         "--config", "configs/carla.yaml", "--data.env.carla.port", "2", "--data.env.carla.timeout_s", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode != 0
    assert "localhost:2" in completed.stderr and "CarlaUE4" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "arguments, overrides, message",
    [
        (["--data.bogus", "1"], {}, "unrecognized arguments: --data.bogus"),
        ([], {"data.bogus": 1}, "bogus"),  # an unknown key in the config file
        (["--data.batch_size", "abc"], {}, 'Parser key "data.batch_size"'),
        ([], {"trainer.max_epochs": "many"}, "max_epochs"),  # a wrong type in the config file
        (["--data.buffer_capacity", "-5"], {}, "data.buffer_capacity must be an integer >= 4"),
        (["--data.env.scenario", "7"], {}, "env.scenario must be one of 0, 1, 2"),
        (["--data.env.carla.opendrive_file", "nowhere.xodr"], {}, "env.carla.opendrive_file must be an existing"),
    ],
)
def test_a_bad_fit_setting_stops_before_any_work_with_a_short_message_naming_it(
    tmp_path, monkeypatch, arguments, overrides, message
):
    plan = install(monkeypatch, FaultPlan())
    with pytest.raises((SystemExit, ConfigError)) as stopped:
        fit(tmp_path, *arguments, **overrides)
    text = str(stopped.value.code if isinstance(stopped.value, SystemExit) else stopped.value)
    assert message in text
    assert len(text.splitlines()) <= 10, text  # not the pages of usage jsonargparse prints by default
    assert plan.resets == 0, "no env was started"
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


def test_sampling_on_the_device_is_refused_on_a_cpu_before_any_env_runs(tmp_path, monkeypatch):
    plan = install(monkeypatch, FaultPlan())
    with pytest.raises(ConfigError, match="data.sample_on_device must be false when training on a CPU"):
        fit(tmp_path, "--data.sample_on_device", "true")
    assert plan.resets == 0, "no env was started"
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("replay"))


@pytest.mark.parametrize("config", sorted((ROOT / "configs/experiments").glob("*.yaml")), ids=lambda path: path.name)
def test_every_experiment_config_builds_its_run_from_the_command_in_its_header(config, monkeypatch):
    # These configs run for an hour or on a GPU, so nothing else builds them: a renamed option would surface there.
    command = next(line for line in config.read_text().splitlines() if "python cli.py fit" in line)
    monkeypatch.chdir(ROOT)  # the headers' paths are relative to the repository
    arguments = shlex.split(command.split("python cli.py fit", 1)[1])
    resolved = cli.main([*arguments, "--trainer.accelerator", "cpu"], run=False).config
    # The file is the last layer of its command, so each of its settings must reach the run as written.
    for key, value in _leaves(yaml.safe_load(config.read_text())):
        if key != "trainer.accelerator":
            assert resolved[key] == value, f"{config.name}: {key}"


def _leaves(settings: dict, prefix: str = ""):
    """(dotted key, value) of every setting but lists (callbacks), which the CLI resolves into its own form."""
    for name, value in settings.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{name}.")
        elif not isinstance(value, list):
            yield f"{prefix}{name}", value
