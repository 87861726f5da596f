"""Ship a trained agent: the actor's weights alone, in half precision, from a full training checkpoint.

A training checkpoint holds the actor, the twin critics, both targets, the optimizers and (for resuming) a pointer
to its replay file: tens of MB. Driving needs only the actor, a few MB in fp16. The exported file is still a Lightning
checkpoint, so `python cli.py validate|test --config <the run's config> --ckpt_path <file>` evaluates it; TD3
refuses it for `fit`, since there is nothing to resume.

    python -m lightning_td3.export runs/<run>/checkpoints/<file>.ckpt agents/<name>.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_td3.checkpointing import AtomicCheckpointIO
from lightning_td3.errors import CheckpointError, UserError

ACTOR_ONLY_KEY = "td3_actor_only"
PROGRESS_KEY = "td3_progress"  # a training checkpoint's record of its run (TD3 writes it, through td3_checkpoint.py, which imports this one)
ACTOR_PREFIX = "actor."


def export_actor(checkpoint_path: Path, out_path: Path, dtype: torch.dtype = torch.float16) -> dict:
    """Write the actor of a TD3 training checkpoint to `out_path`; return what was written."""
    checkpoint_io = AtomicCheckpointIO()  # a damaged source is named; the shipped file is written atomically
    checkpoint = checkpoint_io.load_checkpoint(checkpoint_path, map_location="cpu", weights_only=True)
    weights = {
        name: value.to(dtype) if value.is_floating_point() else value
        for name, value in checkpoint.get("state_dict", {}).items()
        if name.startswith(ACTOR_PREFIX)
    }
    if not weights:
        raise CheckpointError(f"{checkpoint_path} has no '{ACTOR_PREFIX}*' weights: it is not a TD3 checkpoint")
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    progress = checkpoint.get(PROGRESS_KEY, {})
    shipped = {
        "pytorch-lightning_version": checkpoint["pytorch-lightning_version"],
        "state_dict": weights,
        "hyper_parameters": hyper_parameters,
        ACTOR_ONLY_KEY: {
            "hyper_parameters": dict(hyper_parameters),
            "env_steps": progress.get("env_steps", 0),
            "camera": progress.get("camera"),
            "env": progress.get("env"),
            "source": Path(checkpoint_path).name,
            "dtype": str(dtype).removeprefix("torch."),
        },
    }
    checkpoint_io.save_checkpoint(shipped, out_path)
    return shipped


def trained_settings(checkpoint: dict) -> dict:
    """The `model` and `data.env` settings a TD3 checkpoint (training or exported) was trained with, in a run
    config's form; empty for what it does not record (the env, in checkpoints written before it was kept)."""
    hyper_parameters = dict(checkpoint.get("hyper_parameters") or {})
    hyper_parameters.pop("_instantiator", None)
    class_path = hyper_parameters.pop("_class_path", None)
    settings = {"model": {"class_path": class_path, "init_args": hyper_parameters}} if class_path else {}
    env = (checkpoint.get(ACTOR_ONLY_KEY) or checkpoint.get(PROGRESS_KEY) or {}).get("env")
    if env is not None:
        settings["data"] = {"env": env}
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a TD3 training checkpoint (.ckpt)")
    parser.add_argument("out", type=Path, help="where to write the actor-only checkpoint")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = parser.parse_args(argv)
    try:
        shipped = export_actor(args.checkpoint, args.out, getattr(torch, args.dtype))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    size_mb = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size_mb:.1f} MB, {len(shipped['state_dict'])} actor tensors, {args.dtype}, "
          f"trained {shipped[ACTOR_ONLY_KEY]['env_steps']} env steps)")


if __name__ == "__main__":
    main()
