"""Driving environments: one contract (`DrivingEnv`), an embedded highway backend and a CARLA backend."""

import gymnasium as gym

from lightning_td3.envs.config import CarlaConfig, EnvConfig, RewardConfig
from lightning_td3.envs.contract import (
    DrivingEnv,
    Measurement,
    Neighbour,
    Scene,
    VehicleLimits,
)

ENV_ID = "LightningTD3Drive-v0"
if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="lightning_td3.envs.contract:DrivingEnv")

__all__ = [
    "ENV_ID",
    "CarlaConfig",
    "DrivingEnv",
    "EnvConfig",
    "Measurement",
    "Neighbour",
    "RewardConfig",
    "Scene",
    "VehicleLimits",
]
