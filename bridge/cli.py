"""The ``bridge`` command line: run, once, backfill, demo, check, status, tail, cursor,
summarize, dlq, map, auth, sim."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec

from bridge import __version__
from bridge.app import App, compile_flows, open_app, stream_names
from bridge.clock import SystemClock
from bridge.config import Config, OAuthAuth, load_config
from bridge.connectors.ghl.auth import OAuthTokens
from bridge.cursor_cmd import add_cursor_parser, run_cursor
from bridge.errors import EX_CONFIG, EX_USAGE, ConfigError, Fatal
from bridge.models import DeadLetter, content_hash
from bridge.observability.logs import configure_logging, configure_output
from bridge.observability.tail import add_tail_parser, run_tail
from bridge.redact import redact
from bridge.rest import make_session
from bridge.status import status as status_report
from bridge.store import Store
from bridge.summary import has_activity, summary_text

# Imported where they are used, not here: `bridge run` needs none of them, and start-up
# time is import time (bench/startup.py). bridge.demo and bridge.sim.* serve `demo` and
# `sim`; bridge.progress (rich) the progress display of `once` and `backfill`;
# bridge.connectors.ghl.login (aiohttp.web) `auth login`; bridge.checks `check`;
# bridge.preview `map preview`. tests/test_cli.py and tests/test_service.py check `run`.

DEFAULT_CONFIG = "/etc/bridge/config.toml"
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge",
        description="Keep HighLevel Conversations in step with Action Network and ActiveDEMAND.",
    )
    parser.add_argument("--version", action="version", version=f"bridge {__version__}")
    parser.add_argument(
        "--config",
        default=os.environ.get("BRIDGE_CONFIG", DEFAULT_CONFIG),
        help=f"config file (default: $BRIDGE_CONFIG or {DEFAULT_CONFIG})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("run", help="run the daemon until SIGTERM")
    once = commands.add_parser(
        "once", help="poll every stream until caught up, deliver everything, exit"
    )
    once.add_argument(
        "--no-progress", action="store_true", help="no progress display, even on a terminal"
    )
    demo = commands.add_parser(
        "demo", help="run the daemon against built-in simulators (no config or credentials)"
    )
    demo.add_argument("--people", type=_positive_int, default=12, help="people to seed")
    demo.add_argument("--verbose", action="store_true", help="log every page and op")
    backfill = commands.add_parser(
        "backfill", help="re-read a source from a date, leaving its live cursor alone"
    )
    backfill.add_argument(
        "source", help="source name in the config (Action Network, or ActiveDEMAND conversations)"
    )
    backfill.add_argument("--since", required=True, type=_date, help="YYYY-MM-DD (UTC)")
    backfill.add_argument(
        "--no-progress", action="store_true", help="no progress display, even on a terminal"
    )
    mapping = commands.add_parser("map", help="field mapping tools")
    map_commands = mapping.add_subparsers(dest="map_command", metavar="ACTION", required=True)
    preview = map_commands.add_parser(
        "preview", help="show what real source records would send, without sending"
    )
    preview.add_argument("--source", required=True, help="source name in the config")
    preview.add_argument("--limit", type=_positive_int, default=5, help="records to show")
    preview.add_argument(
        "--activities", action="store_true", help="also read each person's activities"
    )
    check = commands.add_parser(
        "check",
        help="validate the config, then probe every configured API (auth, scopes, reachability)",
    )
    check.add_argument(
        "--offline", action="store_true", help="only validate the config; make no API calls"
    )
    status = commands.add_parser(
        "status", help="per GHL location: health, budgets, cursors, outbox, dead letters"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_tail_parser(commands)
    add_cursor_parser(commands)
    summarize = commands.add_parser(
        "summarize",
        help="print a person's summary note text from the state file (no API calls)",
    )
    summarize.add_argument(
        "--contact", required=True, type=_email, metavar="EMAIL", help="the person's e-mail"
    )
    summarize.add_argument(
        "--source", help="Action Network source name, when the e-mail is in several"
    )

    dlq = commands.add_parser("dlq", help="inspect and replay dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    dlq_list = dlq_commands.add_parser("list", help="list dead letters, newest first")
    dlq_list.add_argument("--limit", type=_positive_int, default=50)
    dlq_show = dlq_commands.add_parser("show", help="show one dead letter with its payload")
    dlq_show.add_argument("id", type=_positive_int)
    replay = dlq_commands.add_parser("replay", help="put dead letters back into the outbox")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=_positive_int, nargs="?")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    dlq_drop = dlq_commands.add_parser("drop", help="delete one dead letter for good")
    dlq_drop.add_argument("id", type=_positive_int)

    auth = commands.add_parser("auth", help="OAuth install of the GHL marketplace app")
    auth_commands = auth.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    auth_login = auth_commands.add_parser(
        "login", help="print the install link, receive the code, store the tokens"
    )
    auth_login.add_argument("--location", required=True, help="GHL location name in the config")
    auth_login.add_argument(
        "--code", help="paste the ?code= from the redirect instead of listening on loopback"
    )

    sim = commands.add_parser("sim", help="run a local API simulator (no config needed)")
    sim.add_argument(
        "api", choices=["ghl", "actionnetwork", "activedemand"], help="which API to simulate"
    )
    sim.add_argument("--port", type=_port, default=0, help="port on 127.0.0.1 (0 = any free)")
    sim.add_argument(
        "--location-id", default="simLocation000000001", help="GHL: location to create"
    )
    sim.add_argument(
        "--people",
        type=_positive_int,
        default=200,
        help="Action Network: people to seed; ActiveDEMAND: contacts",
    )
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _email(text: str) -> str:
    address = text.strip()
    if "@" not in address or any(c.isspace() for c in address):
        raise argparse.ArgumentTypeError(f"expected an e-mail address, got {text!r}")
    return address


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)  # exits 2 with usage on a bad argument
    if args.command == "sim":
        return _run_sim(args)
    if args.command == "tail":  # reads logs, not the config
        return run_tail(args, sys.stdin, sys.stdout)
    if args.command == "demo":
        from bridge.demo import demo

        configure_logging(level="info" if args.verbose else "warning", fmt="console")
        return asyncio.run(demo(sys.stdout, people=args.people, verbose=args.verbose))
    # Absolute now: SIGHUP reads it again, whatever the working directory is by then.
    args.config = os.path.abspath(args.config)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"bridge: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    level = config.logging.level
    if _shows_progress(args, sys.stderr) and level in ("debug", "info"):
        # Info lines would scroll the progress frame away; warnings still show.
        level = "warning"
    try:
        configure_output(level=level, fmt=config.logging.format, file=config.logging.file)
    except OSError as exc:
        print(
            f"bridge: config error: $.logging.file: cannot open {config.logging.file}:"
            f" {exc.strerror or type(exc).__name__}",
            file=sys.stderr,
        )
        return EX_CONFIG
    try:
        return asyncio.run(_dispatch(args, config, sys.stdout))
    except ConfigError as exc:
        print(f"bridge: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except Fatal as exc:
        print(f"bridge: fatal: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


async def _dispatch(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    command: str = args.command
    if command == "check":
        return await _check(config, out, offline=args.offline)
    if command == "status":
        return await _status(config, out, as_json=args.json)
    if command == "dlq":
        return await _dlq(args, config, out)
    if command == "summarize":
        return await _summarize(config, args.contact, args.source, out)
    if command == "auth":
        return await _auth_login(config, args.location, args.code, out)
    if command == "map":
        from bridge.preview import map_preview

        return await map_preview(
            config, args.source, out, limit=args.limit, activities=args.activities
        )
    if command == "cursor":
        return await run_cursor(args, config, out, stdin=sys.stdin, err=sys.stderr)
    backfill = (args.source, args.since) if command == "backfill" else None
    async with open_app(config, backfill=backfill, config_path=Path(args.config)) as app:
        started = time.time()
        summary = await _run_with_progress(app, args)
        if command in ("once", "backfill"):
            out.write(_summary_text(summary) + "\n")
            if summary.dead_lettered:
                letters = await app.store.dead_letters(limit=20, since=started)
                out.write(f"dead-lettered in this run ({summary.dead_lettered}):\n")
                out.writelines(_dl_line(dl) + "\n" for dl in letters)
                out.write("see `bridge dlq show ID`; `bridge dlq replay ID` after a fix\n")
                return EXIT_FAILED
    return 0


def _shows_progress(args: argparse.Namespace, err: TextIO) -> bool:
    """A rich progress display: `once` and `backfill` on a terminal, unless told not to."""
    return args.command in ("once", "backfill") and not args.no_progress and err.isatty()


async def _run_with_progress(app: App, args: argparse.Namespace) -> Any:
    """Run; `once` and `backfill` show progress (a live frame on a TTY, log lines otherwise)."""
    once = args.command in ("once", "backfill")
    if not once or args.no_progress:
        return await app.run(once=once)
    from bridge.progress import ProgressSnapshot, show_progress  # rich: only for this display

    pipeline = app.pipeline
    ghl = [b for b in app.limiters.states() if b.api == "ghl"]
    budget = sum(b.capacity / b.window for b in ghl)

    def snapshot() -> ProgressSnapshot:
        s = pipeline.summary
        return ProgressSnapshot(
            records_read=s.events_read,
            ops_sent=s.ops_sent + s.ops_unchanged,
            ops_open=pipeline.open_ops,
            dead_lettered=s.dead_lettered,
            budget_per_second=budget,
            streams_done=len(pipeline.caught_up),
            streams_total=len(app.streams),
        )

    progress = asyncio.create_task(
        show_progress(snapshot, out=sys.stderr, tty=sys.stderr.isatty()), name="progress"
    )
    try:
        return await app.run(once=True)
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress


async def _check(config: Config, out: TextIO, *, offline: bool) -> int:
    compile_flows(config)  # mappings and rules, as `run` would compile them
    streams = stream_names(config)
    out.write(
        f"config OK: {len(config.ghl.locations)} GHL location(s), "
        f"{len(config.sources.action_network) + len(config.sources.activedemand)} source(s), "
        f"{len(streams)} stream(s); state file {config.state.path}\n"
    )
    if offline:
        return 0
    from bridge.checks import live_checks

    async with open_app(config) as app:
        ok = await live_checks(app, out)
    return 0 if ok else EXIT_FAILED


def _summary_text(summary: Any) -> str:
    fields = msgspec.structs.asdict(summary)
    return "summary: " + ", ".join(f"{key}={value}" for key, value in fields.items())


async def _auth_login(config: Config, name: str, code: str | None, out: TextIO) -> int:
    by_name = {loc.name: loc for loc in config.ghl.locations}
    location = by_name.get(name)
    if location is None:
        known = ", ".join(by_name) or "none"
        print(f"bridge: no GHL location named {name!r} (known: {known})", file=sys.stderr)
        return EX_USAGE
    if not isinstance(location.auth, OAuthAuth):
        print(f"bridge: location {name!r} uses a private token; it needs no login", file=sys.stderr)
        return EX_USAGE
    from bridge.connectors.ghl.login import login  # aiohttp.web: only for this

    async with (
        Store.open(config.state.path) as store,
        make_session(timeout=float(location.timeout)) as session,
    ):
        tokens = OAuthTokens(
            location, location.auth, store=store, session=session, clock=SystemClock()
        )
        await login(location, tokens, out, code=code)
    return 0


def _run_sim(args: argparse.Namespace) -> int:
    from bridge.sim.common import run_forever

    if args.api == "actionnetwork":
        from bridge.sim.actionnetwork import build_app as build_an_app
        from bridge.sim.an_data import build_sim as build_an_sim

        an_sim, keys = build_an_sim(people=args.people)
        # The simulator's own throwaway key, printed so a local bridge can be pointed at it.
        print(f"Action Network simulator: {args.people} people, API key {keys[0]}", flush=True)
        run_forever(build_an_app(an_sim), args.port)
        return 0
    if args.api == "activedemand":
        from bridge.sim.activedemand import build_app as build_ad_app
        from bridge.sim.ad_data import build_sim as build_ad_sim

        ad_sim, ad_key = build_ad_sim(contacts=args.people)
        print(f"ActiveDEMAND simulator: {args.people} contacts, API key {ad_key}", flush=True)
        run_forever(build_ad_app(ad_sim), args.port)
        return 0
    from bridge.sim.ghl import build_app as build_ghl_app
    from bridge.sim.ghl_state import GhlSim

    sim = GhlSim()
    sim.add_location(args.location_id)
    token = sim.add_private_token(args.location_id)
    # The simulator's own throwaway token, printed so a local bridge can be pointed at it.
    print(f"GHL simulator: location {args.location_id}, private token {token}", flush=True)
    run_forever(build_ghl_app(sim), args.port)
    return 0


# -- status -------------------------------------------------------------------------------------


async def _status(config: Config, out: TextIO, *, as_json: bool) -> int:
    """Cursors, outbox, dead letters, budgets and health, grouped by GHL location."""
    return await status_report(config, out, as_json=as_json)


# -- summaries ----------------------------------------------------------------------------------


async def _summarize(config: Config, email: str, source: str | None, out: TextIO) -> int:
    """Print the summary text of the people with this e-mail: what their GHL note holds."""
    names = [s.name for s in config.sources.action_network]
    if source is not None and source not in names:
        known = ", ".join(names) or "none"
        print(
            f"bridge: no Action Network source named {source!r} (known: {known})", file=sys.stderr
        )
        return EX_USAGE
    path = Path(config.state.path)
    if not path.exists():  # noqa: ASYNC240 - one stat before any I/O starts
        print(f"bridge: no state yet at {path}: the daemon has not run", file=sys.stderr)
        return EXIT_FAILED
    async with Store.open(path) as store:
        keys = await store.summary_keys_by_email(email)
        if source is not None:
            keys = [k for k in keys if k.startswith(f"{source}:")]
        states = [s for s in [await store.summary(k) for k in keys] if s is not None]
    if not states:
        print(
            f"bridge: no summary for {email}: no person with that e-mail has been synced"
            " with summaries enabled",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for index, state in enumerate(states):
        text = summary_text(state)
        out.write(("\n" if index else "") + text + "\n")
        if not has_activity(state.items):
            print(
                f"bridge: {state.contact_key} has no activity yet: no note in GHL", file=sys.stderr
            )
        elif content_hash(text.encode()) != state.digest:
            print(
                f"bridge: the GHL note of {state.contact_key} is behind this text"
                " (ops pending or dead-lettered: see `bridge status`)",
                file=sys.stderr,
            )
    return 0


# -- dead letters --------------------------------------------------------------------------------


def _dl_line(dl: DeadLetter) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(dl.last_seen))
    error = dl.error.replace("\n", " ")[:80]
    return (
        f"{dl.id:>6}  {when}Z  {dl.stream:<22} {dl.kind:<18} {dl.source_key:<36}"
        f" x{dl.attempts}  {error}"
    )


async def _dlq(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    action: str = args.dlq_command
    if action in ("list", "show", "drop"):
        async with Store.open(config.state.path) as store:
            if action == "list":
                for dl in await store.dead_letters(limit=args.limit):
                    out.write(_dl_line(dl) + "\n")
                return 0
            if action == "drop":
                if not await store.drop_dead_letter(args.id):
                    return _no_such(args.id)
                out.write(f"dropped dead letter {args.id}\n")
                return 0
            found = await store.dead_letter(args.id)
            if found is None:
                return _no_such(args.id)
            out.write(_show(found))
            return 0
    async with open_app(config) as app:
        store = app.store
        if args.all:
            # Oldest first, as they were first written: a person's upsert goes back into
            # the outbox ahead of the messages that wait for its contact.
            letters = sorted(await store.dead_letters(limit=1_000_000), key=lambda d: d.id)
        else:
            one = await store.dead_letter(args.id)
            if one is None:
                return _no_such(args.id)
            letters = [one]
        total = 0
        for dl in letters:
            total += await app.pipeline.replay(dl)
        out.write(f"replayed {len(letters)} dead letter(s) as {total} op(s)\n")
    return 0


def _no_such(dl_id: int) -> int:
    print(f"bridge: no dead letter with id {dl_id}", file=sys.stderr)
    return EXIT_FAILED


def _show(dl: DeadLetter) -> str:
    try:
        payload: Any = msgspec.json.decode(dl.payload)
    except msgspec.DecodeError:
        payload = dl.payload.decode("utf-8", "replace")
    record = msgspec.structs.asdict(dl) | {"payload": payload}
    return redact(msgspec.json.format(msgspec.json.encode(record)).decode()) + "\n"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
