"""A trained agent ships as its actor alone: export, evaluate it through the CLI, refuse it where it cannot serve."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import cli
from lightning_td3 import crashes
from lightning_td3.baselines import RandomPolicy
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.errors import CheckpointError, UserError
from lightning_td3.evaluation import evaluate
from lightning_td3.export import ACTOR_ONLY_KEY, export_actor
from lightning_td3.figures import (
    eval_scalars_vs_env_steps,
    eval_scalars_vs_minutes,
    plot_learning_curve,
    record_episode,
)
from lightning_td3.figures import main as figures_main
from lightning_td3.grid import read_grid
from lightning_td3.replay import ReplayBuffer
from lightning_td3.replay_file import END, save_shard
from lightning_td3.run_config import env_config_of, trained_agent
from lightning_td3.td3 import TD3, fast_settings
from tests.tiny_run import fit

ROOT = Path(__file__).resolve().parent.parent
# What agents/ ships: each agent's recipe is configs/experiments/<name>.yaml.
SHIPPED_AGENTS = ("scenario0_straight_capped", "scenario1_curvy_asymmetric", "scenario2_straight_capped", "generalist")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    fit(run_dir)
    exported = run_dir / "actor.ckpt"
    export_actor(run_dir / "checkpoints" / "last.ckpt", exported)
    return run_dir, exported


def test_export_keeps_only_the_actor_in_half_precision(trained):
    run_dir, exported = trained
    full = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    shipped = torch.load(exported, weights_only=True)
    actor = {name: value for name, value in full["state_dict"].items() if name.startswith("actor.")}
    assert set(shipped["state_dict"]) == set(actor)
    for name, value in shipped["state_dict"].items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(value, actor[name].half(), rtol=0, atol=0)
    assert shipped[ACTOR_ONLY_KEY]["env_steps"] == full["td3_progress"]["env_steps"]
    assert exported.stat().st_size < (run_dir / "checkpoints" / "last.ckpt").stat().st_size / 4


def test_validate_evaluates_the_exported_actor_with_its_weights(trained):
    run_dir, exported = trained
    result = cli.main(["validate", "--config", str(run_dir / "tiny.yaml"), "--ckpt_path", str(exported)])
    module = result.model
    shipped = torch.load(exported, weights_only=True)["state_dict"]
    for name, value in module.actor.state_dict().items():
        assert torch.equal(value, shipped[f"actor.{name}"].float()), name
    assert module.actor.head[0].weight.dtype == torch.float32
    assert "eval/success_rate" in result.trainer.callback_metrics


def test_fit_refuses_an_exported_actor_and_keeps_the_file(trained):
    run_dir, exported = trained
    before = exported.read_bytes()
    with pytest.raises(CheckpointError, match="only an actor's weights"):
        fit(run_dir / "again", "--ckpt_path", str(exported))
    assert exported.read_bytes() == before


def test_the_critics_are_read_from_a_training_checkpoint_and_refused_from_an_exported_actor(trained):
    run_dir, exported = trained
    full = TD3.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8, generator=generator)
    vector = torch.randn(3, full.hparams.vector_size, generator=generator)
    with torch.no_grad():
        q1, q2 = full.critic(image, vector, full.actor(image, vector))
    value = full.value({"image": image.numpy(), "vector": vector.numpy()})
    torch.testing.assert_close(torch.as_tensor(value), torch.minimum(q1, q2))  # the clipped double-Q, as the target
    brake = torch.tensor([[0.0, -1.0]] * 3)  # a given action instead of the actor's (crashes --replay)
    with torch.no_grad():
        braking = torch.minimum(*full.critic(image, vector, brake))
    value_of_braking = full.value({"image": image.numpy(), "vector": vector.numpy()}, brake.numpy())
    torch.testing.assert_close(torch.as_tensor(value_of_braking), braking)
    assert not torch.allclose(braking, torch.minimum(q1, q2))
    observation = {"image": image[0].numpy(), "vector": vector[0].numpy()}
    assert full.policy().value(observation) == pytest.approx(float(value[0]))
    shipped = TD3.load_from_checkpoint(exported, map_location="cpu")
    with pytest.raises(CheckpointError, match="an exported actor has no trained critics"):
        shipped.policy().value(observation)


def test_a_checkpoint_of_another_shape_names_the_parameter_and_the_settings(trained, tmp_path):
    run_dir, exported = trained
    config = yaml.safe_load((run_dir / "tiny.yaml").read_text())
    config["model"]["init_args"]["hidden_sizes"] = [24]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    # The CLI takes the architecture from the checkpoint itself; a checkpoint that does not say it cannot.
    stripped = torch.load(exported, weights_only=True)
    stripped["hyper_parameters"] = {}
    unlabelled = tmp_path / "unlabelled.ckpt"
    torch.save(stripped, unlabelled)
    with pytest.raises(CheckpointError, match=r"shape \(16, 526\), this model \(24, 526\).*'hidden_sizes': \[16\]"):
        cli.main(["validate", "--config", str(other), "--ckpt_path", str(unlabelled)])


def test_the_agent_keeps_the_camera_it_learned_from_and_refuses_frames_of_another(trained, tmp_path):
    run_dir, exported = trained
    learned = {"backend": "highway", "pixels_per_meter": 1.75, "frame_ego_position": 0.3}  # highway's defaults
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["td3_progress"]["camera"] == learned
    assert torch.load(exported, weights_only=True)[ACTOR_ONLY_KEY]["camera"] == learned
    zoomed_out = ["--data.env.pixels_per_meter", "1.25"]
    for checkpoint in (exported, run_dir / "checkpoints" / "last.ckpt"):
        with pytest.raises(UserError, match=r"learned from frames of \{'backend': 'highway', 'pixels_per_meter': 1.75, "
                                            r".* but data.env gives frames of \{.*'pixels_per_meter': 1.25,"):
            cli.main(["validate", "--config", str(run_dir / "tiny.yaml"), *zoomed_out, "--ckpt_path", str(checkpoint)])
    # An actor exported before the camera was kept (every one under agents/ up to row (j)) is not checked for it.
    unrecorded = torch.load(exported, weights_only=True)
    unrecorded[ACTOR_ONLY_KEY]["camera"] = None
    torch.save(unrecorded, tmp_path / "unrecorded.ckpt")
    result = cli.main(["validate", "--config", str(run_dir / "tiny.yaml"), *zoomed_out,
                       "--ckpt_path", str(tmp_path / "unrecorded.ckpt")])
    assert result.datamodule.env.pixels_per_meter == 1.25 and "eval/success_rate" in result.trainer.callback_metrics
    # A record written before the ego's place in the frame was a setting: its frames had the ego at 0.3.
    unplaced = torch.load(exported, weights_only=True)
    del unplaced[ACTOR_ONLY_KEY]["camera"]["frame_ego_position"]
    torch.save(unplaced, tmp_path / "unplaced.ckpt")
    result = cli.main(["validate", "--config", str(run_dir / "tiny.yaml"),
                       "--ckpt_path", str(tmp_path / "unplaced.ckpt")])
    assert "eval/success_rate" in result.trainer.callback_metrics
    with pytest.raises(UserError, match=r"learned from frames of .*'frame_ego_position': 0.3.* but data.env gives "
                                        r"frames of .*'frame_ego_position': 0.12"):
        cli.main(["validate", "--config", str(run_dir / "tiny.yaml"), "--data.env.frame_ego_position", "0.12",
                  "--ckpt_path", str(tmp_path / "unplaced.ckpt")])
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="learned from frames of"):
        fit(tmp_path / "resumed", *zoomed_out, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    config = yaml.safe_load((run_dir / "tiny.yaml").read_text())
    config["data"]["env"]["pixels_per_meter"] = 1.25
    zoomed_config = tmp_path / "zoomed.yaml"
    zoomed_config.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as stopped:
        crashes.main(["--config", str(zoomed_config), "--ckpt", str(exported), "--seed", "3", "--episodes", "1"])
    assert str(stopped.value.code).startswith("error: the agent learned from frames of") and "\n" not in str(stopped.value.code)


def test_crashes_reads_the_critics_on_its_runs_replay_and_refuses_a_replay_of_another_vector_size(trained, tmp_path,
                                                                                                  capsys):
    run_dir, _ = trained
    arguments = ["--config", str(run_dir / "tiny.yaml"), "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"),
                 "--seed", "3", "--episodes", "1"]
    (own_replay,) = (run_dir / "checkpoints" / "replay").glob("*.bin")
    crashes.main([*arguments, "--replay", str(own_replay)])
    assert f"replay {own_replay}: " in capsys.readouterr().out
    other_run = ReplayBuffer(capacity=20, num_envs=1, vector_size=3)  # empty: only its vector size matters here
    other_replay = tmp_path / "other-run.bin"
    save_shard(other_replay, other_run, "other", 0, 1, {})
    # Its checksum spoiled: the refusal comes from the header, before the file is read through.
    written = bytearray(other_replay.read_bytes())
    written[-len(END) - 1] ^= 0x01
    written = bytes(written)
    other_replay.write_bytes(written)
    with pytest.raises(SystemExit) as stopped:
        crashes.main([*arguments, "--replay", str(other_replay)])
    message = str(stopped.value.code)
    assert message.startswith(f"error: replay file {other_replay} holds vectors of 3 but ") and "of 14" in message
    assert "\n" not in message and other_replay.read_bytes() == written


def test_export_refuses_a_file_that_is_not_a_td3_checkpoint(tmp_path):
    baseline = tmp_path / "baseline.ckpt"
    torch.save({"state_dict": {"eval_metrics.x": torch.zeros(1)}, "pytorch-lightning_version": "2"}, baseline)
    with pytest.raises(CheckpointError, match="not a TD3 checkpoint"):
        export_actor(baseline, tmp_path / "out.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint .*garbage.ckpt is damaged or truncated"):
        export_actor(garbage, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def shipped_agent(name: str) -> tuple[TD3, EnvConfig]:
    """agents/<name>.ckpt, loaded, and the env it records it was trained on."""
    agent = TD3.load_from_checkpoint(ROOT / "agents" / f"{name}.ckpt", map_location="cpu")
    return agent, EnvConfig(**agent.trained_env)


def generalist_cells(trained_env: EnvConfig) -> dict[str, EnvConfig]:
    """The env of each cell of configs/grids/generalist.yaml, by name, over the env an agent was trained on."""
    return {cell.name: cell.env for cell in read_grid(ROOT / "configs/grids/generalist.yaml", trained_env)}


@pytest.mark.parametrize("name", SHIPPED_AGENTS)
def test_the_shipped_agent_is_small_and_describes_the_task_its_recipe_trains(name):
    path = ROOT / "agents" / f"{name}.ckpt"
    shipped = torch.load(path, weights_only=True)
    assert path.stat().st_size < 5 * 2**20
    assert {value.dtype for value in shipped["state_dict"].values()} == {torch.float16}
    agent, env_config = shipped_agent(name)
    assert env_config == env_config_of(ROOT / "configs" / "experiments" / f"{name}.yaml")
    recipe = cli.main(["--config", str(ROOT / "configs" / "experiments" / f"{name}.yaml"),
                       "--trainer.accelerator", "cpu"], run=False).model
    for setting in ("vector_size", "hidden_sizes", "layer_norm", "critic_only_vector"):
        assert list(np.atleast_1d(agent.hparams[setting])) == list(np.atleast_1d(recipe.hparams[setting])), setting


def test_learning_curve_reads_the_run_and_draws_both_baselines(trained, tmp_path):
    run_dir, _ = trained
    log_dir = run_dir / "logs" / "tiny" / "version_0"  # the fit's; later validate runs log beside it
    curves = eval_scalars_vs_env_steps(log_dir)
    env_steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["td3_progress"]["env_steps"]
    assert curves["eval/success_rate"][0].tolist() == [env_steps]  # one evaluation, at the end of the one epoch
    png = tmp_path / "curve.png"
    baselines = plot_learning_curve([log_dir], png)
    assert set(baselines) == {"Random", "IDM+MOBIL"}
    assert Image.open(png).size == (1100, 400)
    with pytest.raises(UserError, match="eval/success_rate_vs_env_steps"):
        eval_scalars_vs_env_steps(tmp_path)


def test_the_tools_drive_a_checkpoint_as_validate_does(trained):
    """figures, grid and crashes load agents through `trained_agent`: the same CNN precision and layout as
    `cli.py validate` gives them on this CPU (bf16 where the learner chose it), so the same observation gets the same
    action from both."""
    run_dir, _ = trained
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    agent, env_config = trained_agent(checkpoint)
    validated = cli.main(["validate", "--ckpt_path", str(checkpoint)]).model.cpu()
    assert agent.actor.cnn.bf16 is validated.actor.cnn.bf16 is fast_settings(torch.device("cpu")).get("bf16_cnn", False)
    observation, _ = DrivingEnv(env_config).reset(seed=3)
    batch = {key: value[None] for key, value in observation.items()}
    np.testing.assert_array_equal(agent.act(batch), validated.act(batch))


def test_compare_overlays_runs_against_env_steps_and_the_minutes_since_each_started(trained, tmp_path):
    run_dir, _ = trained
    log_dir = run_dir / "logs" / "tiny" / "version_0"
    (event_file,) = log_dir.glob("events.out.tfevents.*")
    started = float(event_file.name.split(".")[3])
    minutes, values = eval_scalars_vs_minutes(log_dir)["eval/success_rate"]
    steps, same_values = eval_scalars_vs_env_steps(log_dir)["eval/success_rate"]
    assert values.tolist() == same_values.tolist() and len(minutes) == len(steps) == 1
    # The evaluation came after the warm-up and the epoch, within the minutes the fixture's fit took.
    assert 0 < minutes[0] < (event_file.stat().st_mtime - started) / 60 + 1e-6
    png = tmp_path / "compare.png"
    figures_main(["compare", "--run", f"a={log_dir}", "--run", f"b={log_dir}", "--out", str(png)])
    assert Image.open(png).size == (1100, 700)
    with pytest.raises(SystemExit, match="--run nolabel: give LABEL=DIR"):
        figures_main(["compare", "--run", "nolabel", "--out", str(png)])


def test_the_curve_of_a_resumed_run_continues_across_its_log_directories(tmp_path):
    run_dir = tmp_path / "run"
    fit(run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(checkpoint, weights_only=True)["td3_progress"]["env_steps"]
    # Resumed into another folder, as a checkpoint written before it recorded its own folder is (those go on in it).
    fit(run_dir, "--ckpt_path", str(checkpoint), "--trainer.logger.init_args.version", "1",
        **{"trainer.max_epochs": 2})
    second = torch.load(checkpoint, weights_only=True)["td3_progress"]["env_steps"]
    logs = run_dir / "logs" / "tiny"
    resumed_value = eval_scalars_vs_env_steps(logs / "version_1")["eval/success_rate"][1].tolist()
    # As if the first process had evaluated once more after its checkpoint and then crashed: redone by the resumption.
    with SummaryWriter(logs / "version_0") as writer:
        writer.add_scalar("eval/success_rate_vs_env_steps", -1.0, second)

    steps, values = eval_scalars_vs_env_steps(logs / "version_0", logs / "version_1")["eval/success_rate"]
    assert first < second
    assert steps.tolist() == [first, second]
    assert values[1:].tolist() == resumed_value

    png = tmp_path / "curve.png"
    plot_learning_curve([logs / "version_0", logs / "version_1"], png)
    assert Image.open(png).size == (1100, 400)
    config = logs / "version_1" / "config.yaml"
    config.write_text(config.read_text().replace("eval_episodes: 1", "eval_episodes: 2"))
    with pytest.raises(UserError, match="version_1 was evaluated on other episodes than .*version_0"):
        plot_learning_curve([logs / "version_0", logs / "version_1"], tmp_path / "mixed.png")


def test_episode_gif_has_one_frame_per_observation(trained, tmp_path):
    run_dir, exported = trained
    gif = tmp_path / "episode.gif"
    result = record_episode([run_dir / "tiny.yaml"], exported, seed=5, out=gif)
    image = Image.open(gif)
    assert image.n_frames == result["frames"] == result["episode_length"] + 1
    first = np.asarray(image.convert("L"))
    image.seek(image.n_frames - 1)
    last = np.asarray(image.convert("L"))
    assert first.shape == last.shape and not np.array_equal(first, last)
    tiny_env = env_config_of(run_dir / "tiny.yaml")
    assert image.info["duration"] == 1000 // tiny_env.policy_frequency_hz  # plays in real time


# What the critic-only entries read with no other car in range: the car ahead's gap at the range, not closing; then,
# with observe_sides, the four side-lane gaps at the range.
NO_CAR_AHEAD = (1.0, 0.0)
NO_CAR_BESIDE = (1.0, 1.0, 1.0, 1.0)


class _WithoutOtherCars:
    """A policy that hands its own policy every observation with the critic-only entries (the vector's last ones)
    replaced by what they read with no other car in range."""

    def __init__(self, policy, no_car: tuple[float, ...]):
        self.policy = policy
        self.no_car = no_car
        self.changed_observations = 0

    def reset(self, seed: int) -> None:
        self.policy.reset(seed)

    def act(self, observation, env):
        vector = observation["vector"].copy()
        vector[-len(self.no_car):] = self.no_car
        self.changed_observations += not np.array_equal(vector, observation["vector"])
        return self.policy.act({**observation, "vector": vector}, env)


@pytest.mark.parametrize("name, cell, no_car", [
    ("scenario1_curvy_asymmetric", None, NO_CAR_AHEAD),
    ("generalist", "s2-curvy", NO_CAR_AHEAD + NO_CAR_BESIDE),
], ids=["scenario1_curvy_asymmetric", "generalist"])
def test_the_shipped_asymmetric_agents_drive_without_reading_the_other_cars(name, cell, no_car):
    """Their critics read the gaps to other cars in training; the shipped actor drives the same episodes with them
    taken away, so what it shows is driving from the frames and the route."""
    agent, env_config = shipped_agent(name)
    assert agent.hparams.critic_only_vector == len(no_car)
    if cell is not None:
        env_config = generalist_cells(env_config)[cell]
    seeds = [50000, 50001]
    blind_policy = _WithoutOtherCars(agent.policy(), no_car)
    with torch.no_grad():
        driven = evaluate(agent.policy(), env_config, seeds)
        blind = evaluate(blind_policy, env_config, seeds)
    assert blind == driven
    assert driven["eval/route_completion"] > 0.9
    # The entries it was denied did say something: another car was in range on some of those steps.
    assert blind_policy.changed_observations > 0


# Each shipped agent on the first held-out seeds, through `validate --ckpt_path` alone. Measured (seeds 50000-50019):
# scenario0_straight_capped and scenario1_curvy_asymmetric 100 % success, 0 % collisions; scenario2_straight_capped
# 60 % / 40 % (77 % / 23 % over 100 seeds). The bounds sit a little under those numbers: a drop shows.
DRIVES_AS_MEASURED = {  # name: (episodes, lowest success rate, highest collision rate)
    "scenario0_straight_capped": (20, 0.95, 0.05),
    "scenario1_curvy_asymmetric": (20, 0.95, 0.05),
    "scenario2_straight_capped": (20, 0.5, 0.5),
}


def drives(name: str, episodes: int) -> dict[str, float]:
    result = cli.main(["validate", "--ckpt_path", str(ROOT / "agents" / f"{name}.ckpt"), "--data.eval_seed", "50000",
                       "--data.eval_episodes", str(episodes), "--trainer.enable_progress_bar", "false"])
    return {key: float(value) for key, value in result.trainer.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", DRIVES_AS_MEASURED)
def test_the_shipped_agent_drives_its_task_as_measured(name):
    episodes, lowest_success, highest_collisions = DRIVES_AS_MEASURED[name]
    metrics = drives(name, episodes)
    assert metrics["eval/episodes"] == episodes
    assert metrics["eval/success_rate"] >= lowest_success and metrics["eval/collision_rate"] <= highest_collisions


@pytest.mark.parametrize("name", ["scenario0_straight_capped", "scenario1_curvy_asymmetric"])
def test_the_shipped_agents_that_reached_their_target_drive_its_first_held_out_episodes(name):
    metrics = drives(name, episodes=4)  # the default suite's share of the slow check above
    assert metrics["eval/success_rate"] == 1.0 and metrics["eval/collision_rate"] == 0.0
    assert metrics["eval/driving_score"] == 1.0 and metrics["eval/infraction_penalty"] == 1.0


def test_the_generalist_slows_down_in_dense_traffic_and_drives_both_ends_of_its_range():
    """One actor on two cells of configs/grids/generalist.yaml, its first held-out episodes: light traffic on a
    straight road and scenario 2 at twice its traffic on the curvy one. It reaches the goal in both, slower where the
    traffic is (measured over 100 held-out episodes each: 89.1 and 60.2 km/h; IDM+MOBIL 83.8 and 59.6)."""
    agent, trained_env = shipped_agent("generalist")
    assert trained_env.varying  # trained on the ranges, not on a cell
    cells = generalist_cells(trained_env)
    seeds = [60000, 60001]
    speeds = {}
    with torch.no_grad():
        for name in ("s0-straight", "s2x2-curvy"):
            metrics = evaluate(agent.policy(), cells[name], seeds)
            assert metrics["eval/success_rate"] == 1.0 and metrics["eval/collision_rate"] == 0.0, name
            speeds[name] = metrics["eval/avg_speed_kmh"]
    assert speeds["s2x2-curvy"] < speeds["s0-straight"] - 10
