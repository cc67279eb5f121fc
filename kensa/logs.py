"""Logs as data: one JSON object per line, with fields, never secrets.

A log call names an event and passes its facts as fields, never formatted into the message::

    log.info("model_swapped", extra={"model_name": name, "model_version": version})

``configure_logging`` (called by ``kensa serve``) sends kensa's loggers and uvicorn's through one
:class:`JsonFormatter`, which writes::

    {"ts": "2025-06-01T08:30:00.123Z", "level": "INFO", "logger": "kensa.serving.service",
     "event": "verdict", "request_id": "9f1c...", "model_version": "3", "verdict": "ok", ...}

(on one line). Fields bound with :func:`bound` (the serving app binds ``request_id`` for each
HTTP request) are added to every line logged inside that context. Fields whose names say they
hold a secret are redacted, and so are bearer tokens and kensa API keys in any text.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import traceback
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "text"]
FORMATS: tuple[LogFormat, ...] = ("auto", "json", "text")

REQUEST_ID_HEADER = "x-request-id"
_CORE = frozenset({"ts", "level", "logger", "event", "exc", "exc_type", "stack"})
REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (but uvicorn's
# ANSI-coloured copy of its message is no field).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# A field named like this holds a secret whatever its value looks like.
_SECRET_NAME = re.compile(r"secret|password|passwd|token|api_?key|authorization|cookie", re.IGNORECASE)
# Secrets that may hide in free text (an exception message, a foreign library's line): bearer
# credentials and kensa API keys (kensa.store.keys.KEY_PREFIX followed by token_urlsafe text).
_SECRET_TEXT = re.compile(r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]+|kensa_[A-Za-z0-9_-]{20,}")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "kensa_log_context", default=_EMPTY
)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this context (this task and the tasks it starts)."""
    token = _context.set(MappingProxyType({**_context.get(), **fields}))
    try:
        yield
    finally:
        _context.reset(token)


def context_fields() -> Mapping[str, Any]:
    """The fields bound in the current context."""
    return _context.get()


def request_id() -> str | None:
    """The id of the HTTP request being served in this context, if any."""
    value = _context.get().get("request_id")
    return None if value is None else str(value)


def new_request_id() -> str:
    return uuid.uuid4().hex


def redact_text(text: str) -> str:
    return _SECRET_TEXT.sub(REDACTED, text)


def _value(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name):
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_value("", v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _value(str(k), v) for k, v in value.items()}
    return redact_text(str(value))


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a record says, as data: ts, level, logger, event, the bound context, its extras."""
    ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    out: dict[str, Any] = {
        "ts": ts.replace("+00:00", "Z"),
        "level": record.levelname,
        "logger": record.name,
        "event": redact_text(record.getMessage()),
    }
    extras = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}
    for name, value in {**_context.get(), **extras}.items():
        # A field may not overwrite what every line has (an alert's "level" is not the line's).
        out[f"field_{name}" if name in _CORE else name] = _value(name, value)
    if record.exc_info and record.exc_info[0] is not None:
        out["exc_type"] = record.exc_info[0].__name__
        out["exc"] = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip())
    elif record.exc_text:
        out["exc"] = redact_text(record.exc_text)
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The same fields as ``key=value`` pairs on one line, for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        exc = fields.pop("exc", None)
        line = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return f"{line}\n{exc}" if exc else line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


# Loggers of the servers kensa runs under; they carry their own handlers unless told otherwise.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def configure_logging(level: str = "INFO", fmt: LogFormat = "json", stream: IO[str] | None = None) -> None:
    """Send every logger (kensa's, uvicorn's) through one handler on the root logger.

    Replaces the root logger's handlers, so calling it again reconfigures rather than doubles.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":  # a person at a terminal reads text; a collector reads JSON
        fmt = "text" if out.isatty() else "json"
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in SERVER_LOGGERS:
        server_log = logging.getLogger(name)
        server_log.handlers.clear()
        server_log.propagate = True
        server_log.setLevel(logging.NOTSET)  # the root's level decides, whatever set it before
    # Alembic narrates every start-up migration check; only its warnings matter here.
    logging.getLogger("alembic").setLevel(logging.WARNING)
