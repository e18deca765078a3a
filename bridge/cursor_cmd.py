"""``bridge cursor get|set|reset``: read and move where a stream's next poll starts.

A cursor is a row in the state file the daemon rewrites after every page it commits, so
a change made while the daemon runs is lost at its next page: ``set`` and ``reset`` refuse
when the daemon reported its budgets in the last few seconds, unless ``--force``. Both
show the old and the new value and ask for the stream's name on a terminal; a script
says ``--yes``.

What each kind of stream stores, and does without a cursor (read from the connectors):

============================  =============================  ==============================
stream                        cursor                         without one (first run)
============================  =============================  ==============================
``<an>.people``               UTC time, ``...T10:12:37Z``    from its first poll less the
                                                             overlap: older changes are
                                                             ``bridge backfill``'s job
``<an>.taggings``             UTC time the last full scan    the same full scan as always
                              finished (never read back)
``<ad>.contacts``             the same                       the same full scan as always
``<ad>.conversations``        UTC time                       from its first poll
``<location>.messages``       JSON ``ReverseCursor``         from the first poll less
                                                             ``reverse.lookback``
============================  =============================  ==============================
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import Literal, TextIO

import msgspec
import structlog

from bridge.app import BUDGET_REPORT_INTERVAL, reads_back, stream_names
from bridge.config import Config, GhlLocation
from bridge.connectors.ghl.reverse import ReverseCursor
from bridge.errors import EX_USAGE
from bridge.models import CursorRow
from bridge.status import age
from bridge.store import Store
from bridge.streams import format_utc, parse_time

__all__ = ["DAEMON_FRESH", "add_cursor_parser", "run_cursor"]

log = structlog.get_logger("bridge.cursor_cmd")

DAEMON_FRESH = 3 * BUDGET_REPORT_INTERVAL
"""Budget rows younger than this (15 s) mean a daemon is running: it rewrites them every 5 s."""

EXIT_REFUSED = 1

Kind = Literal["an_people", "an_taggings", "ad_contacts", "ad_conversations", "ghl_messages"]

_TIME_SHAPE = (
    "an ISO-8601 UTC time such as 2026-01-05T10:12:37Z (a date alone means its midnight UTC)"
)
_REVERSE_SHAPE = (
    'a reverse cursor as JSON, such as {"mode":"export","since":1767225600000} (since and'
    " watermark in epoch milliseconds), or an ISO-8601 UTC time to start reading there"
)

_FULL_SCAN = (
    "changes nothing that is read: every poll scans all {what}, and the cursor only"
    " records when the last scan finished"
)

_RESET_HELP = """\
Delete the stream's cursor: its next poll starts as on a first run.
  <an>.people, <ad>.conversations  start from now (less the overlap): changes made
                                   before that are not read; use `bridge backfill`
  <location>.messages              starts from now less reverse.lookback: older GHL
                                   messages are not mirrored
  <an>.taggings, <ad>.contacts     nothing changes: every poll is a full scan and the
                                   cursor only records when the last one finished
"""


class _Stream(msgspec.Struct, frozen=True, kw_only=True):
    """A configured stream: what kind it is and what its first run does."""

    name: str
    kind: Kind
    label: str
    first_run: str
    location: GhlLocation | None = None  # a reverse stream's own location


def add_cursor_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cursor get|set|reset`` to the ``bridge`` sub-commands."""
    cursor = commands.add_parser(
        "cursor", help="show, set or reset a stream's cursor (where its next poll starts)"
    )
    actions = cursor.add_subparsers(dest="cursor_command", metavar="ACTION", required=True)
    get = actions.add_parser(
        "get", help="show cursors and when they were written (every stream without STREAM)"
    )
    get.add_argument("stream", nargs="?", metavar="STREAM", help="stream name, e.g. acme.people")
    put = actions.add_parser(
        "set",
        help="move a stream's cursor",
        description="Move a stream's cursor. VALUE is checked against what the stream reads.",
    )
    put.add_argument("stream", metavar="STREAM")
    put.add_argument(
        "value",
        metavar="VALUE",
        help=f"{_TIME_SHAPE}; for <location>.messages {_REVERSE_SHAPE}",
    )
    reset = actions.add_parser(
        "reset",
        help="delete a stream's cursor: it starts again as on a first run",
        description=_RESET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reset.add_argument("stream", metavar="STREAM")
    for parser in (put, reset):
        parser.add_argument(
            "--yes",
            action="store_true",
            help="do not ask for confirmation (required when stdin is not a terminal)",
        )
        parser.add_argument(
            "--force", action="store_true", help="go ahead even if the daemon appears to run"
        )


async def run_cursor(
    args: argparse.Namespace,
    config: Config,
    out: TextIO,
    *,
    stdin: TextIO,
    err: TextIO,
    now: float | None = None,
) -> int:
    """Run ``cursor get|set|reset``; returns the exit status (2 for a bad stream or value)."""
    when = time.time() if now is None else now
    action: str = args.cursor_command
    streams = {s.name: s for s in _streams(config)}
    path = Path(config.state.path)
    stored: dict[str, CursorRow] = {}
    # Opening a state file that does not exist would create an empty one where the daemon
    # has not run yet; only `set` has a reason to (a cursor to start the first run from).
    if path.exists():  # noqa: ASYNC240 - one stat before any I/O starts
        async with Store.open(path) as store:
            stored = {row.stream: row for row in await store.cursors()}
    if action == "get":
        return _get(args.stream, streams, stored, out, err, now=when)
    name: str = args.stream  # argparse requires it for set and reset
    stream = streams.get(name)
    new: str | None = None
    if action == "set":
        if stream is None:
            return _unknown(name, streams, stored, err, settable=True)
        try:
            new = _checked_value(stream, args.value, when)
        except ValueError as exc:
            err.write(f"bridge: {name}: {exc}\n")
            return EX_USAGE
    elif stream is None and name not in stored:
        return _unknown(name, streams, stored, err, settable=False)
    old = stored.get(name)
    if new is None and old is None:
        out.write(f"{name} has no cursor; nothing to reset\n")
        return 0
    if old is not None and old.value == new:
        out.write(f"{name} is already at {new}; nothing to change\n")
        return 0
    async with Store.open(path) as store:
        if await _daemon_running(store, when, err, forced=args.force):
            return EXIT_REFUSED
        was = f"{old.value}, written {_written(old.updated_at, when)}" if old else "none"
        becomes = new if new is not None else f"none: {_first_run(stream, name)}"
        out.write(
            f"stream  {name} ({stream.label if stream else 'not configured'})\n"
            f"old     {was}\nnew     {becomes}\n"
        )
        if not _confirmed(name, args.yes, stdin, err):
            return EXIT_REFUSED
        await store.set_cursor(name, new)
    log.info(
        "cursor_set" if new is not None else "cursor_reset",
        stream=name,
        old=old.value if old else None,
        new=new,
        forced=bool(args.force),
    )
    out.write(f"{name}: cursor {'deleted' if new is None else 'set to ' + new}\n")
    return 0


def _get(
    name: str | None,
    streams: dict[str, _Stream],
    stored: dict[str, CursorRow],
    out: TextIO,
    err: TextIO,
    *,
    now: float,
) -> int:
    """One stream's cursor, or every configured and stored one, with when it was written."""
    if name is not None and name not in streams and name not in stored:
        return _unknown(name, streams, stored, err, settable=False)
    for shown in [name] if name is not None else sorted(set(streams) | set(stored)):
        row = stored.get(shown)
        value = f"{row.value:<28} written {_written(row.updated_at, now)}" if row else ""
        note = "" if shown in streams else "  (not configured)"
        out.write(f"{shown:<32} {value or 'no cursor yet'}{note}\n")
    return 0


def _streams(config: Config) -> list[_Stream]:
    """Every configured stream, with what its first run does in this config."""
    found: list[_Stream] = []
    for an in config.sources.action_network:
        found.append(
            _Stream(
                name=f"{an.name}.people",
                kind="an_people",
                label="Action Network people",
                first_run=(
                    f"reads people changed from its first poll on, less the overlap"
                    f" ({an.overlap:g}s); changes before that are not read: run"
                    f" `bridge backfill {an.name} --since YYYY-MM-DD` for them"
                ),
            )
        )
        if "taggings" in an.streams:
            found.append(
                _Stream(
                    name=f"{an.name}.taggings",
                    kind="an_taggings",
                    label="Action Network taggings",
                    first_run=_FULL_SCAN.format(what="taggings"),
                )
            )
    for ad in config.sources.activedemand:
        if "contacts" in ad.streams:
            found.append(
                _Stream(
                    name=f"{ad.name}.contacts",
                    kind="ad_contacts",
                    label="ActiveDEMAND contacts",
                    first_run=_FULL_SCAN.format(what="contacts"),
                )
            )
        if "conversations" in ad.streams:
            found.append(
                _Stream(
                    name=f"{ad.name}.conversations",
                    kind="ad_conversations",
                    label="ActiveDEMAND conversations",
                    first_run=(
                        "reads conversations changed from its first poll on; changes before"
                        f" that are not read: run `bridge backfill {ad.name} --since YYYY-MM-DD`"
                        " for them"
                    ),
                )
            )
    for loc in config.ghl.locations:
        if reads_back(config, loc):
            lookback = float(loc.reverse.lookback)
            start = f"{lookback:g}s before its first poll" if lookback else "its first poll"
            found.append(
                _Stream(
                    name=f"{loc.name}.messages",
                    kind="ghl_messages",
                    label="GHL messages read back",
                    first_run=(
                        f"reads GHL messages from {start} (reverse.lookback); older messages"
                        " are not mirrored into the sources"
                    ),
                    location=loc,
                )
            )
    # In the order the daemon names them; a stream kind unknown here shows as unconfigured.
    by_name = {s.name: s for s in found}
    return [by_name[n] for n in stream_names(config) if n in by_name]


def _first_run(stream: _Stream | None, name: str) -> str:
    if stream is not None:
        return stream.first_run
    if name.endswith(".conversations.backfill"):
        return (
            "the next `bridge backfill` of this account starts at its --since date instead"
            " of resuming here"
        )
    if name.endswith(".backfill"):
        return "nothing is read differently: a backfill starts at its --since date"
    return "no configured stream reads this cursor; deleting it only tidies the state file"


def _checked_value(stream: _Stream, value: str, now: float) -> str:
    """The value as the stream stores it, or ValueError naming the shape it expects."""
    if stream.kind == "ghl_messages":
        return _reverse_value(stream, value, now)
    try:
        when = _parse_time(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time the stream can read: expected {_TIME_SHAPE}"
        ) from None
    if when.timestamp() > now:
        raise ValueError(
            f"{format_utc(when)} is in the future: the stream would skip every change until then"
        )
    return format_utc(when)


def _reverse_value(stream: _Stream, value: str, now: float) -> str:
    if value.lstrip().startswith("{"):
        try:
            state = msgspec.json.decode(value, type=ReverseCursor)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a reverse cursor ({exc}): expected {_REVERSE_SHAPE}") from None
    else:
        try:
            start = int(_parse_time(value).timestamp() * 1000)
        except ValueError:
            raise ValueError(f"{value!r} is not readable: expected {_REVERSE_SHAPE}") from None
        # What the stream builds on a first run, started at this time instead of now.
        searching = stream.location is not None and stream.location.reverse.mode == "search"
        state = ReverseCursor(
            mode="search" if searching else "export", since=start, watermark=start
        )
    if max(state.since, state.watermark) > now * 1000:
        raise ValueError("since or watermark is in the future: the stream would skip until then")
    return msgspec.json.encode(state).decode()


def _parse_time(value: str) -> datetime:
    """The shared ISO parser (a time without a zone is UTC); ValueError when unreadable."""
    when = parse_time(value.strip())
    if when is None:
        raise ValueError(value)
    return when


async def _daemon_running(store: Store, now: float, err: TextIO, *, forced: bool) -> bool:
    """Whether to refuse: the daemon reported its budgets moments ago and no --force."""
    reported = [row.updated_at for row in await store.budgets()]
    if not reported or now - max(reported) >= DAEMON_FRESH:
        return False
    age = max(0.0, now - max(reported))
    warning = (
        f"the daemon appears to be running (it reported {age:.0f}s ago): it would overwrite"
        " the cursor at its next page"
    )
    if forced:
        err.write(f"bridge: warning: {warning}; going ahead (--force)\n")
        return False
    err.write(f"bridge: {warning}. Stop it first, or add --force\n")
    return True


def _confirmed(name: str, yes: bool, stdin: TextIO, err: TextIO) -> bool:
    if yes:
        return True
    if not stdin.isatty():
        err.write("bridge: not changed: stdin is not a terminal to confirm on; add --yes\n")
        return False
    err.write(f"type the stream name ({name}) to confirm: ")
    err.flush()
    # A blocking read is right here: nothing else runs, and a read in a worker thread
    # would keep the process alive after Ctrl-C until Enter.
    if stdin.readline().strip() != name:
        err.write("bridge: not confirmed; nothing changed\n")
        return False
    return True


def _unknown(
    name: str,
    streams: dict[str, _Stream],
    stored: dict[str, CursorRow],
    err: TextIO,
    *,
    settable: bool,
) -> int:
    if settable and name in stored:
        err.write(
            f"bridge: {name} is not a configured stream: only get and reset work on its cursor\n"
        )
        return EX_USAGE
    known = ", ".join(sorted(set(streams) | (set() if settable else set(stored)))) or "none"
    err.write(f"bridge: no stream named {name!r} (known: {known})\n")
    return EX_USAGE


def _written(at: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    return f"{stamp}Z ({age(now - at)} ago)"
