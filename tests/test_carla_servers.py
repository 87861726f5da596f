"""Training over many CARLA servers without a CARLA server: the list's format, each process's slice, and dead
servers dropped, at start and mid-run. Only the server side is a test double (`FakeCarlaServers`, and
`DyingCarlaServers` whose worlds are the fixture world of tests/test_carla_backend.py); parsing, slicing, the
connection check (`carla_backend.connect`), the CARLA backend, the collector and the datamodule are the real code."""

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.profilers import PassThroughProfiler

from datamodules.replay import ReplayDataModule
from lightning_td3.collector import Collector
from lightning_td3.envs import CarlaConfig, EnvConfig, carla_backend
from lightning_td3.envs.carla_backend import CarlaConnectionError
from lightning_td3.envs.carla_servers import answering_servers, process_servers, training_env_configs
from lightning_td3.envs.config import CarlaServer
from lightning_td3.errors import CheckpointError, ConfigError
from tests.faults import DyingCarlaServers, driving_env_on_doubles
from tests.test_collector import RecordingModule

SERVERS = ["sim-a:2000", "sim-a:2002", "sim-b:2000:9100", "sim-c:2000"]


class FakeCarlaServers:
    """Server-side test double: the addresses where a CARLA server answers. A client of any other address fails
    the version query the way the real client does when nothing answers."""

    def __init__(self, answering: set[tuple[str, int]]):
        self.answering = answering
        self.asked: list[tuple[str, int]] = []

    def client(self, host: str, port: int) -> "FakeCarlaServers.Client":
        return FakeCarlaServers.Client(self, host, port)

    class Client:
        def __init__(self, servers: "FakeCarlaServers", host: str, port: int):
            self.servers, self.address = servers, (host, port)

        def set_timeout(self, seconds: float) -> None:
            pass

        def get_server_version(self) -> str:
            self.servers.asked.append(self.address)
            if self.address not in self.servers.answering:
                raise RuntimeError(f"time-out of 500ms while waiting for the simulator, make sure the simulator is "
                                   f"ready and connected to {self.address[0]}:{self.address[1]}")
            return "0.9.16"


@pytest.fixture
def fake_servers(monkeypatch):
    def install(*answering: tuple[str, int]) -> FakeCarlaServers:
        servers = FakeCarlaServers(set(answering))
        monkeypatch.setattr(carla_backend.carla, "Client", servers.client)
        return servers

    return install


def carla_env(servers=SERVERS) -> EnvConfig:
    return EnvConfig(backend="carla", num_waypoints=5, carla={"servers": servers, "timeout_s": 0.5})


# ------------------------------------------------------------------------------------------------- the list


def test_entries_parse_and_an_omitted_tm_port_is_distinct_per_entry():
    assert CarlaConfig(servers=SERVERS, tm_port=8000).server_list() == [
        CarlaServer("sim-a", 2000, 8000),
        CarlaServer("sim-a", 2002, 8001),
        CarlaServer("sim-b", 2000, 9100),
        CarlaServer("sim-c", 2000, 8003),
    ]


@pytest.mark.parametrize(
    ("entries", "name", "allowed"),
    [
        (["sim-a:2000", "sim-b"], r"env\.carla\.servers\[1\]", "'host:port' or 'host:port:tm_port'"),
        (["sim-a:two"], r"env\.carla\.servers\[0\]", "'host:port' or 'host:port:tm_port'"),
        (["sim-a:2000:70000"], r"env\.carla\.servers\[0\]", "ports in 1..65535"),
        ([":2000"], r"env\.carla\.servers\[0\]", "'host:port'"),
        (["sim-a:2000:8000:1"], r"env\.carla\.servers\[0\]", "'host:port'"),
        (["sim-a:2000", "sim-b:2000", "sim-a:2000"], r"env\.carla\.servers\[2\]", r"servers\[0\] does"),
        (["sim-a:2000:8001", "sim-b:2000"], r"env\.carla\.servers\[1\]", r"port 8001 .*servers\[0\] does"),
    ],
)
def test_a_bad_entry_is_rejected_naming_it(entries, name, allowed):
    with pytest.raises(ConfigError, match=f"{name} must be .*{allowed}"):
        EnvConfig(backend="carla", carla={"servers": entries})


def test_each_process_takes_its_slice_of_num_envs_entries():
    config = CarlaConfig(servers=SERVERS)
    assert [s.host for s in process_servers(config, num_envs=2, rank=0, world_size=2)] == ["sim-a", "sim-a"]
    assert [(s.host, s.port) for s in process_servers(config, num_envs=2, rank=1, world_size=2)] == [
        ("sim-b", 2000), ("sim-c", 2000)
    ]
    assert [s.host for s in process_servers(config, num_envs=1, rank=3, world_size=4)] == ["sim-c"]


def test_a_list_that_does_not_give_one_server_per_env_is_rejected():
    with pytest.raises(ConfigError, match=r"env\.carla\.servers must be 6 entries, one per training env "
                                          r"\(data\.num_envs=3 x 2 processes\); got '4 entries'"):
        process_servers(CarlaConfig(servers=SERVERS), num_envs=3, rank=0, world_size=2)


# ------------------------------------------------------------------------------------------- dead servers


def test_a_dead_server_is_dropped_with_a_warning_and_the_others_kept_in_order(fake_servers):
    servers = fake_servers(("sim-a", 2000), ("sim-b", 2000), ("sim-c", 2000))
    config = CarlaConfig(servers=SERVERS, timeout_s=0.5)
    with pytest.warns(UserWarning, match="CARLA server sim-a:2002 is left out of training") as caught:
        live = answering_servers(config.server_list(), config)
    assert len(caught) == 1
    assert [(s.host, s.port, s.tm_port) for s in live] == [("sim-a", 2000, 8000), ("sim-b", 2000, 9100),
                                                           ("sim-c", 2000, 8003)]
    assert sorted(servers.asked) == sorted((s.host, s.port) for s in config.server_list())


def test_no_answering_server_is_one_error_naming_them_all(fake_servers):
    fake_servers(("sim-a", 2000))  # answers, but is not in this process's slice
    config = CarlaConfig(servers=SERVERS, timeout_s=0.5)
    with pytest.warns(UserWarning), pytest.raises(CarlaConnectionError) as raised:
        answering_servers(process_servers(config, num_envs=2, rank=1, world_size=2), config)
    assert "sim-b:2000, sim-c:2000" in str(raised.value) and "env.carla.servers" in str(raised.value)


def test_the_datamodule_builds_this_process_envs_and_replay_from_its_live_servers(fake_servers):
    fake_servers(("sim-a", 2000), ("sim-a", 2002), ("sim-c", 2000))  # sim-b (process 1's first) is dead
    data = ReplayDataModule(env=carla_env(), num_envs=2, buffer_capacity=100, eval_episodes=2)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(global_rank=1, world_size=2, strategy=cpu)
    with pytest.warns(UserWarning, match="sim-b:2000"):
        data.setup("fit")
    assert [(c.carla.host, c.carla.port, c.carla.tm_port, c.carla.servers) for c in data.env_configs] == [
        ("sim-b", 2000, 9100, ()), ("sim-c", 2000, 8003, ())
    ]
    assert data.live_envs == [1]  # only sim-c's env runs
    assert data.buffer.num_envs == 2  # one replay ring per server of the slice, dead or not: resumes map them alike
    (spec,) = list(data.val_dataloader())  # process 1 of 2 runs the second of the two episodes
    assert spec.env_config.carla.host == "sim-c" and spec.seed == data.eval_seed + 1


def test_without_a_server_list_every_env_uses_the_one_config():
    env = EnvConfig(num_waypoints=5)
    assert training_env_configs(env, num_envs=3, rank=1, world_size=2) == [env, env, env]
    data = ReplayDataModule(env=env, num_envs=3, buffer_capacity=100)
    data.setup("fit")
    assert data.live_envs == [0, 1, 2]


# ------------------------------------------------------------------------------------ servers dying mid-run

TWO_SERVERS = ["sim-a:2000", "sim-b:2000"]


@pytest.fixture
def dying_servers(monkeypatch) -> DyingCarlaServers:
    servers = DyingCarlaServers(TWO_SERVERS)
    monkeypatch.setattr(carla_backend.carla, "Client", servers.client)
    return servers


def carla_data(servers=TWO_SERVERS, root=None) -> ReplayDataModule:
    env = EnvConfig(backend="carla", route_length_m=100.0, num_waypoints=5,
                    carla={"servers": servers, "timeout_s": 0.5, "npc_vehicles": (0, 0, 0)})
    data = ReplayDataModule(env=env, num_envs=2, buffer_capacity=200, eval_episodes=1)
    strategy = SimpleNamespace(broadcast=lambda obj, src: obj, root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, checkpoint_callback=None, default_root_dir=str(root),
                                   ckpt_path=None, strategy=strategy)
    data.setup("fit")
    return data


def collecting(data: ReplayDataModule, async_envs: bool = False) -> tuple[Collector, SimpleNamespace, RecordingModule]:
    collector = Collector(learning_starts=10**6, async_envs=async_envs, max_env_failures=3)
    collector.envs = collector._make_envs(data)
    collector._rng = np.random.default_rng(0)
    collector._obs, _ = collector.envs.reset(seed=3)
    return collector, SimpleNamespace(datamodule=data, global_rank=0, profiler=PassThroughProfiler()), RecordingModule()


def test_a_server_dying_mid_run_is_dropped_with_a_warning_and_collection_goes_on_with_the_rest(dying_servers):
    data = carla_data()
    collector, trainer, module = collecting(data)
    for _ in range(3):
        collector._collect(trainer, module)
    written_before = data.buffer._written.copy()

    dying_servers.kill("sim-b:2000")
    with pytest.warns(UserWarning, match="CARLA server sim-b:2000 is left out of training") as caught:
        for _ in range(4):
            collector._collect(trainer, module)
    try:
        assert sum("left out of training" in str(w.message) for w in caught) == 1
        assert data.live_envs == [0] and collector.envs.num_envs == 1 and collector._gave_up is None
        assert collector.env_failures == 1
        assert module.env_steps == 2 * 3 + 1 * 3  # the failed step counted nothing; then one env per step
        # sim-b's ring keeps its transitions and gets no more; sim-a's ring goes on (a new episode after the crash).
        assert data.buffer._written[1] == written_before[1] and data.buffer._written[0] > written_before[0]
        assert data.buffer._transitions[1] == 3 and len(data.buffer) == 3 + 3 + 3
        data.buffer.sample(64, np.random.default_rng(0))
        (spec,) = list(data.val_dataloader())
        assert spec.env_config.carla.host == "sim-a"  # evaluation runs on a live server
    finally:
        collector._close_envs()


def test_with_no_server_left_the_process_gives_up_naming_its_servers(dying_servers):
    data = carla_data()
    collector, trainer, module = collecting(data)
    collector._collect(trainer, module)
    dying_servers.kill("sim-a:2000")
    dying_servers.kill("sim-b:2000")
    with pytest.warns(UserWarning, match="left out of training"):
        collector._collect(trainer, module)
    assert collector.envs is None and collector.env_failures == 1
    assert "none of this process's CARLA servers (sim-a:2000, sim-b:2000) answered" in collector._gave_up
    assert "time-out" in collector._gave_up  # and the failure that led there


def test_the_replay_file_records_each_rings_server_and_a_resume_keeps_that_mapping(dying_servers, tmp_path):
    data = carla_data(root=tmp_path)
    collector, trainer, module = collecting(data)
    for _ in range(3):
        collector._collect(trainer, module)
    collector._close_envs()
    record = data.state_dict()

    dying_servers.kill("sim-b:2000")  # dead when the run resumes: left out, its ring restored all the same
    with pytest.warns(UserWarning, match="sim-b:2000 is left out"):
        resumed = carla_data(root=tmp_path)
    with pytest.warns(UserWarning, match=r"process 0 resumes with the CARLA servers \['sim-a:2000'\] live; at the "
                                         r"checkpoint \['sim-a:2000', 'sim-b:2000'\] were"):
        resumed.load_state_dict(record)
    assert resumed.live_envs == [0] and resumed.buffer.num_envs == 2
    assert np.array_equal(resumed.buffer._transitions, data.buffer._transitions)

    with pytest.warns(UserWarning, match="sim-b:2000 is left out"):
        reordered = carla_data(servers=TWO_SERVERS[::-1], root=tmp_path)
    with pytest.raises(CheckpointError, match=r"process 0's replay rings were filled from the CARLA servers "
                                              r"\['sim-a:2000', 'sim-b:2000'\], and data\.env\.carla\.servers now "
                                              r"gives it "
                                              r"\['sim-b:2000', 'sim-a:2000'\]"):
        reordered.load_state_dict(record)


def test_a_checkpoint_keeps_every_asynchronous_carla_worker_alive(dying_servers, monkeypatch):
    # The envs step in worker processes, each building its env against the server doubles.
    monkeypatch.setattr("lightning_td3.collector.DrivingEnv", partial(driving_env_on_doubles, TWO_SERVERS))
    data = carla_data()
    collector, trainer, module = collecting(data, async_envs=True)
    try:
        collector._collect(trainer, module)
        with pytest.warns(UserWarning, match="env state is not saved .*restarts its training episodes"):
            saved = collector.state_dict()
        assert saved["per_process"][0]["env_states"] is None
        for _ in range(3):
            collector._collect(trainer, module)
        # Both workers lived on: no failure, no rebuild, every vector step took both envs.
        assert collector.env_failures == 0 and collector.envs.num_envs == 2
        assert module.env_steps == 2 * 4 and len(data.buffer) == 2 * 4
    finally:
        collector._close_envs()
