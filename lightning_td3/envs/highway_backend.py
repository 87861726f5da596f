"""The embedded backend: highway-env's roads, IDM/MOBIL traffic and pygame renderer, driven headless.

The ego is a kinematic highway-env `Vehicle` (bicycle model) steered and accelerated directly by the
continuous action; the other vehicles are highway-env `IDMVehicle`s (IDM car following, MOBIL lane changes).

World frame (highway-env's): x to the right of the screen, y DOWN the screen, headings grow clockwise on
screen, so a positive steering angle turns the car to its driver's right, and a lane's positive lateral
coordinate is to the right of its direction of travel. Lane 0 of every road segment is the leftmost lane.
Everything this module hands out is converted to the contract's conventions (ego frame: x forward, y left).

The road itself (its segments, lanes and road coordinates) is built in `highway_road`.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

# Headless: highway-env's renderer is pygame, which must never look for a display.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
from highway_env.road.graphics import LaneGraphics, RoadGraphics, WorldSurface  # noqa: E402
from highway_env.road.road import LaneIndex, Road  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402
from highway_env.vehicle.kinematics import Vehicle  # noqa: E402

from lightning_td3.envs.config import EnvConfig  # noqa: E402
from lightning_td3.envs.contract import Measurement, Neighbour, Scene, VehicleLimits  # noqa: E402
from lightning_td3.envs.highway_road import LANE_WIDTH_M, Track, TrackNetwork, build_track  # noqa: E402

# Simulator states pickled before the road moved to `highway_road` (the training envs' state in checkpoints)
# name its classes here: a resume from one of them finds them under these names.
_Track, _TrackNetwork = Track, TrackNetwork

# --- Simulation ----------------------------------------------------------------------------------------
SIMULATION_FREQUENCY_HZ = 15.0  # traffic acts and collisions are checked at this rate
MAX_ACCEL_MPS2 = 4.0
MAX_BRAKE_MPS2 = 8.0
# highway-env's bicycle model slips by beta = atan(tan(steer) / 2) and yaws at speed * sin(beta) / (LENGTH / 2):
# a kinematic bicycle with its centre of mass midway between the axles, LENGTH apart.
WHEELBASE_M = Vehicle.LENGTH

# --- Traffic -------------------------------------------------------------------------------------------
# IDM vehicles per km per lane for scenarios 0/1/2 (light/medium/dense), times `traffic_density`.
VEHICLES_PER_KM_PER_LANE = (4.0, 9.0, 16.0)
# Vehicles spawn at most one per slot of this length per lane (jittered inside it), so no two start
# closer than SPAWN_SLOT_M - 2 * SPAWN_JITTER_M centre to centre: a 30 m/s car can still stop behind a
# 20 m/s one with IDM's maximum braking.
SPAWN_SLOT_M = 35.0
SPAWN_JITTER_M = 5.0
NPC_SPEED_RANGE_MPS = (20.0, 30.0)
# A vehicle counts as on a lane for IDM/MOBIL within half a lane width plus this (highway-env's margin).
NEIGHBOUR_LANE_MARGIN_M = 1.0
# No traffic spawns in this window around the ego's start (road coordinate, all lanes): a 30 m/s car
# this far behind the ego can still brake to its speed.
EGO_CLEAR_BEHIND_M = 20.0
EGO_CLEAR_AHEAD_M = 30.0

# --- Rendering -----------------------------------------------------------------------------------------
GRAYSCALE_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])  # ITU-R 601 luma, as highway-env's GrayscaleObservation
# Dark green (luma ~53): far from the road's grey (100) and the IDM cars' light blue (~176).
EGO_COLOR = (0, 90, 0)
TOP_VIEW_SIZE = (600, 150)  # (width, height), highway-env's default render
TOP_VIEW_PIXELS_PER_METER = 5.5
TOP_VIEW_EGO_POSITION = 0.3  # across the top view's width, as env.frame_ego_position is for the frames


@dataclass
class _LanePositions:
    """Where every vehicle is on the road, frozen while the drivers decide (positions only move in `step`)."""

    vehicles: list[Vehicle]
    segments: np.ndarray  # segment of each vehicle's nearest lane
    fractions: np.ndarray  # how far along that segment, 0..1 (beyond at the road's ends)
    laterals: np.ndarray  # metres right of lane 0's centre line

    def arcs(self, track: Track, lane: int) -> np.ndarray:
        """Each vehicle's projection on `lane`, as arc length along it."""
        return track.lane_starts[lane, self.segments] + self.fractions * track.lane_lengths[lane, self.segments]

    def on_lane(self, lane: int) -> np.ndarray:
        return np.abs(self.laterals - lane * LANE_WIDTH_M) <= LANE_WIDTH_M / 2 + NEIGHBOUR_LANE_MARGIN_M


class _TrackRoad(Road):
    """highway-env's `Road` with the per-pair Python loops of its two hot paths replaced by array maths.

    - Neighbour search (IDM/MOBIL call it a few times per vehicle per step, and it visits every vehicle on
      up to three lanes each time): same rule as highway-env with connected lanes (a vehicle counts on a
      lane when within half a lane width plus 1 m of its centre; the nearest ahead and behind win) but
      along the whole road, from positions computed once per simulation step.
    - Collisions: pairs too far apart to touch within the step are skipped before highway-env's own check,
      which would reject them anyway.
    The road holds no static objects (obstacles/landmarks), so only vehicles are considered.
    """

    def __init__(self, track: Track, np_random: np.random.Generator):
        super().__init__(network=track.network, np_random=np_random)
        self.track = track
        self._positions: _LanePositions | None = None

    def invalidate_positions(self) -> None:
        self._positions = None

    def lane_positions(self) -> _LanePositions:
        if self._positions is None:
            segments, fractions, laterals = [], [], []
            for vehicle in self.vehicles:
                segment, _, lane = vehicle.lane_index
                longitudinal, lateral = vehicle.lane.local_coordinates(vehicle.position)
                segments.append(segment)
                fractions.append(longitudinal / self.track.lane_lengths[lane, segment])
                laterals.append(lane * LANE_WIDTH_M + lateral)
            self._positions = _LanePositions(
                list(self.vehicles), np.array(segments, dtype=int), np.array(fractions), np.array(laterals)
            )
        return self._positions

    def act(self) -> None:
        self.invalidate_positions()
        super().act()

    def step(self, dt: float) -> None:
        for vehicle in self.vehicles:
            vehicle.step(dt)
        self.invalidate_positions()
        positions = np.array([v.position for v in self.vehicles])
        # A bound on highway-env's own reach test: half diagonals plus the distance covered in the step.
        reach = np.array([v.diagonal / 2 + abs(v.speed) * dt for v in self.vehicles])
        distances = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
        close = np.triu(distances <= reach[:, None] + reach[None, :], k=1)
        for i, j in zip(*np.nonzero(close)):
            self.vehicles[i].handle_collisions(self.vehicles[j], dt)

    def neighbour_vehicles(
        self, vehicle: Vehicle, lane_index: LaneIndex | None = None
    ) -> tuple[Vehicle | None, Vehicle | None]:
        lane = (lane_index or vehicle.lane_index)[2]
        positions = self.lane_positions()
        arcs = positions.arcs(self.track, lane)
        me = positions.vehicles.index(vehicle)
        candidates = positions.on_lane(lane)
        candidates[me] = False
        ahead = candidates & (arcs >= arcs[me])
        behind = candidates & (arcs < arcs[me])
        leader = positions.vehicles[int(np.argmin(np.where(ahead, arcs, np.inf)))] if ahead.any() else None
        follower = positions.vehicles[int(np.argmax(np.where(behind, arcs, -np.inf)))] if behind.any() else None
        return leader, follower


def _traffic_count(config: EnvConfig, road_length_m: float) -> int:
    """IDM vehicles on a road of this length for the config's scenario and density (before slot capping)."""
    per_lane = VEHICLES_PER_KM_PER_LANE[config.scenario] * config.traffic_density * road_length_m / 1000.0
    return int(round(per_lane * config.lanes))


def _spawn_traffic(road: Road, track: Track, config: EnvConfig, rng: np.random.Generator) -> None:
    slot_centres = np.arange(SPAWN_SLOT_M / 2, track.end_m - SPAWN_SLOT_M / 2, SPAWN_SLOT_M)
    near_ego = (slot_centres > track.start_m - EGO_CLEAR_BEHIND_M - SPAWN_JITTER_M) & (
        slot_centres < track.start_m + EGO_CLEAR_AHEAD_M + SPAWN_JITTER_M
    )
    slots = [(lane, road_m) for lane in range(track.lanes) for road_m in slot_centres[~near_ego]]
    count = min(_traffic_count(config, track.end_m), len(slots))
    for slot in rng.choice(len(slots), size=count, replace=False):
        lane, road_m = slots[slot]
        segment, longitudinal = track.lane_arc_length(lane, road_m + rng.uniform(-SPAWN_JITTER_M, SPAWN_JITTER_M))
        geometry = track.lane(segment, lane)
        speed = rng.uniform(*NPC_SPEED_RANGE_MPS)
        vehicle = IDMVehicle(road, geometry.position(longitudinal, 0.0), geometry.heading_at(longitudinal), speed)
        vehicle.randomize_behavior()
        road.vehicles.append(vehicle)


def _wrap_to_pi(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def view_centering(ego_position: float) -> list[float]:
    """highway-env's `centering_position` of a view with the ego at `ego_position` across its width, mid-height."""
    return [ego_position, 0.5]


def _offscreen_surface(size: tuple[int, int], pixels_per_meter: float, ego_position: float) -> WorldSurface:
    surface = WorldSurface(size, 0, pygame.Surface(size))
    surface.scaling = pixels_per_meter
    surface.centering_position = view_centering(ego_position)
    return surface


class HighwayBackend:
    """`Backend` on highway-env: see the module docstring for the road, traffic and frame conventions."""

    def __init__(self, config: EnvConfig):
        self.config = config
        self.limits = VehicleLimits(
            max_steer_rad=config.max_steer_rad,
            max_accel_mps2=MAX_ACCEL_MPS2,
            max_brake_mps2=MAX_BRAKE_MPS2,
            wheelbase_m=WHEELBASE_M,
        )
        self.dt = 1.0 / config.policy_frequency_hz
        self._substeps = max(int(round(SIMULATION_FREQUENCY_HZ * self.dt)), 1)
        self._frame_surface = _offscreen_surface(
            (config.image_size, config.image_size), config.pixels_per_meter, config.frame_ego_position
        )
        self._top_view_surface = _offscreen_surface(TOP_VIEW_SIZE, TOP_VIEW_PIXELS_PER_METER, TOP_VIEW_EGO_POSITION)
        self._track: Track | None = None
        self._road: _TrackRoad | None = None
        self._ego: Vehicle | None = None

    @property
    def vehicle_count(self) -> int:
        """IDM vehicles currently on the road."""
        return len(self._road.vehicles) - 1

    def reset(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._track = build_track(self.config, rng)
        # The road draws the IDM drivers' randomness (behaviour parameters) from the same seeded generator.
        self._road = _TrackRoad(self._track, rng)
        lane = int(rng.integers(self.config.lanes))
        segment, longitudinal = self._track.lane_arc_length(lane, self._track.start_m)
        start_lane = self._track.lane(segment, lane)
        position, heading = start_lane.position(longitudinal, 0.0), start_lane.heading_at(longitudinal)
        ego = Vehicle(self._road, position, heading, self.config.initial_speed_mps)
        ego.color = EGO_COLOR
        # MOBIL predicts how a lane change would make the ego brake by modelling it as an IDM driver with a
        # desired speed; without one it assumes the ego wants to stand still and never merges ahead of it.
        ego.target_speed = self.config.target_speed_mps
        self._ego = ego
        self._road.vehicles.append(ego)
        _spawn_traffic(self._road, self._track, self.config, rng)

    def step(self, steer: float, throttle_brake: float) -> None:
        full_scale = self.limits.max_brake_mps2 if throttle_brake < 0 else self.limits.max_accel_mps2
        # Positive steering angles turn right in highway-env's y-down world, as the contract's steer does.
        self._ego.act({"steering": steer * self.limits.max_steer_rad, "acceleration": throttle_brake * full_scale})
        substep_dt = self.dt / self._substeps
        for _ in range(self._substeps):
            self._road.act()
            self._road.step(substep_dt)
            # Braking stops the car; the bicycle model alone would reverse it. The position integrates the
            # speed before the update, so the car never moves backwards either.
            self._ego.speed = max(self._ego.speed, 0.0)
        self._remove_vehicles_past_road_end()

    def _remove_vehicles_past_road_end(self) -> None:
        last = self._track.last_segment
        self._road.vehicles = [
            v
            for v in self._road.vehicles
            if v is self._ego or v.lane_index[0] != last or not v.lane.after_end(v.position)
        ]
        self._road.invalidate_positions()

    def frame(self) -> np.ndarray:
        self._draw(self._frame_surface)
        # The weights sum to just under 1, so the luma cannot overflow uint8. Pygame arrays are (W, H).
        luma = np.dot(pygame.surfarray.array3d(self._frame_surface), GRAYSCALE_WEIGHTS).astype(np.uint8)
        return np.ascontiguousarray(luma.T)

    def top_view(self) -> np.ndarray:
        self._draw(self._top_view_surface)
        return np.ascontiguousarray(pygame.surfarray.array3d(self._top_view_surface).transpose(1, 0, 2))

    def _draw(self, surface: WorldSurface) -> None:
        """Redraw the road and traffic around the ego.

        Draws as highway-env's `RoadGraphics.display` does, but only the lanes of segments within the view's
        reach: highway-env computes the stripes of every lane of the network, visible or not.
        """
        surface.move_display_window_to(self._ego.position)
        surface.fill(surface.GREY)
        reach_m = math.hypot(surface.get_width(), surface.get_height()) / surface.scaling
        segment, lane, longitudinal, _ = self._ego_lane_position()
        ego_road_m = self._track.road_coordinate(segment, lane, longitudinal)
        for k in range(self._track.segment_at(ego_road_m - reach_m), self._track.segment_at(ego_road_m + reach_m) + 1):
            for lane_geometry in self._track.network.graph[k][k + 1]:
                LaneGraphics.display(lane_geometry, surface)
        RoadGraphics.display_traffic(self._road, surface, offscreen=True)

    def _ego_lane_position(self) -> tuple[int, int, float, float]:
        """(segment, lane, longitudinal, lateral) of the ego on its nearest lane, in highway-env's lane frame."""
        segment, _, lane = self._ego.lane_index
        longitudinal, lateral = self._ego.lane.local_coordinates(self._ego.position)
        return segment, lane, longitudinal, lateral

    def _to_ego_frame(self, points: np.ndarray) -> np.ndarray:
        delta = points - self._ego.position
        cos_h, sin_h = math.cos(self._ego.heading), math.sin(self._ego.heading)
        # The driver's left in the y-down world is (sin h, -cos h).
        return np.stack([delta @ (cos_h, sin_h), delta @ (sin_h, -cos_h)], axis=1)

    def _waypoints(self, lane: int, arc_length: float) -> np.ndarray:
        points = self._track.points_ahead(lane, arc_length, self.config.num_waypoints, self.config.waypoint_spacing_m)
        return self._to_ego_frame(points)

    def measure(self) -> Measurement:
        ego, track = self._ego, self._track
        segment, lane, longitudinal, lateral = self._ego_lane_position()
        return Measurement(
            speed_mps=float(ego.speed),
            progress_m=track.road_coordinate(segment, lane, longitudinal) - track.start_m,
            route_length_m=track.goal_m - track.start_m,
            lateral_offset_m=-float(lateral),
            # Headings grow clockwise (to the right) in highway-env; the contract's grow counter-clockwise.
            heading_error_rad=_wrap_to_pi(ego.heading - ego.lane.heading_at(longitudinal)),
            waypoints_ego=self._waypoints(lane, track.lane_starts[lane, segment] + longitudinal),
            collision="vehicle" if ego.crashed else None,  # the road holds no static objects
            off_drivable=not ego.lane.on_lane(ego.position, longitudinal, lateral),
        )

    def scene(self) -> Scene:
        track, ego = self._track, self._ego
        lane = ego.lane_index[2]
        positions = self._road.lane_positions()
        me = positions.vehicles.index(ego)
        offsets = [o for o in (-1, 0, 1) if 0 <= lane + o < track.lanes]
        leaders: dict[int, Neighbour | None] = {}
        followers: dict[int, Neighbour | None] = {}
        lane_waypoints = {}
        for offset in offsets:
            other_lane = lane + offset
            arcs = positions.arcs(track, other_lane)
            leader, follower = self._road.neighbour_vehicles(ego, (*ego.lane_index[:2], other_lane))
            leaders[offset] = self._neighbour(leader, arcs, positions, me)
            followers[offset] = self._neighbour(follower, arcs, positions, me)
            lane_waypoints[offset] = self._waypoints(other_lane, arcs[me])
        return Scene(
            speed_mps=float(ego.speed),
            lane=lane,
            lanes=track.lanes,
            leaders=leaders,
            followers=followers,
            lane_waypoints=lane_waypoints,
        )

    def _neighbour(
        self, vehicle: Vehicle | None, arcs: np.ndarray, positions: _LanePositions, me: int
    ) -> Neighbour | None:
        """Bumper-to-bumper gap along the lane (0 when the two overlap) and speed of a neighbour."""
        if vehicle is None:
            return None
        distance = abs(arcs[positions.vehicles.index(vehicle)] - arcs[me])
        gap = distance - (self._ego.LENGTH + vehicle.LENGTH) / 2
        return Neighbour(gap_m=max(float(gap), 0.0), speed_mps=float(vehicle.speed))

    can_snapshot = True

    def get_state(self) -> bytes:
        # One pickle keeps the sharing intact: the ego is also in road.vehicles, the track's network is the road's.
        return pickle.dumps((self._track, self._road, self._ego))

    def set_state(self, state: bytes) -> None:
        self._track, self._road, self._ego = pickle.loads(state)

    def close(self) -> None:
        # The surfaces are plain offscreen pygame surfaces; no pygame module or display was ever initialised.
        self._frame_surface = None
        self._top_view_surface = None
