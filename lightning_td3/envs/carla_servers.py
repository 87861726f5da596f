"""Training envs over many CARLA servers: each DDP process takes its slice of the list, dead servers are dropped.

A server that does not answer when training starts is left out with a warning and the process goes on with the
envs of the servers that did; only a process left with none stops, with one error naming its servers. (A server
that dies later is the collector's business: its env is rebuilt or the run stops, as for any simulator failure.)
"""

from __future__ import annotations

import warnings
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
        "env.carla.servers",
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
            "(`./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=<port>`) or fix env.carla.servers"
        )
    return live


def training_env_configs(env: EnvConfig, num_envs: int, rank: int, world_size: int) -> list[EnvConfig]:
    """One env config per training env of process `rank`: its slice of the CARLA servers that answer, or else
    `num_envs` copies of `env` (the highway backend, or CARLA on the one `host:port`)."""
    if env.backend != "carla" or not env.carla.servers:
        return [env] * num_envs
    live = answering_servers(process_servers(env.carla, num_envs, rank, world_size), env.carla)
    return [
        replace(env, carla=replace(env.carla, host=server.host, port=server.port, tm_port=server.tm_port, servers=()))
        for server in live
    ]
