"""Errors the user can act on. The CLI prints their message alone, without a traceback."""


class UserError(Exception):
    """A problem outside the code: a bad setting, a simulator that is not running, an unusable file."""


class ConfigError(UserError, ValueError):
    """A setting is out of range; the message names the field and what is allowed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot serve here: another kind of model, another shape, or damaged."""
