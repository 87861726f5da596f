"""Reference policies that drive through the same action space as the TD3 agent.

- `RandomPolicy`: uniform actions, the floor every learner must beat.
- `IdmMobilPolicy`: a classic rule-based driver. Longitudinal: Treiber's Intelligent Driver Model (IDM).
  Lane changes: Kesting's MOBIL (incentive + safety criterion). Lateral: pure pursuit on the target lane's
  centre line. It perceives the world through `env.scene()` / `env.limits` and acts only through the action.

References: M. Treiber, A. Hennecke, D. Helbing, "Congested traffic states in empirical observations and
microscopic simulations", Phys. Rev. E 62 (2000); A. Kesting, M. Treiber, D. Helbing, "General lane-changing
model MOBIL for car-following models", Transportation Research Record 1999 (2007); R. C. Coulter,
"Implementation of the Pure Pursuit Path Tracking Algorithm", CMU-RI-TR-92-01 (1992).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_td3.envs.contract import DrivingEnv, Neighbour, Scene, VehicleLimits

# Length of the other cars, which the scene does not report: needed to turn "follower gap to me" plus
# "my gap to my leader" into the follower's gap to that leader. 5 m is a typical passenger car.
VEHICLE_LENGTH_M = 5.0
# IDM's gap term diverges at zero gap; overlapping or touching cars are treated as this close.
MIN_GAP_M = 0.1
LANE_OFFSETS_TO_CONSIDER = (-1, 1)


class RandomPolicy:
    """Uniform random actions in [-1, 1]^2, reproducible per episode seed."""

    def __init__(self) -> None:
        self._rng = np.random.default_rng()

    def reset(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def act(self, obs: dict[str, np.ndarray], env: DrivingEnv) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, size=2).astype(np.float32)


# ----------------------------------------------------------------------------------------------- IDM


@dataclass
class IdmParams:
    """Intelligent Driver Model parameters (Treiber et al. 2000); `desired_speed_mps=None` means the env's
    target speed."""

    desired_speed_mps: float | None = None
    time_headway_s: float = 1.5
    min_gap_m: float = 2.0
    max_accel_mps2: float = 2.0
    comfortable_decel_mps2: float = 3.0
    accel_exponent: float = 4.0


def idm_acceleration(
    speed_mps: float,
    desired_speed_mps: float,
    params: IdmParams,
    gap_m: float | None = None,
    leader_speed_mps: float | None = None,
) -> float:
    """IDM: a = a_max * [1 - (v / v0)^delta - (s* / s)^2], s* = s0 + max(0, v T + v dv / (2 sqrt(a_max b))).

    With no leader (`gap_m=None`) only the free-road term remains. dv = v - v_leader is the approach rate.
    """
    free_road = 1.0 - (max(speed_mps, 0.0) / desired_speed_mps) ** params.accel_exponent
    if gap_m is None:
        return params.max_accel_mps2 * free_road
    approach_rate = speed_mps - leader_speed_mps
    dynamic_gap = speed_mps * params.time_headway_s + speed_mps * approach_rate / (
        2.0 * math.sqrt(params.max_accel_mps2 * params.comfortable_decel_mps2)
    )
    desired_gap = params.min_gap_m + max(0.0, dynamic_gap)
    interaction = (desired_gap / max(gap_m, MIN_GAP_M)) ** 2
    return params.max_accel_mps2 * (free_road - interaction)


def _idm_behind(speed_mps: float, desired_speed_mps: float, params: IdmParams, leader: Neighbour | None) -> float:
    if leader is None:
        return idm_acceleration(speed_mps, desired_speed_mps, params)
    return idm_acceleration(speed_mps, desired_speed_mps, params, leader.gap_m, leader.speed_mps)


# --------------------------------------------------------------------------------------------- MOBIL


@dataclass
class MobilParams:
    """MOBIL parameters (Kesting et al. 2007)."""

    politeness: float = 0.3
    # Minimum net advantage (m/s^2) that makes a change worth it; prevents changes for marginal gains.
    threshold_mps2: float = 0.2
    # Safety criterion: nobody (the new follower, nor the ego) may be made to brake harder than this.
    safe_braking_mps2: float = 4.0
    # After deciding (to change or to abort), hold that decision this long so the driver does not dither.
    min_hold_s: float = 2.0


def mobil_gain(
    ego_accel_now: float,
    ego_accel_after: float,
    new_follower_accel_now: float,
    new_follower_accel_after: float,
    old_follower_accel_now: float,
    old_follower_accel_after: float,
    politeness: float,
) -> float:
    """MOBIL incentive: own advantage plus politeness times the two affected followers' advantage.

    Change lanes when this exceeds the threshold (and the safety criterion holds). A missing follower
    contributes 0 (pass equal now/after values).
    """
    own_advantage = ego_accel_after - ego_accel_now
    others_advantage = (new_follower_accel_after - new_follower_accel_now) + (
        old_follower_accel_after - old_follower_accel_now
    )
    return own_advantage + politeness * others_advantage


def lane_change_gain(
    scene: Scene, offset: int, desired_speed_mps: float, idm: IdmParams, mobil: MobilParams
) -> float | None:
    """MOBIL gain of moving to the lane at `offset`, or None when the move is unsafe."""
    new_leader, new_follower = scene.leaders[offset], scene.followers[offset]
    old_leader, old_follower = scene.leaders[0], scene.followers[0]
    speed = scene.speed_mps

    if any(car is not None and car.gap_m <= 0.0 for car in (new_leader, new_follower)):
        return None  # a car is alongside: there is no gap to move into
    ego_now = _idm_behind(speed, desired_speed_mps, idm, old_leader)
    ego_after = _idm_behind(speed, desired_speed_mps, idm, new_leader)
    if ego_after < -mobil.safe_braking_mps2:
        return None

    new_follower_now = new_follower_after = 0.0
    if new_follower is not None:
        new_follower_now = _idm_without_ego(new_follower, new_leader, desired_speed_mps, idm)
        new_follower_after = idm_acceleration(
            new_follower.speed_mps, desired_speed_mps, idm, new_follower.gap_m, speed
        )
        if new_follower_after < -mobil.safe_braking_mps2:
            return None

    old_follower_now = old_follower_after = 0.0
    if old_follower is not None:
        old_follower_now = idm_acceleration(old_follower.speed_mps, desired_speed_mps, idm, old_follower.gap_m, speed)
        old_follower_after = _idm_without_ego(old_follower, old_leader, desired_speed_mps, idm)

    return mobil_gain(
        ego_now, ego_after, new_follower_now, new_follower_after, old_follower_now, old_follower_after,
        mobil.politeness,
    )


def _idm_without_ego(follower: Neighbour, leader: Neighbour | None, desired_speed_mps: float, idm: IdmParams) -> float:
    """IDM acceleration of the ego's `follower` if the ego were not between it and the ego's `leader`."""
    if leader is None:
        return idm_acceleration(follower.speed_mps, desired_speed_mps, idm)
    gap = follower.gap_m + VEHICLE_LENGTH_M + leader.gap_m
    return idm_acceleration(follower.speed_mps, desired_speed_mps, idm, gap, leader.speed_mps)


# -------------------------------------------------------------------------------------- pure pursuit


@dataclass
class PurePursuitParams:
    """Look-ahead of the pure-pursuit lane tracker."""

    # Look-ahead distance = clip(gain * speed, min, max): farther at speed keeps the loop well damped.
    lookahead_gain_s: float = 0.6
    min_lookahead_m: float = 6.0
    max_lookahead_m: float = 30.0


def lookahead_point(waypoints: np.ndarray, lookahead_m: float) -> np.ndarray:
    """The point of the polyline `waypoints` (ego frame) at distance `lookahead_m` from the ego.

    Walks the polyline from its first point and returns the first crossing of the look-ahead circle; the
    first point if it already lies outside the circle, the last one if the polyline never leaves it.
    """
    distances = np.linalg.norm(waypoints, axis=1)
    outside = np.flatnonzero(distances >= lookahead_m)
    if len(outside) == 0:
        return waypoints[-1]
    index = outside[0]
    if index == 0:
        return waypoints[0]
    inside, beyond = waypoints[index - 1], waypoints[index]
    # Solve |inside + t (beyond - inside)| = lookahead_m for t in [0, 1].
    direction = beyond - inside
    a = direction @ direction
    b = 2.0 * inside @ direction
    c = inside @ inside - lookahead_m**2
    t = (-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)
    return inside + t * direction


def pure_pursuit_steering_angle(waypoints: np.ndarray, lookahead_m: float, wheelbase_m: float) -> float:
    """Front-wheel angle (rad, > 0 = left) of the circular arc from the ego to the look-ahead point.

    Arc curvature kappa = 2 y / d^2 (y: lateral offset of the point, d: its distance); bicycle model
    steering delta = atan(wheelbase * kappa).
    """
    target = lookahead_point(waypoints, lookahead_m)
    curvature = 2.0 * target[1] / (target @ target)
    return math.atan(wheelbase_m * curvature)


# -------------------------------------------------------------------------------- actions from controls


def steer_action(steering_angle_rad: float, limits: VehicleLimits) -> float:
    """Action steer component for a front-wheel angle (> 0 = left); the action's steer > 0 turns right."""
    return float(np.clip(-steering_angle_rad / limits.max_steer_rad, -1.0, 1.0))


def throttle_brake_action(accel_mps2: float, limits: VehicleLimits) -> float:
    """Action throttle/brake component for a desired acceleration (> 0 throttle, < 0 brake)."""
    scale = limits.max_accel_mps2 if accel_mps2 >= 0.0 else limits.max_brake_mps2
    return float(np.clip(accel_mps2 / scale, -1.0, 1.0))


# ------------------------------------------------------------------------------------------- policy


class IdmMobilPolicy:
    """IDM car following, MOBIL lane changes and pure-pursuit lane tracking."""

    def __init__(
        self,
        idm: IdmParams | None = None,
        mobil: MobilParams | None = None,
        pursuit: PurePursuitParams | None = None,
    ):
        self.idm = idm or IdmParams()
        self.mobil = mobil or MobilParams()
        self.pursuit = pursuit or PurePursuitParams()
        self._target_lane: int | None = None
        self._since_decision_s = math.inf

    def reset(self, seed: int) -> None:
        self._target_lane = None
        self._since_decision_s = math.inf

    def act(self, obs: dict[str, np.ndarray], env: DrivingEnv) -> np.ndarray:
        scene = env.scene()
        desired_speed = self.idm.desired_speed_mps
        if desired_speed is None:
            desired_speed = env.config.target_speed_mps
        self._since_decision_s += env.backend.dt
        offset = self._choose_target_offset(scene, desired_speed)

        accel = self._desired_acceleration(scene, offset, desired_speed)
        lookahead = float(
            np.clip(
                self.pursuit.lookahead_gain_s * scene.speed_mps,
                self.pursuit.min_lookahead_m,
                self.pursuit.max_lookahead_m,
            )
        )
        steering = pure_pursuit_steering_angle(scene.lane_waypoints[offset], lookahead, env.limits.wheelbase_m)
        return np.array([steer_action(steering, env.limits), throttle_brake_action(accel, env.limits)], np.float32)

    def _choose_target_offset(self, scene: Scene, desired_speed: float) -> int:
        """Lane offset to track now: keep a held decision, abort an unsafe change, or ask MOBIL for a new one."""
        if self._target_lane is None or self._target_lane - scene.lane not in scene.lane_waypoints:
            self._target_lane = scene.lane
        offset = self._target_lane - scene.lane
        if offset != 0:
            if lane_change_gain(scene, offset, desired_speed, self.idm, self.mobil) is None:
                self._decide(scene.lane)  # the gap closed before we left our lane: stay
                return 0
            return offset
        if self._since_decision_s >= self.mobil.min_hold_s:
            best_offset = self._best_lane_change(scene, desired_speed)
            if best_offset != 0:
                self._decide(scene.lane + best_offset)
                return best_offset
        return 0

    def _best_lane_change(self, scene: Scene, desired_speed: float) -> int:
        best_offset, best_gain = 0, self.mobil.threshold_mps2
        for offset in LANE_OFFSETS_TO_CONSIDER:
            if offset not in scene.leaders or offset not in scene.lane_waypoints:
                continue
            gain = lane_change_gain(scene, offset, desired_speed, self.idm, self.mobil)
            if gain is not None and gain > best_gain:
                best_offset, best_gain = offset, gain
        return best_offset

    def _decide(self, target_lane: int) -> None:
        self._target_lane = target_lane
        self._since_decision_s = 0.0

    def _desired_acceleration(self, scene: Scene, offset: int, desired_speed: float) -> float:
        """IDM behind our lane's leader and, while changing, also behind the target lane's: the stricter wins."""
        accel = _idm_behind(scene.speed_mps, desired_speed, self.idm, scene.leaders[0])
        if offset != 0:
            accel = min(accel, _idm_behind(scene.speed_mps, desired_speed, self.idm, scene.leaders[offset]))
        return accel
