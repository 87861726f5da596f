"""Run folders and checkpoint files as a user meets them on the command line.

- `--ckpt_path last` means the newest `last.ckpt` of this config's runs (`<save_dir>/<name>/version_*/checkpoints/`,
  or the `dirpath` its ModelCheckpoint names), not Lightning's "last" of the folder a new run would get, which never
  holds one: the shipped configs leave the logger's version unpinned, so every fit starts a new folder.
- A checkpoint is read once, before Lightning touches it: a missing, empty, truncated, damaged or foreign file is
  one line naming it (`CheckpointError`), not a traceback from deep inside torch.
- A resumed fit logs into the version folder of the run it resumes (recorded in its checkpoints), so TensorBoard's
  curves go on where they stopped.
- A fit that fails before it trains removes the version folder it created: no empty `version_N` per failed start.
"""

from __future__ import annotations

import glob
import json
import pickle
import shlex
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace

from lightning_td3.config_files import option_values
from lightning_td3.errors import CheckpointError
from lightning_td3.export import trained_settings

LAST = "last"
# Where a checkpoint records the log folder of the run that wrote it (`record_log_dir`).
LOG_DIR_KEY = "log_dir"
# What every Lightning checkpoint holds, ours (training or exported) included: the weights and the version of
# Lightning that wrote them.
LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")
ZIP_MAGIC = b"PK\x03\x04"


def with_trained_settings(argv: list[str]) -> list[str]:
    """A `validate`/`test` command line of a checkpoint given by path, with what the checkpoint says it was trained
    on (model and env) put first, as a config that every `--config` file and option after it overrides: the
    checkpoint alone is enough to evaluate it, and `--data.env.scenario 2` still changes the task."""
    if not argv or argv[0] not in ("validate", "test"):
        return argv
    paths = option_values(argv, ("--ckpt_path",))
    if not paths or paths[-1] in ("", LAST):  # `last` is found through the config the command gives
        return argv
    settings = trained_settings(read_checkpoint(Path(paths[-1])))
    if "data" not in settings:
        warnings.warn(
            f"checkpoint {paths[-1]} does not record the env it was trained on (it was written before that was "
            "kept): it is evaluated on data.env as the command gives it", stacklevel=2,
        )
    return [argv[0], "--config", json.dumps(settings), *argv[1:]] if settings else argv


def resolve_checkpoint(config: Namespace) -> tuple[str, dict[str, Any]]:
    """The checkpoint a subcommand's config names (`last` resolved), and its contents, checked readable."""
    path = Path(config.ckpt_path) if config.ckpt_path != LAST else newest_last_checkpoint(config)
    return str(path), read_checkpoint(path)


def newest_last_checkpoint(config: Namespace) -> Path:
    """The newest `last.ckpt` of the runs this config writes; `CheckpointError` when there is none."""
    patterns = [str(Path(directory) / "last.ckpt") for directory in _checkpoint_dirpaths(config)]
    if not patterns:
        run_root = _run_root(config)
        patterns = [str(run_root / "version_*" / "checkpoints" / "last.ckpt")]
    found = [Path(path) for pattern in patterns for path in glob.glob(pattern) if Path(path).is_file()]
    if not found:
        raise CheckpointError(
            f"--ckpt_path last: nothing to resume, no {' or '.join(patterns)} exists yet; "
            "start a new run by leaving out --ckpt_path"
        )
    return max(found, key=lambda path: path.stat().st_mtime)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path` as torch loads it (weights only, on the CPU), or a `CheckpointError` that names the
    file and says what is wrong with it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist{' (it is a directory)' if path.is_dir() else ''}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written; give another checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as why:
        with open(path, "rb") as file:  # torch writes zip archives: a damaged one still starts like one
            damaged_archive = file.read(4) == ZIP_MAGIC
        # What torch says of a damaged archive names the damage (its first sentence); of other bytes, it only
        # speculates about weights_only.
        detail = f" ({str(why).splitlines()[0].split('. ')[0]})" if damaged_archive else ""
        kind = "is damaged or truncated" if damaged_archive else "is not a PyTorch checkpoint file"
        raise CheckpointError(
            f"checkpoint {path} {kind} and cannot be loaded{detail}; give another checkpoint, e.g. an earlier one "
            "beside it"
        ) from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in LIGHTNING_KEYS):
        held = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning checkpoint (it holds {held}); give one written by `cli.py fit` "
            "or `python -m lightning_td3.export`"
        )
    written_by, installed = checkpoint["pytorch-lightning_version"], pl.__version__
    if written_by.split(".")[0] != installed.split(".")[0]:
        raise CheckpointError(
            f"checkpoint {path} was written by pytorch-lightning {written_by}, which this install ({installed}) "
            "cannot read; install a pytorch-lightning of that major version"
        )
    return checkpoint


def continue_logging(config: Namespace, checkpoint: dict[str, Any]) -> None:
    """Pin the logger's version to the folder the checkpoint's run logged to, when this config logs to the same
    place: the resumed run's curves go on in that folder instead of a new one."""
    logger = _tensorboard_logger(config)
    recorded = checkpoint.get(LOG_DIR_KEY)
    if logger is None or recorded is None or logger.init_args.get("version") is not None:
        return
    recorded = Path(recorded)
    if recorded.parent.resolve() == _run_root(config).resolve():
        # As a number where the folder is Lightning's own `version_<n>`, which is what it then shows as v_num.
        number = recorded.name.removeprefix("version_")
        logger.init_args.version = int(number) if number.isdigit() else recorded.name


@contextmanager
def resuming_in_place(ckpt_path: str | None) -> Iterator[None]:
    """A resumed fit goes on writing into its own checkpoint folder, as meant: Lightning's warning that the folder
    is not empty is left out then (and only then)."""
    with warnings.catch_warnings():
        if ckpt_path:
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        yield


def record_log_dir(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Keep the run's log folder in a checkpoint it writes (read back by `continue_logging`)."""
    log_dir = _log_dir(trainer)
    if log_dir is not None:
        checkpoint[LOG_DIR_KEY] = str(log_dir)


def new_log_dir(trainer: pl.Trainer) -> Path | None:
    """The outermost folder that a run's log folder will create (e.g. `runs/` on a fresh clone), or None when it logs
    nowhere or into a folder that exists."""
    log_dir = _log_dir(trainer)
    if log_dir is None:
        return None
    log_dir = log_dir.absolute()
    if log_dir.exists():
        return None
    while not log_dir.parent.exists():
        log_dir = log_dir.parent
    return log_dir


def remove_unused_log_dir(log_dir: Path | None) -> None:
    """Remove the folder (from `new_log_dir`) that a failed start created, unless it holds a checkpoint."""
    if log_dir is not None and log_dir.is_dir() and not any(log_dir.rglob("*.ckpt")):
        shutil.rmtree(log_dir, ignore_errors=True)


def cli_command(subcommand: str, checkpoint: str | Path) -> str:
    """This process's `cli.py` command line as `subcommand` of `checkpoint` (a generic one when not run from cli.py)."""
    arguments = list(sys.argv[2:]) if sys.argv and sys.argv[0].endswith("cli.py") else ["--config", "..."]
    if "--ckpt_path" in arguments:
        index = arguments.index("--ckpt_path")
        del arguments[index:index + 2]
    arguments = [a for a in arguments if not a.startswith("--ckpt_path=")]
    return shlex.join(["python", "cli.py", subcommand, *arguments, "--ckpt_path", str(checkpoint)])


# What the closing summary of a fit shows of its last evaluation: (metric, label, as a percentage).
SUMMARY_METRICS = (
    ("eval/success_rate", "success", True),
    ("eval/driving_score", "driving score", True),  # the CARLA Leaderboard's (evaluation.EpisodeResult)
    ("eval/collision_rate", "collisions", True),
    ("eval/route_completion", "route completed", True),
    ("eval/avg_speed_kmh", "average speed, km/h", False),
    ("eval/episode_return", "episode return", False),
)


def fit_summary(trainer: pl.Trainer) -> str:
    """What a finished fit reached and where it is, with the commands to evaluate, watch and resume it."""
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("eval/")}
    lines = []
    if "eval/episodes" in metrics:
        lines.append(f"Last evaluation, {int(metrics['eval/episodes'])} episodes:")
        for name, label, percent in SUMMARY_METRICS:
            value = metrics[name]
            lines.append(f"  {label:<22}{value:8.0%}" if percent else f"  {label:<22}{value:8.1f}")
    checkpoint = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    if checkpoint is None:
        return "\n".join(lines)
    log_dir = _log_dir(trainer)
    seed = trainer.datamodule.eval_seed  # the first episode its evaluations drove
    lines += [
        f"Checkpoint: {checkpoint}",
        f"  evaluate: {shlex.join(['python', 'cli.py', 'validate', '--ckpt_path', str(checkpoint)])}",
        "  watch:    " + shlex.join([
            "python", "-m", "lightning_td3.figures", "episode", "--ckpt", str(checkpoint), "--seed", str(seed),
            "--out", str(Path(checkpoint).parent.parent / "episode.gif"),
        ]),
        f"  resume:   {cli_command('fit', LAST)}",
    ]
    if log_dir is not None:
        lines.append(f"  curves:   tensorboard --logdir {log_dir.parent.parent}")
    return "\n".join(lines)


def _log_dir(trainer: pl.Trainer) -> Path | None:
    """The first logger's folder, as `trainer.log_dir` gives it but without its broadcast: a collective under DDP,
    which one process alone must not enter."""
    log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
    return Path(log_dir) if log_dir is not None else None


def _tensorboard_logger(config: Namespace) -> Namespace | None:
    logger = config.trainer.get("logger")
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return logger
    return None


def _run_root(config: Namespace) -> Path:
    """`<save_dir>/<name>` of the config's TensorBoard logger (Lightning's default: `<default_root_dir>/lightning_logs`)."""
    logger = _tensorboard_logger(config)
    if logger is None:
        return Path(config.trainer.get("default_root_dir") or ".") / "lightning_logs"
    name = logger.init_args.get("name", "lightning_logs")
    return Path(logger.init_args.save_dir) / (name or "")


def _checkpoint_dirpaths(config: Namespace) -> list[str]:
    """The `dirpath`s that the config's ModelCheckpoint callbacks with `save_last` name explicitly."""
    callbacks = config.trainer.get("callbacks") or []
    return [
        callback.init_args.dirpath
        for callback in callbacks
        if isinstance(callback, Namespace)
        and str(callback.get("class_path", "")).endswith("ModelCheckpoint")
        and callback.init_args.get("save_last")
        and callback.init_args.get("dirpath")
    ]
