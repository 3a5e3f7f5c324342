"""Layered command options: flags > FCL_* environment > TOML file > defaults (pydantic-settings)."""

from __future__ import annotations

import argparse
import difflib
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "FCL_"
S = TypeVar("S", bound="LayeredSettings")
# values of the --config file for the settings object being built right now (sources are per class)
_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("fcl_file_values", default=None)


class SettingsError(ValueError):
    """An option is missing, unknown or invalid; the message names it, where it came from, and the fix."""


class LayeredSettings(BaseSettings):
    """Options of one command. Key `some_option` is flag `--some-option`, env `FCL_SOME_OPTION`, TOML key
    `some_option` (flat, no sections)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # earlier sources win; no .env files or secret dirs: only what the operator passes explicitly
        return init_settings, env_settings, InitSettingsSource(settings_cls, dict(_FILE_VALUES.get() or {}))


def host_port(value: str) -> str:
    """Check a HOST:PORT address (IPv6 in brackets, port 0 = any free port); returns it stripped."""
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051, 0.0.0.0:0 or [::]:9100)")
    return value


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def read_toml(path: Path) -> dict[str, Any]:
    """The flat table of a --config file; a clear error when it is missing, unreadable or not flat."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    for key, value in data.items():
        if isinstance(value, dict):
            raise SettingsError(
                f"config file {path}: [{key}] is a section; options are flat top-level keys "
                '(e.g. state_dir = "/srv/fcl")'
            )
    return data


@contextmanager
def _file_values(values: dict[str, Any]) -> Iterator[None]:
    token = _FILE_VALUES.set(values)
    try:
        yield
    finally:
        _FILE_VALUES.reset(token)


def load_settings(
    cls: type[S],
    flags: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build `cls` from flags given on the command line (None = not given), the environment and the file."""
    given = {k: v for k, v in flags.items() if v is not None}
    file_values = read_toml(config_file) if config_file else {}
    environ = os.environ if environ is None else environ
    try:
        with _file_values(file_values):
            return cls(**given)
    except ValidationError as exc:
        raise SettingsError(explain(cls, exc, given, file_values, config_file, environ)) from None


def explain(
    cls: type[LayeredSettings],
    exc: ValidationError,
    flags: Mapping[str, Any],
    file_values: Mapping[str, Any],
    config_file: Path | None,
    environ: Mapping[str, str],
) -> str:
    """One line per problem, each naming the key, where its value came from and what to do."""
    env = {k.upper(): v for k, v in environ.items()}
    where_file = f"config file {config_file}" if config_file else "the --config file"
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(
                f"unknown key {key!r} in {where_file}: {hint}valid keys are {', '.join(cls.model_fields)}"
            )
        elif err["type"] == "missing":
            lines.append(
                f"missing option {key!r}: pass {flag_name(key)}, set {env_name(key)} or put "
                f"{key} = ... in the --config file"
            )
        elif key in flags:
            lines.append(f"bad value for {flag_name(key)} {flags[key]!r}: {msg}")
        elif env_name(key) in env:
            lines.append(f"bad value in environment {env_name(key)}={env[env_name(key)]!r}: {msg}")
        elif key in file_values:
            lines.append(f"bad value for {key} = {file_values[key]!r} in {where_file}: {msg}")
        else:  # a check across options (model validator): its message names them itself
            lines.append(msg)
    return "; ".join(lines)


# -- command-line flags generated from the settings fields (one list of options, never out of sync) ----
def add_flags(parser: argparse.ArgumentParser, cls: type[LayeredSettings]) -> None:
    """One flag per field; every default is None so that only flags actually given take precedence."""
    for key, field in cls.model_fields.items():
        help_text = _help(field)
        if _is_bool(field.annotation):
            action: Any = argparse.BooleanOptionalAction if field.default is True else "store_true"
            parser.add_argument(flag_name(key), dest=key, action=action, default=None, help=help_text)
            continue
        choices = _literal_choices(field.annotation)
        parser.add_argument(flag_name(key), dest=key, default=None, choices=choices, help=help_text)


def add_settings_command(
    sub: Any, name: str, help: str, cls: type[LayeredSettings], env_examples: str, example_file: str
) -> argparse.ArgumentParser:
    """A subcommand whose options are `cls`'s fields as flags, plus --config (the same help on both CLIs)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=f"Every option can also come from FCL_<OPTION> (e.g. {env_examples}) or from the TOML "
        "file given by --config (keys are the long flag names with '-' -> '_'). Precedence: flags > "
        "environment > file > defaults.",
    )
    parser.add_argument("--config", type=Path, help=f"TOML file of options (see {example_file})")
    add_flags(parser, cls)
    return parser


def given_flags(args: argparse.Namespace, cls: type[LayeredSettings]) -> dict[str, Any]:
    """The options of `cls` that were given on the command line (add_flags leaves the others None)."""
    return {key: getattr(args, key) for key in cls.model_fields if getattr(args, key, None) is not None}


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return f"{text} (required)"
    if field.default not in (None, False, True, "") and "default:" not in text:
        return f"{text} (default: {field.default})"
    return text


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _literal_choices(annotation: Any) -> list[str] | None:
    args = [a for a in get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    if len(args) == 1 and get_origin(args[0]) is Literal:
        return [str(a) for a in get_args(args[0])]
    return None


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType)


# -- example files ------------------------------------------------------------------------------------
def example_toml(cls: type[LayeredSettings], title: str, set_keys: Iterable[str] = ()) -> str:
    """Every option as TOML: required ones and `set_keys` set to their example value, the others commented
    out at their default (or at an example when they have none)."""
    lines = [
        f"# {title}",
        "# Keys are the long flag names with '-' -> '_' (flat, no sections). FCL_<KEY> environment",
        "# variables and command-line flags override this file.",
    ]
    for key, field in cls.model_fields.items():
        lines.append("")
        lines += textwrap.wrap(field.description or "", 100, initial_indent="# ", subsequent_indent="# ")
        example = _toml_value(field.examples[0]) if field.examples else '""'
        if field.is_required() or key in set_keys:
            lines.append(f"{key} = {example}")
        elif field.default is None and "default:" not in (field.description or ""):
            lines.append(f"# {key} = {example}  # default: not set")
        elif field.default is None:
            lines.append(f"# {key} = {example}")
        else:
            lines.append(f"# {key} = {_toml_value(field.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
