"""An agent and the baselines over a grid of tasks: per-cell success, collisions and speed, against the targets.

    python -m lightning_td3.grid --cells configs/grids/generalist.yaml --ckpt agents/<name>.ckpt \
        --policies td3 idm_mobil random --episodes 100 --seed 50000 --out docs/grid/

A grid file names its cells; each is one task, given as env settings over the agent's own (those its checkpoint
records, or its run's config with --config) and the grid's shared `env`:

    env:                               # every cell's, under the cell's own (optional)
      route_length_m: 300
      max_steps: {per_km: 500}
    cells:
      - name: s1-curvy-2-lanes         # unique: the key of the cell's rows in the table and the CSV
        row: scenario 1                # where the heat-map puts it (optional: a row of its own, named after it)
        column: curvy, 2 lanes         # (optional: one column)
        env: {scenario: 1, layout: curvy, lanes: 2}

Every policy drives the same episodes of a cell (seeds --seed to --seed + --episodes - 1) through the one
evaluation harness (`lightning_td3.evaluation.evaluate`). Written to --out: grid.md (per cell, each policy's success
/ collisions / km/h and whether the agent meets the targets against IDM+MOBIL), grid.csv (a row per cell and policy
with every metric the harness returns) and grid.png (a heat-map of the agent's success, the cells at their row and
column). Baselines do not change with the agent: `--baselines-from <earlier>/grid.csv` takes their results from an
earlier grid where a row there has the cell's task, first seed and number of episodes, and drives the rest. Bad input
stops before any episode with one line and exit code 1, and nothing is written.
Needs matplotlib (`pip install -e ".[figures]"`).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import multiprocessing
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from datamodules.replay import ReplayDataModule
from lightning_td3.driving_module import BASELINES
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import ConfigError, UserError, require
from lightning_td3.evaluation import Policy, evaluate
from lightning_td3.run_config import env_config_of, layered, trained_agent

AGENT = "td3"
POLICY_LABELS = {AGENT: "TD3", "idm_mobil": "IDM+MOBIL", "random": "Random"}
REFERENCE = "idm_mobil"  # the driver the agent's targets are measured against
# The agent meets a cell's targets with at least the reference's success less this, at most this share of
# collisions, and at least this fraction of the reference's average speed, on the same episodes.
SUCCESS_MARGIN = 0.01
MAX_COLLISION_RATE = 0.02
SPEED_FRACTION = 0.9
# The harness's means are float32: a rate exactly at a bound may land a few 1e-8 beyond it.
RATE_TOLERANCE = 1e-6
CELL_KEYS = ("name", "row", "column", "env")
GRID_KEYS = ("env", "cells")
ENV_SETTINGS = {field.name for field in fields(EnvConfig)}
METRIC_PREFIX = "eval/"  # of the metrics `evaluate` returns
# Unless told otherwise, the grid runs on the validation episodes `cli.py validate` runs on: the datamodule's defaults.
DATA_SETTINGS = inspect.signature(ReplayDataModule).parameters


@dataclass
class Cell:
    """One task of the grid, and where the heat-map shows it."""

    name: str
    row: str
    column: str
    env: EnvConfig


# --- the grid file -------------------------------------------------------------------------------------------------

def read_grid(path: Path, base: EnvConfig) -> list[Cell]:
    """The cells of a grid file, each env its settings over the grid's `env` over `base`; every cell one task."""
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as why:
        raise UserError(f"grid file {path} cannot be read ({why!r})".replace("\n", " ")) from None
    require(isinstance(grid, dict) and isinstance(grid.get("cells"), list) and bool(grid["cells"]),
            f"grid file {path}", "a mapping with a non-empty list of `cells` (and optionally a shared `env`)",
            grid if not isinstance(grid, dict) else sorted(grid))
    _require_known(grid, GRID_KEYS, f"grid file {path}")
    shared = _env_settings(grid.get("env", {}), f"{path}: env")
    cells: list[Cell] = []
    for index, entry in enumerate(grid["cells"]):
        where = f"{path}: cells[{index}]"
        require(isinstance(entry, dict) and isinstance(entry.get("name"), str) and bool(entry["name"]), where,
                f"a mapping with a `name` and any of {CELL_KEYS[1:]}", entry)
        _require_known(entry, CELL_KEYS, where)
        name = entry["name"]
        where = f"{path}: cell '{name}'"
        require(all(cell.name != name for cell in cells), where, "named as no other cell is", name)
        settings = layered(layered(base.settings(), shared), _env_settings(entry.get("env", {}), f"{where}: env"))
        try:
            env = EnvConfig(**settings)
        except (ConfigError, TypeError) as error:  # TypeError: an unknown setting of a section (reward, carla)
            raise ConfigError(f"{where}: {error}") from None
        if env.varying:
            setting = env.varying[0]
            raise ConfigError(f"{where}: data.env.{setting} must be one value: a cell is one task (give one in the "
                              f"cell or in the grid's env); got {getattr(env, setting)!r}")
        cell = Cell(name, str(entry.get("row", name)), str(entry.get("column", "")), env)
        for other in cells:
            require((other.row, other.column) != (cell.row, cell.column), where,
                    f"at a row and column of its own (cell '{other.name}' is at {other.row!r}, {other.column!r})",
                    {"row": cell.row, "column": cell.column})
        cells.append(cell)
    return cells


def _require_known(mapping: dict, known: Sequence[str], where: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}: its keys are {', '.join(known)}")


def _env_settings(settings: object, where: str) -> dict:
    require(isinstance(settings, dict), where, "a mapping of data.env settings", settings)
    unknown = sorted(set(settings) - ENV_SETTINGS)
    if unknown:
        raise ConfigError(f"{where} has unknown setting(s) {unknown}: data.env has no such setting")
    return settings


# --- evaluation ----------------------------------------------------------------------------------------------------

# The agent in this process (set by `_load_agent`, in every worker too): a policy is built by name from it.
_agent = None


def _load_agent(checkpoint: Path | None, config_paths: Sequence[Path]) -> EnvConfig:
    """Load the agent of `checkpoint` (if any) for `_policy`, and return the env its cells build on: its own, the run
    config's, or the defaults."""
    global _agent
    # The agent reads one observation at a time, where more threads only wait on each other: on a 2-core CPU an
    # action takes 0.5 ms with one and 3.7 ms with two (more when other work shares the cores).
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if checkpoint is None:
        return env_config_of(*config_paths) if config_paths else EnvConfig()
    _agent, env = trained_agent(checkpoint, config_paths)
    return env


def _policy(name: str) -> Policy:
    return _agent.policy() if name == AGENT else BASELINES[name]()


def _evaluate(job: tuple[str, EnvConfig, list[int]]) -> tuple[dict[str, float], float]:
    """One policy on one cell's episodes; its metrics (without the prefix) and the seconds it took."""
    name, env, seeds = job
    started = time.perf_counter()
    metrics = evaluate(_policy(name), env, seeds)
    return {key.removeprefix(METRIC_PREFIX): value for key, value in metrics.items()}, time.perf_counter() - started


def evaluate_grid(
    cells: Sequence[Cell], policies: Sequence[str], seeds: Sequence[int], checkpoint: Path | None = None,
    config_paths: Sequence[Path] = (), workers: int = 1, known: dict[tuple[str, str], dict[str, float]] | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """{(cell name, policy): metrics} of every policy on every cell's episodes (the agent: `checkpoint`'s, driving
    as `trained_agent` loads it); with `workers` > 1, in that many processes. Entries of `known` (results taken
    from an earlier grid) are not driven again."""
    known = known or {}
    pairs = [(cell.name, policy) for cell in cells for policy in policies]
    results = {pair: known[pair] for pair in pairs if pair in known}
    for cell, policy in results:
        print(f"{cell}: {POLICY_LABELS[policy]} {_entry(results[cell, policy])} (from an earlier grid)", flush=True)
    jobs = [pair for pair in pairs if pair not in known]
    env_of = {cell.name: cell.env for cell in cells}
    work = [(policy, env_of[cell], list(seeds)) for cell, policy in jobs]
    if not jobs:
        return results
    if workers == 1:
        _load_agent(checkpoint, config_paths)
        finished = map(_evaluate, work)
    else:
        # Spawned, as the training envs are: a forked pygame or torch is not safe.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, context, _load_agent, (checkpoint, config_paths))
        finished = pool.map(_evaluate, work)
    try:
        for (cell, policy), (metrics, seconds) in zip(jobs, finished):
            results[cell, policy] = metrics
            print(f"{cell}: {POLICY_LABELS[policy]} {_entry(metrics)} ({seconds:.0f} s)", flush=True)
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    return results


def earlier_baselines(path: Path, cells: Sequence[Cell], seeds: Sequence[int]) -> dict[tuple[str, str], dict[str, float]]:
    """{(cell name, policy): metrics} of the baselines in an earlier grid.csv, for the cells whose task, first seed
    and number of episodes a row there matches (whatever that grid named the cell). The agent's rows are never
    taken: the file does not say which agent drove them."""
    try:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as why:
        raise UserError(f"--baselines-from {path} cannot be read ({why!r})") from None
    task_keys = list(cells[0].env.task())
    columns = ["cell", "policy", *task_keys, "first_seed", "episodes", "success_rate", "collision_rate",
               "avg_speed_kmh"]
    missing = [column for column in columns if not rows or column not in rows[0]]
    if missing:
        raise UserError(f"--baselines-from {path} is not a grid.csv of this command: no rows, or no column(s) "
                        f"{missing}")
    labels = ("cell", "row", "column", "policy", *task_keys, "first_seed")

    def identity(policy: str, task: dict, first_seed: object, episodes: object) -> tuple[str, ...]:
        return (policy, *(str(task[key]) for key in task_keys), str(first_seed), str(float(episodes)))

    by_identity = {
        identity(row["policy"], row, row["first_seed"], row["episodes"]):
            {key: float(value) for key, value in row.items() if key not in labels}
        for row in rows if row["policy"] != AGENT
    }
    return {
        (cell.name, policy): by_identity[key]
        for cell in cells for policy in POLICY_LABELS if policy != AGENT
        if (key := identity(policy, cell.env.task(), seeds[0], len(seeds))) in by_identity
    }


def meets_targets(agent: dict[str, float], reference: dict[str, float]) -> list[str]:
    """The targets the agent misses against the reference on the same episodes (none: it meets them all)."""
    missed = []
    if agent["success_rate"] < reference["success_rate"] - SUCCESS_MARGIN - RATE_TOLERANCE:
        missed.append(f"success {_percent(agent['success_rate'])} < "
                      f"{_percent(reference['success_rate'] - SUCCESS_MARGIN)}")
    if agent["collision_rate"] > MAX_COLLISION_RATE + RATE_TOLERANCE:
        missed.append(f"collisions {_percent(agent['collision_rate'])} > {_percent(MAX_COLLISION_RATE)}")
    if agent["avg_speed_kmh"] < SPEED_FRACTION * reference["avg_speed_kmh"]:
        missed.append(f"{agent['avg_speed_kmh']:.1f} km/h < {SPEED_FRACTION * reference['avg_speed_kmh']:.1f}")
    return missed


# --- what is written -----------------------------------------------------------------------------------------------

def _percent(rate: float) -> str:
    return f"{100 * rate:.0f} %"


def _entry(metrics: dict[str, float]) -> str:
    return f"{_percent(metrics['success_rate'])} / {_percent(metrics['collision_rate'])} / " \
           f"{metrics['avg_speed_kmh']:.1f}"


def _task(env: EnvConfig) -> str:
    task = env.task()
    return (f"scenario {task['scenario']}, {task['traffic_density']:g}× traffic, {task['layout']}, "
            f"{task['lanes']} lanes, {task['route_length_m']:g} m, {task['max_steps']} steps")


def _targets_checked(policies: Sequence[str]) -> bool:
    return AGENT in policies and REFERENCE in policies


def grid_table(cells: Sequence[Cell], policies: Sequence[str], seeds: Sequence[int],
               results: dict[tuple[str, str], dict[str, float]], command: str) -> str:
    """grid.md: one row per cell, each policy's success / collisions / km/h, and the agent against the targets."""
    checked = _targets_checked(policies)
    header = ["cell", "task", *(POLICY_LABELS[policy] for policy in policies)]
    header += [f"{POLICY_LABELS[AGENT]} meets the targets"] if checked else []
    lines = [
        "# Evaluation grid", "",
        f"`{command}`", "",
        f"{len(seeds)} episodes per cell and policy, seeds {seeds[0]}–{seeds[-1]}, the same for every policy. Each "
        "entry: success / collisions / average km/h.",
    ]
    if checked:
        lines[-1] += (
            f" Targets, against {POLICY_LABELS[REFERENCE]} on the same episodes: success at least its own less "
            f"{100 * SUCCESS_MARGIN:g} pp, collisions at most {_percent(MAX_COLLISION_RATE)}, average speed at least "
            f"{100 * SPEED_FRACTION:g} % of its own."
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    met = 0
    for cell in cells:
        row = [cell.name, _task(cell.env), *(_entry(results[cell.name, policy]) for policy in policies)]
        if checked:
            missed = meets_targets(results[cell.name, AGENT], results[cell.name, REFERENCE])
            met += not missed
            row.append("no: " + "; ".join(missed) if missed else "**yes**")
        lines.append("| " + " | ".join(row) + " |")
    if checked:
        lines += ["", f"{POLICY_LABELS[AGENT]} meets the targets on {met} of {len(cells)} cells."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cells: Sequence[Cell], policies: Sequence[str], seeds: Sequence[int],
              results: dict[tuple[str, str], dict[str, float]]) -> None:
    """grid.csv: one row per cell and policy, with the cell's task, its episodes and every metric of the harness."""
    rows = [
        {"cell": cell.name, "row": cell.row, "column": cell.column, "policy": policy, **cell.env.task(),
         "first_seed": seeds[0], **results[cell.name, policy]}
        for cell in cells for policy in policies
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def draw_heatmap(path: Path, cells: Sequence[Cell], policies: Sequence[str], seeds: Sequence[int],
                 results: dict[tuple[str, str], dict[str, float]]) -> None:
    """grid.png: the agent's success per cell (the first policy's without the agent), each cell at its row and
    column, with ✓ where the agent meets the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = AGENT if AGENT in policies else policies[0]
    rows = list(dict.fromkeys(cell.row for cell in cells))
    columns = list(dict.fromkeys(cell.column for cell in cells))
    success = np.full((len(rows), len(columns)), np.nan)
    figure, axis = plt.subplots(figsize=(2.2 * len(columns) + 2, 1.1 * len(rows) + 1.4), constrained_layout=True)
    for cell in cells:
        i, j = rows.index(cell.row), columns.index(cell.column)
        metrics = results[cell.name, shown]
        success[i, j] = metrics["success_rate"]
        met = _targets_checked(policies) and not meets_targets(metrics, results[cell.name, REFERENCE])
        dark = abs(metrics["success_rate"] - 0.5) > 0.3  # the colour map's ends are dark: white text there
        axis.text(j, i, f"{cell.name}\n{_percent(metrics['success_rate'])}{' ✓' if met else ''}",
                  ha="center", va="center", fontsize=8, color="white" if dark else "black")
    colours = plt.get_cmap("RdYlGn").with_extremes(bad="whitesmoke")  # "bad": no cell there
    image = axis.imshow(np.ma.masked_invalid(success), cmap=colours, vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    axis.tick_params(which="both", length=0)
    axis.set_xticks(np.arange(len(columns) + 1) - 0.5, minor=True)  # white lines between the cells
    axis.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
    axis.grid(which="minor", color="white", linewidth=2)
    figure.colorbar(image, ax=axis, label="success rate")
    checked = " (✓: meets the targets)" if _targets_checked(policies) else ""
    axis.set_title(f"{POLICY_LABELS[shown]} success, {len(seeds)} episodes per cell, seeds {seeds[0]}–{seeds[-1]}"
                   f"{checked}", fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- the command ---------------------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    """A bad option ends with one line and exit code 1, as every other bad input of the command."""

    def error(self, message: str):
        sys.exit(f"error: {message}")


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineParser(prog="python -m lightning_td3.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=Path, required=True, help="the grid file (e.g. configs/grids/generalist.yaml)")
    parser.add_argument("--ckpt", type=Path, help="the agent: a training checkpoint or an exported actor (needed by "
                        "--policies td3); the cells build on the env it records it was trained on")
    parser.add_argument("--config", type=Path, action="append", default=[],
                        help="the run's config instead (its data.env); repeat it to layer configs as cli.py does")
    parser.add_argument("--policies", nargs="+", choices=list(POLICY_LABELS), default=list(POLICY_LABELS),
                        help="the policies to evaluate (default: all)")
    parser.add_argument("--episodes", type=int, default=DATA_SETTINGS["eval_episodes"].default,
                        help="episodes per cell and policy (default: %(default)s, as cli.py validate)")
    parser.add_argument("--seed", type=int, default=DATA_SETTINGS["eval_seed"].default,
                        help="the first episode's seed (default: %(default)s, the validation seeds; held-out seeds "
                             "for a final table)")
    parser.add_argument("--workers", type=int, default=1, help="processes evaluating at once (default: 1)")
    parser.add_argument("--baselines-from", type=Path,
                        help="an earlier grid.csv: the baselines' results there on the same tasks and episodes are "
                             "taken instead of driven again (the agent is always driven)")
    parser.add_argument("--out", type=Path, required=True, help="the folder grid.md, grid.csv and grid.png go to")
    args = parser.parse_args(argv)
    try:
        require(args.episodes >= 1, "--episodes", "an integer >= 1", args.episodes)
        require(args.workers >= 1, "--workers", "an integer >= 1", args.workers)
        require(not args.out.exists() or args.out.is_dir(), "--out", "a folder (it is a file)", str(args.out))
        if args.ckpt is None and AGENT in args.policies:
            raise UserError("--policies td3 needs the agent's checkpoint: give --ckpt")
        policies = list(dict.fromkeys(args.policies))
        try:
            import matplotlib  # noqa: F401  (grid.png is drawn last: missing, it would be found after every episode)
        except ImportError:
            raise UserError('grid.png needs matplotlib: pip install -e ".[figures]"') from None
        base = _load_agent(args.ckpt, args.config)
        cells = read_grid(args.cells, base)
        if _agent is not None:
            for cell in cells:
                try:
                    _agent.require_env(cell.env)
                except ConfigError as error:
                    raise ConfigError(f"{args.cells}: cell '{cell.name}': {error}") from None
        seeds = list(range(args.seed, args.seed + args.episodes))
        known = earlier_baselines(args.baselines_from, cells, seeds) if args.baselines_from else {}
        results = evaluate_grid(cells, policies, seeds, args.ckpt, args.config, args.workers, known)
        args.out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "-m", "lightning_td3.grid", *(sys.argv[1:] if argv is None else argv)])
        (args.out / "grid.md").write_text(grid_table(cells, policies, seeds, results, command))
        write_csv(args.out / "grid.csv", cells, policies, seeds, results)
        draw_heatmap(args.out / "grid.png", cells, policies, seeds, results)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out / 'grid.md'}, {args.out / 'grid.csv'} and {args.out / 'grid.png'}")


if __name__ == "__main__":
    main()
