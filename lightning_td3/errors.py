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
