"""Training envs over many CARLA servers: each DDP process takes its slice of the list, dead servers are dropped.

Each entry of a process's slice is one training env with its own replay ring, fixed by the list (so a resume maps
rings to servers as before). A server that does not answer, when training starts or when the Collector rebuilds
its envs after a failure, is left out with a warning naming it and the process goes on with the envs of the
servers that do (its ring keeps what it holds); only a process left with none stops: with one error naming its
servers at start, through the collective stop (`fault_tolerance.stop_together`) mid-run.

The datamodule and the Collector ask here for any backend (`training_envs`, `ring_servers`, `live_envs`,
`evaluation_shares_world`): without a server list every training env runs the one `data.env` and counts as live.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from lightning_td3.envs.carla_backend import CarlaConnectionError, connect
from lightning_td3.envs.config import CarlaConfig, CarlaServer, EnvConfig
from lightning_td3.errors import require


def process_servers(config: CarlaConfig, num_envs: int, rank: int, world_size: int) -> list[CarlaServer]:
    """Process `rank`'s slice of `config.servers`: entries rank * num_envs to (rank + 1) * num_envs - 1."""
    servers = config.server_list()
    require(
        len(servers) == num_envs * world_size,
        "data.env.carla.servers",
        f"{num_envs * world_size} entries, one per training env (data.num_envs={num_envs} x {world_size} "
        f"process{'es' if world_size > 1 else ''})",
        f"{len(servers)} entries",
    )
    return servers[rank * num_envs : (rank + 1) * num_envs]


def answering_servers(servers: list[CarlaServer], config: CarlaConfig) -> list[CarlaServer]:
    """The servers that answer within `config.timeout_s` (asked all at once); a warning names each that does not."""

    def answers(server: CarlaServer) -> bool:
        try:
            connect(replace(config, host=server.host, port=server.port, tm_port=server.tm_port, servers=()))
        except CarlaConnectionError as error:
            warnings.warn(f"CARLA server {server.host}:{server.port} is left out of training: {error}", stacklevel=2)
            return False
        return True

    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="carla-server-check") as pool:
        answered = list(pool.map(answers, servers))
    live = [server for server, ok in zip(servers, answered) if ok]
    if not live:
        addresses = ", ".join(f"{server.host}:{server.port}" for server in servers)
        raise CarlaConnectionError(
            f"none of this process's CARLA servers ({addresses}) answered within {config.timeout_s:g} s; start them "
            "(`./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=<port>`) or fix data.env.carla.servers"
        )
    return live


def training_envs(env: EnvConfig, num_envs: int, rank: int, world_size: int) -> tuple[list[EnvConfig], list[int]]:
    """Process `rank`'s training envs, for any backend: one config per env (and replay ring), from
    `training_env_configs`, and the indices of those that run, from `live_envs`."""
    configs = training_env_configs(env, num_envs, rank, world_size)
    return configs, live_envs(env, configs, range(len(configs)))


def ring_servers(env: EnvConfig, configs: Sequence[EnvConfig]) -> list[str] | None:
    """`host:port` of the server behind each training env (and replay ring), in ring order; None without a server
    list, where the envs are interchangeable."""
    return [f"{config.carla.host}:{config.carla.port}" for config in configs] if uses_server_list(env) else None


def training_env_configs(env: EnvConfig, num_envs: int, rank: int, world_size: int) -> list[EnvConfig]:
    """One env config per training env (and replay ring) of process `rank`: one per server of its slice, or else
    `num_envs` copies of `env` (the highway backend, or CARLA on the one `host:port`)."""
    if not uses_server_list(env):
        return [env] * num_envs
    return [
        replace(env, carla=replace(env.carla, host=server.host, port=server.port, tm_port=server.tm_port, servers=()))
        for server in process_servers(env.carla, num_envs, rank, world_size)
    ]


def evaluation_shares_world(env: EnvConfig) -> bool:
    """Whether evaluation runs in the training envs' world. On CARLA it does: on this process's first live training
    server (`datamodules.replay.ReplayDataModule`), where the training envs must make way for it (`Collector`);
    highway envs each have their own world."""
    return env.backend == "carla"


def uses_server_list(env: EnvConfig) -> bool:
    return env.backend == "carla" and bool(env.carla.servers)


def live_envs(env: EnvConfig, configs: Sequence[EnvConfig], among: Sequence[int]) -> list[int]:
    """The envs of `among` (indices into `configs`, from `training_env_configs`) whose CARLA server answers now, all
    asked at once; a warning names each server left out, and `CarlaConnectionError` says when none answers. Without
    a server list every env counts as live (a failing simulator there is the Collector's ordinary fault path)."""
    if not uses_server_list(env):
        return list(among)
    servers = [CarlaServer(configs[i].carla.host, configs[i].carla.port, configs[i].carla.tm_port) for i in among]
    live = set(answering_servers(servers, env.carla))
    return [index for index, server in zip(among, servers) if server in live]
