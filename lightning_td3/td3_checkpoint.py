"""What a TD3 checkpoint holds beyond Lightning's own, and whether a checkpoint and an env fit the model.

Lightning saves the weights, optimizers, callbacks (the Collector's envs) and the datamodule (a pointer to the replay
file). TD3 adds `td3_progress` (`lightning_td3.export.PROGRESS_KEY`): the run's env steps and episodes, every
process's own, the updates and skipped updates, the camera and env settings the networks learned from, and the RNG
states, so that a resumed run goes on bit for bit. An exported actor (`python -m lightning_td3.export`) carries
`td3_actor_only` instead: it is evaluated, never trained further.
"""

from __future__ import annotations

from itertools import product

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from pytorch_lightning.trainer.states import TrainerFn

from lightning_td3.checkpointing import arrays_to_tensors, tensors_to_arrays
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import CheckpointError, ConfigError
from lightning_td3.export import ACTOR_ONLY_KEY, PROGRESS_KEY
from lightning_td3.per_process import gather_per_process, own_state

if TYPE_CHECKING:
    from lightning_td3.td3 import TD3

# What decides the weights' shapes.
ARCHITECTURE_HPARAMS = ("vector_size", "hidden_sizes", "layer_norm", "critic_only_vector")


def save(module: TD3, checkpoint: dict) -> None:
    """Add `td3_progress` to a checkpoint Lightning is writing (on every process: a collective under DDP)."""
    # (env steps, episodes) of every process; the run's totals are their sums.
    per_process = gather_per_process((module.env_steps, module.episodes))
    checkpoint[PROGRESS_KEY] = {
        "env_steps": sum(env_steps for env_steps, _ in per_process),
        "episodes": sum(episodes for _, episodes in per_process),
        "per_process": per_process,
        "updates": module.updates,
        "skipped_updates": module.skipped_updates,
        "camera": module.trained_camera,
        "env": module.trained_env,
        # The same on every process: seeded alike and drawn from alike (the target smoothing noise).
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": arrays_to_tensors(np.random.get_state(legacy=False)),
            "python": random.getstate(),
        },
    }


def load(module: TD3, checkpoint: dict) -> None:
    """Take back what `save` added (or an exported actor's records), before Lightning loads the weights."""
    module.from_checkpoint = True
    if ACTOR_ONLY_KEY in checkpoint:
        _load_shipped_actor(module, checkpoint)
        return
    progress = checkpoint.get(PROGRESS_KEY)
    if progress is None:
        raise CheckpointError(
            f"{_checkpoint_name(module)} has no '{PROGRESS_KEY}' entry: it was not written by "
            "lightning_td3.td3.TD3 (nor by `python -m lightning_td3.export`)"
        )
    _check_fits(module, checkpoint["state_dict"], checkpoint.get("hyper_parameters", {}))
    _load_trained_camera(module, progress)
    module.trained_env = progress.get("env")  # absent from checkpoints written before it was kept
    module.run_env_steps = progress["env_steps"]
    module.run_episodes = progress["episodes"]
    module.updates = progress["updates"]
    module.skipped_updates = progress.get("skipped_updates", 0)  # absent from checkpoints before it was counted
    if _fitting(module):  # evaluation needs no more
        module.env_steps, module.episodes = own_state(module.trainer, progress["per_process"], "the counters")
    rng = progress["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(tensors_to_arrays(rng["numpy"]))
    random.setstate(rng["python"])


def _load_shipped_actor(module: TD3, checkpoint: dict) -> None:
    # An exported actor holds no critic, optimizer or replay: it can be evaluated, not trained further.
    if _fitting(module):
        raise CheckpointError(
            f"{_checkpoint_name(module)} holds only an actor's weights, for validate/test; to train, resume "
            "from a full training checkpoint (e.g. --ckpt_path last) or start without --ckpt_path"
        )
    shipped = checkpoint[ACTOR_ONLY_KEY]
    _check_fits(module, checkpoint["state_dict"], shipped["hyper_parameters"], part="actor.")
    _load_trained_camera(module, shipped)
    module.trained_env = shipped.get("env")
    module.run_env_steps = shipped["env_steps"]  # where its evaluation goes on the env-step axis
    module.actor_only = True
    # The critic stays as built; filling it in keeps Lightning's strict loading, which still guards the actor.
    own = module.state_dict()
    checkpoint["state_dict"] = {
        **own, **{name: value.to(own[name].dtype) for name, value in checkpoint["state_dict"].items()}
    }


def _load_trained_camera(module: TD3, record: dict) -> None:
    """Take the checkpoint's camera and hold the attached env to it (without a trainer, as in
    `load_from_checkpoint`, the caller's `require_env` does it)."""
    if record.get("camera") is not None:  # else (an older checkpoint) it stays as setup found it
        module.trained_camera = EnvConfig.complete_camera(record["camera"])
    require_attached_env(module)


def require_env(module: TD3, env: EnvConfig) -> None:
    """Refuse an env whose vector the module's networks cannot read, or whose frames they did not learn from, before
    any episode runs."""
    vector_size = module.hparams.vector_size
    if env.vector_size != vector_size:
        gives = (
            f"data.env gives vectors of {env.vector_size} (4 + 2 x num_waypoints={env.num_waypoints}, + 2 with "
            f"observe_leader={env.observe_leader}, + 4 with observe_sides={env.observe_sides})"
        )
        if not module.from_checkpoint:
            raise ConfigError(
                f"model.init_args.vector_size is {vector_size} but {gives}; set "
                f"model.init_args.vector_size: {env.vector_size}"
            )
        # Trained weights read only vectors of their size: the env must change, not the setting.
        options = _env_options_giving(vector_size, env)
        raise ConfigError(
            f"the agent in {_checkpoint_name(module)} was trained on vectors of {vector_size} but "
            f"{gives}: give the env it was trained on (its run's config)"
            + (f", e.g. {' or '.join(options)}" if options else "")
        )
    if module.trained_camera is not None and env.camera != module.trained_camera:
        raise ConfigError(
            f"the agent learned from frames of {module.trained_camera} but data.env gives frames of {env.camera}: "
            "give the env it was trained on (its run's config)"
        )


def require_attached_env(module: TD3) -> None:
    """`require_env` on the env of the datamodule the module runs with, if any."""
    env = attached_env(module)
    if env is not None:
        require_env(module, env)


def attached_env(module: TD3) -> EnvConfig | None:
    # `_trainer`: Lightning's `trainer` raises where none is attached (as in `load_from_checkpoint`).
    data = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(data, "env", None)


def _fitting(module: TD3) -> bool:
    return module._trainer is not None and module._trainer.state.fn == TrainerFn.FITTING


def _check_fits(module: TD3, state_dict: dict[str, torch.Tensor], trained_with: dict, part: str = "") -> None:
    """A clear error instead of PyTorch's size-mismatch wall when the checkpoint was built differently.

    `part` limits the comparison to the parameters whose names start with it (an exported actor: "actor.").
    """
    own = {name: value for name, value in module.state_dict().items() if name.startswith(part)}
    problem = next((f"lacks '{name}'" for name in own if name not in state_dict), None)
    for name, value in state_dict.items():
        if problem is not None:
            break
        if name not in own:
            problem = f"has '{name}', which this model lacks"
        elif value.shape != own[name].shape:
            problem = f"has '{name}' of shape {tuple(value.shape)}, this model {tuple(own[name].shape)}"
    if problem is None:
        return
    built = {name: trained_with[name] for name in ARCHITECTURE_HPARAMS if name in trained_with}
    here = {name: module.hparams[name] for name in ARCHITECTURE_HPARAMS}
    raise CheckpointError(
        f"{_checkpoint_name(module)} does not fit this model: it {problem}. It was trained with {built}; "
        f"this model is built with {here}; set the same model.init_args"
    )


def _checkpoint_name(module: TD3) -> str:
    path = getattr(module._trainer, "ckpt_path", None) if module._trainer is not None else None
    return f"checkpoint {path}" if path else "the checkpoint"


def _env_options_giving(vector_size: int, env: EnvConfig) -> list[str]:
    """The `--data.env` options that make `env` give vectors of `vector_size` (see `EnvConfig.vector_size`) with the
    fewest changes: one way per choice of observe_leader and observe_sides that num_waypoints >= 1 allows. The size
    alone cannot tell which of them the agent was trained on."""
    fits = []
    # The observed radars before num_waypoints on a tie: toggling them is the likelier difference (the shipped
    # configs differ in them, never in num_waypoints).
    leaders, sides_choices = (not env.observe_leader, env.observe_leader), (env.observe_sides, not env.observe_sides)
    for leader, sides in product(leaders, sides_choices):
        waypoints, odd = divmod(vector_size - 4 - (2 if leader else 0) - (4 if sides else 0), 2)
        if waypoints >= 1 and not odd:
            wanted = {"observe_leader": leader, "observe_sides": sides, "num_waypoints": waypoints}
            fits.append({name: value for name, value in wanted.items() if getattr(env, name) != value})
    fewest = min(map(len, fits), default=0)
    return [
        " ".join(f"--data.env.{name} {str(value).lower()}" for name, value in changes.items())
        for changes in fits if len(changes) == fewest
    ]
