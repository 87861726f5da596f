"""Checkpoint and replay files: atomic writes, a clear error for damage, nothing overwritten, replay optional
for evaluation, old replay files pruned."""

from __future__ import annotations

import shutil

import pytest
import torch

import cli
from datamodules.replay import ReplayDataModule
from lightning_td3.checkpointing import AtomicCheckpointIO
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import CheckpointError
from tests.tiny_run import TINY_ENV, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (2 epochs): its checkpoints and their replay files."""
    run_dir = tmp_path_factory.mktemp("trained")
    fit(run_dir, **{"trainer.max_epochs": 2})
    return run_dir


def snapshot(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


class ExplodingOnPickle:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_failure_mid_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(10)}, path)
    before = path.read_bytes()
    # The tensor is written, then pickling the next entry fails: torch.save dies with the file half written.
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"weights": torch.arange(10_000), "z": ExplodingOnPickle()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["weights"], torch.arange(10))


def test_two_epochs_keep_the_replay_file_last_names_and_the_one_before(trained):
    checkpoints = trained / "checkpoints"
    # The newest, shared by the second epoch's checkpoint and last.ckpt, and the first epoch's: had the run been
    # killed while the second epoch's checkpoints were written, last.ckpt would still name that one.
    before, replay_file = sorted((checkpoints / "replay").iterdir())
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    first = torch.load(checkpoints / "epoch=0-step=9.ckpt", weights_only=True)  # 6 updates = 9 optimizer steps
    assert last["ReplayDataModule"]["replay_file"]["key"] in replay_file.name
    assert first["ReplayDataModule"]["replay_file"]["key"] in before.name
    assert last["ReplayDataModule"]["replay_file"]["world_size"] == 1
    # Replay is not inside the checkpoint any more.
    assert set(last["ReplayDataModule"]) == {"replay_file"}


def test_validate_from_a_checkpoint_needs_no_replay_file(trained, tmp_path, monkeypatch):
    shutil.copy(trained / "checkpoints" / "last.ckpt", tmp_path / "weights_only.ckpt")

    def no_replay_reads(*args, **kwargs):
        raise AssertionError("validate read a replay file")

    monkeypatch.setattr("datamodules.replay.load_shard", no_replay_reads)
    result = cli.main(["validate", "--config", str(trained / "tiny.yaml"),
                       "--ckpt_path", str(tmp_path / "weights_only.ckpt")])
    assert "eval/success_rate" in result.trainer.callback_metrics


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "damaged or truncated"),
        (lambda path: path.write_bytes(b"not a checkpoint at all"), "is not a PyTorch checkpoint file"),
    ],
)
def test_a_damaged_checkpoint_stops_with_its_name_and_nothing_is_overwritten(trained, tmp_path, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "tiny.yaml").write_text((trained / "tiny.yaml").read_text().replace(str(trained), str(run_dir)))
    damage(run_dir / "checkpoints" / "last.ckpt")
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=message) as raised:
        cli.main(["fit", "--config", str(run_dir / "tiny.yaml"), "--ckpt_path", "last",
                  "--trainer.max_epochs", "4"])
    assert str(run_dir / "checkpoints" / "last.ckpt") in str(raised.value)
    assert snapshot(run_dir / "checkpoints") == before


def test_a_damaged_replay_file_stops_the_resume_with_its_name_and_nothing_is_overwritten(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "tiny.yaml").write_text((trained / "tiny.yaml").read_text().replace(str(trained), str(run_dir)))
    replay_file = sorted((run_dir / "checkpoints" / "replay").iterdir())[-1]  # the newest: last.ckpt's
    replay_file.write_bytes(replay_file.read_bytes()[:-1000])  # as if the disk filled up mid-copy
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="truncated") as raised:
        cli.main(["fit", "--config", str(run_dir / "tiny.yaml"), "--ckpt_path", "last",
                  "--trainer.max_epochs", "4"])
    # Found next to the moved checkpoint, not at the original run's path.
    assert str(replay_file) in str(raised.value)
    assert snapshot(run_dir / "checkpoints") == before


def test_replay_saved_by_another_world_size_is_refused():
    data = ReplayDataModule(env=EnvConfig(**TINY_ENV), num_envs=2, buffer_capacity=100)
    data.setup("fit")
    with pytest.raises(CheckpointError, match="saved by 2 rank"):
        data.load_state_dict({"replay_file": {"key": "k", "world_size": 2, "directory": "/nowhere"}})
