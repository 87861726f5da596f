"""Environment configuration shared by every backend, validated at construction.

Bad values fail here, before any simulator starts, with a message naming the field and what is allowed. Fields are
named as the user sets them, `data.env.<field>` (the `cli.py` option and the key in a run's config file), whoever
builds the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lightning_td3.envs import tasks
from lightning_td3.envs.tasks import Range, StepsPerKm, TaskSetting
from lightning_td3.errors import require

# Each backend by the name data.env.backend gives: (module, class), imported when an env of it is built
# (`contract.make_backend`): the backends import the contract module that builds them.
BACKENDS = {
    "highway": ("lightning_td3.envs.highway_backend", "HighwayBackend"),
    "carla": ("lightning_td3.envs.carla_backend", "CarlaBackend"),
}
LAYOUTS = ("straight", "curvy")
SCENARIOS = {0: "light", 1: "medium", 2: "dense"}
IMAGE_SIZE = 84
FRAME_STACK = 4


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The settings that make up a task, in the order an episode draws those that vary (`EnvConfig.sample_task`).
TASK_SETTINGS = (
    TaskSetting(
        "scenario", "one of 0, 1, 2 (light, medium, dense traffic)",
        lambda value: isinstance(value, int) and value in SCENARIOS, integer=True,
    ),
    TaskSetting("traffic_density", "a number >= 0", lambda value: _is_number(value) and value >= 0),
    TaskSetting("layout", f"one of {LAYOUTS}", lambda value: isinstance(value, str) and value in LAYOUTS, ranged=False),
    TaskSetting(
        "lanes", "an integer in 1..6", lambda value: isinstance(value, int) and 1 <= value <= 6, integer=True
    ),
    TaskSetting("route_length_m", ">= 100 metres", lambda value: _is_number(value) and value >= 100),
)
# Where every highway frame put the ego before env.frame_ego_position existed: what a camera record without it means.
UNRECORDED_FRAME_EGO_POSITION = 0.3


@dataclass
class RewardConfig:
    """Weights of the seed's reward terms (see `lightning_td3.envs.reward`)."""

    efficiency: float = 2.0
    lane_keeping: float = 2.0
    comfort: float = 1.0
    safety: float = 1.0
    progress: float = 3.0
    # Charged once, times `safety`, when the episode ends in a collision or off the road.
    crash_penalty: float = 50.0
    # Pay progress only up to the target speed. The per-step penalties make finishing sooner pay, so without the
    # cap a discounted return favours speeding past the target (and the collisions that come with it).
    progress_up_to_target_speed: bool = False
    # Per step, times `headway`: how far the time gap to the car ahead in the ego's lane (gap / ego speed) is
    # below `headway_s`, from 0 (at or above it, or no car ahead) to 1 (touching). The crash penalty comes once,
    # when it is too late; this says so while braking still helps. 0 (the seed): off.
    headway: float = 0.0
    headway_s: float = 1.5
    # Per step, times `closing`: how far the time to collision with the car ahead in the ego's lane (gap / closing
    # speed, while closing in) is below `closing_s`, from 0 (at or above it, or not closing) to 1 (touching). The
    # headway charge reads the gap and the ego's speed alone, so it charges a fast approach on a slower car no sooner
    # than a steady follow: this one grows with the closing speed, while braking still sheds it. 0: off.
    closing: float = 0.0
    closing_s: float = 4.0
    # Per step, times `alongside`: the headway charge of the lane the ego moves toward, to the nearer of the car
    # ahead and the car behind in it, times how far toward it the ego has moved (0 at its lane's centre line, 1 at
    # `reward.ALONGSIDE_FULL_AT_M`). It charges drifting or changing into a lane where a car is beside the ego, which
    # the headway charge reaches only once the lanes have swapped: when the two cars already touch. 0: off.
    alongside: float = 0.0

    def __post_init__(self) -> None:
        for name in ("efficiency", "lane_keeping", "comfort", "safety", "progress", "crash_penalty", "headway",
                     "closing", "alongside"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value >= 0, f"data.env.reward.{name}", "a number >= 0", value)
        for name in ("headway_s", "closing_s"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value > 0, f"data.env.reward.{name}", "> 0 seconds", value)


@dataclass(frozen=True)
class CarlaServer:
    """One CARLA server and the Traffic Manager port its client uses."""

    host: str
    port: int
    tm_port: int


SERVER_FORMAT = "'host:port' or 'host:port:tm_port' with ports in 1..65535"


def _is_port(value: object) -> bool:
    return isinstance(value, int) and 0 < value < 65536


@dataclass
class CarlaConfig:
    """How to reach CARLA 0.9.16 servers and what to load there.

    `servers` spreads the training envs over many servers: one "host:port[:tm_port]" entry per env of the whole
    run; process r of a DDP run takes entries r * num_envs to (r + 1) * num_envs - 1. Without a tm_port an entry
    uses `tm_port` plus its index: the Traffic Manager runs in the client, so the envs of one machine need
    distinct ports. Empty: every env uses `host`, `port` and `tm_port`.

    What is loaded is `town`, or a custom road network from an OpenDRIVE file (`opendrive_file`, built by the
    server's OpenDRIVE standalone mode; `town` is then ignored).
    """

    host: str = "localhost"
    port: int = 2000
    tm_port: int = 8000
    timeout_s: float = 10.0
    town: str = "Town01"
    # NPC vehicles per scenario 0/1/2.
    npc_vehicles: tuple[int, int, int] = (20, 50, 100)
    camera_fov_deg: float = 90.0
    servers: tuple[str, ...] = ()
    opendrive_file: str | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.host, str) and bool(self.host), "data.env.carla.host", "a non-empty host name", self.host
        )
        for name in ("port", "tm_port"):
            value = getattr(self, name)
            require(_is_port(value), f"data.env.carla.{name}", "a port in 1..65535", value)
        require(self.timeout_s > 0, "data.env.carla.timeout_s", "> 0 seconds", self.timeout_s)
        self.npc_vehicles = tuple(self.npc_vehicles)
        require(
            len(self.npc_vehicles) == 3 and all(isinstance(n, int) and n >= 0 for n in self.npc_vehicles),
            "data.env.carla.npc_vehicles",
            "three counts >= 0 for scenarios 0/1/2",
            self.npc_vehicles,
        )
        self.servers = tuple(self.servers)
        self.server_list()  # validates every entry now, before any work
        if self.opendrive_file is not None:
            require(
                Path(self.opendrive_file).is_file() and Path(self.opendrive_file).suffix == ".xodr",
                "data.env.carla.opendrive_file", "an existing OpenDRIVE file (*.xodr) or null", self.opendrive_file,
            )

    def server_list(self) -> list[CarlaServer]:
        """The parsed `servers` entries; an error names the first bad one."""
        parsed: list[CarlaServer] = []
        for index, entry in enumerate(self.servers):
            name = f"data.env.carla.servers[{index}]"
            parts = entry.split(":") if isinstance(entry, str) else []
            ports = [int(part) if part.isdecimal() else None for part in parts[1:]]
            require(
                len(parts) in (2, 3) and bool(parts[0]) and all(_is_port(port) for port in ports),
                name, SERVER_FORMAT, entry,
            )
            server = CarlaServer(parts[0], ports[0], ports[1] if len(ports) == 2 else self.tm_port + index)
            for other_index, other in enumerate(parsed):
                require(
                    (server.host, server.port) != (other.host, other.port), name,
                    f"an entry naming a server no other entry names (servers[{other_index}] does)", entry,
                )
                require(
                    server.tm_port != other.tm_port, name,
                    f"an entry whose Traffic Manager port {server.tm_port} no other entry uses "
                    f"(servers[{other_index}] does)", entry,
                )
            parsed.append(server)
        return parsed


@dataclass
class EnvConfig:
    """One driving task: backend, road, traffic, observation and episode rules.

    Args:
        backend: "highway" (embedded, no server) or "carla" (needs a running CARLA 0.9.16 server).
        scenario: traffic level, 0/1/2 = light/medium/dense.
        traffic_density: multiplier on the scenario's traffic (1.0 = as the scenario says).
        layout: highway road shape, "straight" or "curvy" (S-bends from circular arcs).
        lanes: lanes on the highway road.
        route_length_m: length of the route to the goal along the road.
            These five make up the task: each also takes a list to draw from, or (but the layout) a range
            {low, high}, and then every episode draws its own task from the env's seeded generator
            (`lightning_td3.envs.tasks`).
        target_speed_mps: the speed the efficiency reward tracks.
        initial_speed_mps: ego speed at reset (highway backend; CARLA starts at rest).
        policy_frequency_hz: agent decisions per simulated second (highway backend; CARLA is fixed at 20 Hz).
        max_steer_rad: front-wheel angle at steer = ±1 (highway backend; CARLA uses the car's own limit). At highway
            speed 0.1 rad already turns on a 50 m radius; bends need about 0.03.
        max_steps: steps before time-out (truncation), or {per_km: N}: N steps per km of each episode's route,
            rounded up ({per_km: 500}: 150 steps on 300 m, 1000 on 2 km), which a varying route needs.
        num_waypoints: route waypoints in the vector observation.
        waypoint_spacing_m: distance between those waypoints along the lane.
        off_road_distance_m: farther than this from the nearest lane centre counts as off-road.
        goal_radius_m: closer than this to the end of the route counts as goal reached.
        image_size: camera image side in pixels (only 84 is supported: the NatureCNN expects it).
        pixels_per_meter: zoom of the highway top view camera.
        frame_ego_position: where the ego sits across the highway frame's width, as a fraction from its left edge;
            the road ahead runs to the right, so a smaller fraction shows more of it (and less behind).
        observe_leader: append to the vector the gap to the vehicle ahead in the ego's lane and the speed at which
            the ego closes on it, as a forward radar would give them (off: the agent sees other vehicles only in
            the frames).
        observe_sides: append to the vector the gaps to the nearest vehicles ahead of and behind the ego in the
            lanes to its left and right (4 entries), as corner radars would give them; no lane or no vehicle within
            range reads as a vehicle at the range.
        reward: weights of the reward terms.
        carla: server connection and world settings, used by the carla backend.
    """

    backend: str = "highway"
    scenario: int | list[int] | Range = 1
    traffic_density: float | list[float] | Range = 1.0
    layout: str | list[str] = "straight"
    lanes: int | list[int] | Range = 3
    route_length_m: float | list[float] | Range = 500.0
    target_speed_mps: float = 25.0
    initial_speed_mps: float = 20.0
    policy_frequency_hz: float = 5.0
    max_steer_rad: float = 0.1
    max_steps: int | StepsPerKm = 300
    num_waypoints: int = 25
    waypoint_spacing_m: float = 2.0
    off_road_distance_m: float = 2.5
    goal_radius_m: float = 3.0
    image_size: int = IMAGE_SIZE
    pixels_per_meter: float = 1.75
    frame_ego_position: float = 0.3
    observe_leader: bool = False
    observe_sides: bool = False
    reward: RewardConfig = field(default_factory=RewardConfig)
    carla: CarlaConfig = field(default_factory=CarlaConfig)

    def __post_init__(self) -> None:
        if isinstance(self.reward, dict):
            self.reward = RewardConfig(**self.reward)
        if isinstance(self.carla, dict):
            self.carla = CarlaConfig(**self.carla)
        require(self.backend in BACKENDS, "data.env.backend", f"one of {tuple(BACKENDS)}", self.backend)
        for setting in TASK_SETTINGS:
            setattr(self, setting.name, tasks.parse(setting, getattr(self, setting.name)))
        require(self.target_speed_mps > 0, "data.env.target_speed_mps", "> 0", self.target_speed_mps)
        require(self.initial_speed_mps >= 0, "data.env.initial_speed_mps", ">= 0", self.initial_speed_mps)
        require(self.policy_frequency_hz > 0, "data.env.policy_frequency_hz", "> 0", self.policy_frequency_hz)
        require(0 < self.max_steer_rad <= 0.6, "data.env.max_steer_rad", "in (0, 0.6] radians", self.max_steer_rad)
        if isinstance(self.max_steps, dict) and set(self.max_steps) == {"per_km"}:
            self.max_steps = StepsPerKm(**self.max_steps)
        per_route = isinstance(self.max_steps, StepsPerKm)
        require(
            (isinstance(self.max_steps, int) and self.max_steps > 0)
            or (per_route and _is_number(self.max_steps.per_km) and self.max_steps.per_km > 0),
            "data.env.max_steps", "an integer > 0, or {per_km: N} for N > 0 steps per km of route",
            {"per_km": self.max_steps.per_km} if per_route else self.max_steps,
        )
        require(
            per_route or not tasks.is_distribution(self.route_length_m), "data.env.max_steps",
            "{per_km: N} when data.env.route_length_m varies, so that each episode's time-out follows its route "
            "({per_km: 500} gives 150 steps on 300 m)", self.max_steps,
        )
        require(
            isinstance(self.num_waypoints, int) and self.num_waypoints > 0,
            "data.env.num_waypoints",
            "an integer > 0",
            self.num_waypoints,
        )
        require(self.waypoint_spacing_m > 0, "data.env.waypoint_spacing_m", "> 0", self.waypoint_spacing_m)
        require(self.off_road_distance_m > 0, "data.env.off_road_distance_m", "> 0", self.off_road_distance_m)
        require(self.goal_radius_m > 0, "data.env.goal_radius_m", "> 0", self.goal_radius_m)
        require(
            self.image_size == IMAGE_SIZE,
            "data.env.image_size",
            f"{IMAGE_SIZE} (the NatureCNN input size)",
            self.image_size,
        )
        require(self.pixels_per_meter > 0, "data.env.pixels_per_meter", "> 0", self.pixels_per_meter)
        require(
            0 < self.frame_ego_position < 1, "data.env.frame_ego_position", "in (0, 1)", self.frame_ego_position
        )
        require(isinstance(self.observe_leader, bool), "data.env.observe_leader", "true or false", self.observe_leader)
        require(isinstance(self.observe_sides, bool), "data.env.observe_sides", "true or false", self.observe_sides)

    @property
    def camera(self) -> dict:
        """What shapes the frames besides their size: an agent reads frames like those it was trained on, so its
        checkpoint keeps this and refuses an env that differs (a zoomed-out frame shows every car smaller)."""
        if self.backend == "carla":
            return {"backend": "carla", "camera_fov_deg": self.carla.camera_fov_deg}
        return {
            "backend": self.backend,
            "pixels_per_meter": self.pixels_per_meter,
            "frame_ego_position": self.frame_ego_position,
        }

    @staticmethod
    def complete_camera(recorded: dict) -> dict:
        """A checkpoint's camera record as `camera` gives it now (highway records written before the ego's place in
        the frame became a setting lack it)."""
        if recorded.get("backend") == "highway":
            return {**recorded, "frame_ego_position": recorded.get("frame_ego_position", UNRECORDED_FRAME_EGO_POSITION)}
        return recorded

    @property
    def varying(self) -> tuple[str, ...]:
        """The task settings given as a distribution (a list or a range): those each episode draws."""
        return tuple(setting.name for setting in TASK_SETTINGS if tasks.is_distribution(getattr(self, setting.name)))

    def sample_task(self, rng: np.random.Generator) -> EnvConfig:
        """One episode's task: this config with every varying setting drawn from `rng` (in `TASK_SETTINGS` order) and
        the time-out of its route. A config of single values and a time-out in steps is its own task and draws
        nothing: its episodes are those it gave before tasks could vary."""
        if not self.varying and isinstance(self.max_steps, int):
            return self
        drawn = {
            setting.name: tasks.draw(setting, getattr(self, setting.name), rng)
            for setting in TASK_SETTINGS
            if setting.name in self.varying
        }
        return replace(self, **drawn, max_steps=self._max_steps_for(drawn.get("route_length_m", self.route_length_m)))

    def _max_steps_for(self, route_length_m: float) -> int:
        """The time-out of an episode on a route of this length."""
        return self.max_steps.steps(route_length_m) if isinstance(self.max_steps, StepsPerKm) else self.max_steps

    def task(self) -> dict:
        """The task settings of a config that does not vary (an episode's task, `sample_task`), and the time-out they
        give, as plain values: what `info["task"]` reports."""
        return {setting.name: getattr(self, setting.name) for setting in TASK_SETTINGS} | {
            "max_steps": self._max_steps_for(self.route_length_m)
        }

    def settings(self) -> dict:
        """Every setting as plain values, as a run's `data.env` writes them: what a checkpoint keeps of its task, so
        that `validate --ckpt_path` alone evaluates an agent on it."""
        return asdict(self)

    @property
    def vector_size(self) -> int:
        """speed, distance to goal, heading error, lateral offset, (x, y) per waypoint, then the leader's gap and
        closing speed if observed, then the side lanes' gaps if observed."""
        return 4 + 2 * self.num_waypoints + (2 if self.observe_leader else 0) + (4 if self.observe_sides else 0)
