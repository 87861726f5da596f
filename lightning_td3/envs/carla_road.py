"""Road geometry on a CARLA map without a server: routes, projections, lane errors, lanes and neighbours.

Everything here takes real carla objects (`carla.Map`, `carla.Waypoint`, `carla.Transform`, `carla.Location`),
which exist offline too (`carla.Map(name, opendrive_xml)`), so it is tested without a simulator.

Handedness: CARLA's world is left-handed (with x forward, y points to the right and yaw turns clockwise seen
from above), while the contract's ego frame is right-handed (y to the left). So all geometry here happens in
the *planar frame* (CARLA's x, -y; headings counter-clockwise in radians); `planar_point` and `Pose` convert at
the boundary and nothing else touches CARLA coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import carla
import numpy as np

from lightning_td3.envs.contract import Neighbour

# Spacing of the dense route polyline; progress is measured on it.
ROUTE_SPACING_M = 1.0
# Spacing of the lane centre lines that scene() projects vehicles onto.
LANE_LINE_SPACING_M = 1.0
# Consecutive polyline points closer than this are one point (CARLA repeats a point where roads join).
DUPLICATE_POINT_M = 1e-3
# A real map has at most a handful of lanes per direction; this only bounds the walk across them.
MAX_LANES_PER_SIDE = 8


def planar_point(location: carla.Location) -> np.ndarray:
    return np.array([location.x, -location.y])


def wrap_angle(angle_rad: float) -> float:
    return (angle_rad + math.pi) % (2.0 * math.pi) - math.pi


@dataclass(frozen=True)
class Pose:
    """Position and heading in the planar frame."""

    xy: np.ndarray
    heading_rad: float

    @classmethod
    def from_transform(cls, transform: carla.Transform) -> Pose:
        return cls(planar_point(transform.location), -math.radians(transform.rotation.yaw))


def to_ego_frame(points: np.ndarray, ego: Pose) -> np.ndarray:
    """Planar points (n, 2) seen from `ego`: x forward, y to the left."""
    cos, sin = math.cos(ego.heading_rad), math.sin(ego.heading_rad)
    relative = np.asarray(points, dtype=np.float64) - ego.xy
    return np.stack([cos * relative[:, 0] + sin * relative[:, 1], -sin * relative[:, 0] + cos * relative[:, 1]], axis=1)


def lane_errors(ego: Pose, lane: Pose) -> tuple[float, float]:
    """(lateral offset of the ego from the lane centre point `lane`, > 0 = left; lane minus ego heading)."""
    forward = np.array([math.cos(lane.heading_rad), math.sin(lane.heading_rad)])
    relative = ego.xy - lane.xy
    offset = forward[0] * relative[1] - forward[1] * relative[0]
    return float(offset), wrap_angle(lane.heading_rad - ego.heading_rad)


@dataclass(frozen=True)
class Projection:
    """The point of a polyline nearest to a query point."""

    s_m: float  # arc length from the polyline's start
    distance_m: float
    offset_m: float  # signed lateral offset of the query point, > 0 = left of the polyline's direction
    heading_rad: float  # direction of the polyline there


class Polyline:
    """A planar polyline parametrised by arc length."""

    def __init__(self, points: np.ndarray):
        points = np.asarray(points, dtype=np.float64)
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > DUPLICATE_POINT_M
        self.points = points[keep]
        if len(self.points) < 2:
            raise ValueError("a polyline needs at least two distinct points")
        self._deltas = np.diff(self.points, axis=0)
        self._segment_lengths = np.linalg.norm(self._deltas, axis=1)
        self._cumulative = np.concatenate([[0.0], np.cumsum(self._segment_lengths)])

    @property
    def length_m(self) -> float:
        return float(self._cumulative[-1])

    def project(
        self, point: np.ndarray, near_s_m: float | None = None, behind_m: float = 0.0, ahead_m: float = 0.0
    ) -> Projection:
        """Nearest point of the polyline; with `near_s_m`, only among arc lengths in [near - behind, near + ahead],
        so that a route passing close to itself cannot make the projection jump."""
        segments = np.arange(len(self._segment_lengths))
        if near_s_m is not None:
            overlaps = (self._cumulative[1:] >= near_s_m - behind_m) & (self._cumulative[:-1] <= near_s_m + ahead_m)
            if overlaps.any():
                segments = segments[overlaps]
        starts, deltas, lengths = self.points[segments], self._deltas[segments], self._segment_lengths[segments]
        relative = np.asarray(point, dtype=np.float64) - starts
        fraction = np.clip(np.einsum("ij,ij->i", relative, deltas) / lengths**2, 0.0, 1.0)
        to_point = relative - fraction[:, None] * deltas
        distances = np.linalg.norm(to_point, axis=1)
        best = int(np.argmin(distances))
        tangent = deltas[best] / lengths[best]
        return Projection(
            s_m=float(self._cumulative[segments[best]] + fraction[best] * lengths[best]),
            distance_m=float(distances[best]),
            offset_m=float(tangent[0] * to_point[best, 1] - tangent[1] * to_point[best, 0]),
            heading_rad=math.atan2(tangent[1], tangent[0]),
        )

    def points_at(self, s_values: np.ndarray) -> np.ndarray:
        """Points at the given arc lengths; beyond either end the end segment is extended in a straight line."""
        s_values = np.asarray(s_values, dtype=np.float64)
        segment = np.clip(np.searchsorted(self._cumulative, s_values, side="right") - 1, 0, len(self._deltas) - 1)
        fraction = (s_values - self._cumulative[segment]) / self._segment_lengths[segment]
        return self.points[segment] + fraction[:, None] * self._deltas[segment]

    def points_ahead(self, s_m: float, count: int, spacing_m: float) -> np.ndarray:
        """`count` points strictly ahead of arc length `s_m`, one every `spacing_m`."""
        return self.points_at(s_m + spacing_m * np.arange(1, count + 1))


def _nearest_to(options: Iterable[carla.Waypoint], target: np.ndarray) -> carla.Waypoint:
    return min(options, key=lambda waypoint: float(np.linalg.norm(planar_point(waypoint.transform.location) - target)))


def plan_route(
    start: carla.Waypoint, length_m: float, rng: np.random.Generator, spacing_m: float = ROUTE_SPACING_M
) -> Polyline | None:
    """The lane centre line from `start` for about `length_m` along the traffic direction (or to a dead end);
    None if the lane ends right at `start`.

    Where the lane forks (junctions), the branch is drawn from `rng` among the options sorted by road and lane,
    so the same seed gives the same route.
    """
    points = [planar_point(start.transform.location)]
    waypoint, travelled = start, 0.0
    # Each step normally advances `spacing_m`; the bound keeps a map whose lanes do not advance from looping.
    for _ in range(2 * math.ceil(length_m / spacing_m) + 2):
        if travelled >= length_m:
            break
        options = sorted(waypoint.next(spacing_m), key=lambda w: (w.road_id, w.section_id, w.lane_id, w.s))
        if not options:
            break
        waypoint = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        point = planar_point(waypoint.transform.location)
        travelled += float(np.linalg.norm(point - points[-1]))
        points.append(point)
    return Polyline(np.array(points)) if travelled > 0.0 else None


def _walk_lane(
    start: carla.Waypoint,
    step: Callable[[carla.Waypoint], list[carla.Waypoint]],
    count: int,
    target: Callable[[int, carla.Waypoint], np.ndarray],
) -> list[np.ndarray]:
    """Up to `count` points stepping along a lane; at a fork, the option nearest to `target(k, current)`."""
    points, waypoint = [], start
    for k in range(1, count + 1):
        options = step(waypoint)
        if not options:
            break
        waypoint = _nearest_to(options, target(k, waypoint))
        points.append(planar_point(waypoint.transform.location))
    return points


def lane_centre_line(
    waypoint: carla.Waypoint, behind_m: float, ahead_m: float, guide: Polyline, guide_s_m: float
) -> tuple[Polyline, float]:
    """The centre line of `waypoint`'s lane from `behind_m` before it to `ahead_m` past it, and its arc length
    at `waypoint`.

    Ahead, forks follow the branch nearest to `guide` (the route, from arc length `guide_s_m`), so every lane
    heads where the ego is going; behind, forks follow the straightest branch.
    """
    spacing = LANE_LINE_SPACING_M

    def straight_back(_: int, current: carla.Waypoint) -> np.ndarray:
        pose = Pose.from_transform(current.transform)
        return pose.xy - spacing * np.array([math.cos(pose.heading_rad), math.sin(pose.heading_rad)])

    def along_guide(k: int, _: carla.Waypoint) -> np.ndarray:
        return guide.points_at([guide_s_m + k * spacing])[0]

    behind = _walk_lane(waypoint, lambda w: w.previous(spacing), math.ceil(behind_m / spacing), straight_back)
    ahead = _walk_lane(waypoint, lambda w: w.next(spacing), math.ceil(ahead_m / spacing), along_guide)
    here = planar_point(waypoint.transform.location)
    line = Polyline(np.array([*reversed(behind), here, *ahead]))
    return line, line.project(here).s_m


def is_on_driving_lane(carla_map: carla.Map, location: carla.Location) -> bool:
    """Whether `location` lies inside a driving lane (not on a shoulder, sidewalk or off the road)."""
    return carla_map.get_waypoint(location, project_to_road=False, lane_type=carla.LaneType.Driving) is not None


def _same_direction(reference: carla.Waypoint, candidate: carla.Waypoint | None) -> bool:
    # Lane ids of one road share their sign exactly when the lanes carry traffic the same way.
    return (
        candidate is not None
        and candidate.lane_type == carla.LaneType.Driving
        and candidate.lane_id * reference.lane_id > 0
    )


def _lanes_beside(waypoint: carla.Waypoint, side: Callable[[carla.Waypoint], carla.Waypoint | None]) -> list:
    lanes, current = [], waypoint
    for _ in range(MAX_LANES_PER_SIDE):
        current = side(current)
        if not _same_direction(waypoint, current):
            break
        lanes.append(current)
    return lanes


def same_direction_lanes(waypoint: carla.Waypoint) -> tuple[list[carla.Waypoint], list[carla.Waypoint]]:
    """Driving lanes beside `waypoint`'s lane that carry traffic its way: (to the left, to the right), nearest first."""
    return _lanes_beside(waypoint, lambda w: w.get_left_lane()), _lanes_beside(waypoint, lambda w: w.get_right_lane())


@dataclass(frozen=True)
class OtherVehicle:
    xy: np.ndarray  # planar frame
    half_length_m: float
    speed_mps: float


@dataclass(frozen=True)
class LaneView:
    """One lane as the ego sees it: its centre line, the ego's arc length on it and its half width."""

    line: Polyline
    ego_s_m: float
    half_width_m: float


def nearest_neighbours(
    lanes: dict[int, LaneView], others: Iterable[OtherVehicle], ego_half_length_m: float
) -> tuple[dict[int, Neighbour | None], dict[int, Neighbour | None]]:
    """Closest leader and follower per lane offset; a vehicle belongs to the lane whose centre line is nearest,
    if it lies within that lane's half width. A vehicle level with the ego counts as a leader at gap 0."""
    leaders: dict[int, Neighbour | None] = dict.fromkeys(lanes)
    followers: dict[int, Neighbour | None] = dict.fromkeys(lanes)
    for vehicle in others:
        projections = {offset: lane.line.project(vehicle.xy) for offset, lane in lanes.items()}
        offset = min(projections, key=lambda o: projections[o].distance_m)
        if projections[offset].distance_m > lanes[offset].half_width_m:
            continue
        along = projections[offset].s_m - lanes[offset].ego_s_m
        gap = max(abs(along) - ego_half_length_m - vehicle.half_length_m, 0.0)
        table = leaders if along >= 0.0 else followers
        if table[offset] is None or gap < table[offset].gap_m:
            table[offset] = Neighbour(gap_m=gap, speed_mps=vehicle.speed_mps)
    return leaders, followers
