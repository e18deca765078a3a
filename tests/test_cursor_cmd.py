"""``bridge cursor get|set|reset`` on a real state file: listing, validation, confirmation."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from bridge.app import stream_names
from bridge.config import Config, load_config
from bridge.connectors.ghl.reverse import ReverseCursor
from bridge.cursor_cmd import add_cursor_parser, run_cursor
from bridge.errors import EX_USAGE
from bridge.models import BudgetRow
from bridge.store import Store

# 2027-01-15T08:00:00Z: after every cursor value the tests write, so none is "future".
NOW = 1_800_000_000.0
PEOPLE_CURSOR = "2026-01-05T10:12:37Z"

CONFIG = """
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc1"
auth = { kind = "private_token", token = "pit-11111111-2222-4333-8444-555555555555" }
reverse = { lookback = "1h" }

[[sources.action_network]]
name = "an"
location = "main"
api_key = "an-key-0123456789"

[sources.action_network.mirror]
# A source that mirrors GHL replies is what gives the location its messages stream.
add_tags = ["replied-in-ghl"]

[[sources.activedemand]]
name = "ad"
location = "main"
api_key = "ad-key-0123456789"
streams = ["contacts", "conversations"]
"""


class Tty(io.StringIO):
    """Operator input typed at a terminal."""

    def isatty(self) -> bool:
        return True


class Result(msgspec.Struct):
    status: int
    out: str
    err: str


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "bridge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_config(path)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bridge")
    add_cursor_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["cursor", *argv])


async def cursor(config: Config, *argv: str, stdin: io.StringIO | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    status = await run_cursor(
        parse(*argv), config, out, stdin=stdin or io.StringIO(), err=err, now=NOW
    )
    return Result(status, out.getvalue(), err.getvalue())


async def seed(config: Config, cursors: dict[str, str], *, budgets_at: float | None = None) -> None:
    async with Store.open(config.state.path) as store:
        for stream, value in cursors.items():
            await store.set_cursor(stream, value)
        if budgets_at is not None:
            row = BudgetRow(
                api="ghl",
                tenant="main",
                capacity=100,
                window=10.0,
                available=100,
                used_today=0,
                daily_cap=None,
                paused_until=None,
                updated_at=budgets_at,
            )
            await store.save_budgets([row])


def state_file_exists(config: Config) -> bool:
    return Path(config.state.path).exists()


async def stored(config: Config, stream: str) -> str | None:
    async with Store.open(config.state.path) as store:
        return await store.get_cursor(stream)


async def test_get_lists_every_stream_with_or_without_a_cursor(config: Config) -> None:
    """Without STREAM every configured stream is listed, and a stored unconfigured one too."""
    await seed(config, {"an.people": PEOPLE_CURSOR, "an.people.backfill": "2026-01-01T00:00:00Z"})
    result = await cursor(config, "get")
    assert result.status == 0
    lines = result.out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(
        [*stream_names(config), "an.people.backfill"]
    )
    people = next(line for line in lines if line.startswith("an.people "))
    assert PEOPLE_CURSOR in people
    assert "written " in people
    assert next(line for line in lines if line.startswith("ad.contacts ")).endswith("no cursor yet")
    assert next(line for line in lines if line.startswith("an.people.backfill")).endswith(
        "(not configured)"
    )


async def test_get_one_stream(config: Config) -> None:
    """With STREAM only that stream's cursor and write time are shown."""
    await seed(config, {"an.people": PEOPLE_CURSOR})
    result = await cursor(config, "get", "an.people")
    assert result.status == 0
    (line,) = result.out.splitlines()
    assert line.startswith("an.people ")
    assert PEOPLE_CURSOR in line


async def test_get_without_state_creates_no_file(config: Config) -> None:
    """Before the daemon has run, get lists streams without creating the state file."""
    result = await cursor(config, "get")
    assert result.status == 0
    assert result.out.count("no cursor yet") == len(stream_names(config))
    assert not state_file_exists(config)


async def test_set_with_yes_stores_the_normalised_value(config: Config) -> None:
    """--yes skips the question; old and new are shown, the value stored as the stream writes it."""
    await seed(config, {"an.people": PEOPLE_CURSOR})
    with capture_logs() as logs:
        result = await cursor(config, "set", "an.people", "2026-01-01 08:30:00", "--yes")
    assert result.status == 0, result.err
    assert f"old     {PEOPLE_CURSOR}, written " in result.out
    assert "new     2026-01-01T08:30:00Z" in result.out
    assert await stored(config, "an.people") == "2026-01-01T08:30:00Z"
    assert logs == [
        {
            "event": "cursor_set",
            "log_level": "info",
            "stream": "an.people",
            "old": PEOPLE_CURSOR,
            "new": "2026-01-01T08:30:00Z",
            "forced": False,
        }
    ]


async def test_set_without_a_terminal_or_yes_is_refused(config: Config) -> None:
    """Piped stdin cannot confirm: the change is refused with a pointer to --yes."""
    await seed(config, {"an.people": PEOPLE_CURSOR})
    result = await cursor(config, "set", "an.people", "2026-01-01T00:00:00Z")
    assert result.status == 1
    assert "add --yes" in result.err
    assert await stored(config, "an.people") == PEOPLE_CURSOR


async def test_typing_the_stream_name_confirms(config: Config) -> None:
    """On a terminal, typing the stream's name goes ahead."""
    await seed(config, {"ad.conversations": PEOPLE_CURSOR})
    result = await cursor(
        config, "set", "ad.conversations", "2026-01-02", stdin=Tty("ad.conversations\n")
    )
    assert result.status == 0, result.err
    assert "type the stream name (ad.conversations) to confirm" in result.err
    assert await stored(config, "ad.conversations") == "2026-01-02T00:00:00Z"


async def test_typing_another_name_changes_nothing(config: Config) -> None:
    """On a terminal, any answer but the stream's name leaves the cursor alone."""
    await seed(config, {"an.people": PEOPLE_CURSOR})
    result = await cursor(config, "reset", "an.people", stdin=Tty("yes\n"))
    assert result.status == 1
    assert "not confirmed" in result.err
    assert await stored(config, "an.people") == PEOPLE_CURSOR


async def test_reset_deletes_and_says_what_a_first_run_does(config: Config) -> None:
    """Reset deletes the cursor after saying the stream will skip history a backfill must read."""
    await seed(config, {"an.people": PEOPLE_CURSOR})
    result = await cursor(config, "reset", "an.people", "--yes")
    assert result.status == 0, result.err
    assert "new     none: reads people changed from its first poll on" in result.out
    assert "bridge backfill an --since YYYY-MM-DD" in result.out
    assert "an.people: cursor deleted" in result.out
    assert await stored(config, "an.people") is None
    again = await cursor(config, "reset", "an.people", "--yes")
    assert (again.status, again.out) == (0, "an.people has no cursor; nothing to reset\n")


async def test_reset_of_messages_names_the_lookback(config: Config) -> None:
    """The reverse stream's first run starts reverse.lookback before its first poll."""
    await seed(config, {"main.messages": '{"since":1767225600000}'})
    result = await cursor(config, "reset", "main.messages", "--yes")
    assert result.status == 0, result.err
    assert "3600s before its first poll (reverse.lookback)" in result.out


async def test_unconfigured_stored_cursor_can_be_reset_not_set(config: Config) -> None:
    """A cursor left by a removed or backfill stream may be read and deleted, never moved."""
    await seed(config, {"old.people": PEOPLE_CURSOR})
    refused = await cursor(config, "set", "old.people", "2026-01-01", "--yes")
    assert refused.status == EX_USAGE
    assert "only get and reset" in refused.err
    result = await cursor(config, "reset", "old.people", "--yes")
    assert result.status == 0, result.err
    assert "(not configured)" in result.out
    assert await stored(config, "old.people") is None


async def test_unknown_stream_exits_2_listing_names(config: Config) -> None:
    """A stream that is neither configured nor stored is a usage error naming the known ones."""
    for argv in (
        ["get", "an.peple"],
        ["set", "an.peple", "2026-01-01", "--yes"],
        ["reset", "an.peple", "--yes"],
    ):
        result = await cursor(config, *argv)
        assert result.status == EX_USAGE, argv
        assert "no stream named 'an.peple'" in result.err
        for name in stream_names(config):
            assert name in result.err


async def test_running_daemon_refuses_unless_forced(config: Config) -> None:
    """Budgets reported 5 s ago mean the daemon runs: refused, and --force goes ahead."""
    await seed(config, {"an.people": PEOPLE_CURSOR}, budgets_at=NOW - 5)
    refused = await cursor(config, "reset", "an.people", "--yes")
    assert refused.status == 1
    assert "the daemon appears to be running" in refused.err
    assert "add --force" in refused.err
    assert await stored(config, "an.people") == PEOPLE_CURSOR
    forced = await cursor(config, "reset", "an.people", "--yes", "--force")
    assert forced.status == 0, forced.err
    assert "going ahead (--force)" in forced.err
    assert await stored(config, "an.people") is None


async def test_stale_budgets_do_not_block(config: Config) -> None:
    """Budgets last reported a minute ago are a stopped daemon's: the change goes ahead."""
    await seed(config, {"an.people": PEOPLE_CURSOR}, budgets_at=NOW - 60)
    result = await cursor(config, "set", "an.people", "2026-01-01", "--yes")
    assert result.status == 0, result.err
    assert await stored(config, "an.people") == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("stream", "value", "expected"),
    [
        ("an.people", "yesterday", "expected an ISO-8601 UTC time such as"),
        ("an.people", "2031-01-01T00:00:00Z", "is in the future"),
        ("ad.conversations", "1767225600", "expected an ISO-8601 UTC time"),
        ("an.taggings", "", "expected an ISO-8601 UTC time"),
        ("main.messages", '{"mode":"export"}', "expected a reverse cursor as JSON"),
        ("main.messages", '{"since":"soon"}', "expected a reverse cursor as JSON"),
        ("main.messages", "not json", "expected a reverse cursor as JSON"),
        ("main.messages", '{"since":1999999999000}', "in the future"),
    ],
)
async def test_invalid_value_is_rejected_with_its_shape(
    config: Config, stream: str, value: str, expected: str
) -> None:
    """A value the stream could not read exits 2, names the expected shape and stores nothing."""
    result = await cursor(config, "set", stream, value, "--yes")
    assert result.status == EX_USAGE
    assert expected in result.err
    assert not state_file_exists(config)


async def test_messages_cursor_from_json_or_a_time(config: Config) -> None:
    """The reverse stream takes its JSON cursor, or a time it turns into a first-run cursor."""
    result = await cursor(config, "set", "main.messages", '{"since":1767225600000}', "--yes")
    assert result.status == 0, result.err
    state = msgspec.json.decode(await stored(config, "main.messages") or "", type=ReverseCursor)
    assert state == ReverseCursor(since=1767225600000)
    result = await cursor(config, "set", "main.messages", "2026-01-02T00:00:00Z", "--yes")
    assert result.status == 0, result.err
    state = msgspec.json.decode(await stored(config, "main.messages") or "", type=ReverseCursor)
    assert state == ReverseCursor(mode="export", since=1767312000000, watermark=1767312000000)


def test_help_says_what_reset_does(capsys: pytest.CaptureFixture[str]) -> None:
    """`cursor reset --help` explains each kind of stream's first run."""
    with pytest.raises(SystemExit):
        parse("reset", "--help")
    help_text = capsys.readouterr().out
    assert "bridge backfill" in help_text
    assert "reverse.lookback" in help_text
