"""Soak: a long fit with faults injected at random — simulator crashes, NaN batches, SIGTERMs with resumes — whose
counters, replay and checkpoints must still add up at the end. Not in the default suite: `pytest -m slow`."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_td3.errors import StopRequested
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import load_shard, shard_name
from tests.faults import FaultPlan, PoisonedBatches, install
from tests.tiny_run import fit

EPOCHS = int(os.environ.get("SOAK_EPOCHS", 25))
UPDATES_PER_EPOCH = 40
WARM_UP = 30
NUM_ENVS = 2


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_a_long_run_with_random_faults_keeps_counters_replay_and_checkpoints_consistent(tmp_path, monkeypatch):
    crashes = install(monkeypatch, FaultPlan(step_crash_rate=0.01, seed=1))
    poison = PoisonedBatches(rate=0.02, seed=2).install(monkeypatch)
    settings = {
        "trainer.max_epochs": EPOCHS,
        "trainer.limit_train_batches": UPDATES_PER_EPOCH,
        # Big enough that nothing is overwritten: then every counted env step is one transition in replay.
        "data.buffer_capacity": 4 * EPOCHS * UPDATES_PER_EPOCH,
        "trainer.callbacks.0.init_args.max_env_failures": 4,
        "model.init_args.max_nonfinite_updates": 4,
        # Evaluation episodes are not what is soaked here (a simulator crash there ends the run).
        "trainer.limit_val_batches": 0,
    }
    arguments = ["--trainer.callbacks+=tests.faults.RandomStops",
                 "--trainer.callbacks.init_args.rate=0.01", "--trainer.callbacks.init_args.seed=3"]
    stops = 0
    while True:
        try:
            result = fit(tmp_path, *arguments, *(["--ckpt_path", "last"] if stops else []), **settings)
            break
        except StopRequested:
            stops += 1
            arguments[-1] = f"--trainer.callbacks.init_args.seed={3 + stops}"  # a fresh stop schedule for the resumed run
    module = result.model
    (collector,) = [callback for callback in result.trainer.callbacks if type(callback).__name__ == "Collector"]

    print(f"\nsoak: {EPOCHS * UPDATES_PER_EPOCH} batches, {module.env_steps} env steps, {stops} SIGTERM stops, "
          f"{collector.env_failures} simulator crashes, {module.skipped_updates} skipped updates "
          f"({poison.poisoned} NaN batches injected)")
    assert stops > 0 and crashes.crashes > 0 and poison.poisoned > 0, "every kind of fault must have happened"
    # Counters: every batch is an update step (skipped ones included); one update per env step after warm-up.
    assert module.updates == EPOCHS * UPDATES_PER_EPOCH
    assert module.skipped_updates == poison.poisoned
    assert 0 <= module.env_steps - WARM_UP - module.updates < NUM_ENVS
    assert collector.env_failures == crashes.crashes

    # The last checkpoint is the final state, and its replay file holds exactly the counted transitions.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    progress = checkpoint["td3_progress"]
    assert (progress["env_steps"], progress["updates"], progress["skipped_updates"], progress["episodes"]) == (
        module.env_steps, module.updates, module.skipped_updates, module.episodes
    )
    assert checkpoint["callbacks"]["Collector"]["per_process"][0]["env_failures"] == collector.env_failures
    record = checkpoint["ReplayDataModule"]["replay_file"]
    replay_dir = tmp_path / "checkpoints" / "replay"
    buffer = ReplayBuffer(settings["data.buffer_capacity"], NUM_ENVS, 14)
    load_shard(replay_dir / shard_name(record["key"], 0, 1), buffer, record["key"], 0, 1)
    assert len(buffer) == module.env_steps
    assert len(list(replay_dir.iterdir())) == 1, "old replay files are pruned"
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
