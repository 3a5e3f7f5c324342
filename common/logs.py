"""Logging for the daemons: human-readable text lines by default, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_level(value: str) -> str:
    """A level name, case-insensitive; a clear error otherwise (used by the option validators)."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields that JSON lines carry as keys (text lines ignore them)."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...structured fields, "exc"} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_installed: list[logging.Handler] = []  # the handler setup_logging added last (a CLI may run twice)


def setup_logging(level: str, fmt: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to `stream` (default: stderr) in `fmt`, replacing one installed here earlier."""
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(log_level(level))
    return handler
