"""Run folders and checkpoint files as a user meets them: `--ckpt_path last` resumes the newest run in its own folder,
a bad checkpoint is one line that names it, evaluation and failed starts leave no folder, runs print no noise."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import cli
from lightning_td3.collector import COUNTERS
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import CheckpointError, ConfigError
from lightning_td3.export import export_actor
from lightning_td3.figures import record_episode
from lightning_td3.progress import ProgressBar
from tests.tiny_run import TINY_ENV, fit

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# What the documented commands printed before, none of which a user can act on or should believe.
NOISE = ("LeafSpec", "💡", "litlogger", "weights_only", "not resumable", "exists and is not empty", "Traceback")


def quickstart_scaled_down(directory: Path) -> Path:
    """configs/quickstart.yaml as shipped (logger version unpinned, checkpoints in the run's own folder), with the
    sizes of a test and its runs under `directory`/runs."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"].update(max_epochs=1000, limit_train_batches=6)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(directory / "runs")
    collector = config["trainer"]["callbacks"][0]
    assert collector["class_path"].endswith("Collector")
    collector["init_args"]["learning_starts"] = 30
    config["model"]["init_args"].update(vector_size=14, hidden_sizes=[16], log_images_every_n_updates=6)
    config["data"].update(buffer_capacity=500, batch_size=4, eval_episodes=1, env=dict(TINY_ENV))
    path = directory / "quickstart_small.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*arguments: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def files_under(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_after_a_kill_ckpt_path_last_resumes_the_newest_run_in_its_own_folder(tmp_path):
    config = quickstart_scaled_down(tmp_path)
    runs = tmp_path / "runs" / "quickstart"
    # An older, finished run: "last" must not pick it.
    finished = run_cli("fit", "--config", str(config), "--trainer.max_epochs", "1")
    assert finished.returncode == 0, finished.stderr[-2000:]
    # The newer run, killed after its first checkpoint.
    killed = subprocess.Popen([sys.executable, "cli.py", "fit", "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = runs / "version_1" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended without a checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)
    killed.kill()
    killed.wait()
    before = torch.load(last, weights_only=True)
    epochs = before["epoch"] + 2  # one more epoch than the checkpoint holds

    resumed = run_cli("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", str(epochs))

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(path.name for path in runs.iterdir()) == ["version_0", "version_1"], "no new version folder"
    after = torch.load(last, weights_only=True)
    assert after["td3_progress"]["updates"] == 6 * epochs > before["td3_progress"]["updates"]
    assert after["td3_progress"]["env_steps"] > before["td3_progress"]["env_steps"]
    # TensorBoard's curves go on in the same folder: the resumed run wrote its events beside the killed run's.
    assert len(list((runs / "version_1").glob("events.out.tfevents.*"))) == 2
    assert len(list((runs / "version_0").glob("events.out.tfevents.*"))) == 1
    for noise in NOISE:
        assert noise not in resumed.stderr + resumed.stdout, noise
    # It closes with what it reached and how to go on.
    assert "Last evaluation, 1 episodes:" in resumed.stdout
    assert f"Checkpoint: {last}" in resumed.stdout
    assert f"resume:   python cli.py fit --config {config} --trainer.max_epochs {epochs} --ckpt_path last" in resumed.stdout


def test_ckpt_path_last_with_no_run_to_resume_is_one_clear_line_and_starts_nothing(tmp_path):
    completed = run_cli("fit", "--config", str(QUICKSTART), "--ckpt_path", "last", cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [
        "error: --ckpt_path last: nothing to resume, no runs/quickstart/version_*/checkpoints/last.ckpt exists yet; "
        "start a new run by leaving out --ckpt_path"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    fit(run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _write(data: bytes):
    return lambda path, real: path.write_bytes(data)


def _lightning_version(version: str):
    def write(path: Path, real: Path) -> None:
        contents = torch.load(real, weights_only=True)
        contents["pytorch-lightning_version"] = version
        torch.save(contents, path)
    return write


BAD_CHECKPOINTS = {
    "empty": (_write(b""), "is empty (0 bytes)"),
    "random_bytes": (_write(bytes(range(256)) * 40), "is not a PyTorch checkpoint file"),
    "truncated": (lambda path, real: path.write_bytes(real.read_bytes()[: real.stat().st_size // 2]),
                  "is damaged or truncated"),
    "foreign": (lambda path, real: torch.save({"weights": torch.zeros(3)}, path), "is not a Lightning checkpoint"),
    "other_lightning_major_version": (_lightning_version("1.9.5"), "was written by pytorch-lightning 1.9.5"),
    "missing": (lambda path, real: None, "does not exist"),
}


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_one_line_naming_it_and_nothing_is_written(checkpoint, tmp_path, subcommand, kind):
    damage, message = BAD_CHECKPOINTS[kind]
    bad = tmp_path / "bad.ckpt"
    damage(bad, checkpoint)
    config = checkpoint.parent.parent / "tiny.yaml"
    run_dir = checkpoint.parent.parent
    before = files_under(run_dir), files_under(tmp_path)
    with pytest.raises(CheckpointError) as raised:
        cli.main([subcommand, "--config", str(config), "--ckpt_path", str(bad)])
    text = str(raised.value)
    assert message in text and str(bad) in text and len(text.splitlines()) == 1, text
    assert (files_under(run_dir), files_under(tmp_path)) == before


def test_the_cli_process_reports_a_damaged_checkpoint_in_one_line(tmp_path):
    # The process's own exit path; every kind and subcommand is checked in-process above.
    bad = tmp_path / "half.ckpt"
    bad.write_bytes(b"PK\x03\x04" + bytes(1000))  # the start of a zip archive, cut short
    completed = run_cli("validate", "--config", str(QUICKSTART), "--ckpt_path", str(bad), cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(f"error: checkpoint {bad} is damaged or truncated and cannot be loaded ("), line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["half.ckpt"]


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluation_leaves_no_run_folder_and_no_config_file(checkpoint, tmp_path, monkeypatch, subcommand):
    monkeypatch.chdir(tmp_path)
    logs = checkpoint.parent.parent / "logs"
    versions = sorted(logs.rglob("version_*"))
    result = cli.main([subcommand, "--config", str(checkpoint.parent.parent / "tiny.yaml"),
                       "--ckpt_path", str(checkpoint)])
    assert "eval/success_rate" in result.trainer.callback_metrics
    assert sorted(logs.rglob("version_*")) == versions
    assert list(tmp_path.iterdir()) == []


def test_a_fit_that_fails_before_training_leaves_no_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="vector_size"):
        fit(tmp_path, "--model.init_args.vector_size", "16")
    assert not (tmp_path / "logs").exists()


def test_training_on_from_a_shipped_agent_is_refused_in_one_line_leaving_no_folder(tmp_path):
    agent = ROOT / "agents" / "scenario0_straight_capped.ckpt"
    completed = run_cli("fit", "--config", str(QUICKSTART), "--ckpt_path", str(agent), cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint {agent} holds only an actor's weights, for validate/test"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_progress_bar_shows_the_counters_as_whole_numbers():
    class Logger:
        version = 3

    class Trainer:  # what the bar reads: the logged values (floats) and the logger's version
        progress_bar_metrics = {"env_steps": 1301.0, "episodes": 170.0, "sps": 19.652}
        loggers = [Logger()]

    metrics = ProgressBar().get_metrics(Trainer(), None)
    assert {name: metrics[name] for name in (*COUNTERS, "v_num")} == {"env_steps": "1301", "episodes": "170",
                                                                      "v_num": "3"}
    assert metrics["sps"] == 19.652


def test_the_cli_process_names_a_config_file_that_is_not_yaml(tmp_path):
    broken = tmp_path / "mine.yaml"
    broken.write_text("data: {eval_episodes: 3\n")
    completed = run_cli("fit", "--config", str(QUICKSTART), "--config", str(broken), cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(f"error: config file {broken} is not valid YAML: ") and "line 2" in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.yaml"]


def test_the_cli_process_says_when_the_output_folder_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("")
    completed = run_cli("fit", "--config", str(QUICKSTART), cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1].startswith(
        "error: the checkpoint directory runs is not writable: runs is a file, not a directory; remove or rename it"
    )
    assert (tmp_path / "runs").read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exported") / "agent.ckpt"
    export_actor(checkpoint, path)
    return path


@pytest.mark.parametrize("which", ["training_checkpoint", "exported_actor"])
def test_a_checkpoint_alone_evaluates_on_the_task_and_networks_it_was_trained_with(checkpoint, exported, which):
    path = checkpoint if which == "training_checkpoint" else exported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli.main(["validate", "--ckpt_path", str(path)])
    # Nothing about the training callbacks or a checkpoint folder: evaluation restores weights and writes nothing.
    assert not [str(w.message) for w in caught if "callbacks used to create" in str(w.message)
                or "dirpath has changed" in str(w.message)]
    assert result.datamodule.env == EnvConfig(**TINY_ENV)  # not the defaults: scenario 1 straight, 25 waypoints
    assert list(result.model.hparams.hidden_sizes) == [16] and result.model.hparams.vector_size == 14
    assert result.trainer.callback_metrics["eval/episodes"] == 10  # data.eval_episodes, as defaulted


def test_settings_given_with_a_checkpoint_go_over_what_it_was_trained_on(exported):
    result = cli.main(["validate", "--ckpt_path", str(exported), "--data.env.scenario", "2",
                       "--data.eval_episodes", "2"])
    assert result.datamodule.env == EnvConfig(**{**TINY_ENV, "scenario": 2})
    assert result.datamodule.eval_episodes == 2


def test_a_checkpoint_alone_still_refuses_a_camera_it_did_not_learn_from(exported):
    with pytest.raises(ConfigError, match="the agent learned from frames of"):
        cli.main(["validate", "--ckpt_path", str(exported), "--data.env.pixels_per_meter", "2.5"])


def test_the_episode_gif_of_a_checkpoint_alone_drives_the_env_it_was_trained_on(checkpoint, exported, tmp_path):
    alone = record_episode([], exported, seed=5, out=tmp_path / "alone.gif")
    with_config = record_episode([checkpoint.parent.parent / "tiny.yaml"], exported, seed=5, out=tmp_path / "c.gif")
    assert alone == with_config
    assert (tmp_path / "alone.gif").read_bytes() == (tmp_path / "c.gif").read_bytes()
