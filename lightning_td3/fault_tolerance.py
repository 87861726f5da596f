"""Run-level protection that the CLI adds to every run (`fault_tolerance:` in a config).

- Checkpoint files are written atomically and a damaged one is a clear error (`AtomicCheckpointIO`).
- Before fit does any work (`check_outputs`, which the CLI calls before `fit`: Lightning creates the log directory
  before any callback hook runs), the log and checkpoint directories are probed with a real write, and the free
  space is compared with what a checkpoint plus its replay file will take: a run does not die on its first
  checkpoint an hour in.
- SIGINT / SIGTERM: the step under way finishes (during an evaluation: the episode under way), `last.ckpt` is
  written, and the run ends with exit code 0 and a message saying how to resume. A second Ctrl+C stops at once,
  without a checkpoint.
- A stop is decided together (`stop_together`): under DDP a signal that reached one process, or one process's
  envs giving up, stops every process at the same safe point, where they write one checkpoint together; a
  process stopping alone would leave the others waiting in their next collective until the DDP time-out.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.rank_zero import rank_prefixed_message, rank_zero_only
from pytorch_lightning.utilities import rank_zero_info

from lightning_td3.checkpointing import AtomicCheckpointIO, save_last_checkpoint
from lightning_td3.errors import StopRequested, StorageError, TrainingAborted, require
from lightning_td3.per_process import gather_per_process
from lightning_td3.replay import ReplayBuffer
from lightning_td3.runs import cli_command, record_log_dir

GB = 1e9
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Signals are process-wide, and so is the request they make: the handlers set it, safe points check it.
_stop_request: str | None = None


def stop_together(trainer: pl.Trainer, module, failure: str | None = None, busy: bool = False) -> bool:
    """A safe point: every process calls it at the same place (the Collector: before each update, between warm-up
    steps, and before each evaluation episode), where a checkpoint would be consistent.

    If a stop signal reached any process, every process raises `StopRequested` here (`FaultTolerance` then
    writes the checkpoint, all processes together). If any process reports a `failure` (a description of what it
    cannot get past), every process writes `last.ckpt` together and raises `TrainingAborted` naming the failing
    process and the resume command. Otherwise returns whether any process is still `busy` (so a loop whose length
    differs between processes, the warm-up, can run in lockstep until all are done).

    Under DDP one all-reduce of four integers per call (see bench/stop_vote.py for its cost); the processes'
    reasons are gathered only when stopping.
    """
    signal_name = _stop_request  # read once: a signal arriving during the vote waits for the next safe point
    if trainer.world_size == 1:
        if signal_name is None and failure is None:
            return busy
        run_env_steps, reasons = module.env_steps, [(signal_name, failure)]
    else:
        votes = torch.tensor(
            [int(signal_name is not None), int(failure is not None), int(busy), module.env_steps], device=module.device
        )
        # torch's all-reduce itself, not the strategy's `reduce`, which puts a barrier (a second collective) first.
        torch.distributed.all_reduce(votes)
        signals, failures, busy_processes, run_env_steps = votes.tolist()
        if not signals and not failures:
            return busy_processes > 0
        reasons = gather_per_process((signal_name, failure))
    if trainer.validating:  # stopping between two evaluation episodes
        _evaluate_again_on_resume(trainer)
    failed = [(rank, why) for rank, (_, why) in enumerate(reasons) if why is not None]
    if failed:
        path = save_last_checkpoint(trainer)
        descriptions = "; ".join(f"{_process(rank, len(reasons))}{why}" for rank, why in failed)
        together = f" All {len(reasons)} processes stopped together." if len(reasons) > 1 else ""
        raise TrainingAborted(
            f"{descriptions}.{together} Checkpoint written to {path}; once the cause is fixed, resume with: "
            f"{cli_command('fit', path)}"
        )
    signalled = [rank for rank, (name, _) in enumerate(reasons) if name is not None]
    received_by = None
    if len(reasons) > 1:
        received_by = f"process{'es' if len(signalled) > 1 else ''} {', '.join(map(str, signalled))} of {len(reasons)}"
    raise StopRequested(reasons[signalled[0]][0], run_env_steps, received_by)


def _process(rank: int, world_size: int) -> str:
    return f"process {rank} of {world_size}: " if world_size > 1 else ""


class FaultTolerance(pl.Callback):
    """Atomic checkpoints, output directories checked before fit, a checkpoint on SIGINT/SIGTERM.

    Args:
        check_free_space: compare the free disk space with the needs of a checkpoint and its replay file.
    """

    def __init__(self, check_free_space: bool = True) -> None:
        require(isinstance(check_free_space, bool), "fault_tolerance.check_free_space", "true or false",
                check_free_space)
        self.check_free_space = check_free_space
        # Whether this fit got past its setup and checkpoint restore (see `on_fit_start`).
        self.fit_started = False
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        # Set up and restored: what fails from here on failed while training (the CLI keeps its log folder). The
        # CLI puts this callback first, so that this comes before the Collector's warm-up.
        self.fit_started = True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        record_log_dir(trainer, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # Lightning put its own SIGTERM handler in front of ours after setup; it would end the run at the end of the
        # batch with a bare SystemExit and no checkpoint. Ours takes SIGTERM back.
        signal.signal(signal.SIGTERM, _request_stop)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, StopRequested):
            exception.checkpoint = save_last_checkpoint(trainer)
            exception.resume_command = cli_command("fit", exception.checkpoint)

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


def _evaluate_again_on_resume(trainer: pl.Trainer) -> None:
    """Make the checkpoint of a stop during an evaluation resume by running that evaluation again, whole.

    The training state is the one the evaluation started from (it changes none of it, and draws from no random
    stream that training uses), so the resumed run logs the same evaluation as an uninterrupted one would. Lightning
    runs an evaluation again when its checkpoint was written during a step (an episode begun, not finished); left as
    it is, a stop between two episodes would resume after the evaluation and log none of it. So the checkpoint says
    that the first episode has begun and none has finished."""
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    for counts in (progress.current, progress.total):
        counts.ready, counts.started, counts.processed, counts.completed = 1, 1, 0, 0


def _request_stop(signum, frame) -> None:
    global _stop_request
    _stop_request = signal.Signals(signum).name
    # Said by the process that received it (under DDP possibly not rank 0).
    message = (
        f"{_stop_request} received: finishing the current step, then writing a checkpoint. "
        "Press Ctrl+C again to stop at once without one."
    )
    rank = rank_zero_only.rank
    print(f"\n{rank_prefixed_message(message, rank) if rank else message}", file=sys.stderr, flush=True)
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
        # mkdir says only "File exists" or "Not a directory" when the directory, or one above it, is a plain file.
        in_the_way = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
        problem = (
            f": {in_the_way} is a file, not a directory; remove or rename it,"
            if in_the_way is not None
            else f" ({why.strerror or why}); fix its permissions"
        )
        raise StorageError(
            f"the {role} directory {directory} is not writable{problem} or point the run elsewhere "
            "(trainer.default_root_dir, the logger's save_dir, ModelCheckpoint's dirpath)"
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
