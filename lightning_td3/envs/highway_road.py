"""The highway backend's road: a chain of segments of parallel highway-env lanes, and where things are on it.

The road is a chain of segments (node k -> node k + 1), each holding `lanes` parallel lanes:
- "straight": one straight segment;
- "curvy": a straight run, then S-bends (circular arcs of alternating direction with concentric lanes,
  separated by short straights), so the road keeps heading roughly along +x.
The route starts where the ego starts, `ROAD_BEHIND_START_M` into the road, and the road runs on for
`ROAD_BEYOND_GOAL_M` past the goal so traffic and waypoints do not run out there.

Positions along the road ("road coordinate") are measured along the road's middle line. Because the lanes
of an arc are concentric, a given fraction of a segment is the same road coordinate on every lane, so
progress does not jump when the ego changes lane.

Coordinates are highway-env's world frame (see `highway_backend`): y down the screen, lane 0 leftmost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from highway_env.road.lane import AbstractLane, CircularLane, LineType, StraightLane
from highway_env.road.road import LaneIndex, RoadNetwork

from lightning_td3.envs.config import EnvConfig

LANE_WIDTH_M = StraightLane.DEFAULT_WIDTH
SPEED_LIMIT_MPS = 30.0  # caps the IDM vehicles' desired speeds
ROAD_BEHIND_START_M = 150.0  # road before the ego's start, so there is traffic behind it
ROAD_BEYOND_GOAL_M = 200.0
FIRST_BEND_AFTER_START_M = 50.0  # curvy layout: straight run ahead of the ego before the first bend
BEND_RADIUS_RANGE_M = (150.0, 300.0)  # of the road's middle line; needs ~0.02-0.03 rad of steer at 25 m/s
BEND_HEADING_SWING_RAD = math.radians(20.0)  # the road's heading swings between -/+ this
STRAIGHT_BETWEEN_BENDS_RANGE_M = (20.0, 80.0)
# Lane centre lines are sampled this finely for waypoints (an arc of 150 m radius deviates < 1 mm from it).
POLYLINE_STEP_M = 1.0
# Spacing of the points that locate a position's road segment; far below the shortest segment.
LANDMARK_SPACING_M = 5.0


@dataclass
class _Segment:
    """One piece of the road's middle line: straight if `turn` is 0, else an arc turning right (+1) or left (-1)."""

    length: float
    turn: int = 0
    radius: float = math.inf


class TrackNetwork(RoadNetwork):
    """A chain of segments of parallel lanes; the closest-lane search only weighs the segments near a position.

    highway-env weighs every lane of the network, for every vehicle, every simulation step: on a road of many
    segments that dominates the step. A position on or near the road projects onto lane 0 within half a
    landmark spacing of its nearest landmark (a point on lane 0's centre line), and lanes of farther segments
    are at least a whole segment away, so only the segments within one spacing of that landmark can hold
    the closest lane; highway-env's own distance picks among their lanes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._landmarks = np.zeros((0, 2))
        self._first_segments = self._last_segments = np.zeros(0, dtype=int)

    def set_landmarks(self, points: np.ndarray, first_segments: np.ndarray, last_segments: np.ndarray) -> None:
        self._landmarks, self._first_segments, self._last_segments = points, first_segments, last_segments

    def get_closest_lane_index(self, position: np.ndarray, heading: float | None = None) -> LaneIndex:
        nearest = int(np.argmin(((self._landmarks - position) ** 2).sum(axis=1)))
        candidates = [
            (k, k + 1, lane)
            for k in range(self._first_segments[nearest], self._last_segments[nearest] + 1)
            for lane in range(len(self.graph[k][k + 1]))
        ]
        return min(candidates, key=lambda index: self.get_lane(index).distance_with_heading(position, heading))


@dataclass
class Track:
    """The road network plus the arrays that turn (segment, lane, local coordinate) into road positions."""

    network: TrackNetwork
    lanes: int
    segment_starts: np.ndarray  # (segments + 1,) road coordinate where each segment starts, then the end
    segment_lengths: np.ndarray  # (segments,) along the middle line
    lane_starts: np.ndarray  # (lanes, segments) arc length along lane i where segment k starts
    lane_lengths: np.ndarray  # (lanes, segments)
    centre_lines: list[np.ndarray]  # per lane: (n, 3) rows of (arc length along the lane, x, y)
    start_m: float  # road coordinate of the route start (the ego's start)
    goal_m: float

    @property
    def end_m(self) -> float:
        return float(self.segment_starts[-1])

    @property
    def last_segment(self) -> int:
        return len(self.segment_lengths) - 1

    def lane(self, segment: int, lane: int) -> AbstractLane:
        return self.network.graph[segment][segment + 1][lane]

    def road_coordinate(self, segment: int, lane: int, longitudinal: float) -> float:
        fraction = longitudinal / self.lane_lengths[lane, segment]
        return float(self.segment_starts[segment] + fraction * self.segment_lengths[segment])

    def segment_at(self, road_m: float) -> int:
        return int(np.clip(np.searchsorted(self.segment_starts, road_m, "right") - 1, 0, self.last_segment))

    def lane_arc_length(self, lane: int, road_m: float) -> tuple[int, float]:
        """(segment, local longitudinal coordinate on `lane`) at a road coordinate."""
        segment = self.segment_at(road_m)
        fraction = (road_m - self.segment_starts[segment]) / self.segment_lengths[segment]
        return segment, float(fraction * self.lane_lengths[lane, segment])

    def points_ahead(self, lane: int, arc_length: float, count: int, spacing: float) -> np.ndarray:
        """(count, 2) world points on `lane`'s centre line, `spacing` apart, starting `spacing` past `arc_length`."""
        line = self.centre_lines[lane]
        at = arc_length + spacing * np.arange(1, count + 1)
        return np.stack([np.interp(at, line[:, 0], line[:, 1]), np.interp(at, line[:, 0], line[:, 2])], axis=1)


def _plan_segments(layout: str, length_m: float, rng: np.random.Generator) -> list[_Segment]:
    if layout == "straight":
        return [_Segment(length_m)]
    segments = [_Segment(ROAD_BEHIND_START_M + FIRST_BEND_AFTER_START_M)]
    turn = int(rng.choice([-1, 1]))
    heading_change = BEND_HEADING_SWING_RAD  # the first bend swings from straight ahead to one side
    while sum(s.length for s in segments) < length_m:
        radius = rng.uniform(*BEND_RADIUS_RANGE_M)
        segments.append(_Segment(radius * heading_change, turn, radius))
        segments.append(_Segment(rng.uniform(*STRAIGHT_BETWEEN_BENDS_RANGE_M)))
        turn = -turn
        heading_change = 2 * BEND_HEADING_SWING_RAD
    return segments


def _line_types(lane: int, lanes: int, curved: bool) -> list[int]:
    # A "continuous line" is drawn as a single chord, which cuts corners on arcs.
    edge = LineType.CONTINUOUS if curved else LineType.CONTINUOUS_LINE
    return [edge if lane == 0 else LineType.STRIPED, edge if lane == lanes - 1 else LineType.NONE]


def _segment_lanes(segment: _Segment, position: np.ndarray, heading: float, lanes: int) -> list[AbstractLane]:
    """The lanes of one segment starting at the middle line's pose, lane 0 leftmost."""
    right = np.array([-math.sin(heading), math.cos(heading)])
    offsets = (np.arange(lanes) - (lanes - 1) / 2) * LANE_WIDTH_M  # lateral, > 0 = right of the middle
    curved = segment.turn != 0
    common = dict(width=LANE_WIDTH_M, speed_limit=SPEED_LIMIT_MPS)
    if not curved:
        forward = np.array([math.cos(heading), math.sin(heading)])
        end = position + segment.length * forward
        return [
            StraightLane(position + o * right, end + o * right, line_types=_line_types(i, lanes, curved), **common)
            for i, o in enumerate(offsets)
        ]
    # The centre sits on the inner side; a lane `o` to the right of the middle has radius R - turn * o.
    centre = position + segment.turn * segment.radius * right
    start_phase = heading - segment.turn * math.pi / 2
    end_phase = start_phase + segment.turn * segment.length / segment.radius
    return [
        CircularLane(
            centre,
            segment.radius - segment.turn * o,
            start_phase,
            end_phase,
            clockwise=segment.turn > 0,
            line_types=_line_types(i, lanes, curved),
            **common,
        )
        for i, o in enumerate(offsets)
    ]


def _lay_out_lanes(segments: list[_Segment], lanes: int) -> TrackNetwork:
    """Chain the segments' lanes end to end, the road starting at the origin heading along +x."""
    network = TrackNetwork()
    position, heading = np.zeros(2), 0.0
    for k, segment in enumerate(segments):
        segment_lanes = _segment_lanes(segment, position, heading, lanes)
        for lane in segment_lanes:
            network.add_lane(k, k + 1, lane)
        # The middle line ends halfway between the (symmetric) outer lanes' ends.
        left_end = segment_lanes[0].position(segment_lanes[0].length, 0.0)
        right_end = segment_lanes[-1].position(segment_lanes[-1].length, 0.0)
        position = (left_end + right_end) / 2
        heading += segment.turn * segment.length / segment.radius
    return network


def _sample_centre_line(lanes: list[AbstractLane], lane_starts: np.ndarray) -> np.ndarray:
    """(n, 3) rows of (arc length, x, y) along consecutive lanes, every ~POLYLINE_STEP_M."""
    pieces = []
    for lane, lane_start in zip(lanes, lane_starts):
        along = np.linspace(0.0, lane.length, max(int(math.ceil(lane.length / POLYLINE_STEP_M)), 1) + 1)
        points = np.array([lane.position(s, 0.0) for s in along])
        # Each piece's first point repeats the previous piece's last one.
        pieces.append(np.column_stack([lane_start + along, points])[1 if pieces else 0 :])
    return np.concatenate(pieces)


def _place_landmarks(network: TrackNetwork, lane_0_line: np.ndarray, lane_0_starts: np.ndarray) -> None:
    landmarks = lane_0_line[:: int(LANDMARK_SPACING_M / POLYLINE_STEP_M)]
    last_segment = len(lane_0_starts) - 1

    def segment_at(arc_length: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(lane_0_starts, arc_length, "right") - 1, 0, last_segment)

    arcs = landmarks[:, 0]
    first_segments, last_segments = segment_at(arcs - LANDMARK_SPACING_M), segment_at(arcs + LANDMARK_SPACING_M)
    network.set_landmarks(landmarks[:, 1:], first_segments, last_segments)


def build_track(config: EnvConfig, rng: np.random.Generator) -> Track:
    """A new road for one episode: its layout, lanes and route length from `config`, its bends drawn from `rng`."""
    start_m = ROAD_BEHIND_START_M
    goal_m = start_m + config.route_length_m
    segments = _plan_segments(config.layout, goal_m + ROAD_BEYOND_GOAL_M, rng)
    network = _lay_out_lanes(segments, config.lanes)
    lanes_by_id = [[network.graph[k][k + 1][i] for k in range(len(segments))] for i in range(config.lanes)]
    lane_lengths = np.array([[lane.length for lane in lanes] for lanes in lanes_by_id])
    lane_starts = np.cumsum(lane_lengths, axis=1) - lane_lengths
    centre_lines = [_sample_centre_line(lanes, starts) for lanes, starts in zip(lanes_by_id, lane_starts)]
    _place_landmarks(network, centre_lines[0], lane_starts[0])
    segment_lengths = np.array([s.length for s in segments])
    return Track(
        network=network,
        lanes=config.lanes,
        segment_starts=np.concatenate([[0.0], np.cumsum(segment_lengths)]),
        segment_lengths=segment_lengths,
        lane_starts=lane_starts,
        lane_lengths=lane_lengths,
        centre_lines=centre_lines,
        start_m=start_m,
        goal_m=goal_m,
    )
