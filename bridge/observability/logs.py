"""structlog setup: one JSON object per line on stdout for journald, redacted on the way out.

Conventions: events are stable snake_case names (``page_fetched``, ``op_sent``,
``op_dead_lettered``) that operators grep and tests assert on; the context keys ``source``,
``stream``, ``location``, ``entity`` and ``op`` are bound with :func:`bind` / :func:`bound`
(contextvars, so they follow the asyncio task), not repeated on every call. Never pass a
secret on purpose: :func:`redaction_processor` is the safety net, not the plan.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TextIO, cast

import msgspec
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from bridge.redact import redact, redact_for_output

__all__ = [
    "bind",
    "bound",
    "configure_logging",
    "configure_output",
    "get_logger",
    "redaction_processor",
    "unbind",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_FORMATS = ("json", "console", "auto")

# The stdlib handler we installed last, so reconfiguring replaces it without touching
# handlers that belong to someone else (pytest's capture, for one).
_stdlib_handler: logging.Handler | None = None


def _encode_fallback(obj: object) -> str:
    # Only odd dict keys reach this: the redaction processor already turned values to text.
    return redact(repr(obj))


# Built once: msgspec is already a dependency and much faster than json.dumps per line.
_encoder = msgspec.json.Encoder(enc_hook=_encode_fallback)


# People read journald from the left edge, so these lead every line.
_LEADING_KEYS = ("ts", "level", "event")


def _dumps(obj: object, **_ignored: object) -> str:
    # JSONRenderer passes json.dumps keywords (default=...) that msgspec does not take.
    if isinstance(obj, dict):
        lead = {k: obj[k] for k in _LEADING_KEYS if k in obj}
        obj = lead | {k: v for k, v in obj.items() if k not in lead}
    return _encoder.encode(obj).decode()


def redaction_processor(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Redact every value of the event, the event name and exception text included."""
    return cast(EventDict, redact_for_output(dict(event_dict)))


def configure_logging(
    *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Send structlog events and stdlib warnings to ``stream`` (stdout), redacted."""
    min_level = _LEVELS.get(level.lower())
    if min_level is None:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}")
    if fmt not in _FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(_FORMATS)}")
    # Resolved now, not at import, so a replaced sys.stdout (tests, daemons) is honoured.
    out = sys.stdout if stream is None else stream
    tty = out.isatty()

    renderer: Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(colors=tty, timestamp_key="ts")
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        # Exceptions become text before redaction, so a token in a message cannot slip by.
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, redaction_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        # WriteLogger emits each line with one write and flushes it: stdout is
        # block-buffered under systemd, and journald should see lines as they happen.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, shared, renderer, max(min_level, logging.WARNING))


def _add_stdlib_logger_name(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    # Same key as get_logger(name) binds, so one filter finds both kinds of line.
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["logger_name"] = record.name
    return event_dict


def _route_stdlib(
    out: TextIO, shared: Sequence[Processor], renderer: Processor, level: int
) -> None:
    global _stdlib_handler
    # aiohttp and asyncio log through the stdlib; without this their warnings would be
    # unredacted free text in a different format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _add_stdlib_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redaction_processor,
                renderer,
            ],
        )
    )
    # On the handler too: records propagated from a logger set to INFO skip root's level.
    handler.setLevel(level)
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    root.addHandler(handler)
    root.setLevel(level)
    _stdlib_handler = handler


# The log file configure_output opened last, closed when a reload replaces it.
_log_file: TextIO | None = None


def configure_output(*, level: str, fmt: str, file: str = "") -> None:
    """Configure logging to stdout, or to ``file`` (appended; opened afresh on each call).

    Called again on SIGHUP: a file that logrotate moved away is closed and a new one
    opened at the configured path, so nothing is written into the rotated file for long.
    """
    global _log_file
    previous = _log_file
    if file:
        # Owner-only like the state file: lines carry people's e-mail addresses.
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # Line-buffered: each event is one write, and a crash loses none of them.
        _log_file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        configure_logging(level=level, fmt=fmt, stream=_log_file)
    else:
        _log_file = None
        configure_logging(level=level, fmt=fmt)
    if previous is not None:
        previous.close()


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """Return a lazy logger, so one made at import time follows a later configure_logging."""
    if name is None:
        return cast(FilteringBoundLogger, structlog.get_logger())
    # "logger" would clash with wrap_logger's own parameter; ConsoleRenderer knows this key.
    return cast(FilteringBoundLogger, structlog.get_logger(logger_name=name))


def bind(**kw: object) -> None:
    """Add ``kw`` to the context of every event logged from this task from now on."""
    structlog.contextvars.bind_contextvars(**kw)


def unbind(*keys: str) -> None:
    """Remove ``keys`` from this task's logging context."""
    structlog.contextvars.unbind_contextvars(*keys)


def bound(**kw: object) -> AbstractContextManager[None]:
    """Bind ``kw`` for the duration of a ``with`` block, then restore what was there."""
    return structlog.contextvars.bound_contextvars(**kw)
