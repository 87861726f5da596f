"""Score Random and IDM+MOBIL on scenarios 0/1/2 with the shared evaluation harness; print a markdown table.

    python bench/baselines_table.py --episodes 50 [--layout straight] [--seed 1000]

Every policy sees the same seeds seed..seed+episodes-1, on the default env config otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from lightning_td3.baselines import IdmMobilPolicy, RandomPolicy
from lightning_td3.envs.config import LAYOUTS, SCENARIOS, EnvConfig
from lightning_td3.evaluation import evaluate

POLICIES = {"Random": RandomPolicy, "IDM+MOBIL": IdmMobilPolicy}
COLUMNS = (
    ("success", "eval/success_rate", "{:.0%}"),
    ("collision", "eval/collision_rate", "{:.0%}"),
    ("avg speed km/h", "eval/avg_speed_kmh", "{:.1f}"),
    ("return", "eval/episode_return", "{:.1f}"),
    ("length", "eval/episode_length", "{:.1f}"),
    ("route completion", "eval/route_completion", "{:.0%}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy and scenario")
    parser.add_argument("--layout", choices=LAYOUTS, default="straight")
    parser.add_argument("--seed", type=int, default=1000, help="first episode seed")
    return parser.parse_args(argv)


def markdown_table(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    header = ["policy", "scenario", *(title for title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy_name, scenario, metrics in rows:
        cells = [policy_name, f"{scenario} ({SCENARIOS[scenario]})"]
        cells += [fmt.format(metrics[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    seeds = range(args.seed, args.seed + args.episodes)
    started = time.perf_counter()
    rows = []
    for scenario in SCENARIOS:
        config = EnvConfig(scenario=scenario, layout=args.layout)
        for policy_name, make_policy in POLICIES.items():
            rows.append((policy_name, scenario, evaluate(make_policy(), config, seeds)))
            print(f"done: {policy_name} on scenario {scenario}", file=sys.stderr, flush=True)
    wall_s = time.perf_counter() - started
    command = " ".join(shlex.quote(part) for part in ["python", "bench/baselines_table.py", *argv])
    print(markdown_table(rows))
    print()
    print(f"command: `{command}`  ")
    print(f"seeds {seeds.start}..{seeds.stop - 1}, layout {args.layout}, wall time {wall_s:.0f} s")


if __name__ == "__main__":
    main()
