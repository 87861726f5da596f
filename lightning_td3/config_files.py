"""The `--config` files of a `cli.py` command line, checked to be YAML before jsonargparse reads them.

jsonargparse reports a YAML syntax error without the file's name ("in <unicode string>", over several lines), which
leaves the user guessing when several `--config` files are stacked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from lightning_td3.errors import ConfigError

CONFIG_FLAGS = ("--config", "-c")


def check_config_files(argv: Iterable[str]) -> None:
    """`ConfigError` naming the first `--config` file of `argv` that is not valid YAML, and where (a path that is no
    file is left to jsonargparse, which also takes a config given inline)."""
    for value in option_values(argv, CONFIG_FLAGS):
        if Path(value).is_file():
            _check_yaml(Path(value))


def option_values(argv: Iterable[str], flags: tuple[str, ...]) -> list[str]:
    """The values that a command line gives the options `flags`, as `--flag VALUE` or `--flag=VALUE`, in order."""
    arguments = list(argv)
    values = []
    for index, argument in enumerate(arguments):
        flag, equals, value = argument.partition("=")
        if flag in flags and not equals:  # `--flag VALUE` rather than `--flag=VALUE`
            value = arguments[index + 1] if index + 1 < len(arguments) else ""
        if flag in flags:
            values.append(value)
    return values


def _check_yaml(path: Path) -> None:
    try:
        # Composing checks the syntax without building values: whatever passes is jsonargparse's to judge. The
        # loader is the one jsonargparse reads with, so both see the same errors.
        with open(path, "rb") as file:
            list(yaml.compose_all(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except OSError as why:
        raise ConfigError(f"config file {path} cannot be read ({why.strerror or why})") from None
    except yaml.YAMLError as why:
        raise ConfigError(f"config file {path} is not valid YAML: {_where(why)}; fix the file") from None


def _where(error: yaml.YAMLError) -> str:
    """The YAML error in one line, with the 1-based line and column of the problem (and of its context)."""
    if isinstance(error, yaml.reader.ReaderError):  # a byte that is not text: it has a position, not a line
        return f"{error.reason} at byte {error.position}"
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(error).split())
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context is not None and context_mark is not None:
        where += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return where
