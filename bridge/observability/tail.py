"""``bridge tail``: the daemon's JSON log lines, filtered and printed for people to read."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import closing, suppress
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import TextIO

import msgspec

from bridge.streams import parse_time

__all__ = ["Filters", "add_tail_parser", "matches", "parse_line", "render", "run_tail"]

HINT = "pipe the logs in: journalctl -u bridge -o cat -f | bridge tail"
POLL_INTERVAL = 0.25
"""Seconds between looks at a followed file once it has been read to the end."""

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# structlog and the stdlib also write these spellings; rank them with their usual meaning.
_RANKS = LEVELS | {"warn": 30, "exception": 40, "fatal": 50}
_LABELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "warn": "WARN"}
_LABELS |= {"error": "ERROR", "exception": "ERROR", "critical": "CRIT", "fatal": "CRIT"}
_RED, _YELLOW, _DIM, _BOLD, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
_LEVEL_COLORS = {10: _DIM, 30: _YELLOW, 40: _RED, 50: "\x1b[1;31m"}

CONTACT_KEYS = ("entity", "source_key", "email", "contact_id", "contact", "person", "key")
# Shown as "[main ghl]" right after the event: which location and which end of the bridge.
_BRACKET_KEYS = ("location", "source", "target")
# Shown first among the key=value pairs, so the same facts sit in the same place every line.
_FIRST_KEYS = ("stream", "entity", "op", "op_id")
# Tracebacks are printed whole below their line: cut at 300 characters they lose the cause.
_BLOCK_KEYS = ("exception", "stack")
_SKIP_KEYS = frozenset(
    ("ts", "level", "event", "logger_name", *_BRACKET_KEYS, *_FIRST_KEYS, *_BLOCK_KEYS)
)
MAX_VALUE = 300
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_QUOTE_IF = frozenset(' "=\\')
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder(enc_hook=repr)


class Filters(msgspec.Struct, frozen=True):
    """What a line must have to be shown; the defaults let everything through."""

    min_level: int = 0
    stream: str | None = None
    location: str | None = None
    events: tuple[str, ...] = ()
    contact: str | None = None  # casefolded
    since: datetime | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, now: datetime | None = None) -> Filters:
        """The filters the ``tail`` arguments ask for; a ``--since`` duration counts from now."""
        since: datetime | timedelta | None = args.since
        if isinstance(since, timedelta):
            since = (now or datetime.now(UTC)) - since
        return cls(
            min_level=LEVELS[args.level] if args.level else 0,
            stream=args.stream,
            location=args.location,
            events=tuple(args.event or ()),
            contact=args.contact.casefold() if args.contact else None,
            since=since,
        )

    @property
    def active(self) -> bool:
        """Whether any filter is set, in which case lines that are not JSON are dropped."""
        return self != Filters()


def add_tail_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``tail`` subcommand and its filters to the CLI's subcommands."""
    tail = commands.add_parser(
        "tail",
        help="follow the daemon's JSON logs readably: journalctl -u bridge -o cat -f | bridge tail",
    )
    add = tail.add_argument
    add("file", nargs="?", help="a log file (default, or -: standard input)")
    add("-f", "--follow", action="store_true", help="keep reading FILE as it grows, like tail -F")
    add("--level", type=str.lower, choices=tuple(LEVELS), help="the lowest level to show")
    add("--stream", metavar="NAME", help="only lines about this stream")
    add("--location", metavar="NAME", help="only lines about this GHL location")
    add("--event", action="append", metavar="PATTERN", help="event glob such as 'op_*'; repeatable")
    add("--contact", metavar="TEXT", help="only lines whose entity, email, source_key… has TEXT")
    add(
        "--since", metavar="WHEN", type=_since, help="a duration ago (90s, 10m, 2h, 1d) or ISO time"
    )
    add("--color", choices=("auto", "always", "never"), default="auto", help="auto: on a terminal")
    add("--json", action="store_true", help="print the matching JSON lines unformatted")


def _since(text: str) -> datetime | timedelta:
    # Validated here so a typo is a usage error; a duration is resolved when the run starts.
    found = _DURATION.fullmatch(text.strip().lower())
    try:
        if found:
            return timedelta(seconds=float(found[1]) * _UNIT_SECONDS[found[2]])
        when = parse_time(text.strip())
    except (OverflowError, ValueError):
        when = None
    if when is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration (90s, 10m, 2h, 1d) or an ISO date/time, got {text!r}"
        )
    return when


def parse_line(line: str) -> dict[str, object] | None:
    """The JSON object on ``line``, bare or after a journalctl prefix; None for other text."""
    found = _split(line)
    return None if found is None else found[1]


def _split(line: str) -> tuple[str, dict[str, object]] | None:
    start = line.find("{")
    # "Nov 21 10:00:00 host bridge[123]: {" is journalctl; other text with a brace is not JSON.
    if start < 0 or (line[:start].strip() and not line[:start].endswith(": ")):
        return None
    text = line[start:].rstrip()
    try:
        record = _decoder.decode(text)
    except (msgspec.DecodeError, ValueError):  # ValueError: lone surrogates in the text
        return None
    return (text, record) if isinstance(record, dict) else None


def _timestamp(record: Mapping[str, object]) -> datetime | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return parse_time(ts)
    except OverflowError:  # an offset that pushes the year past 9999
        return None


def _rank(level: object) -> int:
    # A line without a known level counts as info, so --level warning hides it.
    return _RANKS.get(level.lower(), 20) if isinstance(level, str) else 20


def matches(record: Mapping[str, object], filters: Filters) -> bool:
    """Whether ``record`` passes every filter that is set."""
    if filters.min_level and _rank(record.get("level")) < filters.min_level:
        return False
    if filters.stream is not None and record.get("stream") != filters.stream:
        return False
    if filters.location is not None and record.get("location") != filters.location:
        return False
    if filters.events:
        event = record.get("event")
        if not isinstance(event, str) or not any(fnmatchcase(event, p) for p in filters.events):
            return False
    if filters.contact is not None and not any(
        isinstance(value, str | int) and filters.contact in str(value).casefold()
        for value in (record.get(key) for key in CONTACT_KEYS)
    ):
        return False
    if filters.since is not None:
        ts = _timestamp(record)
        return ts is not None and ts >= filters.since
    return True


def _clean(text: str) -> str:
    # Log values are data from outside: never let one move the cursor or recolour a terminal.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _value(value: object) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = _encoder.encode(value).decode()
        except (TypeError, ValueError, OverflowError):
            text = f"<{type(value).__name__}>"
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "…"
    if isinstance(value, str) and (not text or not text.isprintable() or _QUOTE_IF & set(text)):
        return '"' + _clean(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return _clean(text)


def render(record: Mapping[str, object], *, color: bool) -> str:
    """One readable line for ``record``: time, level, event, where, then the other keys."""
    ts = _timestamp(record)
    clock = f"{ts:%H:%M:%S}.{ts.microsecond // 1000:03d}" if ts else "--:--:--.---"
    level = record.get("level")
    label = _LABELS.get(level.lower(), "") if isinstance(level, str) else ""
    label = (label or _value(level if level is not None else "-").upper()[:5]).ljust(5)
    event = _value(record.get("event", "-"))
    if color:
        code = _LEVEL_COLORS.get(_rank(level))
        label = f"{code}{label}{_RESET}" if code else label  # info keeps the terminal's colour
        event = f"{_BOLD}{event}{_RESET}"
    where = " ".join(_value(record[k]) for k in _BRACKET_KEYS if record.get(k) is not None)
    rest = [f"[{where}]"] if where else []
    keys = [*(k for k in _FIRST_KEYS if k in record)]
    keys += [k for k in record if k not in _SKIP_KEYS]
    keys += ["logger_name"] if "logger_name" in record else []
    rest += [f"{_clean(str(k))}={_value(record[k])}" for k in keys]
    line = f"{clock} {label} {event}" + ("  " + " ".join(rest) if rest else "")
    for key in _BLOCK_KEYS:
        block = record.get(key)
        if isinstance(block, str) and block:
            text = "\n".join("    " + _clean(part) for part in block.splitlines())
            line += f"\n{_RED}{text}{_RESET}" if color else f"\n{text}"
    return line


def run_tail(
    args: argparse.Namespace,
    stdin: TextIO,
    stdout: TextIO,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``bridge tail``: print the matching lines until the input ends (or, following, forever).

    ``sleep`` is the wait between looks at a followed file, a seam for tests.
    """
    if args.file is None and stdin.isatty():
        print(HINT, file=sys.stderr)
        return 2
    filters = Filters.from_args(args)
    color = args.color == "always" or (
        args.color == "auto" and stdout.isatty() and not os.environ.get("NO_COLOR")
    )
    try:
        with closing(_lines(args, stdin, sleep)) as lines:
            for line in lines:
                shown = _show(line, filters, color=color, as_json=args.json)
                if shown is not None:
                    stdout.write(shown + "\n")
                    stdout.flush()  # live: the reader may be a pipe to grep or less
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader left (| head): point stdout at /dev/null so the exit flush is quiet too.
        with suppress(OSError, ValueError):  # not a real file (tests): nothing flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        return 0
    except OSError as exc:
        print(f"bridge tail: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(line: str, filters: Filters, *, color: bool, as_json: bool) -> str | None:
    found = _split(line)
    if found is None:
        # Tracebacks and other programs' lines carry no fields a filter could test.
        if filters.active or as_json:
            return None
        return f"{_DIM}{line}{_RESET}" if color and line else line
    text, record = found
    if not matches(record, filters):
        return None
    return text if as_json else render(record, color=color)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")


def _lines(
    args: argparse.Namespace, stdin: TextIO, sleep: Callable[[float], None]
) -> Generator[str, None, None]:
    if args.file in (None, "-"):
        # Bytes where there are any, so a stray invalid byte is replaced instead of fatal.
        binary = getattr(stdin, "buffer", None)
        if binary is not None:
            yield from map(_decode, binary)
        else:
            yield from (line.rstrip("\r\n") for line in stdin)
    elif args.follow:
        yield from _follow(args.file, sleep)
    else:
        with open(args.file, "rb") as handle:
            yield from map(_decode, handle)


def _follow(path: str, sleep: Callable[[float], None]) -> Generator[str, None, None]:
    handle = open(path, "rb")  # noqa: SIM115 - swapped on rotation, closed in finally
    pending = b""  # a line the writer has not finished yet
    try:
        while True:
            data = handle.read(65536)
            if data:
                *done, pending = (pending + data).split(b"\n")
                yield from map(_decode, done)
                continue
            sleep(POLL_INTERVAL)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # rotated away and not yet recreated: the old file is all there is
            if now.st_ino != os.fstat(handle.fileno()).st_ino:
                # Lines written to the old file after our last read still belong to the log.
                *done, pending = (pending + handle.read()).split(b"\n")
                yield from map(_decode, done)
                try:
                    fresh = open(path, "rb")  # noqa: SIM115 - becomes handle, closed in finally
                except FileNotFoundError:
                    continue
                handle.close()
                handle = fresh
            elif now.st_size < handle.tell():
                handle.seek(0)  # truncated in place (logrotate copytruncate)
            else:
                continue
            if pending:
                yield _decode(pending)
                pending = b""
    finally:
        handle.close()
