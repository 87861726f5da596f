"""Run-level protection that the CLI adds to every run (`fault_tolerance:` in a config).

- Checkpoint files are written atomically and a damaged one is a clear error (`AtomicCheckpointIO`).
- Before fit does any work (`check_outputs`, which the CLI calls before `fit`: Lightning creates the log directory
  before any callback hook runs), the log and checkpoint directories are probed with a real write, and the free
  space is compared with what a checkpoint plus its replay file will take: a run does not die on its first
  checkpoint an hour in.
- SIGINT / SIGTERM: the step under way finishes, `last.ckpt` is written, and the run ends with exit code 0 and a
  message saying how to resume. A second Ctrl+C stops at once, without a checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info

from lightning_td3.checkpointing import AtomicCheckpointIO, save_last_checkpoint
from lightning_td3.errors import StopRequested, StorageError, require
from lightning_td3.replay import ReplayBuffer

GB = 1e9
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Signals are process-wide, and so is the request they make: the handlers set it, safe points check it.
_stop_request: str | None = None


def check_stop_request(env_steps: int) -> None:
    """Raise `StopRequested` if a stop signal arrived; call only where a checkpoint would be consistent."""
    if _stop_request is not None:
        raise StopRequested(_stop_request, env_steps)


class FaultTolerance(pl.Callback):
    """Atomic checkpoints, output directories checked before fit, a checkpoint on SIGINT/SIGTERM.

    Args:
        check_free_space: compare the free disk space with the needs of a checkpoint and its replay file.
    """

    def __init__(self, check_free_space: bool = True) -> None:
        require(isinstance(check_free_space, bool), "fault_tolerance.check_free_space", "true or false",
                check_free_space)
        self.check_free_space = check_free_space
        self._previous_handlers: dict[int, object] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Only Lightning's default is replaced: a CheckpointIO the user chose stays.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit":
            self._install_signal_handlers()
            rank_zero_info("SIGINT/SIGTERM stop the run with a checkpoint")

    def check_outputs(self, trainer: pl.Trainer, module: pl.LightningModule, data) -> None:
        """`StorageError` unless the checkpoint and log directories take a write and have room for a checkpoint."""
        checkpoint_dir, log_dirs = _output_dirs(trainer)
        for directory, role in [(checkpoint_dir, "checkpoint")] + [(d, "log") for d in log_dirs]:
            _probe_write(directory, role)
        if self.check_free_space:
            _check_free_space(checkpoint_dir, module, data)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # Lightning put its own SIGTERM handler in front of ours after setup; it would end the run at the end of the
        # batch with a bare SystemExit and no checkpoint. Ours takes SIGTERM back.
        signal.signal(signal.SIGTERM, _request_stop)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # Between updates: the previous one is complete, the next not begun.
        check_stop_request(getattr(pl_module, "env_steps", trainer.global_step))

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, StopRequested):
            exception.checkpoint = save_last_checkpoint(trainer)
            exception.resume_command = _resume_command(exception.checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        global _stop_request
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        _stop_request = None

    def _install_signal_handlers(self) -> None:
        global _stop_request
        _stop_request = None
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, _request_stop)


def _request_stop(signum, frame) -> None:
    global _stop_request
    _stop_request = signal.Signals(signum).name
    rank_zero_info(
        f"\n{_stop_request} received: finishing the current step, then writing a checkpoint. "
        "Press Ctrl+C again to stop at once without one."
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _output_dirs(trainer: pl.Trainer) -> tuple[Path, list[Path]]:
    """Where checkpoints and logs will go (checkpoints as ModelCheckpoint resolves them, set up after us)."""
    log_dirs = [Path(logger.save_dir) for logger in trainer.loggers if logger.save_dir is not None]
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath), log_dirs
    return (log_dirs[0] if log_dirs else Path(trainer.default_root_dir)), log_dirs


def _probe_write(directory: Path, role: str) -> None:
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"probe")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as why:
        raise StorageError(
            f"the {role} directory {directory} is not writable ({why.strerror or why}); "
            "fix its permissions or point the run elsewhere (trainer.default_root_dir, the logger's save_dir, "
            "ModelCheckpoint's dirpath)"
        ) from None


def _check_free_space(directory: Path, module: pl.LightningModule, data) -> None:
    """A checkpoint is written beside the previous one before replacing it, and so is a replay file."""
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    checkpoint_bytes = parameters + 2 * trainable  # weights + Adam's two moments
    replay_bytes = 0
    if getattr(data, "buffer_capacity", None):
        per_slot = ReplayBuffer(2 * data.num_envs, data.num_envs, data.env.vector_size).bytes_per_transition
        replay_bytes = data.buffer_capacity * per_slot * (data.replay_files_kept + 1)
    needed = 2 * checkpoint_bytes + replay_bytes
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StorageError(
            f"not enough free disk space for checkpoints in {directory}: {free / GB:.2f} GB free, about "
            f"{needed / GB:.2f} GB needed (2 x {checkpoint_bytes / GB:.2f} GB of checkpoint while one replaces the "
            f"other, {replay_bytes / GB:.2f} GB of replay files at data.buffer_capacity={data.buffer_capacity}); "
            "free space, write elsewhere, lower data.buffer_capacity, or set fault_tolerance.check_free_space: false"
        )


def _resume_command(checkpoint: Path) -> str:
    """This run's command line with `--ckpt_path <checkpoint>`, or a generic one when not run from cli.py."""
    arguments = list(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("cli.py") else ["fit", "--config", "..."]
    if "--ckpt_path" in arguments:
        index = arguments.index("--ckpt_path")
        del arguments[index:index + 2]
    arguments = [a for a in arguments if not a.startswith("--ckpt_path=")]
    return shlex.join(["python", "cli.py", *arguments, "--ckpt_path", str(checkpoint)])
