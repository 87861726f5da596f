"""Errors the user can act on. The CLI prints their message alone, without a traceback."""


class UserError(Exception):
    """A problem outside the code: a bad setting, a simulator that is not running, an unusable file."""


class ConfigError(UserError, ValueError):
    """A setting is out of range; the message names the field and what is allowed."""


def require(ok: bool, name: str, allowed: str, got: object) -> None:
    """Raise `ConfigError` unless `ok`: '<name> must be <allowed>; got <got>'."""
    if not ok:
        raise ConfigError(f"{name} must be {allowed}; got {got!r}")


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot serve here: another kind of model, another shape, or damaged."""


class TrainingAborted(UserError, RuntimeError):
    """A fault kept repeating (envs crashing, non-finite losses); a checkpoint was written before stopping."""


class StorageError(UserError, OSError):
    """An output directory cannot be written, or its disk is (about to be) full."""


class StopRequested(Exception):
    """SIGINT/SIGTERM asked the run to stop; raised at the next safe point, where a checkpoint is then written."""

    def __init__(self, signal_name: str, env_steps: int, received_by: str | None = None):
        super().__init__(signal_name, env_steps, received_by)
        self.signal_name = signal_name
        self.env_steps = env_steps  # the run's, over all processes
        self.received_by = received_by  # under DDP: which processes the signal reached
        self.checkpoint = None  # set once the checkpoint is written
        self.resume_command = None

    def __str__(self) -> str:
        received = f" (received by {self.received_by})" if self.received_by else ""
        stopped = f"stopped by {self.signal_name}{received} at env step {self.env_steps}"
        if self.checkpoint is None:
            return f"{stopped}; no checkpoint was written"
        return f"{stopped}; checkpoint written to {self.checkpoint}. Resume with:\n  {self.resume_command}"
