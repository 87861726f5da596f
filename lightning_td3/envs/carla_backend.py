"""The CARLA 0.9.16 backend: a real server world behind the driving-env contract.

One env step is one synchronous tick of `FIXED_DELTA_SECONDS`. Per episode (`reset`) the backend spawns the
ego (role "hero") at a seeded spawn point, plans a route of about `route_length_m` along the lanes from there,
attaches an 84x84 RGB camera, a collision sensor and a lane-invasion sensor, and spawns the scenario's NPC
vehicles on Traffic Manager autopilot. `close` destroys all of it and gives the world's settings back as found.

Measurements (see `lightning_td3.envs.carla_road` for the geometry and the left-handed world):
- progress: the ego's arc length projected on the route polyline;
- lateral offset / heading error: against the nearest driving-lane centre on the map; inside junctions, where
  connecting lanes overlap and the nearest one may turn elsewhere, against the route instead;
- off_drivable: the ego's centre is in no driving lane (shoulder, sidewalk, off the road), or since the reset
  it crossed a marking that must not be crossed (`ROAD_EDGE_MARKINGS`: solid lines, curbs, grass edges);
- collision: what the collision sensor reported the ego hit since the warm-up (`collision_kind`).

Sensor callbacks run on CARLA's client thread; the backend waits for the camera image of each tick and counts
collision and lane-invasion events by the frame they happened in (`EgoSensors`).

A running server's world cannot be snapshotted, so `get_state`/`set_state` raise `NotImplementedError`.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import carla
import numpy as np

from lightning_td3.envs.carla_road import (
    LaneView,
    OtherVehicle,
    Polyline,
    Pose,
    Projection,
    is_on_driving_lane,
    lane_centre_line,
    lane_errors,
    nearest_neighbours,
    plan_route,
    same_direction_lanes,
    to_ego_frame,
)
from lightning_td3.envs.config import CarlaConfig, EnvConfig
from lightning_td3.envs.contract import LEADER_RANGE_M, SIDE_RANGE_M, Measurement, Scene, VehicleLimits
from lightning_td3.errors import UserError

FIXED_DELTA_SECONDS = 0.05
# The connection check may overrun the client's own timeout by this much before we give up on it.
CONNECT_MARGIN_S = 2.0
# Loading a town takes far longer than an ordinary call.
LOAD_WORLD_TIMEOUT_S = 120.0

EGO_BLUEPRINT_ID = "vehicle.tesla.model3"
EGO_ROLE_NAME = "hero"
NPC_ROLE_NAME = "autopilot"
NPC_WHEELS = 4  # cars only: bikes and motorcycles are too narrow for the lane logic
# Approximate longitudinal limits of a passenger car in CARLA at full throttle / full brake.
MAX_ACCEL_MPS2 = 4.0
MAX_BRAKE_MPS2 = 8.0
CENTIMETRES_PER_METRE = 100.0

# Camera above the windscreen, pitched down to see the road ahead.
CAMERA_MOUNT = carla.Transform(carla.Location(x=1.5, z=2.4), carla.Rotation(pitch=-15.0))
LUMINANCE_WEIGHTS = np.array([0.2989, 0.587, 0.114])  # R, G, B (as highway-env's grayscale observation)
TOP_VIEW_UPSCALE = 4

# Ticks after spawning, so the cars (spawned slightly above the road) land and traffic starts moving.
WARMUP_TICKS = 10
# A route shorter than this fraction of the requested length (a dead end) is planned from another spawn point.
MIN_ROUTE_FRACTION = 0.5
# No NPC spawns this close to the ego, so an episode does not start in a crash.
EGO_CLEARANCE_M = 10.0
# Per step the ego moves < 3 m; the projection window keeps progress from jumping where a route nears itself.
PROJECTION_BEHIND_M = 10.0
PROJECTION_AHEAD_M = 30.0
# Range of scene(): lanes and neighbours this far ahead of / behind the ego; ahead, as far as `env.observe_leader`
# reads the car ahead on every backend (highway-env's search has no limit); behind, as far as `env.observe_sides` reads.
SCENE_AHEAD_M = LEADER_RANGE_M
SCENE_BEHIND_M = SIDE_RANGE_M
# Markings that must not be crossed: crossing one means leaving the road or entering the oncoming lanes.
ROAD_EDGE_MARKINGS = frozenset(
    {
        carla.LaneMarkingType.Solid,
        carla.LaneMarkingType.SolidSolid,
        carla.LaneMarkingType.Curb,
        carla.LaneMarkingType.Grass,
    }
)


class CarlaConnectionError(UserError, RuntimeError):
    """No CARLA server answered at the configured address."""


def _connection_help(config: CarlaConfig, reason: str) -> str:
    return (
        f"No CARLA server answered at {config.host}:{config.port} within {config.timeout_s:g} s ({reason}). "
        f"Start CARLA 0.9.16 first, e.g. `./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={config.port}`, "
        "or point data.env.carla.host / data.env.carla.port at a running server "
        "(and raise data.env.carla.timeout_s if it is slow to answer)."
    )


def connect(config: CarlaConfig) -> carla.Client:
    """A client of the server at `config.host:config.port`, checked to answer, or `CarlaConnectionError`.

    The check runs on a helper thread joined with a deadline, so it ends within the timeout plus a margin
    even if the client library itself were to block.
    """
    answer: dict[str, object] = {}

    def ask_server() -> None:
        try:
            client = carla.Client(config.host, config.port)
            client.set_timeout(config.timeout_s)
            client.get_server_version()
            answer["client"] = client
        except Exception as error:  # whatever the client library raises, the user gets the one error below
            answer["error"] = error

    checker = threading.Thread(target=ask_server, name="carla-connection-check", daemon=True)
    checker.start()
    checker.join(config.timeout_s + CONNECT_MARGIN_S)
    if "client" not in answer:
        reason = f"the client said: {answer['error']}" if "error" in answer else "the client call did not return"
        raise CarlaConnectionError(_connection_help(config, reason)) from None
    return answer["client"]


def vehicle_control(steer: float, throttle_brake: float) -> carla.VehicleControl:
    """The contract's action as CARLA's control: steer > 0 turns right in both; one pedal at a time."""
    steer = float(np.clip(steer, -1.0, 1.0))
    throttle_brake = float(np.clip(throttle_brake, -1.0, 1.0))
    return carla.VehicleControl(
        throttle=max(throttle_brake, 0.0), steer=steer, brake=max(-throttle_brake, 0.0), hand_brake=False
    )


def bgra_to_rgb(raw_data: bytes, height: int, width: int) -> np.ndarray:
    """A CARLA camera buffer (32-bit BGRA per pixel) as an (height, width, 3) uint8 RGB image."""
    bgra = np.frombuffer(raw_data, dtype=np.uint8).reshape(height, width, 4)
    return bgra[:, :, 2::-1].copy()


def grayscale(rgb: np.ndarray) -> np.ndarray:
    return np.dot(rgb, LUMINANCE_WEIGHTS).clip(0, 255).astype(np.uint8)


def vehicle_limits(physics: carla.VehiclePhysicsControl) -> VehicleLimits:
    """Steering limit and wheelbase from the physics control (wheels: front left, front right, rear left, rear
    right; positions in centimetres); the longitudinal limits are the approximate constants."""
    front, rear = physics.wheels[:2], physics.wheels[2:]

    def axle_centre(wheels) -> np.ndarray:
        return np.mean([[w.position.x, w.position.y, w.position.z] for w in wheels], axis=0)

    wheelbase_cm = float(np.linalg.norm(axle_centre(front) - axle_centre(rear)))
    if wheelbase_cm <= 0.0:
        raise RuntimeError("the ego's physics control puts its front and rear wheels at one place: no wheelbase")
    return VehicleLimits(
        max_steer_rad=math.radians(max(w.max_steer_angle for w in front)),
        max_accel_mps2=MAX_ACCEL_MPS2,
        max_brake_mps2=MAX_BRAKE_MPS2,
        wheelbase_m=wheelbase_cm / CENTIMETRES_PER_METRE,
    )


def crosses_road_edge(event: carla.LaneInvasionEvent) -> bool:
    return any(marking.type in ROAD_EDGE_MARKINGS for marking in event.crossed_lane_markings)


def collision_kind(other_type_id: str) -> str:
    """What the ego hit, from the other actor's blueprint id, as the CARLA Leaderboard's collision criterion
    classifies it (scenario_runner's `CollisionTest._count_collisions`): "static" (static props and traffic signs,
    not sidewalks), "vehicle", "pedestrian" (walkers); the leaderboard counts nothing else, which is "other" here."""
    if ("static" in other_type_id or "traffic" in other_type_id) and "sidewalk" not in other_type_id:
        return "static"
    if "vehicle" in other_type_id:
        return "vehicle"
    if "walker" in other_type_id:
        return "pedestrian"
    return "other"


class EgoSensors:
    """Camera, collision and lane-invasion sensors on the ego, and what they reported for the frames counted.

    Sensor data arrive on CARLA's client thread, after the tick that made them (adv_synchrony_timestep.md, "Using
    synchronous mode"); the camera sends an image every tick, collision and lane-invasion sensors only on an event,
    each event stamped with the frame it happened in. So the backend waits for the camera image of each tick, but a
    tick's events may arrive later still: they are counted by their frame, not by when they arrive. An event of a
    frame before `count_from` (the warm-up: landing after the spawn is not the agent's doing) is never counted, even
    if it arrives later; one of a counted frame that arrives after that frame's measurement is counted at the next.
    """

    def __init__(self) -> None:
        self.actors: list[carla.Actor] = []
        self._arrived = threading.Condition()  # guards what the callbacks write
        # Only the newest image is kept: the backend wants the image of the frame it ticked, and ticks of another
        # client (which CARLA's synchronous mode allows, adv_synchrony_timestep.md) must not pile images up.
        self._image: carla.Image | None = None
        self._collisions: list[tuple[int, str]] = []  # (frame, collision_kind)
        self._road_edge_frames: list[int] = []
        self._first_counted_frame = 0

    def attach(self, world: carla.World, ego: carla.Actor, image_size: int, fov_deg: float) -> None:
        library = world.get_blueprint_library()
        camera_blueprint = library.find("sensor.camera.rgb")
        camera_blueprint.set_attribute("image_size_x", str(image_size))
        camera_blueprint.set_attribute("image_size_y", str(image_size))
        camera_blueprint.set_attribute("fov", str(fov_deg))
        camera = self._attach(world, camera_blueprint, CAMERA_MOUNT, ego)
        collision = self._attach(world, library.find("sensor.other.collision"), carla.Transform(), ego)
        lane_invasion = self._attach(world, library.find("sensor.other.lane_invasion"), carla.Transform(), ego)
        camera.listen(self._on_image)
        collision.listen(self._on_collision)
        lane_invasion.listen(self._on_lane_invasion)

    def _attach(self, world: carla.World, blueprint, mount: carla.Transform, ego: carla.Actor) -> carla.Actor:
        sensor = world.spawn_actor(blueprint, mount, attach_to=ego)
        self.actors.append(sensor)  # tracked at once, so a failure further on still destroys it
        return sensor

    def _on_image(self, image: carla.Image) -> None:
        with self._arrived:
            if self._image is None or image.frame > self._image.frame:
                self._image = image
                self._arrived.notify_all()

    def _on_collision(self, event: carla.CollisionEvent) -> None:
        with self._arrived:
            self._collisions.append((event.frame, collision_kind(event.other_actor.type_id)))

    def _on_lane_invasion(self, event: carla.LaneInvasionEvent) -> None:
        if crosses_road_edge(event):
            with self._arrived:
                self._road_edge_frames.append(event.frame)

    def count_from(self, frame: int) -> None:
        """Count only events of `frame` and later."""
        with self._arrived:
            self._first_counted_frame = frame

    def collision(self) -> str | None:
        """What the ego first hit in the counted frames (`collision_kind`), or None."""
        with self._arrived:
            counted = [kind for frame, kind in self._collisions if frame >= self._first_counted_frame]
        return counted[0] if counted else None

    def crossed_road_edge(self) -> bool:
        with self._arrived:
            return any(frame >= self._first_counted_frame for frame in self._road_edge_frames)

    def image_for(self, frame: int, timeout_s: float) -> carla.Image:
        """The camera image of simulation frame `frame` (or a newer one)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._image is not None and self._image.frame >= frame, timeout_s):
                raise RuntimeError(f"the CARLA camera sent no image for frame {frame} within {timeout_s:g} s")
            return self._image

    def stop(self) -> None:
        for sensor in self.actors:
            sensor.stop()


class CarlaBackend:
    """A CARLA server world behind the driving-env contract (see the module docstring)."""

    def __init__(self, config: EnvConfig, client: carla.Client | None = None):
        self.config = config
        self.dt = FIXED_DELTA_SECONDS
        self._timeout_s = config.carla.timeout_s
        self._closed = False
        self._found_settings: carla.WorldSettings | None = None  # what `close` gives back, if this backend changed it
        self._traffic_manager: carla.TrafficManager | None = None
        self._sensors: EgoSensors | None = None
        self._ego: carla.Actor | None = None
        self._npcs: list[carla.Actor] = []
        self._limits: VehicleLimits | None = None
        self._route: Polyline | None = None
        self._progress_m = 0.0
        self._rgb = np.zeros((config.image_size, config.image_size, 3), np.uint8)
        self._client = client if client is not None else connect(config.carla)
        try:
            self._world = self._load_town()
            self._make_synchronous()
            self._map = self._world.get_map()
            self._library = self._world.get_blueprint_library()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------- world setup

    def _load_town(self) -> carla.World:
        if self.config.carla.opendrive_file is not None:
            return self._load_slowly(
                self._client.generate_opendrive_world, Path(self.config.carla.opendrive_file).read_text()
            )
        world = self._client.get_world()
        if world.get_map().name.split("/")[-1] == self.config.carla.town:
            return world
        return self._load_slowly(self._client.load_world, self.config.carla.town)

    def _load_slowly(self, load, what: str) -> carla.World:
        self._client.set_timeout(max(self._timeout_s, LOAD_WORLD_TIMEOUT_S))
        try:
            return load(what)
        finally:
            self._client.set_timeout(self._timeout_s)

    def _make_synchronous(self) -> None:
        """Synchronous at FIXED_DELTA_SECONDS, and the Traffic Manager with it (adv_synchrony_timestep.md: a TM must
        be synchronous when the world is).

        Only a backend that changes the settings gives them back (`close`): one that finds them already so (another
        env of this run made them so, or the user) leaves that to whoever did. So the server is handed back as it
        was found whichever of a run's backends closes last.
        """
        found = self._world.get_settings()
        self._traffic_manager = self._client.get_trafficmanager(self.config.carla.tm_port)
        if not (found.synchronous_mode and math.isclose(found.fixed_delta_seconds or 0.0, FIXED_DELTA_SECONDS)):
            self._found_settings = found
            settings = self._world.get_settings()
            settings.synchronous_mode = True
            settings.fixed_delta_seconds = FIXED_DELTA_SECONDS
            self._world.apply_settings(settings)
        self._traffic_manager.set_synchronous_mode(True)

    # -------------------------------------------------------------------------------------------- episode

    @property
    def limits(self) -> VehicleLimits:
        if self._limits is None:
            raise RuntimeError("CarlaBackend.limits come from the ego's physics: call reset() first")
        return self._limits

    def reset(self, seed: int) -> None:
        self._destroy_episode_actors()
        rng = np.random.default_rng(seed)
        self._traffic_manager.set_random_device_seed(seed)
        spawn_points = self._map.get_spawn_points()
        shuffled = [spawn_points[i] for i in rng.permutation(len(spawn_points))]
        free_points = self._spawn_ego_with_route(shuffled, rng)
        self._sensors = EgoSensors()
        self._sensors.attach(self._world, self._ego, self.config.image_size, self.config.carla.camera_fov_deg)
        self._spawn_traffic(free_points, rng)
        self._progress_m = 0.0
        self._warm_up()
        if self._limits is None:
            # After the warm-up ticks: the wheel positions are world positions of the simulated car
            # (python_api.md, carla.WheelPhysicsControl.position), which a car not yet simulated lacks.
            self._limits = vehicle_limits(self._ego.get_physics_control())

    def _spawn_ego_with_route(self, spawn_points: list[carla.Transform], rng: np.random.Generator) -> list:
        """Spawn the ego at the first of `spawn_points` that is free and starts a long enough route; returns
        the later spawn points not too close to the ego, for traffic."""
        blueprint = self._library.find(EGO_BLUEPRINT_ID)
        blueprint.set_attribute("role_name", EGO_ROLE_NAME)
        for index, spawn_point in enumerate(spawn_points):
            start = self._map.get_waypoint(spawn_point.location)
            route = plan_route(start, self.config.route_length_m, rng)
            if route is None or route.length_m < MIN_ROUTE_FRACTION * self.config.route_length_m:
                continue
            ego = self._world.try_spawn_actor(blueprint, spawn_point)
            if ego is None:
                continue
            self._ego, self._route = ego, route
            return [p for p in spawn_points[index + 1 :] if p.location.distance(spawn_point.location) > EGO_CLEARANCE_M]
        raise RuntimeError(
            f"no free spawn point in {self.config.carla.town} starts a route of "
            f"{MIN_ROUTE_FRACTION * self.config.route_length_m:g} m or more"
        )

    def _npc_count(self) -> int:
        scenario_count = self.config.carla.npc_vehicles[self.config.scenario]
        return round(scenario_count * self.config.traffic_density)

    def _spawn_traffic(self, spawn_points: list[carla.Transform], rng: np.random.Generator) -> None:
        blueprints = sorted(
            (b for b in self._library.filter("vehicle.*") if self._wheels(b) == NPC_WHEELS),
            key=lambda b: b.id,
        )
        wanted = self._npc_count()
        port = self._traffic_manager.get_port()
        for spawn_point in spawn_points:
            if len(self._npcs) >= wanted:
                break
            blueprint = blueprints[int(rng.integers(len(blueprints)))]
            blueprint.set_attribute("role_name", NPC_ROLE_NAME)
            npc = self._world.try_spawn_actor(blueprint, spawn_point)
            if npc is not None:
                self._npcs.append(npc)
                npc.set_autopilot(True, port)

    @staticmethod
    def _wheels(blueprint: carla.ActorBlueprint) -> int:
        if not blueprint.has_attribute("number_of_wheels"):
            return 0
        return blueprint.get_attribute("number_of_wheels").as_int()

    def _warm_up(self) -> None:
        standing = carla.VehicleControl(brake=1.0)
        for _ in range(WARMUP_TICKS):
            self._ego.apply_control(standing)
            frame = self._tick()
        self._sensors.count_from(frame + 1)  # landing after the spawn is not the agent's doing

    def _tick(self) -> int:
        frame = self._world.tick(self._timeout_s)
        image = self._sensors.image_for(frame, self._timeout_s)
        self._rgb = bgra_to_rgb(image.raw_data, image.height, image.width)
        return frame

    def step(self, steer: float, throttle_brake: float) -> None:
        self._ego.apply_control(vehicle_control(steer, throttle_brake))
        self._tick()

    # ------------------------------------------------------------------------------------ observations

    def frame(self) -> np.ndarray:
        return grayscale(self._rgb)

    def top_view(self) -> np.ndarray:
        return self._rgb.repeat(TOP_VIEW_UPSCALE, axis=0).repeat(TOP_VIEW_UPSCALE, axis=1)

    def measure(self) -> Measurement:
        transform = self._ego.get_transform()
        ego = Pose.from_transform(transform)
        on_route = self._route.project(ego.xy, self._progress_m, PROJECTION_BEHIND_M, PROJECTION_AHEAD_M)
        self._progress_m = on_route.s_m
        lateral_offset, heading_error = lane_errors(ego, self._lane_reference(transform.location, on_route))
        ahead = self._route.points_ahead(on_route.s_m, self.config.num_waypoints, self.config.waypoint_spacing_m)
        return Measurement(
            speed_mps=self._speed(self._ego),
            progress_m=on_route.s_m,
            route_length_m=self._route.length_m,
            lateral_offset_m=lateral_offset,
            heading_error_rad=heading_error,
            waypoints_ego=to_ego_frame(ahead, ego),
            collision=self._sensors.collision(),
            off_drivable=self._sensors.crossed_road_edge() or not is_on_driving_lane(self._map, transform.location),
        )

    def _lane_reference(self, location: carla.Location, on_route: Projection) -> Pose:
        """The lane centre point the ego is measured against (see the module docstring)."""
        lane = self._map.get_waypoint(location)
        if lane is not None and not lane.is_junction:
            return Pose.from_transform(lane.transform)
        return Pose(self._route.points_at([on_route.s_m])[0], on_route.heading_rad)

    @staticmethod
    def _speed(vehicle: carla.Actor) -> float:
        velocity = vehicle.get_velocity()
        return math.sqrt(velocity.x**2 + velocity.y**2 + velocity.z**2)

    def scene(self) -> Scene:
        transform = self._ego.get_transform()
        ego = Pose.from_transform(transform)
        lane = self._map.get_waypoint(transform.location)
        left, right = same_direction_lanes(lane)
        lane_by_offset = {0: lane} | ({-1: left[0]} if left else {}) | ({+1: right[0]} if right else {})
        views = {offset: self._lane_view(waypoint, ego) for offset, waypoint in lane_by_offset.items()}
        leaders, followers = nearest_neighbours(views, self._other_vehicles(ego), self._ego.bounding_box.extent.x)
        spacing, count = self.config.waypoint_spacing_m, self.config.num_waypoints
        return Scene(
            speed_mps=self._speed(self._ego),
            lane=len(left),
            lanes=len(left) + 1 + len(right),
            leaders=leaders,
            followers=followers,
            lane_waypoints={
                offset: to_ego_frame(view.line.points_ahead(view.ego_s_m, count, spacing), ego)
                for offset, view in views.items()
            },
        )

    def _lane_view(self, waypoint: carla.Waypoint, ego: Pose) -> LaneView:
        ahead_m = max(SCENE_AHEAD_M, self.config.num_waypoints * self.config.waypoint_spacing_m)
        line, _ = lane_centre_line(waypoint, SCENE_BEHIND_M, ahead_m, self._route, self._progress_m)
        return LaneView(line=line, ego_s_m=line.project(ego.xy).s_m, half_width_m=waypoint.lane_width / 2.0)

    def _other_vehicles(self, ego: Pose) -> list[OtherVehicle]:
        reach_m = max(SCENE_AHEAD_M, SCENE_BEHIND_M)
        others = []
        for vehicle in self._world.get_actors().filter("vehicle.*"):
            if vehicle.id == self._ego.id:
                continue
            pose = Pose.from_transform(vehicle.get_transform())
            if np.linalg.norm(pose.xy - ego.xy) <= reach_m:
                others.append(OtherVehicle(pose.xy, vehicle.bounding_box.extent.x, self._speed(vehicle)))
        return others

    # -------------------------------------------------------------------------------------- state, close

    can_snapshot = False

    def get_state(self) -> bytes:
        raise NotImplementedError(
            "CarlaBackend cannot snapshot a CARLA server's world; a resumed run restarts its episodes instead"
        )

    def set_state(self, state: bytes) -> None:
        raise NotImplementedError(
            "CarlaBackend cannot restore a CARLA server's world; a resumed run restarts its episodes instead"
        )

    def _destroy_episode_actors(self) -> None:
        """Destroy the sensors, then the ego, then the NPCs of the current episode."""
        actors: list[carla.Actor] = []
        if self._sensors is not None:
            self._sensors.stop()
            actors += self._sensors.actors
        if self._ego is not None:
            actors.append(self._ego)
        actors += self._npcs
        if actors:
            self._client.apply_batch_sync([carla.command.DestroyActor(actor.id) for actor in actors])
        self._sensors, self._ego, self._npcs = None, None, []

    def close(self) -> None:
        """Destroy every actor this backend spawned and give back the settings it changed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._destroy_episode_actors()
        if self._found_settings is not None:
            self._world.apply_settings(self._found_settings)
            # The TM's mode cannot be read (the API has no getter): it goes back with the world's.
            self._traffic_manager.set_synchronous_mode(self._found_settings.synchronous_mode)
