"""Lightning DDP on CPU: two processes (gloo) run the real CLI on a tiny config and must act as one run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_td3.errors import ConfigError
from lightning_td3.td3 import _let_ddp_find_unused_parameters
from tests.faults import SIMULATOR_TIMEOUT, CarlaServerDoubles, CrashOnRank, StopInEvaluation
from tests.rank_snapshot import RankSnapshot
from tests.tiny_run import tiny_config

ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
EVAL_EPISODES = 3  # not a multiple of the world size: a padding sampler would run one seed twice
EVAL_SEED = 500
UPDATES_PER_EPOCH = 3  # two epochs, each followed by an evaluation


def ddp_config(run_dir: Path, *extra_callbacks: dict, **overrides) -> Path:
    path = tiny_config(
        run_dir,
        **{"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": WORLD_SIZE,
           "trainer.max_epochs": 2, "trainer.limit_train_batches": UPDATES_PER_EPOCH,
           "data.eval_episodes": EVAL_EPISODES, "data.eval_seed": EVAL_SEED} | overrides,
    )
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] += [
        {"class_path": f"{RankSnapshot.__module__}.RankSnapshot", "init_args": {"dirpath": str(run_dir / "ranks")}},
        *extra_callbacks,
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # Through a real process: Lightning's DDP launcher starts the other rank by re-running this command line.
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )


def load_ranks(run_dir: Path) -> list[dict]:
    return [torch.load(run_dir / "ranks" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def tensorboard_events(run_dir: Path) -> EventAccumulator:
    (event_dir,) = {path.parent for path in (run_dir / "logs").rglob("events.out.tfevents.*")}
    return EventAccumulator(str(event_dir)).Reload()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    completed = run_cli("fit", "--config", str(ddp_config(run_dir)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return run_dir, load_ranks(run_dir)


def test_both_processes_hold_the_same_weights_and_they_were_trained(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["world_size"] == rank1["world_size"] == WORLD_SIZE
    assert rank0["updates"] == rank1["updates"] == 2 * UPDATES_PER_EPOCH
    for name in rank0["final"]:
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    # Actor (updated every policy_delay) and critic both moved; so did their Polyak targets.
    for network in ("actor.", "critic.", "actor_target.", "critic_target."):
        assert any(
            not torch.equal(rank0["initial"][name], rank0["final"][name])
            for name in rank0["final"] if name.startswith(network)
        ), network


def test_each_process_collects_into_its_own_replay_shard(ddp_run):
    _, (rank0, rank1) = ddp_run
    for rank in (rank0, rank1):  # each its own warm-up (30) and one env step per update, two envs at a time
        assert 0 <= rank["env_steps"] - 30 - rank["updates"] < 2
    assert not torch.equal(rank0["replay_sample"], rank1["replay_sample"])


def test_counters_are_the_runs_totals_over_both_processes(ddp_run):
    run_dir, (rank0, rank1) = ddp_run
    assert rank0["run_env_steps"] == rank1["run_env_steps"] == rank0["env_steps"] + rank1["env_steps"]
    assert rank0["run_episodes"] == rank1["run_episodes"] == rank0["episodes"] + rank1["episodes"] > 0
    events = tensorboard_events(run_dir)
    # TensorBoard's env-step axis is the run's: the evaluation after the last update sits at the total.
    assert events.Scalars("eval/success_rate_vs_env_steps")[-1].step == rank0["run_env_steps"]
    train_episodes = sum(event.value for event in events.Scalars("train/episodes_vs_env_steps"))
    assert train_episodes == rank0["run_episodes"]  # every training episode of both processes, logged once


def test_evaluation_runs_every_seed_once_split_over_the_processes(ddp_run):
    run_dir, (rank0, rank1) = ddp_run
    seeds = list(range(EVAL_SEED, EVAL_SEED + EVAL_EPISODES))
    assert set(rank0["eval_seeds"]).isdisjoint(rank1["eval_seeds"])
    assert sorted(rank0["eval_seeds"] + rank1["eval_seeds"]) == sorted(seeds * 2)  # two evaluations
    assert [event.value for event in tensorboard_events(run_dir).Scalars("eval/episodes")] == [EVAL_EPISODES] * 2


def test_fewer_evaluation_episodes_than_processes_is_rejected(tmp_path):
    completed = run_cli("fit", "--config", str(ddp_config(tmp_path, **{"data.eval_episodes": 1})))
    assert completed.returncode == 1
    assert "error: data.eval_episodes must be >= the number of processes (2)" in completed.stderr


def test_resume_with_the_same_processes_continues_exactly(ddp_run, tmp_path):
    _, straight = ddp_run
    first_half = run_cli("fit", "--config", str(ddp_config(tmp_path, **{"trainer.max_epochs": 1})))
    assert first_half.returncode == 0, first_half.stderr[-3000:]
    # Every process wrote its own replay shard next to the checkpoint.
    shards = sorted(path.name.rsplit("-rank", 1)[1] for path in (tmp_path / "checkpoints" / "replay").glob("*.bin"))
    assert shards == [f"{rank}-of{WORLD_SIZE}.bin" for rank in range(WORLD_SIZE)]
    resumed = run_cli("fit", "--config", str(ddp_config(tmp_path)), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for expected, actual in zip(straight, load_ranks(tmp_path)):
        for key in ("env_steps", "episodes", "updates", "run_env_steps", "run_episodes"):
            assert actual[key] == expected[key], key
        for name, weights in expected["final"].items():
            assert torch.equal(actual["final"][name], weights), name
        # Each process got its own replay shard back: the same draw samples the same transitions.
        assert torch.equal(actual["replay_sample"], expected["replay_sample"])


def test_resume_with_another_number_of_processes_is_one_clear_error(ddp_run):
    run_dir, _ = ddp_run
    completed = run_cli(
        "fit", "--config", str(run_dir / "tiny.yaml"), "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.max_epochs", "3", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
    )
    assert completed.returncode == 1
    assert "error: this checkpoint holds the counters of 2 process(es) and this run has 1; resume with the same " \
           "number of processes" in completed.stderr


def test_ddp_is_told_to_find_unused_parameters_and_a_static_graph_is_refused():
    strategy = DDPStrategy()
    _let_ddp_find_unused_parameters(strategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    with pytest.raises(ConfigError, match=r"trainer\.strategy\.init_args\.static_graph must be false"):
        _let_ddp_find_unused_parameters(DDPStrategy(static_graph=True))


# ------------------------------------------------------------------------------- a fault on one process only

NO_HANG_S = 120  # far below the DDP time-out (30 min): a process left waiting in a collective fails the test


class DdpRun:
    """`python cli.py fit` under DDP in its own session, so that a hung process can be found and killed."""

    def __init__(self, config: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "cli.py", "fit", "--config", str(config), *args], cwd=ROOT, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def rank1_pid(self) -> int:
        # Lightning's launcher starts rank 1 by running the same command line as a child of rank 0.
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        (pid,) = [int(p) for p in children if "cli.py" in Path(f"/proc/{p}/cmdline").read_text()]
        return pid

    def finish(self) -> tuple[int, str]:
        """Exit code and output, once rank 0 and rank 1 (which shares rank 0's output pipe) have both exited."""
        try:
            output, _ = self.process.communicate(timeout=NO_HANG_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            output, _ = self.process.communicate()
            pytest.fail(f"the processes did not all stop within {NO_HANG_S} s (a hang):\n{output[-3000:]}")
        return self.process.returncode, output


def crash_on_rank1(from_step: int) -> dict:
    return {"class_path": f"{CrashOnRank.__module__}.CrashOnRank",
            "init_args": {"rank": 1, "crash_from_step": from_step}}


def test_envs_failing_on_one_process_stop_every_process_with_one_checkpoint_that_resumes(tmp_path):
    # Rank 1's simulator goes away for good after its warm-up (15 vector steps of 2 envs = 30 backend steps).
    settings = {"trainer.callbacks.0.init_args.max_env_failures": 2}
    code, output = DdpRun(ddp_config(tmp_path, crash_on_rank1(from_step=34), **settings)).finish()

    assert code == 1, output[-3000:]
    stop = "error: process 1 of 2: the training envs failed 2 times in a row (Collector.max_env_failures=2)"
    assert output.count(stop) == WORLD_SIZE, output[-3000:]  # the same message from both processes
    assert SIMULATOR_TIMEOUT in output and "All 2 processes stopped together" in output
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"Checkpoint written to {last}; once the cause is fixed, resume with: " in output
    saved = torch.load(last, weights_only=True)  # one checkpoint, holding both processes' state
    assert [state["env_failures"] for state in saved["callbacks"]["Collector"]["per_process"]] == [0, 2]
    assert saved["callbacks"]["Collector"]["per_process"][1]["env_states"] is None  # rank 1 had no envs left
    assert 0 < saved["td3_progress"]["updates"] < 2 * UPDATES_PER_EPOCH
    record = saved["ReplayDataModule"]["replay_file"]
    shards = {p.name for p in (tmp_path / "checkpoints" / "replay").glob("*.bin")}
    # Each process's file of this checkpoint, and at most the one of the state saved before it.
    assert {f"replay-{record['key']}-rank{rank}-of{WORLD_SIZE}.bin" for rank in range(WORLD_SIZE)} <= shards
    assert len(shards) <= 2 * WORLD_SIZE

    # The simulator is back: the same two processes go on from the checkpoint to the end.
    code, output = DdpRun(ddp_config(tmp_path, **settings), "--ckpt_path", "last").finish()
    assert code == 0, output[-3000:]
    rank0, rank1 = load_ranks(tmp_path)
    assert rank0["updates"] == rank1["updates"] == 2 * UPDATES_PER_EPOCH
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name


def test_sigterm_to_one_process_stops_every_process_with_one_checkpoint(tmp_path):
    run = DdpRun(ddp_config(tmp_path, **{"trainer.max_epochs": 1000}))
    deadline = time.monotonic() + NO_HANG_S
    while not list((tmp_path / "checkpoints").glob("epoch=0-*.ckpt")):
        assert run.process.poll() is None and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    signalled = time.time()

    os.kill(run.rank1_pid(), signal.SIGTERM)  # rank 1 only: rank 0 hears of it only through the stop vote
    code, output = run.finish()

    assert code == 0, output[-3000:]
    assert "[rank: 1] SIGTERM received: finishing the current step" in output
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.stat().st_mtime >= signalled
    progress = torch.load(last, weights_only=True)["td3_progress"]
    stopped = f"stopped by SIGTERM (received by process 1 of 2) at env step {progress['env_steps']}; checkpoint written"
    assert output.count(stopped) == WORLD_SIZE, output[-3000:]
    assert "Traceback" not in output


def test_sigterm_to_one_process_during_an_evaluation_stops_both_there_and_the_resumed_run_evaluates_again(tmp_path):
    # 5 episodes: rank 0 drives 3, rank 1 two; both stop before their second, the last that both drive.
    episodes = tmp_path / "episodes.txt"
    stop = {"class_path": f"{StopInEvaluation.__module__}.StopInEvaluation",
            "init_args": {"log": str(episodes), "after": 0, "rank": 1}}
    code, output = DdpRun(ddp_config(tmp_path, stop, **{"data.eval_episodes": 5})).finish()

    assert code == 0, output[-3000:]
    stopped = "stopped by SIGTERM (received by process 1 of 2) at env step"
    assert output.count(stopped) == WORLD_SIZE, output[-3000:]
    assert sorted(episodes.read_text().splitlines()) == ["0 0 0", "1 0 0"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]

    code, output = DdpRun(ddp_config(tmp_path, **{"data.eval_episodes": 5}), "--ckpt_path", "last").finish()
    assert code == 0, output[-3000:]
    rank0, rank1 = load_ranks(tmp_path)
    assert rank0["updates"] == rank1["updates"] == 2 * UPDATES_PER_EPOCH
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    # Both evaluations logged, the interrupted one run again whole (5 episodes, over both processes).
    assert [event.value for event in tensorboard_events(tmp_path).Scalars("eval/episodes")] == [5, 5]


def test_a_carla_server_dying_on_one_process_is_dropped_and_the_run_goes_on_with_fewer_envs_there(tmp_path):
    servers = ["sim-a:2000", "sim-b:2000", "sim-c:2000", "sim-d:2000"]  # rank 1 runs sim-c and sim-d
    doubles = {"class_path": f"{CarlaServerDoubles.__module__}.CarlaServerDoubles",
               "init_args": {"servers": servers, "dies_at_tick": {"sim-d:2000": 16}}}  # during warm-up
    env = {"backend": "carla", "route_length_m": 100.0, "max_steps": 12, "num_waypoints": 5,
           "carla": {"servers": servers, "timeout_s": 0.5, "npc_vehicles": [0, 0, 0]}}
    code, output = DdpRun(ddp_config(tmp_path, doubles, **{"data.env": env})).finish()

    assert code == 0, output[-3000:]
    assert output.count("CARLA server sim-d:2000 is left out of training") == 1, output[-3000:]
    rank0, rank1 = load_ranks(tmp_path)
    assert rank0["updates"] == rank1["updates"] == 2 * UPDATES_PER_EPOCH
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    # Rank 1 warmed up and collected on one env after the drop: its env steps came one at a time.
    assert 0 <= rank0["env_steps"] - 30 - rank0["updates"] < 2
    assert rank1["env_steps"] - 30 - rank1["updates"] == 0
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert [p["env_states"] for p in saved["callbacks"]["Collector"]["per_process"]] == [None, None]  # CARLA
