"""Resume: fit to N, stop, `fit --ckpt_path last` to 2N equals one uninterrupted run to 2N."""

import copy
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_td3.checkpointing import tensors_to_arrays
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import load_shard, shard_name
from tests.tiny_run import TINY_ENV, fit, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def load(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def load_replay(checkpoint: dict) -> tuple[dict, dict]:
    """The replay contents and the sampler's RNG state that a checkpoint's replay file holds."""
    record = checkpoint["ReplayDataModule"]["replay_file"]
    buffer = ReplayBuffer(500, num_envs=2, vector_size=EnvConfig(**TINY_ENV).vector_size)
    path = Path(record["directory"]) / shard_name(record["key"], 0, 1)
    extra = load_shard(path, buffer, record["key"], 0, 1)
    return buffer.state_dict(), extra


# With a learning-rate decay too: a resumed run must take it up at its update count, not start it over. With tasks
# drawn per episode too: the resumed envs must draw the tasks the uninterrupted ones drew.
TASK_DISTRIBUTIONS = ("--data.env.scenario", "[0, 2]", "--data.env.lanes", "{low: 2, high: 4}",
                      "--data.env.route_length_m", "{low: 100, high: 140}", "--data.env.max_steps", "{per_km: 80}")


@pytest.mark.parametrize(
    "settings", [(), ("--model.init_args.lr_decay_updates", "9"), TASK_DISTRIBUTIONS],
    ids=["constant_lr", "lr_decay", "task_distributions"],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, settings):
    fit(tmp_path / "straight_through", *settings, **{"trainer.max_epochs": 2})
    fit(tmp_path / "interrupted", *settings, **{"trainer.max_epochs": 1})
    first_half = load(tmp_path / "interrupted")
    fit(tmp_path / "interrupted", *settings, "--ckpt_path", "last", **{"trainer.max_epochs": 2})

    expected, resumed = load(tmp_path / "straight_through"), load(tmp_path / "interrupted")
    assert first_half["td3_progress"]["updates"] == 6
    assert resumed["td3_progress"]["updates"] == expected["td3_progress"]["updates"] == 12
    assert resumed["td3_progress"]["env_steps"] == expected["td3_progress"]["env_steps"]
    assert resumed["td3_progress"]["episodes"] == expected["td3_progress"]["episodes"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), f"{name} differs after resume"
    for expected_opt, resumed_opt in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for key, state in expected_opt["state"].items():
            for field, tensor in state.items():
                assert torch.equal(tensor, resumed_opt["state"][key][field]), f"optimizer state {field} differs"
    assert_same_tree(load_replay(expected), load_replay(resumed), "replay")
    # One process: the Collector's per-process list has one entry.
    (expected_collector,) = expected["callbacks"]["Collector"]["per_process"]
    (resumed_collector,) = resumed["callbacks"]["Collector"]["per_process"]
    assert_same_tree(
        {k: v for k, v in expected_collector.items() if k != "env_states"},
        {k: v for k, v in resumed_collector.items() if k != "env_states"},
        "collector",
    )
    assert_same_futures(expected_collector["env_states"], resumed_collector["env_states"])


def assert_same_futures(expected_states: bytes, resumed_states: bytes) -> None:
    """The training envs were left in the same state: the same actions from here give the same observations."""
    config = EnvConfig(**TINY_ENV)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 2))
    for expected_state, resumed_state in zip(pickle.loads(expected_states), pickle.loads(resumed_states)):
        rollouts = []
        for state in (expected_state, resumed_state):
            env = DrivingEnv(config)
            env.reset(seed=0)
            env.set_state(state)
            rollouts.append([env.step(action)[:2] for action in actions])
            env.close()
        for (obs_a, reward_a), (obs_b, reward_b) in zip(*rollouts):
            assert np.array_equal(obs_a["image"], obs_b["image"]) and np.array_equal(obs_a["vector"], obs_b["vector"])
            assert reward_a == reward_b


def assert_same_tree(expected, actual, where: str) -> None:
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tree(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (item, actual_item) in enumerate(zip(expected, actual)):
            assert_same_tree(item, actual_item, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs after resume"
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(expected, actual), f"{where} differs after resume"
    else:
        assert expected == actual, f"{where} differs after resume"


class RestoredState(pl.Callback):
    """Records what a resumed run starts training from, to compare with the checkpoint it resumed."""

    def on_fit_start(self, trainer, module):
        # Before Lightning's first batch fetch, as the checkpoint left them (the loaders' iterators draw their seeds
        # from the loaders' own generators, not from torch's RNG).
        self.rng = (torch.get_rng_state(), np.random.get_state(legacy=False), random.getstate())

    def on_train_start(self, trainer, module):  # optimizers are restored after on_fit_start
        data = trainer.datamodule
        collector = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Collector")
        self.state = {
            "weights": copy.deepcopy(module.state_dict()),
            "optimizers": [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers],
            "counters": (module.env_steps, module.episodes, module.updates),
            "rng": self.rng,
            "collector_rng": collector._rng.bit_generator.state,
            "sampler_rng": data._sampler_rng.bit_generator.state,
            "replay": copy.deepcopy(data.buffer.state_dict()),
        }


def test_after_a_sigkill_resume_starts_from_exactly_the_last_checkpoint(tmp_path):
    """Killed at a random moment after its first checkpoint (maybe mid-write), the run resumes bit for bit."""
    run_dir = tmp_path / "killed"
    config = tiny_config(run_dir, **{"trainer.max_epochs": 1000})
    run = subprocess.Popen([sys.executable, "cli.py", "fit", "--config", str(config)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    delay = random.uniform(0.0, 1.5)
    time.sleep(delay)
    run.kill()
    run.wait()

    checkpoint = load(run_dir)  # what survived the kill must load whole
    progress = checkpoint["td3_progress"]
    replay, extra = load_replay(checkpoint)  # before the resumed run's first checkpoint prunes this replay file
    result = fit(run_dir, "--ckpt_path", "last", "--trainer.callbacks+=tests.test_resume.RestoredState",
                 **{"trainer.max_epochs": checkpoint["epoch"] + 2})
    # The CLI imports this module as tests.test_resume, pytest under another name: match the class by name.
    (restored,) = [cb for cb in result.trainer.callbacks if type(cb).__name__ == "RestoredState"]
    state, where = restored.state, f"(killed {delay:.2f} s after the first checkpoint)"

    assert state["counters"] == (progress["env_steps"], progress["episodes"], progress["updates"]), where
    assert_same_tree(checkpoint["state_dict"], dict(state["weights"]), f"weights {where}")
    for saved, live in zip(checkpoint["optimizer_states"], state["optimizers"]):
        assert_same_tree(saved["state"], live["state"], f"optimizer {where}")
    torch_rng, numpy_rng, python_rng = state["rng"]
    assert torch.equal(torch_rng, progress["rng"]["torch"]), where
    assert_same_tree(tensors_to_arrays(progress["rng"]["numpy"]), numpy_rng, f"numpy rng {where}")
    assert python_rng == progress["rng"]["python"], where
    assert state["collector_rng"] == checkpoint["callbacks"]["Collector"]["per_process"][0]["rng"], where
    assert state["sampler_rng"] == extra["sampler_rng"], where
    assert_same_tree(replay, state["replay"], f"replay {where}")


def test_a_resumed_fit_uses_its_own_adam_capturable_flag_not_the_checkpoints(tmp_path):
    """Adam's `capturable` is saved with its state and comes back with it: a checkpoint of a graphed GPU fit (true)
    resumed on a CPU must step eagerly (false), and a CPU checkpoint (false) resumed with graphs must be recordable
    (true; tests/test_gpu.py resumes one on a GPU)."""
    fit(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    for optimizer_state in checkpoint["optimizer_states"]:
        assert not any(group["capturable"] for group in optimizer_state["param_groups"])
        for group in optimizer_state["param_groups"]:
            group["capturable"] = True  # as a graphed GPU fit writes it
    torch.save(checkpoint, last)
    result = fit(tmp_path, "--ckpt_path", str(last), **{"trainer.max_epochs": 2})
    assert [group["capturable"] for optimizer in result.trainer.optimizers for group in optimizer.param_groups] == [
        False, False
    ]
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["td3_progress"]["updates"] == 12
