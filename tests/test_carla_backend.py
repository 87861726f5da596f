"""The CARLA backend without a CARLA server.

Road logic runs on real `carla.Map`s built offline from the OpenDRIVE fixtures in tests/data (a straight
two-lane one-way road, a two-way road bending left, a fork with a right turn). Only the server side (client,
world, actors, sensors, Traffic Manager) is a test double: `FakeCarlaClient` / `FakeCarlaWorld` below.
"""

from __future__ import annotations

import fnmatch
import gc
import math
import socket
import threading
import time
import weakref
from functools import cache
from pathlib import Path

import carla
import numpy as np
import pytest

from lightning_td3.envs import carla_backend
from lightning_td3.envs.carla_backend import (
    CONNECT_MARGIN_S,
    FIXED_DELTA_SECONDS,
    CarlaBackend,
    CarlaConnectionError,
    bgra_to_rgb,
    crosses_road_edge,
    grayscale,
    vehicle_control,
    vehicle_limits,
)
from lightning_td3.envs.carla_road import (
    ROUTE_SPACING_M,
    LaneView,
    OtherVehicle,
    Polyline,
    Pose,
    is_on_driving_lane,
    lane_centre_line,
    lane_errors,
    nearest_neighbours,
    plan_route,
    planar_point,
    same_direction_lanes,
    to_ego_frame,
)
from lightning_td3.envs.config import CarlaConfig, EnvConfig
from lightning_td3.envs.contract import DrivingEnv, Neighbour
from lightning_td3.errors import ConfigError
from lightning_td3.evaluation import EpisodeResult

DATA = Path(__file__).parent / "data"
LANE_WIDTH_M = 3.5
# Wheel positions (cm) and steering of the fake ego: 2.9 m wheelbase, 70 degrees like CARLA's cars.
FRONT_AXLE_CM, REAR_AXLE_CM, HALF_TRACK_CM = 150.0, -140.0, 80.0
MAX_STEER_DEG = 70.0
CAR_HALF_LENGTH_M = 2.4
CENTIMETRES = 100.0
SENSOR_DELAY_S = 0.002  # how long after a tick the fake world's sensor data reach the client


@cache
def road_map(name: str) -> carla.Map:
    return carla.Map(name, (DATA / f"{name}.xodr").read_text())


def lane_point(carla_map: carla.Map, road: int, lane: int, s: float) -> carla.Waypoint:
    waypoint = carla_map.get_waypoint_xodr(road, lane, s)
    assert waypoint is not None, f"no lane {lane} at s={s} on road {road}"
    return waypoint


def shifted(location: carla.Location, vector: carla.Vector3D, metres: float) -> carla.Location:
    return carla.Location(location.x + metres * vector.x, location.y + metres * vector.y, location.z + metres * vector.z)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.mark.parametrize("name", ["straight_two_lanes", "curve_left", "fork_junction"])
def test_opendrive_fixtures_parse_into_driving_lanes(name):
    waypoints = road_map(name).generate_waypoints(10.0)
    assert waypoints and all(w.lane_type == carla.LaneType.Driving for w in waypoints)


# -------------------------------------------------------------------------------------------- routes


def test_route_on_straight_road_has_the_requested_length_and_stays_on_the_lane_centre():
    start = lane_point(road_map("straight_two_lanes"), 1, -1, 0.0)
    route = plan_route(start, 200.0, np.random.default_rng(0))
    assert 200.0 <= route.length_m < 200.0 + ROUTE_SPACING_M + 1e-6
    # Lane -1 is the left lane of a road along +x; to the driver's right in CARLA is +y, so planar y = -1.75.
    np.testing.assert_allclose(route.points[:, 1], -LANE_WIDTH_M / 2, atol=1e-3)
    assert np.all(np.diff(route.points[:, 0]) > 0)


def test_route_ends_early_at_a_dead_end():
    start = lane_point(road_map("straight_two_lanes"), 1, -1, 0.0)
    route = plan_route(start, 500.0, np.random.default_rng(0))
    assert route.length_m == pytest.approx(300.0, abs=ROUTE_SPACING_M)


def test_no_route_from_the_very_end_of_a_lane():
    end = road_map("straight_two_lanes").get_waypoint(carla.Location(300.0, LANE_WIDTH_M / 2, 0.0))
    assert plan_route(end, 100.0, np.random.default_rng(0)) is None


def test_route_on_curve_follows_the_lane_through_the_bend():
    carla_map = road_map("curve_left")
    route = plan_route(lane_point(carla_map, 1, -1, 10.0), 250.0, np.random.default_rng(0))
    # Measured along the lane itself (the outer lane of the bend is longer than the reference line).
    assert 250.0 <= route.length_m < 250.0 + 2 * ROUTE_SPACING_M
    # The fixture's geometry in the planar frame (= OpenDRIVE's): straight along y = -1.75, a quarter circle
    # around (50, 100) of radius 100 + 1.75, then straight along x = 151.75.
    for x, y in route.points:
        if x <= 50.0:
            assert y == pytest.approx(-LANE_WIDTH_M / 2, abs=1e-3)
        elif y >= 100.0:
            assert x == pytest.approx(150.0 + LANE_WIDTH_M / 2, abs=1e-3)
        else:
            assert math.hypot(x - 50.0, y - 100.0) == pytest.approx(100.0 + LANE_WIDTH_M / 2, abs=1e-3)
    # After the quarter circle to the left the road heads along planar +y.
    last_direction = route.points[-1] - route.points[-2]
    assert math.degrees(math.atan2(last_direction[1], last_direction[0])) == pytest.approx(90.0, abs=0.5)


def _ends_straight_on(route: Polyline) -> bool:
    return abs(route.points[-1, 1] + LANE_WIDTH_M / 2) < 0.1


def test_route_chooses_at_a_junction_from_the_seeded_rng():
    start = lane_point(road_map("fork_junction"), 1, -1, 50.0)
    routes = {seed: plan_route(start, 150.0, np.random.default_rng(seed)) for seed in range(16)}
    for seed, route in routes.items():
        np.testing.assert_array_equal(route.points, plan_route(start, 150.0, np.random.default_rng(seed)).points)
    straight_on = [seed for seed, route in routes.items() if _ends_straight_on(route)]
    turned_right = [seed for seed, route in routes.items() if route.points[-1, 1] < -20.0]
    assert straight_on and turned_right and len(straight_on) + len(turned_right) == len(routes)


# ------------------------------------------------------------------------------------ ego-frame geometry


def test_ego_frame_has_x_forward_and_y_to_the_left_of_a_carla_transform():
    ego_transform = carla.Transform(carla.Location(10.0, 5.0, 0.3), carla.Rotation(yaw=30.0))
    ahead_and_left = shifted(
        shifted(ego_transform.location, ego_transform.get_forward_vector(), 5.0),
        ego_transform.get_right_vector(),
        -2.0,
    )
    ego_frame = to_ego_frame(planar_point(ahead_and_left)[None], Pose.from_transform(ego_transform))
    np.testing.assert_allclose(ego_frame, [[5.0, 2.0]], atol=1e-4)


def _waypoints_ahead(route: Polyline, ego_transform: carla.Transform, count=25, spacing=2.0) -> np.ndarray:
    ego = Pose.from_transform(ego_transform)
    progress = route.project(ego.xy).s_m
    return to_ego_frame(route.points_ahead(progress, count, spacing), ego)


def test_waypoints_are_strictly_ahead_and_bend_left_on_a_left_curve():
    carla_map = road_map("curve_left")
    route = plan_route(lane_point(carla_map, 1, -1, 0.0), 200.0, np.random.default_rng(0))
    waypoints = _waypoints_ahead(route, lane_point(carla_map, 1, -1, 40.0).transform)
    assert np.all(waypoints[:, 0] > 0)
    assert waypoints[0, 0] == pytest.approx(2.0, abs=0.05)
    assert waypoints[-1, 1] > 1.0 and np.all(np.diff(waypoints[:, 1]) >= -1e-6)


def test_waypoints_bend_right_on_a_right_turn():
    carla_map = road_map("fork_junction")
    start = lane_point(carla_map, 1, -1, 0.0)
    seed = next(s for s in range(16) if not _ends_straight_on(plan_route(start, 150.0, np.random.default_rng(s))))
    route = plan_route(start, 150.0, np.random.default_rng(seed))
    waypoints = _waypoints_ahead(route, lane_point(carla_map, 1, -1, 90.0).transform)
    assert np.all(waypoints[:, 0] > 0)
    assert waypoints[-1, 1] < -10.0


def test_points_past_the_route_end_continue_straight():
    route = Polyline(np.array([[0.0, 0.0], [10.0, 0.0]]))
    np.testing.assert_allclose(route.points_ahead(8.0, 3, 2.0), [[10.0, 0.0], [12.0, 0.0], [14.0, 0.0]])


def test_projection_near_the_last_progress_ignores_a_close_later_leg():
    # A hairpin: out along +x, back along x 3 m to the left.
    route = Polyline(np.array([[0.0, 0.0], [50.0, 0.0], [50.0, 3.0], [0.0, 3.0]]))
    near_second_leg = np.array([20.0, 2.0])
    assert route.project(near_second_leg).s_m > 53.0
    on_first_leg = route.project(near_second_leg, near_s_m=18.0, behind_m=10.0, ahead_m=10.0)
    assert on_first_leg.s_m == pytest.approx(20.0)
    assert on_first_leg.offset_m == pytest.approx(2.0)


# ------------------------------------------------------------------------------- lateral and heading errors


@pytest.mark.parametrize("metres_left", [0.5, -0.8])
def test_lateral_offset_is_positive_to_the_drivers_left(metres_left):
    carla_map = road_map("curve_left")
    lane = lane_point(carla_map, 1, -1, 120.0).transform  # inside the bend
    ego_location = shifted(lane.location, lane.get_right_vector(), -metres_left)
    ego = Pose.from_transform(carla.Transform(ego_location, lane.rotation))
    nearest_lane = carla_map.get_waypoint(ego_location).transform
    offset, heading_error = lane_errors(ego, Pose.from_transform(nearest_lane))
    assert offset == pytest.approx(metres_left, abs=1e-3)
    assert heading_error == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("ego_yaw_minus_lane_yaw_deg", [10.0, -25.0])
def test_heading_error_is_lane_minus_ego_positive_when_the_lane_is_to_the_left(ego_yaw_minus_lane_yaw_deg):
    lane = lane_point(road_map("straight_two_lanes"), 1, -1, 50.0).transform
    # CARLA's yaw grows clockwise: an ego yawed +10 degrees points right of the lane, which bends left of it.
    ego_rotation = carla.Rotation(yaw=lane.rotation.yaw + ego_yaw_minus_lane_yaw_deg)
    ego = Pose.from_transform(carla.Transform(lane.location, ego_rotation))
    _, heading_error = lane_errors(ego, Pose.from_transform(lane))
    assert heading_error == pytest.approx(math.radians(ego_yaw_minus_lane_yaw_deg), abs=1e-6)


def test_heading_error_is_positive_where_a_left_bend_begins():
    carla_map = road_map("curve_left")
    ego_transform = carla.Transform(lane_point(carla_map, 1, -1, 80.0).transform.location, carla.Rotation(yaw=0.0))
    _, heading_error = lane_errors(
        Pose.from_transform(ego_transform), Pose.from_transform(carla_map.get_waypoint(ego_transform.location).transform)
    )
    assert heading_error > math.radians(10.0)


# ----------------------------------------------------------------------------------- lanes and neighbours


def test_lane_index_counts_same_direction_driving_lanes_from_the_left():
    straight, curve = road_map("straight_two_lanes"), road_map("curve_left")
    left, right = same_direction_lanes(lane_point(straight, 1, -1, 20.0))
    assert (len(left), [w.lane_id for w in right]) == (0, [-2])
    left, right = same_direction_lanes(lane_point(straight, 1, -2, 20.0))  # the shoulder beyond is no lane
    assert ([w.lane_id for w in left], len(right)) == ([-1], 0)
    left, right = same_direction_lanes(lane_point(curve, 1, -1, 20.0))  # the oncoming lane 1 is not counted
    assert (len(left), [w.lane_id for w in right]) == (0, [-2])


def _vehicle_on(carla_map: carla.Map, lane: int, s: float, speed_mps: float) -> OtherVehicle:
    xy = planar_point(lane_point(carla_map, 1, lane, s).transform.location)
    return OtherVehicle(xy=xy, half_length_m=CAR_HALF_LENGTH_M, speed_mps=speed_mps)


def test_neighbours_are_the_nearest_leader_and_follower_per_lane():
    carla_map = road_map("straight_two_lanes")
    route = plan_route(lane_point(carla_map, 1, -1, 0.0), 250.0, np.random.default_rng(0))
    ego_xy = planar_point(lane_point(carla_map, 1, -1, 50.0).transform.location)
    lanes = {}
    for offset, lane_id in ((0, -1), (1, -2)):
        waypoint = lane_point(carla_map, 1, lane_id, 50.0)
        line, _ = lane_centre_line(waypoint, 40.0, 80.0, route, 50.0)
        lanes[offset] = LaneView(line=line, ego_s_m=line.project(ego_xy).s_m, half_width_m=waypoint.lane_width / 2)
    others = [
        _vehicle_on(carla_map, -1, 70.0, 8.0),  # own lane, 20 m ahead
        _vehicle_on(carla_map, -1, 90.0, 9.0),  # own lane, behind that leader
        _vehicle_on(carla_map, -2, 45.0, 7.0),  # right lane, 5 m back: overlapping bumpers
        _vehicle_on(carla_map, -2, 200.0, 6.0),  # right lane, out of range
    ]
    leaders, followers = nearest_neighbours(lanes, others, CAR_HALF_LENGTH_M)
    assert leaders[0] == Neighbour(gap_m=pytest.approx(20.0 - 2 * CAR_HALF_LENGTH_M), speed_mps=8.0)
    assert leaders[1] is None and followers[0] is None
    assert followers[1] == Neighbour(gap_m=pytest.approx(0.2), speed_mps=7.0)


def test_driving_lane_check_excludes_shoulder_and_off_road():
    carla_map = road_map("straight_two_lanes")
    assert is_on_driving_lane(carla_map, carla.Location(10.0, 1.75, 0.0))
    assert not is_on_driving_lane(carla_map, carla.Location(10.0, 8.25, 0.0))  # shoulder
    assert not is_on_driving_lane(carla_map, carla.Location(10.0, 30.0, 0.0))


class FakeLaneInvasionEvent:
    def __init__(self, markings):
        self.crossed_lane_markings = markings


def test_crossing_solid_lines_counts_as_leaving_the_road_but_broken_lines_do_not():
    straight, curve = road_map("straight_two_lanes"), road_map("curve_left")
    between_lanes = lane_point(straight, 1, -1, 20.0).right_lane_marking  # broken
    road_edge = lane_point(straight, 1, -2, 20.0).right_lane_marking  # solid
    centre_line = lane_point(curve, 1, -1, 20.0).left_lane_marking  # solid solid
    assert not crosses_road_edge(FakeLaneInvasionEvent([between_lanes]))
    assert crosses_road_edge(FakeLaneInvasionEvent([between_lanes, road_edge]))
    assert crosses_road_edge(FakeLaneInvasionEvent([centre_line]))


# ------------------------------------------------------------------------- control, image, vehicle limits


def test_throttle_brake_and_steer_map_onto_a_vehicle_control():
    assert vehicle_control(0.2, 0.5) == carla.VehicleControl(throttle=0.5, steer=0.2, brake=0.0)
    assert vehicle_control(-0.4, -0.3) == carla.VehicleControl(throttle=0.0, steer=-0.4, brake=0.3)
    assert vehicle_control(1.7, 0.0).steer == 1.0 and vehicle_control(-2.0, 0.0).steer == -1.0
    control = vehicle_control(0.0, 3.0)
    assert (control.throttle, control.brake, control.hand_brake, control.reverse) == (1.0, 0.0, False, False)


def test_grayscale_reads_the_camera_buffer_as_bgra():
    pixels_bgra = [[0, 0, 255, 255], [255, 0, 0, 255], [0, 255, 0, 255], [255, 255, 255, 255]]  # red blue green white
    rgb = bgra_to_rgb(bytes(np.array(pixels_bgra, np.uint8).ravel()), 2, 2)
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    gray = grayscale(rgb)
    assert gray.dtype == np.uint8 and gray.shape == (2, 2)
    expected = [int(0.2989 * 255), int(0.114 * 255), int(0.587 * 255), int((0.2989 + 0.587 + 0.114) * 255)]
    np.testing.assert_array_equal(gray.ravel(), expected)


def fake_physics_control(place=lambda offset_cm: offset_cm) -> carla.VehiclePhysicsControl:
    """Front left, front right, rear left, rear right wheels; `place` maps each wheel's offset from the car's centre
    (cm) to the position reported."""
    wheels = []
    for x_cm, steer_deg in ((FRONT_AXLE_CM, MAX_STEER_DEG), (REAR_AXLE_CM, 0.0)):
        for y_cm in (-HALF_TRACK_CM, HALF_TRACK_CM):
            position = place(carla.Vector3D(x_cm, y_cm, 30.0))
            wheels.append(carla.WheelPhysicsControl(max_steer_angle=steer_deg, position=position))
    return carla.VehiclePhysicsControl(wheels=wheels)


def test_vehicle_limits_come_from_the_physics_control():
    limits = vehicle_limits(fake_physics_control())
    assert limits.max_steer_rad == pytest.approx(math.radians(MAX_STEER_DEG))
    assert limits.wheelbase_m == pytest.approx((FRONT_AXLE_CM - REAR_AXLE_CM) / 100.0)
    assert limits.max_accel_mps2 > 0 and limits.max_brake_mps2 > 0


# ----------------------------------------------------------------------------- connection and config


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_server_raises_one_clear_error_within_the_timeout():
    port, timeout_s = free_local_port(), 2.0
    started = time.monotonic()
    with pytest.raises(CarlaConnectionError) as raised:
        DrivingEnv(EnvConfig(backend="carla", carla=CarlaConfig(host="localhost", port=port, timeout_s=timeout_s)))
    assert time.monotonic() - started < timeout_s + CONNECT_MARGIN_S + 1.0
    message = str(raised.value)
    assert f"localhost:{port}" in message
    assert "CarlaUE4.sh" in message and f"-carla-rpc-port={port}" in message and "env.carla.port" in message
    assert raised.value.__suppress_context__


class FakeHangingClient:
    """A client whose server never answers and whose calls never return."""

    def __init__(self, host: str, port: int):
        pass

    def set_timeout(self, seconds: float) -> None:
        pass

    def get_server_version(self) -> str:
        time.sleep(3600.0)
        return "never"


def test_connecting_ends_at_the_deadline_even_if_the_client_call_hangs(monkeypatch):
    monkeypatch.setattr(carla_backend.carla, "Client", FakeHangingClient)
    timeout_s = 0.5
    started = time.monotonic()
    with pytest.raises(CarlaConnectionError, match="did not return"):
        carla_backend.connect(CarlaConfig(host="127.0.0.1", port=free_local_port(), timeout_s=timeout_s))
    assert time.monotonic() - started < timeout_s + CONNECT_MARGIN_S + 0.5


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [("port", 0, "env.carla.port"), ("port", 70000, "env.carla.port"), ("timeout_s", 0, "env.carla.timeout_s")],
)
def test_bad_carla_settings_are_rejected_naming_the_field(field, value, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        CarlaConfig(**{field: value})


# --------------------------------------------------------------- server-side test doubles (no simulator)


class FakeAttribute:
    def __init__(self, value: str):
        self.value = value

    def as_int(self) -> int:
        return int(self.value)


class FakeBlueprint:
    def __init__(self, blueprint_id: str, **attributes: str):
        self.id = blueprint_id
        self.attributes = dict(attributes)

    def has_attribute(self, name: str) -> bool:
        return name in self.attributes

    def get_attribute(self, name: str) -> FakeAttribute:
        return FakeAttribute(self.attributes[name])

    def set_attribute(self, name: str, value: str) -> None:
        self.attributes[name] = value


class FakeBlueprintLibrary:
    def __init__(self):
        self._blueprints = [
            FakeBlueprint("vehicle.tesla.model3", number_of_wheels="4"),
            FakeBlueprint("vehicle.audi.a2", number_of_wheels="4"),
            FakeBlueprint("vehicle.yamaha.yzf", number_of_wheels="2"),
            FakeBlueprint("sensor.camera.rgb"),
            FakeBlueprint("sensor.other.collision"),
            FakeBlueprint("sensor.other.lane_invasion"),
        ]

    def find(self, blueprint_id: str) -> FakeBlueprint:
        found = next(b for b in self._blueprints if b.id == blueprint_id)
        return FakeBlueprint(found.id, **found.attributes)

    def filter(self, pattern: str) -> list[FakeBlueprint]:
        return [FakeBlueprint(b.id, **b.attributes) for b in self._blueprints if fnmatch.fnmatch(b.id, pattern)]


class FakeActor:
    def __init__(self, world: FakeCarlaWorld, actor_id: int, blueprint: FakeBlueprint, transform: carla.Transform):
        self.world, self.id, self.type_id = world, actor_id, blueprint.id
        self.attributes = dict(blueprint.attributes)
        self.transform = carla.Transform(transform.location, transform.rotation)
        self.alive = True

    def get_transform(self) -> carla.Transform:
        return carla.Transform(self.transform.location, self.transform.rotation)


class FakeVehicle(FakeActor):
    """Drives straight along its yaw: throttle accelerates, brake decelerates (enough for a test).

    CARLA behaviour it follows:
    - a control applies from the next tick on and holds until another is applied (python_api.md,
      carla.Vehicle.apply_control: "Applies a control object on the next tick"; get_control: "the control applied in
      the last tick"), so a car nobody drives keeps its last throttle;
    - wheel positions in the physics control are world positions in centimetres (python_api.md,
      carla.WheelPhysicsControl.position: "World position of the wheel. This is a read-only parameter"). That a car
      not yet simulated reports them as zeros is an assumption (the docs say nothing): this double does, so the
      backend must read them only after a tick.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.bounding_box = carla.BoundingBox(carla.Location(), carla.Vector3D(CAR_HALF_LENGTH_M, 1.0, 0.8))
        self.controls: list[carla.VehicleControl] = []
        self.autopilot_port: int | None = None
        self.speed_mps = 0.0
        self.simulated = False

    def apply_control(self, control: carla.VehicleControl) -> None:
        self.controls.append(control)

    def set_autopilot(self, enabled: bool, port: int) -> None:
        self.autopilot_port = port if enabled else None

    def get_physics_control(self) -> carla.VehiclePhysicsControl:
        def world_cm(offset_cm: carla.Vector3D) -> carla.Vector3D:
            if not self.simulated:
                return carla.Vector3D()
            return self.transform.transform(offset_cm / CENTIMETRES) * CENTIMETRES  # transform() maps a local point

        return fake_physics_control(world_cm)

    def get_velocity(self) -> carla.Vector3D:
        forward = self.transform.get_forward_vector()
        return carla.Vector3D(forward.x * self.speed_mps, forward.y * self.speed_mps, 0.0)

    def advance(self, dt: float) -> None:
        self.simulated = True
        if self.controls:
            control = self.controls[-1]
            self.speed_mps = max(self.speed_mps + (4.0 * control.throttle - 8.0 * control.brake) * dt, 0.0)
        self.transform.location = shifted(self.transform.location, self.transform.get_forward_vector(), self.speed_mps * dt)


class FakeCameraImage:
    alive: weakref.WeakSet = weakref.WeakSet()  # every image not yet garbage: what the client holds

    def __init__(self, frame: int, size: int):
        self.frame, self.width, self.height = frame, size, size
        self.raw_data = bytes(np.full((size, size, 4), 128, np.uint8).ravel())
        FakeCameraImage.alive.add(self)


class FakeCollisionEvent:
    """python_api.md, carla.CollisionEvent: the sensor's parent `actor`, the `other_actor` hit, and (as every
    carla.SensorData) the `frame` it happened in."""

    def __init__(self, frame: int, actor: FakeActor, other_actor: FakeActor):
        self.frame, self.actor, self.other_actor = frame, actor, other_actor


class FakeSensor(FakeActor):
    """`listen` registers the callback the world's data go to, `stop` ends them (python_api.md, carla.Sensor)."""

    def __init__(self, *args, parent: FakeVehicle):
        super().__init__(*args)
        self.parent = parent
        self.callback = None

    def listen(self, callback) -> None:
        self.callback = callback

    def stop(self) -> None:
        self.callback = None


class FakeActorList(list):
    def filter(self, pattern: str) -> FakeActorList:
        return FakeActorList(a for a in self if fnmatch.fnmatch(a.type_id, pattern))


class FakeTownMap(carla.Map):
    """A real `carla.Map` from OpenDRIVE, plus the spawn points a server's town would supply."""

    def __init__(self, name: str, opendrive: str, spawn_points: list[carla.Transform]):
        super().__init__(name, opendrive)
        self._spawn_points = spawn_points

    def get_spawn_points(self) -> list[carla.Transform]:
        return list(self._spawn_points)


def _copy_settings(settings: carla.WorldSettings) -> carla.WorldSettings:
    return carla.WorldSettings(
        synchronous_mode=settings.synchronous_mode,
        fixed_delta_seconds=settings.fixed_delta_seconds or 0.0,
    )


class FakeCarlaWorld:
    """Stands in for the server's world: actors, sensors and ticks, on the straight two-lane fixture road."""

    def __init__(self, town: str = "Town01"):
        opendrive = (DATA / "straight_two_lanes.xodr").read_text()
        lane_centres = carla.Map(town, opendrive).generate_waypoints(20.0)
        spawn_points = [
            carla.Transform(shifted(w.transform.location, carla.Vector3D(0, 0, 1), 0.5), w.transform.rotation)
            for w in sorted(lane_centres, key=lambda w: (w.lane_id, w.s))
            if w.s <= 150.0
        ]
        self.map = FakeTownMap(town, opendrive, spawn_points)
        self.settings = carla.WorldSettings()
        self.actors: dict[int, FakeActor] = {}
        self.frame = 0
        self.ticks = 0
        self._deliveries: list[threading.Timer] = []
        self.traffic_managers: dict[int, FakeTrafficManager] = {}
        self.most_egos_in_a_tick = 0  # egos ("hero") alive in one tick, at most: two backends sharing the world
        self._late_events: list[tuple[int, FakeSensor, FakeCollisionEvent]] = []  # (frame delivered, sensor, event)

    def get_map(self) -> carla.Map:
        return self.map

    def get_settings(self) -> carla.WorldSettings:
        return _copy_settings(self.settings)

    def apply_settings(self, settings: carla.WorldSettings) -> int:
        # python_api.md, carla.World.apply_settings: "returns the ID of the frame they were implemented".
        self.settings = _copy_settings(settings)
        return self.frame

    def get_blueprint_library(self) -> FakeBlueprintLibrary:
        return FakeBlueprintLibrary()

    def try_spawn_actor(self, blueprint: FakeBlueprint, transform: carla.Transform) -> FakeVehicle | None:
        # python_api.md, carla.World.try_spawn_actor: None instead of an exception when the place is taken.
        occupied = any(
            isinstance(a, FakeVehicle) and a.alive and a.transform.location.distance(transform.location) < 2.0
            for a in self.actors.values()
        )
        return None if occupied else self._add(FakeVehicle(self, len(self.actors) + 1, blueprint, transform))

    def spawn_actor(self, blueprint: FakeBlueprint, transform: carla.Transform, attach_to: FakeVehicle) -> FakeSensor:
        return self._add(FakeSensor(self, len(self.actors) + 1, blueprint, transform, parent=attach_to))

    def _add(self, actor: FakeActor) -> FakeActor:
        self.actors[actor.id] = actor
        return actor

    def alive(self, kind: type = FakeActor) -> list[FakeActor]:
        return [a for a in self.actors.values() if a.alive and isinstance(a, kind)]

    def get_actors(self) -> FakeActorList:
        return FakeActorList(self.alive())

    def ego(self) -> FakeVehicle:
        return next(v for v in self.alive(FakeVehicle) if v.attributes.get("role_name") == "hero")

    def tick(self, seconds: float = 10.0) -> int:
        """One synchronous step. As on a server, the sensor data of the frame reach their callbacks on another
        thread, after `tick` returned (adv_synchrony_timestep.md, "Using synchronous mode"; the camera "with a delay
        of a couple of frames" there is modelled as SENSOR_DELAY_S); a collision may be delivered later still."""
        assert self.settings.synchronous_mode, "the backend ticks only a synchronous world"
        self.frame += 1
        self.ticks += 1
        for vehicle in self.alive(FakeVehicle):
            vehicle.advance(self.settings.fixed_delta_seconds)
        egos = [v for v in self.alive(FakeVehicle) if v.attributes.get("role_name") == "hero"]
        self.most_egos_in_a_tick = max(self.most_egos_in_a_tick, len(egos))
        due = [event for event in self._late_events if event[0] <= self.frame]
        self._late_events = [event for event in self._late_events if event[0] > self.frame]
        for _, sensor, event in due:
            self._deliver(sensor.callback, event)
        for camera in self._listening("sensor.camera.rgb"):
            self._deliver(camera.callback, FakeCameraImage(self.frame, int(camera.attributes["image_size_x"])))
        return self.frame

    def _deliver(self, callback, data) -> None:
        delivery = threading.Timer(SENSOR_DELAY_S, callback, [data])
        self._deliveries.append(delivery)
        delivery.start()

    def flush_sensors(self) -> None:
        """Wait until every sensor datum sent so far has reached its callback."""
        for delivery in self._deliveries:
            delivery.join()
        self._deliveries.clear()

    def collide(self, vehicle: FakeVehicle, other_type_id: str = "vehicle.audi.a2", delivered_after: int = 0) -> None:
        """`vehicle` hits an actor of `other_type_id` in the current frame; the event reaches the collision sensor's
        callback `delivered_after` ticks later (0: now, before the next tick)."""
        other = FakeActor(self, 0, FakeBlueprint(other_type_id), vehicle.transform)
        for sensor in self._listening("sensor.other.collision"):
            if sensor.parent is vehicle:
                event = FakeCollisionEvent(self.frame, vehicle, other)
                if delivered_after == 0:
                    sensor.callback(event)
                else:
                    self._late_events.append((self.frame + delivered_after, sensor, event))

    def _listening(self, type_id: str) -> list[FakeSensor]:
        return [s for s in self.alive(FakeSensor) if s.type_id == type_id and s.callback is not None]


class FakeTrafficManager:
    """The Traffic Manager on one port. Its synchronous mode must follow the world's (adv_synchrony_timestep.md:
    "If synchronous mode is enabled, and there is a Traffic Manager running, this must be set to sync mode too");
    the API has a setter and no getter for it, so only this double can tell what it was left in."""

    def __init__(self, port: int):
        self.port = port
        self.synchronous = False
        self.seeds: list[int] = []

    def get_port(self) -> int:
        return self.port

    def set_synchronous_mode(self, enabled: bool) -> None:
        self.synchronous = enabled

    def set_random_device_seed(self, seed: int) -> None:
        self.seeds.append(seed)


class FakeCarlaClient:
    def __init__(self, world: FakeCarlaWorld):
        self.world = world
        self.loaded_towns: list[str] = []
        self.destroy_batches: list[list[int]] = []
        self.traffic_manager: FakeTrafficManager | None = None

    def set_timeout(self, seconds: float) -> None:
        pass

    def get_world(self) -> FakeCarlaWorld:
        return self.world

    def load_world(self, town: str) -> FakeCarlaWorld:
        self.loaded_towns.append(town)
        return self.world

    def generate_opendrive_world(self, opendrive: str) -> FakeCarlaWorld:
        self.loaded_towns.append(("opendrive", opendrive))
        return self.world

    def get_trafficmanager(self, port: int) -> FakeTrafficManager:
        # One Traffic Manager per port, whichever client asks (python_api.md, carla.Client.get_trafficmanager:
        # "Returns an instance of the traffic manager related to the specified port. If it does not exist, this will
        # be created.").
        self.traffic_manager = self.world.traffic_managers.setdefault(port, FakeTrafficManager(port))
        return self.traffic_manager

    def apply_batch_sync(self, commands, do_tick: bool = False) -> list:
        # python_api.md, carla.Client.apply_batch_sync: the commands run on one simulation step; the backend reads no
        # responses, so none are made here.
        ids = [command.actor_id for command in commands]
        for actor_id in ids:
            self.world.actors[actor_id].alive = False
        self.destroy_batches.append(ids)
        return []


def carla_env_config(**carla_overrides) -> EnvConfig:
    carla_settings = CarlaConfig(**{"npc_vehicles": (3, 5, 8), "tm_port": 8123, **carla_overrides})
    return EnvConfig(backend="carla", route_length_m=100.0, scenario=0, carla=carla_settings)


@pytest.fixture
def fake_client() -> FakeCarlaClient:
    return FakeCarlaClient(FakeCarlaWorld())


@pytest.fixture
def backend(fake_client):
    backend = CarlaBackend(carla_env_config(), client=fake_client)
    yield backend
    backend.close()


# ------------------------------------------------------------------------- the backend on the fake world


def test_construction_makes_the_world_synchronous_without_reloading_the_same_town(backend, fake_client):
    assert fake_client.world.settings.synchronous_mode
    assert fake_client.world.settings.fixed_delta_seconds == pytest.approx(FIXED_DELTA_SECONDS)
    assert fake_client.traffic_manager.synchronous and fake_client.traffic_manager.port == 8123
    assert fake_client.loaded_towns == [] and backend.dt == FIXED_DELTA_SECONDS


def test_another_town_is_loaded():
    client = FakeCarlaClient(FakeCarlaWorld(town="Town01"))
    CarlaBackend(carla_env_config(town="Town02"), client=client).close()
    assert client.loaded_towns == ["Town02"]


def test_a_custom_opendrive_road_network_is_generated_instead_of_a_town():
    client = FakeCarlaClient(FakeCarlaWorld(town="Town01"))
    xodr = DATA / "straight_two_lanes.xodr"
    CarlaBackend(carla_env_config(town="Town02", opendrive_file=str(xodr)), client=client).close()
    assert client.loaded_towns == [("opendrive", xodr.read_text())]


def test_a_missing_opendrive_file_is_rejected_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="env.carla.opendrive_file must be an existing OpenDRIVE file"):
        CarlaConfig(opendrive_file=str(tmp_path / "missing.xodr"))


def test_reset_spawns_ego_sensors_and_traffic_and_measures_from_the_route(backend, fake_client):
    backend.reset(seed=3)
    world = fake_client.world
    ego = world.ego()
    npcs = [v for v in world.alive(FakeVehicle) if v is not ego]
    assert len(npcs) == 3 and all(v.autopilot_port == 8123 and v.type_id != "vehicle.yamaha.yzf" for v in npcs)
    assert sorted(s.type_id for s in world.alive(FakeSensor)) == [
        "sensor.camera.rgb",
        "sensor.other.collision",
        "sensor.other.lane_invasion",
    ]
    assert fake_client.traffic_manager.seeds == [3]
    assert backend.frame().shape == (84, 84) and backend.frame().dtype == np.uint8
    assert backend.top_view().ndim == 3 and backend.top_view().shape[2] == 3
    assert backend.limits.wheelbase_m == pytest.approx(2.9)
    measurement = backend.measure()
    assert measurement.route_length_m >= 50.0 and measurement.progress_m == pytest.approx(0.0, abs=0.5)
    assert measurement.lateral_offset_m == pytest.approx(0.0, abs=1e-3)
    assert measurement.heading_error_rad == pytest.approx(0.0, abs=1e-3)
    assert measurement.waypoints_ego.shape == (25, 2) and np.all(measurement.waypoints_ego[:, 0] > 0)
    np.testing.assert_allclose(measurement.waypoints_ego[:, 1], 0.0, atol=1e-3)
    assert not measurement.collision and not measurement.off_drivable


def test_leaving_the_driving_lanes_counts_as_off_drivable(backend, fake_client):
    backend.reset(seed=0)
    ego = fake_client.world.ego()
    ego.transform.location = carla.Location(ego.transform.location.x, 2 * LANE_WIDTH_M + 1.25, 0.0)  # shoulder
    measurement = backend.measure()
    assert measurement.off_drivable and not measurement.collision


def test_same_seed_same_start_and_traffic(fake_client):
    placements = []
    for _ in range(2):
        backend = CarlaBackend(carla_env_config(), client=fake_client)
        backend.reset(seed=11)
        vehicles = fake_client.world.alive(FakeVehicle)
        placements.append(sorted((v.type_id, round(v.transform.location.x), round(v.transform.location.y)) for v in vehicles))
        backend.close()
    assert placements[0] == placements[1]


def test_step_applies_the_vehicle_control_and_ticks_once(backend, fake_client):
    backend.reset(seed=0)
    ticks = fake_client.world.ticks
    backend.step(0.2, 0.5)
    assert fake_client.world.ticks == ticks + 1
    assert fake_client.world.ego().controls[-1] == carla.VehicleControl(throttle=0.5, steer=0.2, brake=0.0)
    for _ in range(20):
        backend.step(0.0, 1.0)
    assert backend.measure().progress_m > 1.0 and backend.measure().speed_mps > 1.0


def test_scene_reports_lanes_and_lane_waypoints(backend):
    backend.reset(seed=0)
    scene = backend.scene()
    assert scene.lanes == 2 and scene.lane in (0, 1)
    assert set(scene.lane_waypoints) == ({0, 1} if scene.lane == 0 else {-1, 0})
    assert set(scene.leaders) == set(scene.followers) == set(scene.lane_waypoints)
    np.testing.assert_allclose(scene.lane_waypoints[0][:, 1], 0.0, atol=1e-3)
    other = 1 if scene.lane == 0 else -1
    np.testing.assert_allclose(scene.lane_waypoints[other][:, 1], -other * LANE_WIDTH_M, atol=1e-3)


def test_reset_destroys_the_previous_episode(backend, fake_client):
    backend.reset(seed=0)
    backend.reset(seed=1)
    assert len(fake_client.world.alive(FakeSensor)) == 3 and len(fake_client.world.alive(FakeVehicle)) == 4


def test_close_destroys_every_spawned_actor_sensors_first_and_restores_the_world(fake_client):
    world = fake_client.world
    backend = CarlaBackend(carla_env_config(), client=fake_client)
    backend.reset(seed=0)
    sensors, ego = world.alive(FakeSensor), world.ego()
    npcs = [v for v in world.alive(FakeVehicle) if v is not ego]
    backend.close()
    assert world.alive() == []
    assert fake_client.destroy_batches[-1] == [a.id for a in (*sensors, ego, *npcs)]
    assert all(sensor.callback is None for sensor in sensors)
    assert not world.settings.synchronous_mode and not world.settings.fixed_delta_seconds
    assert not fake_client.traffic_manager.synchronous
    batches = len(fake_client.destroy_batches)
    backend.close()
    assert len(fake_client.destroy_batches) == batches


def test_state_snapshots_are_not_supported(backend):
    assert not backend.can_snapshot  # what the Collector asks before asking for the state
    with pytest.raises(NotImplementedError, match="restarts its episodes"):
        backend.get_state()
    with pytest.raises(NotImplementedError, match="restarts its episodes"):
        backend.set_state(b"")


def test_a_collision_ends_the_driving_env_episode(monkeypatch, fake_client):
    monkeypatch.setattr(carla_backend, "connect", lambda carla_config: fake_client)
    env = DrivingEnv(carla_env_config())
    try:
        observation, info = env.reset(seed=0)
        assert observation["image"].shape == (4, 84, 84)
        _, _, terminated, truncated, info = env.step(np.array([0.0, 0.5]))
        assert not terminated and not truncated and info["reason"] is None
        fake_client.world.collide(fake_client.world.ego())
        _, _, terminated, _, info = env.step(np.array([0.0, 0.5]))
        assert terminated and info["reason"] == "collision" and info["collision"]
        assert info["collision_with"] == "vehicle"  # what the driving score charges (0.6)
        assert EpisodeResult.from_info(info).infraction_penalty == pytest.approx(0.6)
    finally:
        env.close()
    assert fake_client.world.alive() == []


# ------------------------------------------------------------------- sensor timing, measured from the fake world


def test_the_wheelbase_is_read_once_the_car_has_been_simulated(backend, fake_client):
    backend.reset(seed=0)
    assert backend.limits.wheelbase_m == pytest.approx((FRONT_AXLE_CM - REAR_AXLE_CM) / CENTIMETRES)
    assert backend.limits.max_steer_rad == pytest.approx(math.radians(MAX_STEER_DEG))


def test_a_warm_up_collision_that_arrives_late_is_not_charged_to_the_agent(backend, fake_client):
    world = fake_client.world
    landing_frame = world.frame + carla_backend.WARMUP_TICKS  # the warm-up's last tick

    real_tick = world.tick

    def tick(seconds: float = 10.0) -> int:
        frame = real_tick(seconds)
        if frame == landing_frame:  # the ego bumps a car as it lands; the event comes a tick late
            world.collide(world.ego(), delivered_after=1)
        return frame

    world.tick = tick
    backend.reset(seed=0)
    backend.step(0.0, 0.0)
    world.flush_sensors()
    assert backend.measure().collision is None


def test_a_collision_is_counted_by_its_frame_and_classified_as_the_leaderboard_does(backend, fake_client):
    world = fake_client.world
    backend.reset(seed=0)
    backend.step(0.0, 0.5)
    world.collide(world.ego(), other_type_id="static.prop.streetbarrier", delivered_after=1)
    assert backend.measure().collision is None  # not arrived yet
    backend.step(0.0, 0.5)
    world.flush_sensors()
    assert backend.measure().collision == "static"


@pytest.mark.parametrize(
    ("type_id", "kind"),
    [("vehicle.audi.a2", "vehicle"), ("walker.pedestrian.0001", "pedestrian"), ("static.prop.trafficcone01", "static"),
     ("traffic.traffic_light", "static"), ("static.sidewalk", "other"), ("sensor.other.collision", "other")],
)
def test_collision_kinds_follow_the_leaderboards_collision_criterion(type_id, kind):
    assert carla_backend.collision_kind(type_id) == kind


def test_images_the_backend_does_not_ask_for_are_not_kept(backend, fake_client):
    world = fake_client.world
    backend.reset(seed=0)
    for _ in range(40):  # another client ticking the world while this backend waits
        world.tick()
    world.flush_sensors()
    gc.collect()
    assert len(FakeCameraImage.alive) == 1  # the newest
    backend.step(0.0, 0.0)
    assert backend.frame().shape == (84, 84)  # the image of its own tick


# --------------------------------------------------------------------------- the server handed back as found


@pytest.mark.parametrize("first_closed", ["training", "evaluation"])
def test_two_backends_on_one_server_hand_it_back_as_found_whichever_closes_first(fake_client, first_closed):
    # Lightning tears the callbacks (the training envs) down before the module (its evaluation env).
    training = CarlaBackend(carla_env_config(), client=fake_client)
    evaluation = CarlaBackend(carla_env_config(), client=fake_client)  # finds the world synchronous already
    for backend in (training, evaluation) if first_closed == "training" else (evaluation, training):
        backend.close()
    world = fake_client.world
    assert not world.settings.synchronous_mode and not world.settings.fixed_delta_seconds
    assert not world.traffic_managers[8123].synchronous


def test_settings_a_user_chose_are_given_back(fake_client):
    world = fake_client.world
    world.settings = carla.WorldSettings(synchronous_mode=True, fixed_delta_seconds=0.1)  # the user ticks at 10 Hz
    backend = CarlaBackend(carla_env_config(), client=fake_client)
    assert world.settings.fixed_delta_seconds == pytest.approx(FIXED_DELTA_SECONDS)
    backend.close()
    assert world.settings.synchronous_mode and world.settings.fixed_delta_seconds == pytest.approx(0.1)
    assert world.traffic_managers[8123].synchronous  # as the world it serves
