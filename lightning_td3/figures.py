"""Pictures of a run for people: the learning curve against the baselines, and a GIF of one evaluation episode.

    python -m lightning_td3.figures curve --run runs/<name>/version_<n> [more, in order] --out docs/<name>_curve.png
    python -m lightning_td3.figures episode --ckpt <checkpoint> --seed 50000 --out docs/<name>_episode.gif

The curve reads the run's own TensorBoard scalars (logged against env steps) and its saved config; the baselines
are evaluated on the very episodes the run was validated on, through the same harness, so the lines compare like
with like. A resumed run goes on logging in its own version_<n> folder; one whose checkpoint did not record that
folder (written before it was kept) logs into a new one: give the run's folders in the order they ran, and the curve
continues across them. The GIF shows what the networks see (the 4-frame camera stack) above a top view
of the road.
Needs matplotlib (`pip install -e ".[figures]"`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_td3.baselines import IdmMobilPolicy, RandomPolicy
from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.errors import UserError
from lightning_td3.evaluation import evaluate, run_episode
from lightning_td3.run_config import data_section, env_config_in, trained_agent

CURVE_METRICS = {"eval/success_rate": "success rate", "eval/episode_return": "episode return"}
BASELINES = {"Random": RandomPolicy, "IDM+MOBIL": IdmMobilPolicy}
CAMERA_ZOOM = 2  # 84-pixel frames are too small to read in a README
CAPTION_HEIGHT = 20


# --- learning curve ------------------------------------------------------------------------------------------------

def eval_scalars_vs_env_steps(*run_dirs: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (env_steps, values)} of a run's evaluations, from its TensorBoard event files.

    `run_dirs`: the run's log directory, then those of its resumptions in the order they ran. A resumption starts
    from a checkpoint, which may be older than what its predecessor logged last (it crashed after the checkpoint):
    what the predecessor logged after the resumption's first logged env step is dropped, as that training was redone.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run_dir in run_dirs:
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags()["scalars"])
        for metric in CURVE_METRICS:
            if f"{metric}_vs_env_steps" not in available:
                raise UserError(
                    f"{run_dir} has no '{metric}_vs_env_steps' scalars: is it a TD3 run's log directory "
                    "(runs/<name>/version_<n>)?"
                )
        resumed_from = min(events.Scalars(tag)[0].step for tag in available if tag.endswith("_vs_env_steps"))
        for metric in CURVE_METRICS:
            points = events.Scalars(f"{metric}_vs_env_steps")
            earlier_steps, earlier_values = curves.get(metric, (np.array([], int), np.array([])))
            kept = earlier_steps <= resumed_from
            curves[metric] = (
                np.concatenate([earlier_steps[kept], [p.step for p in points]]),
                np.concatenate([earlier_values[kept], [p.value for p in points]]),
            )
    return curves


def run_evaluation_episodes(run_dir: Path) -> tuple[EnvConfig, list[int]]:
    """The env and seeds the run's validation used, from the config.yaml LightningCLI saved next to its events."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: the baselines need the run's config to replay its evaluation")
    data = data_section(config_path)
    seeds = list(range(data["eval_seed"], data["eval_seed"] + data["eval_episodes"]))
    return env_config_in(data, str(config_path)), seeds


def plot_learning_curve(run_dirs: Sequence[Path], out: Path) -> dict[str, dict[str, float]]:
    """Draw the run's evaluation curves with the baselines as horizontal lines; return the baselines' metrics.

    `run_dirs`: the run's log directory, followed by those of its resumptions in the order they ran.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_config, seeds = run_evaluation_episodes(run_dirs[0])
    for run_dir in run_dirs[1:]:
        if run_evaluation_episodes(run_dir) != (env_config, seeds):
            raise UserError(
                f"{run_dir} was evaluated on other episodes than {run_dirs[0]} (its config.yaml's data.env, "
                "eval_seed or eval_episodes differ): one curve needs the same evaluation throughout"
            )
    curves = eval_scalars_vs_env_steps(*run_dirs)
    baselines = {name: evaluate(policy(), env_config, seeds) for name, policy in BASELINES.items()}

    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(11, 4), constrained_layout=True)
    for axis, (metric, label) in zip(axes, CURVE_METRICS.items()):
        steps, values = curves[metric]
        axis.plot(steps, values, marker="o", color="tab:blue", label="TD3")
        for (name, metrics), style in zip(baselines.items(), ("--", ":")):
            # A plotted line (unlike axhline) widens the y range, so a baseline above the curve stays in view.
            axis.plot(steps[[0, -1]], [metrics[metric]] * 2, linestyle=style, color="gray", label=name)
        axis.set_xlabel("env steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(loc="lower right")
    versions = "+".join(run_dir.name for run_dir in run_dirs)
    figure.suptitle(
        f"{run_dirs[0].parent.name}/{versions}: scenario {env_config.scenario}, {env_config.layout}, "
        f"{len(seeds)} evaluation episodes (seeds {seeds[0]}-{seeds[-1]})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return baselines


def eval_scalars_vs_minutes(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (minutes since the run started, values)} of a run's evaluations. The start is when the logger
    opened its first event file (TensorBoard names the file after that moment), before the warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not event_files:
        raise UserError(f"{run_dir} has no TensorBoard event files: is it a run's log directory?")
    started = min(float(path.name.split(".")[3]) for path in event_files)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        metric: (np.array([(p.wall_time - started) / 60 for p in points]), np.array([p.value for p in points]))
        for metric in CURVE_METRICS
        for points in [events.Scalars(f"{metric}_vs_env_steps")]
    }


def plot_comparison(runs: dict[str, Path], out: Path) -> None:
    """Overlay several runs' evaluation curves, against env steps and against wall-clock minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(CURVE_METRICS), figsize=(11, 7), constrained_layout=True)
    for label, run_dir in runs.items():
        by_steps, by_minutes = eval_scalars_vs_env_steps(run_dir), eval_scalars_vs_minutes(run_dir)
        for column, metric in enumerate(CURVE_METRICS):
            axes[0, column].plot(*by_steps[metric], marker="o", markersize=3, label=label)
            axes[1, column].plot(*by_minutes[metric], marker="o", markersize=3, label=label)
    for row, x_label in enumerate(("env steps", "minutes since the run started")):
        for column, y_label in enumerate(CURVE_METRICS.values()):
            axes[row, column].set_xlabel(x_label)
            axes[row, column].set_ylabel(y_label)
            axes[row, column].grid(alpha=0.3)
        axes[row, 0].set_ylim(-0.05, 1.05)
    axes[0, 0].legend(loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


# --- episode GIF ---------------------------------------------------------------------------------------------------

def episode_frame(image_stack: np.ndarray, top_view: np.ndarray, caption: str) -> np.ndarray:
    """One GIF frame: the camera stack (oldest frame left, enlarged), the top view, and a caption line."""
    from PIL import Image, ImageDraw

    camera = np.concatenate(list(image_stack), axis=1).repeat(CAMERA_ZOOM, axis=0).repeat(CAMERA_ZOOM, axis=1)
    camera = np.repeat(camera[:, :, None], 3, axis=2)
    width = max(camera.shape[1], top_view.shape[1])
    caption_strip = np.zeros((CAPTION_HEIGHT, width, 3), np.uint8)
    rows = [np.pad(part, ((0, 0), (0, width - part.shape[1]), (0, 0))) for part in (camera, top_view, caption_strip)]
    frame = Image.fromarray(np.concatenate(rows, axis=0))
    ImageDraw.Draw(frame).text((6, frame.height - CAPTION_HEIGHT + 4), caption, fill=(255, 255, 255))
    return np.asarray(frame)


def _caption(info: dict) -> str:
    outcome = f"  {info['reason']}" if info["reason"] else ""
    return (f"step {info['episode_length']:3d}   {info['speed_kmh']:5.1f} km/h   "
            f"route {100 * info['route_completion']:3.0f} %{outcome}")


def record_episode(config_paths: Sequence[Path], checkpoint: Path, seed: int, out: Path) -> dict:
    """Drive one evaluation episode with the checkpoint's actor and write it as a GIF; return its result.

    `config_paths`: the run's config, or the configs it was layered from, in order; none: the env the checkpoint
    records it was trained on."""
    from PIL import Image

    agent, env_config = trained_agent(checkpoint, config_paths)
    env = DrivingEnv(env_config, render_mode="rgb_array")
    frames = []
    try:
        result = run_episode(
            env, agent.policy(), seed,
            watch=lambda obs, info: frames.append(episode_frame(obs["image"], env.render(), _caption(info))),
        )
    finally:
        env.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(out, save_all=True, append_images=images[1:], duration=1000 // env.metadata["render_fps"], loop=0)
    return {"frames": len(frames), **vars(result)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curve = commands.add_parser("curve", help="learning curve PNG with the two baselines")
    curve.add_argument(
        "--run", type=Path, nargs="+", required=True,
        help="the run's log directory (runs/<name>/version_<n>), then those of its resumptions in the order they ran",
    )
    curve.add_argument("--out", type=Path, required=True)
    compare = commands.add_parser("compare", help="several runs' evaluation curves overlaid, vs env steps and minutes")
    compare.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                         help="a label and a run's log directory (runs/<name>/version_<n>); repeat it per run")
    compare.add_argument("--out", type=Path, required=True)
    episode = commands.add_parser("episode", help="GIF of one evaluation episode")
    episode.add_argument("--config", type=Path, action="append", default=[],
        help="the run's config (its data.env is used; default: the env the checkpoint records); repeat it to layer "
             "configs as cli.py does")
    episode.add_argument("--ckpt", type=Path, required=True, help="a training checkpoint or an exported actor")
    episode.add_argument("--seed", type=int, required=True)
    episode.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        if args.command == "curve":
            baselines = plot_learning_curve(args.run, args.out)
            for name, metrics in baselines.items():
                print(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in metrics.items()))
        elif args.command == "compare":
            plot_comparison(_labelled_runs(args.run), args.out)
        else:
            result = record_episode(args.config, args.ckpt, args.seed, args.out)
            print(", ".join(f"{key} {value}" for key, value in result.items()))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}")


def _labelled_runs(arguments: list[str]) -> dict[str, Path]:
    runs = {}
    for argument in arguments:
        label, separator, run_dir = argument.partition("=")
        if not separator or not label or not Path(run_dir).is_dir():
            raise UserError(f"--run {argument}: give LABEL=DIR with DIR a run's log directory")
        runs[label] = Path(run_dir)
    return runs


if __name__ == "__main__":
    main()
