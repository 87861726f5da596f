"""Training and evaluation on one CARLA server, through the real CLI, Collector, module and CARLA backend; only the
server is a test double (`CarlaServerDoubles` from tests/faults.py, whose world is the fixture world of
tests/test_carla_backend.py): evaluation never shares the world with the training envs, a failed evaluation episode
does not end the run, and the server is handed back in the settings it was found in."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_td3.envs import carla_backend
from tests.faults import CarlaServerDoubles
from tests.tiny_run import fit

SERVER = "localhost:2000"  # data.env.carla's default address
EPOCHS = 2  # validation after each: the training envs must run again after the first
UPDATES_PER_EPOCH = 6


def carla_fit(run_dir: Path, monkeypatch, **doubles) -> tuple[object, CarlaServerDoubles]:
    monkeypatch.setattr(carla_backend.carla, "Client", carla_backend.carla.Client)  # the doubles' install is undone
    env = {"backend": "carla", "route_length_m": 100.0, "max_steps": 12, "num_waypoints": 5,
           "carla": {"timeout_s": 0.5, "npc_vehicles": [2, 2, 2]}}
    result = fit(run_dir, **{
        "data.env": env, "data.num_envs": 1, "trainer.max_epochs": EPOCHS,
        "trainer.limit_train_batches": UPDATES_PER_EPOCH,
        "trainer.callbacks": _callbacks(run_dir) + [{
            "class_path": f"{CarlaServerDoubles.__module__}.CarlaServerDoubles",
            "init_args": {"servers": [SERVER], **doubles},
        }],
    })
    (server_doubles,) = [c for c in result.trainer.callbacks if isinstance(c, CarlaServerDoubles)]
    return result, server_doubles


def _callbacks(run_dir: Path) -> list[dict]:
    return [
        {"class_path": "lightning_td3.collector.Collector", "init_args": {"learning_starts": 30, "async_envs": False}},
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run_dir / "checkpoints"), "every_n_epochs": 1, "save_top_k": -1,
                       "save_last": True}},
    ]


def eval_scalars(run_dir: Path, name: str) -> list[float]:
    (event_dir,) = {path.parent for path in (run_dir / "logs").rglob("events.out.tfevents.*")}
    return [event.value for event in EventAccumulator(str(event_dir)).Reload().Scalars(name)]


@pytest.fixture(scope="module")
def module_monkeypatch():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def carla_run(tmp_path_factory, module_monkeypatch):
    run_dir = tmp_path_factory.mktemp("carla_run")
    result, doubles = carla_fit(run_dir, module_monkeypatch)
    return run_dir, result, doubles.servers.worlds["localhost", 2000]


def test_evaluation_never_shares_the_world_with_the_training_envs(carla_run):
    run_dir, result, world = carla_run
    assert world.most_egos_in_a_tick == 1  # the training ego and the evaluation ego never met
    # Training went on after the first validation, on rebuilt envs, without a failure.
    progress = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert progress["td3_progress"]["updates"] == EPOCHS * UPDATES_PER_EPOCH
    assert progress["callbacks"]["Collector"]["per_process"][0]["env_failures"] == 0
    assert eval_scalars(run_dir, "eval/episodes") == [1.0] * EPOCHS


def test_the_server_is_handed_back_as_found_after_the_run(carla_run):
    _, _, world = carla_run
    assert not world.settings.synchronous_mode and not world.settings.fixed_delta_seconds
    assert not world.traffic_managers[8000].synchronous
    assert world.alive() == []


def test_a_failed_evaluation_episode_is_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="evaluation episode with seed 10000 failed .*time-out"):
        result, doubles = carla_fit(tmp_path, monkeypatch, time_out_in_validation=0)
    assert eval_scalars(tmp_path, "eval/failed_episodes") == [1.0, 0.0]
    assert eval_scalars(tmp_path, "eval/episodes") == [0.0, 1.0]
    progress = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["td3_progress"]
    assert progress["updates"] == EPOCHS * UPDATES_PER_EPOCH
    assert doubles.servers.worlds["localhost", 2000].alive() == []
