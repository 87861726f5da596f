"""The one driving-env contract every simulator backend sits behind.

`DrivingEnv` is the gymnasium env users see. It owns everything that must mean the same on every
simulator: the frame stack, the normalised vector observation, the reward, the termination rules and the
episode metrics in `info`. A backend only moves the world, draws one grayscale frame and reports a
`Measurement`; baselines may also read its `Scene`.

Conventions (all backends):
- action = [steer, throttle_brake] in [-1, 1]; steer > 0 turns right (as `carla.VehicleControl`),
  throttle_brake > 0 is throttle, < 0 is brake.
- ego frame: x forward, y to the left, metres.
- lanes are numbered from 0 = leftmost; a lane offset of -1 is the lane to the left.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from lightning_td3.envs.config import BACKENDS, FRAME_STACK, EnvConfig
from lightning_td3.envs.reward import RewardTerms, compute_reward

# Normalisers of the vector observation (the seed's scales): each entry lands roughly in [-1, 1].
SPEED_SCALE_MPS = 30.0
LATERAL_SCALE_M = 3.5
WAYPOINT_SCALE_M = 50.0
# The observed leader's gap is capped here, a forward radar's reach; no leader reads as one this far away.
LEADER_RANGE_M = 100.0
# The same for the side lanes' cars (`env.observe_sides`), corner radars' reach: the 1.5 s headway at 27 m/s.
SIDE_RANGE_M = 40.0
# Lane offsets of the side lanes, in the order the vector and `compute_reward` take them: left, then right.
SIDES = (-1, 1)
# Hard bound of the vector observation space; values are clipped into it.
VECTOR_BOUND = 5.0

# Why an episode ended; "time_out" is a truncation, the others are terminal.
CRASHES = ("collision", "off_road")
# What the ego can hit, as the CARLA Leaderboard's collision criterion tells them apart (`evaluation` charges each its
# coefficient); "other" is what that criterion does not count.
COLLISION_KINDS = ("vehicle", "pedestrian", "static", "other")
TERMINAL_REASONS = (*CRASHES, "goal")


@dataclass
class VehicleLimits:
    """What the extreme actions mean physically; baselines invert it to turn a desired control into an action."""

    max_steer_rad: float
    max_accel_mps2: float
    max_brake_mps2: float
    wheelbase_m: float


@dataclass
class Measurement:
    """Ego state relative to the route, as the backend measures it after a step."""

    speed_mps: float
    progress_m: float  # distance along the route from its start to the ego's projection
    route_length_m: float
    lateral_offset_m: float  # signed distance from the nearest lane centre, > 0 = left of it
    heading_error_rad: float  # lane heading minus ego heading in [-pi, pi], > 0 = lane bends left
    waypoints_ego: np.ndarray  # (num_waypoints, 2) next route waypoints strictly ahead, ego frame
    collision: str | None  # what the ego hit since the reset, one of COLLISION_KINDS; None: nothing
    off_drivable: bool  # off the drivable area as the simulator sees it


@dataclass
class Neighbour:
    gap_m: float  # bumper-to-bumper distance along the lane
    speed_mps: float


@dataclass
class Scene:
    """What a rule-based driver perceives; keys of the dicts are lane offsets (-1 left, 0 own, +1 right)."""

    speed_mps: float
    lane: int
    lanes: int
    leaders: dict[int, Neighbour | None]
    followers: dict[int, Neighbour | None]
    lane_waypoints: dict[int, np.ndarray]  # (n, 2) centre line ahead in the ego frame, per existing lane


class Backend(Protocol):
    limits: VehicleLimits
    dt: float  # simulated seconds per env step
    can_snapshot: bool  # whether get_state/set_state work (a CARLA server's world cannot be snapshotted)
    # The task the next reset builds: DrivingEnv sets it to each episode's (`EnvConfig.sample_task`) before `reset`.
    config: EnvConfig

    def reset(self, seed: int) -> None: ...
    def step(self, steer: float, throttle_brake: float) -> None: ...
    def frame(self) -> np.ndarray: ...  # (84, 84) uint8 grayscale
    def measure(self) -> Measurement: ...
    def scene(self) -> Scene: ...
    def top_view(self) -> np.ndarray: ...  # (H, W, 3) uint8 for humans (render / GIFs)
    def get_state(self) -> bytes: ...
    def set_state(self, state: bytes) -> None: ...
    def close(self) -> None: ...


def make_backend(config: EnvConfig) -> Backend:
    module_name, class_name = BACKENDS[config.backend]
    return getattr(importlib.import_module(module_name), class_name)(config)


class DrivingEnv(gym.Env):
    """Drive a route to its goal among traffic, from a 4-frame grayscale stack and a route vector."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}

    def __init__(self, config: EnvConfig | dict | None = None, render_mode: str | None = None, **overrides: Any):
        if config is None:
            config = EnvConfig(**overrides)
        elif isinstance(config, dict):
            config = EnvConfig(**{**config, **overrides})
        elif overrides:
            raise TypeError("pass either an EnvConfig or keyword overrides, not both")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array'; got {render_mode!r}")
        self.config = config
        self.render_mode = render_mode
        size = config.image_size
        self.observation_space = gym.spaces.Dict(
            image=gym.spaces.Box(0, 255, (FRAME_STACK, size, size), np.uint8),
            vector=gym.spaces.Box(-VECTOR_BOUND, VECTOR_BOUND, (config.vector_size,), np.float32),
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.backend = make_backend(config)
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.backend.dt)}
        self._stack = np.zeros((FRAME_STACK, size, size), np.uint8)
        self._steps = 0
        self._last_action = np.zeros(2, np.float32)
        self._last_measurement: Measurement | None = None
        self._return = 0.0
        self._distance_m = 0.0
        self._outside_lanes_m = 0.0  # route progress made outside the lanes (the leaderboard's lane infraction)
        # The episode's task, drawn at reset from the config's distributions (the config itself if it has none).
        self.task: EnvConfig | None = None

    @property
    def limits(self) -> VehicleLimits:
        return self.backend.limits

    def scene(self) -> Scene:
        return self.backend.scene()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = self.backend.config = self.config.sample_task(self.np_random)
        self.backend.reset(int(self.np_random.integers(2**31 - 1)))
        self._stack[:] = self.backend.frame()  # pad the stack with the first frame
        self._steps = 0
        self._last_action = np.zeros(2, np.float32)
        self._return = 0.0
        self._distance_m = 0.0
        self._outside_lanes_m = 0.0
        measurement = self._last_measurement = self.backend.measure()
        return self._observation(measurement, self._scene()), self._info(measurement, None, None)

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(2)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite; got {action.tolist()}")
        action = np.clip(action, -1.0, 1.0)
        previous = self._last_measurement
        self.backend.step(float(action[0]), float(action[1]))
        self._steps += 1
        measurement = self.backend.measure()
        self._stack = np.roll(self._stack, -1, axis=0)
        self._stack[-1] = self.backend.frame()

        scene = self._scene()
        leader = None if scene is None else scene.leaders.get(0)
        reason = self._termination_reason(measurement)
        terminated = reason in TERMINAL_REASONS
        truncated = reason == "time_out"
        terms = compute_reward(
            self.config.reward,
            speed_mps=measurement.speed_mps,
            target_speed_mps=self.config.target_speed_mps,
            progress_step_m=measurement.progress_m - previous.progress_m,
            dt=self.backend.dt,
            lateral_offset_m=measurement.lateral_offset_m,
            off_road_distance_m=self.config.off_road_distance_m,
            heading_error_rad=measurement.heading_error_rad,
            action_change=action - self._last_action,
            crashed=reason in CRASHES,
            gap_ahead_m=None if leader is None else leader.gap_m,
            speed_ahead_mps=None if leader is None else leader.speed_mps,
            gaps_beside_m=tuple(_nearest_gap(scene, side) for side in SIDES),
        )
        self._last_action = action
        self._last_measurement = measurement
        self._return += terms.total
        self._distance_m += measurement.speed_mps * self.backend.dt
        if reason == "off_road":
            self._outside_lanes_m += max(measurement.progress_m - previous.progress_m, 0.0)
        info = self._info(measurement, reason, terms)
        return self._observation(measurement, scene), terms.total, terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.backend.top_view()
        return None

    def close(self):
        self.backend.close()

    def get_state(self) -> dict:
        """Everything needed to continue this episode exactly (for checkpoint/resume)."""
        return {
            "backend": self.backend.get_state(),
            "stack": self._stack.copy(),
            "steps": self._steps,
            "last_action": self._last_action.copy(),
            "last_measurement": self._last_measurement,
            "return": self._return,
            "distance_m": self._distance_m,
            "outside_lanes_m": self._outside_lanes_m,
            "np_random": self.np_random.bit_generator.state,
            "task": self.task,
        }

    @property
    def can_snapshot(self) -> bool:
        """Whether `get_state` works: asked before it (through a vector env's `get_attr`), because an exception
        inside an asynchronous vector env's worker ends that worker."""
        return self.backend.can_snapshot

    @property
    def simulator_state(self) -> dict:
        """The state as an attribute, so a gymnasium vector env can get and set it per env (`get_attr`/`set_attr`)."""
        return self.get_state()

    @simulator_state.setter
    def simulator_state(self, state: dict) -> None:
        self.set_state(state)

    def set_state(self, state: dict) -> None:
        self.backend.set_state(state["backend"])
        self._stack = state["stack"].copy()
        self._steps = state["steps"]
        self._last_action = state["last_action"].copy()
        self._last_measurement = state["last_measurement"]
        self._return = state["return"]
        self._distance_m = state["distance_m"]
        self._outside_lanes_m = state.get("outside_lanes_m", 0.0)  # absent from states saved before it was kept
        self.np_random.bit_generator.state = state["np_random"]
        # States saved before tasks were drawn per episode come from configs of single values: their own task.
        self.task = self.backend.config = state.get("task", self.config)

    def _scene(self) -> Scene | None:
        """The other vehicles around the ego, read only when the reward or the observation uses them."""
        config = self.config
        reward = config.reward
        if not (reward.headway or reward.closing or reward.alongside or config.observe_leader or config.observe_sides):
            return None
        return self.backend.scene()

    def _termination_reason(self, m: Measurement) -> str | None:
        if m.collision:
            return "collision"
        if m.off_drivable or abs(m.lateral_offset_m) > self.config.off_road_distance_m:
            return "off_road"
        if m.route_length_m - m.progress_m <= self.config.goal_radius_m:
            return "goal"
        if self._steps >= self.task.max_steps:
            return "time_out"
        return None

    def _observation(self, m: Measurement, scene: Scene | None) -> dict[str, np.ndarray]:
        vector = np.empty(self.config.vector_size, np.float32)
        vector[0] = m.speed_mps / SPEED_SCALE_MPS
        vector[1] = max(m.route_length_m - m.progress_m, 0.0) / m.route_length_m
        vector[2] = m.heading_error_rad / math.pi
        vector[3] = m.lateral_offset_m / LATERAL_SCALE_M
        waypoints_end = 4 + m.waypoints_ego.size
        vector[4:waypoints_end] = (m.waypoints_ego / WAYPOINT_SCALE_M).reshape(-1)
        end = waypoints_end
        if self.config.observe_leader:
            leader = scene.leaders.get(0)
            gap, closing = 1.0, 0.0  # nothing ahead within range reads as a car at the range, not closing
            if leader is not None and leader.gap_m < LEADER_RANGE_M:
                gap, closing = leader.gap_m / LEADER_RANGE_M, (m.speed_mps - leader.speed_mps) / SPEED_SCALE_MPS
            vector[end:end + 2] = gap, closing
            end += 2
        if self.config.observe_sides:
            # No lane or no car within range reads as a car at the range.
            vector[end:end + 4] = [
                min(neighbour.gap_m / SIDE_RANGE_M, 1.0) if neighbour is not None else 1.0
                for side in SIDES for neighbour in (scene.leaders.get(side), scene.followers.get(side))
            ]
        np.clip(vector, -VECTOR_BOUND, VECTOR_BOUND, out=vector)
        return {"image": self._stack.copy(), "vector": vector}

    def _info(self, m: Measurement, reason: str | None, terms: RewardTerms | None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "reason": reason,
            "success": reason == "goal",
            "collision": bool(m.collision),
            # A COLLISION_KINDS entry, or None (also for a measurement restored from a snapshot that kept a bool).
            "collision_with": m.collision or None,
            "speed_kmh": m.speed_mps * 3.6,
            "route_completion": float(np.clip(m.progress_m / m.route_length_m, 0.0, 1.0)),
            # The share of the route driven so far that was driven off the road, as the CARLA Leaderboard's
            # OutsideRouteLanesTest measures it; an episode ends on the step the ego leaves the road, so it is at
            # most that step's progress.
            "route_outside_lanes": self._outside_lanes_m / m.progress_m if m.progress_m > 0 else 0.0,
            "episode_return": self._return,
            "episode_length": self._steps,
            "avg_speed_kmh": 3.6 * self._distance_m / (self._steps * self.backend.dt) if self._steps else 0.0,
        }
        if terms is not None:
            info["reward_terms"] = terms.as_dict()
        if terms is None or reason is not None:  # the episode's first and last info: which task it is
            info["task"] = self.task.task()
        return info


def _nearest_gap(scene: Scene | None, side: int) -> float | None:
    """The gap to the nearer of the cars ahead and behind in the lane at `side` (None: no such lane or car)."""
    if scene is None:
        return None
    gaps = [n.gap_m for n in (scene.leaders.get(side), scene.followers.get(side)) if n is not None]
    return min(gaps, default=None)
