"""Checkpoint files: written atomically, loaded with a clear error, extra state loadable with weights_only.

`torch.load(weights_only=True)`, Lightning's safe default, accepts tensors and plain Python values but no numpy
arrays, so arrays travel as tensors (sharing memory, no copy) and come back as arrays.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_td3.errors import CheckpointError, StorageError


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A file to write `path`'s new contents to; they replace the old ones only once complete and on disk.

    The temporary file sits in the same directory (so the final rename is atomic) under a hidden name that no
    checkpoint or replay pattern matches; a crash mid-write leaves it behind and the previous file intact.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as failure:
        temporary.unlink(missing_ok=True)
        if isinstance(failure, OSError) and not isinstance(failure, StorageError):
            raise StorageError(
                f"could not write {path} ({failure.strerror or failure}); the previous file is intact"
            ) from failure
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a kill mid-write keeps the previous checkpoint, and a damaged file
    raises `CheckpointError` naming it (Lightning's default writes in place after serializing it all in memory)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_write(path) as file:
            torch.save(checkpoint, file)

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as why:
            raise CheckpointError(
                f"checkpoint {path} is damaged or truncated and cannot be loaded ({why}); "
                "resume from an earlier checkpoint"
            ) from None


def save_last_checkpoint(trainer) -> Path:
    """Write `last.ckpt` now, where `--ckpt_path last` finds it (the ModelCheckpoint's directory); return its path."""
    callback = trainer.checkpoint_callback
    directory = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
    path = directory / "last.ckpt"
    if getattr(callback, "save_last", False):
        # Recorded as ModelCheckpoint's own last checkpoint, so a resumed run goes on writing this file rather than
        # a versioned last-v1.ckpt beside it.
        path = Path(callback.last_model_path or path)
        callback.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)  # the full state, as ModelCheckpoint writes it
    return path


def arrays_to_tensors(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, dict):
        return {key: arrays_to_tensors(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(arrays_to_tensors(value) for value in tree)
    return tree


def tensors_to_arrays(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {key: tensors_to_arrays(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tensors_to_arrays(value) for value in tree)
    return tree
