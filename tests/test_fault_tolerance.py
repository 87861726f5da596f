"""Run-level faults: stop signals, unwritable or full output directories — each met before or without losing work."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
from lightning_td3.errors import StopRequested, StorageError
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import load_shard, shard_name
from tests.faults import FaultPlan, install
from tests.test_resume import assert_same_tree
from tests.tiny_run import fit, tiny_config

ROOT = Path(__file__).resolve().parent.parent


class CliRun:
    """`python cli.py fit` in a subprocess, its output collected line by line."""

    def __init__(self, config: Path):
        self.process = subprocess.Popen(
            [sys.executable, "cli.py", "fit", "--config", str(config)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, what: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"exited before {what}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=120)
        time.sleep(0.2)  # let the reader take the last lines
        return code


def test_sigterm_mid_training_writes_a_checkpoint_exits_0_and_says_how_to_resume(tmp_path):
    config = tiny_config(tmp_path, **{"trainer.max_epochs": 1000})
    run = CliRun(config)
    first = tmp_path / "checkpoints" / "epoch=0-step=9.ckpt"
    run.wait_for(first.exists, "first checkpoint")
    signalled = time.time()

    assert run.stop(signal.SIGTERM) == 0, run.output[-3000:]

    assert "SIGTERM received: finishing the current step" in run.output
    assert "weights_only" not in run.output  # the stop's checkpoint is a full one, and says nothing about it
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    progress = saved["td3_progress"]
    assert f"stopped by SIGTERM at env step {progress['env_steps']}; checkpoint written to " in run.output
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_mtime >= signalled, "written on the signal"
    command = run.output.split("Resume with:\n")[1].strip().splitlines()[0]
    arguments = shlex.split(command)
    assert arguments[:4] == ["python", "cli.py", "fit", "--config"] and "--ckpt_path" in arguments

    result = cli.main([*arguments[2:], "--trainer.max_epochs", str(saved["epoch"] + 2)])
    assert result.model.updates == 6 * (saved["epoch"] + 2)
    assert result.model.env_steps >= progress["env_steps"]


def test_sigint_during_warm_up_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    # Room for every step a fast machine takes before the signal: a full ring would drop the oldest transitions.
    capacity = 5000
    config = tiny_config(tmp_path, **{"trainer.callbacks.0.init_args.learning_starts": 100_000,
                                      "data.buffer_capacity": capacity})
    run = CliRun(config)
    run.wait_for(lambda: "SIGINT/SIGTERM stop the run with a checkpoint" in run.output, "signal handlers")
    time.sleep(3.0)  # into the warm-up (its envs take a moment to build)

    assert run.stop(signal.SIGINT) == 0, run.output[-3000:]

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    progress = saved["td3_progress"]
    assert progress["env_steps"] < 100_000 and progress["updates"] == 0
    assert f"stopped by SIGINT at env step {progress['env_steps']}" in run.output
    assert "Traceback" not in run.output
    # Stopped between two vector steps: the replay file holds exactly the transitions counted.
    record = saved["ReplayDataModule"]["replay_file"]
    assert progress["env_steps"] < capacity / 2, "the ring never filled"
    buffer = ReplayBuffer(capacity, 2, 14)
    load_shard(tmp_path / "checkpoints" / "replay" / shard_name(record["key"], 0, 1), buffer, record["key"], 0, 1)
    assert len(buffer) == progress["env_steps"]


def eval_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every eval/* value the run logged to TensorBoard, by tag, as (step, value)."""
    values = {}
    for version in sorted((run_dir / "logs" / "tiny").iterdir()):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("eval/"):
                values.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return values


def test_sigterm_during_an_evaluation_stops_before_its_next_episode_and_the_resumed_run_evaluates_it_again(tmp_path):
    settings = {"trainer.max_epochs": 2, "data.eval_episodes": 8}
    episodes = tmp_path / "episodes.txt"
    fit(tmp_path / "straight_through", **settings)
    with pytest.raises(StopRequested, match="stopped by SIGTERM at env step"):
        fit(tmp_path / "interrupted", "--trainer.callbacks+=tests.faults.StopInEvaluation",
            f"--trainer.callbacks.init_args.log={episodes}", "--trainer.callbacks.init_args.after=2", **settings)
    # Signalled as its third episode of 8 ended: it drove no fourth.
    assert episodes.read_text().splitlines() == ["0 0 0", "0 0 1", "0 0 2"]
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == ["last.ckpt"]

    fit(tmp_path / "interrupted", "--ckpt_path", "last", **settings)

    # The interrupted evaluation ran again, whole: the same eval/* values at the same steps as without the stop.
    expected = eval_scalars(tmp_path / "straight_through")
    assert len(expected["eval/success_rate"]) == 2
    assert eval_scalars(tmp_path / "interrupted") == expected
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == [
        "epoch=0-step=9.ckpt", "epoch=1-step=18.ckpt", "last.ckpt"]
    straight, resumed = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
                         for run in (tmp_path / "straight_through", tmp_path / "interrupted"))
    assert_same_tree(straight["td3_progress"], resumed["td3_progress"], "td3_progress")  # counters, RNG states
    for name, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), f"{name} differs after the resume"


def under_a_regular_file(tmp_path: Path) -> Path:
    """A path no one can create, root included: its parent is a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    return blocker / "out"


@pytest.mark.parametrize(
    "setting, role",
    [
        ("trainer.callbacks.1.init_args.dirpath", "checkpoint"),
        ("trainer.logger.init_args.save_dir", "log"),
    ],
)
def test_an_unwritable_output_directory_stops_the_run_before_any_env_step(tmp_path, monkeypatch, setting, role):
    plan = install(monkeypatch, FaultPlan())
    blocked = under_a_regular_file(tmp_path)
    with pytest.raises(StorageError, match=f"the {role} directory {blocked} is not writable"):
        fit(tmp_path, **{setting: str(blocked)})
    assert plan.steps == 0 and plan.resets == 0


def test_too_little_free_disk_space_stops_the_run_before_any_env_step(tmp_path, monkeypatch):
    plan = install(monkeypatch, FaultPlan())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lightning_td3.fault_tolerance.shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))
    # One replay file kept plus the one being written, at capacity (2 envs of a 14-entry vector).
    replay_gb = 2 * 1_000_000 * ReplayBuffer(4, 2, 14).bytes_per_transition / 1e9
    with pytest.raises(StorageError, match=rf"1.00 GB free, about .* {replay_gb:.2f} GB of replay files at "
                                           r"data.buffer_capacity=1000000"):
        fit(tmp_path, **{"data.buffer_capacity": 1_000_000})
    assert plan.steps == 0 and plan.resets == 0
    assert not (tmp_path / "checkpoints" / "replay").exists()


def test_a_full_disk_during_a_checkpoint_write_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from lightning_td3.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(10)}, path)

    def disk_full(obj, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lightning_td3.checkpointing.torch.save", disk_full)
    with pytest.raises(StorageError, match=f"could not write {path} .No space left on device.; the previous file"):
        io.save_checkpoint({"weights": torch.arange(20)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(10))
