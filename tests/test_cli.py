"""The ``bridge`` command line: exit codes, usage, status and dead-letter handling."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import structlog

from bridge.cli import main
from bridge.errors import EX_CONFIG, EX_USAGE
from bridge.models import NewOp, Rejection, SourceEvent
from bridge.redact import clear_secrets
from bridge.store import Store


class SimProcess(msgspec.Struct):
    url: str
    location_id: str
    token: str


@pytest.fixture(scope="module")
def ghl_sim() -> Iterator[SimProcess]:
    """`bridge sim ghl` as a real process, since main() runs its own event loop."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "sim", "ghl", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline().strip()  # GHL simulator: location X, private token T
    url = proc.stdout.readline().strip()
    location_id = banner.split("location ")[1].split(",")[0]
    token = banner.split("private token ")[1]
    try:
        yield SimProcess(url=url, location_id=location_id, token=token)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` configures structlog onto captured stdout; later tests must not write there."""
    yield
    structlog.reset_defaults()
    clear_secrets()


def write_config(tmp_path: Path, sim: SimProcess, extra: str = "") -> Path:
    config = tmp_path / "bridge.toml"
    config.write_text(
        f"""
[state]
path = "state.db"

[logging]
format = "json"

[[ghl.locations]]
name = "main"
location_id = "{sim.location_id}"
base_url = "{sim.url}"
auth = {{ kind = "private_token", token = "{sim.token}" }}
{extra}
"""
    )
    return config


def seed_dead_letters(db: Path) -> None:
    """Two dead letters: an op the target rejected and an event that did not map."""

    async def seed() -> None:
        async with Store.open(db) as store:
            event = SourceEvent(
                stream="an-main.people",
                key="an:p1",
                kind="person",
                data=b'{"x":1}',
                content_hash="h1",
            )
            op = NewOp(
                target="ghl:main",
                entity="an:p2",
                kind="upsert_contact",
                source_key="an:p2",
                payload=b'{"email":"bad"}',
            )
            await store.commit_page(
                "an-main.people", "c1", [op], [Rejection(event=event, reason="no email")], now=10.0
            )
            (due,) = await store.due_ops(now=11.0, limit=5)
            await store.dead_letter_op(due, "HTTP 422: email must be an email", now=12.0)

    asyncio.run(seed())


def test_bad_config_exits_78_with_key_path(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value stops the CLI with exit 78 and names the key path."""
    config = write_config(tmp_path, ghl_sim, '[pipeline]\ndrain_grace = "soon"\n')
    assert main(["--config", str(config), "check"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert '$.pipeline.drain_grace: expected a duration like "30s", got "soon"' in err


# Modules only some commands need: importing them costs `bridge run` start-up time.
ONLY_SOME_COMMANDS = (
    "bridge.demo",
    "bridge.sim",
    "bridge.progress",
    "bridge.preview",
    "bridge.checks",
    "bridge.connectors.ghl.login",
    "aiohttp.web",
    "rich.live",
    "hypothesis",
)


def test_the_cli_imports_nothing_only_some_commands_need() -> None:
    """Importing the CLI (all `bridge run` needs before it starts) loads no demo, simulator,
    progress display, preview, live check, login listener, aiohttp.web or hypothesis."""
    code = "import sys, bridge.cli; print(*sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = run.stdout.split()
    assert "bridge.app" in loaded
    assert not [m for m in loaded if m.startswith(ONLY_SOME_COMMANDS)]


def test_check_probes_the_location_live(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` (its module imported when used) probes every scope of the location."""
    assert main(["--config", str(write_config(tmp_path, ghl_sim)), "check"]) == 0
    out = capsys.readouterr().out
    assert "GHL main: contacts.readonly" in out
    assert "MISSING" not in out


def test_missing_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist is a config error, not a crash."""
    assert main(["--config", str(tmp_path / "nope.toml"), "check"]) == EX_CONFIG
    assert "cannot read config file" in capsys.readouterr().err


def test_bad_argument_prints_usage_and_exits_2() -> None:
    """An unknown subcommand or a malformed argument prints usage and exits 2."""
    for argv in (["bogus"], ["dlq", "show", "abc"], []):
        run = subprocess.run(
            [sys.executable, "-m", "bridge", *argv], capture_output=True, text=True, check=False
        )
        assert run.returncode == EX_USAGE, argv
        assert run.stderr.startswith("usage: bridge"), argv


def test_config_from_environment_variable(
    tmp_path: Path,
    ghl_sim: SimProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """BRIDGE_CONFIG names the config when --config is not given."""
    monkeypatch.setenv("BRIDGE_CONFIG", str(write_config(tmp_path, ghl_sim)))
    assert main(["check", "--offline"]) == 0
    assert "config OK: 1 GHL location(s)" in capsys.readouterr().out


def test_check_probes_token_and_scopes(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` probes each location live and reports every scope; a bad token fails clearly."""
    assert main(["--config", str(write_config(tmp_path, ghl_sim)), "check"]) == 0
    out = capsys.readouterr().out
    assert "GHL main: conversations/message.write" in out
    assert "MISSING" not in out
    bad = msgspec.structs.replace(ghl_sim, token="pit-00000000-0000-4000-8000-000000000000")
    assert main(["--config", str(write_config(tmp_path, bad)), "check"]) == 1
    out = capsys.readouterr().out
    assert (
        "GHL main: FAILED: GHL location 'main': the private integration token was rejected" in out
    )
    assert bad.token not in out


def test_once_with_nothing_to_do_exits_0(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`once` with no sources drains an empty outbox and exits 0 with a summary."""
    assert main(["--config", str(write_config(tmp_path, ghl_sim)), "once"]) == 0
    out = capsys.readouterr().out
    assert "summary: events_read=0" in out
    assert ghl_sim.token not in out
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600


def test_status_reports_outbox_dead_letters_and_budgets(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --json` groups budgets, outbox and dead letters by location, then totals them.

    The seeded stream ``an-main.people`` belongs to no configured source, so it and the
    event it could not map are shown apart from the location.
    """
    config = write_config(tmp_path, ghl_sim)
    assert main(["--config", str(config), "status"]) == 0
    assert "no state yet" in capsys.readouterr().out
    assert main(["--config", str(config), "once"]) == 0
    seed_dead_letters(tmp_path / "state.db")
    capsys.readouterr()
    assert main(["--config", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (main_location,) = report["locations"]
    assert main_location["location"] == "main"
    assert main_location["health"]["state"] == "ok"
    assert main_location["budgets"][0]["api"] == "ghl"
    assert main_location["budgets"][0]["capacity"] == 100
    assert [t["target"] for t in main_location["targets"]] == ["ghl:main"]
    assert main_location["dead_letters"] == {
        "total": 1,
        "by_reason": {"HTTP 422: email must be an email": 1},
    }
    other = report["other"]
    assert other["streams"] == [
        {
            "stream": "an-main.people",
            "cursor": "c1",
            "cursor_age_seconds": other["streams"][0]["cursor_age_seconds"],
            "health": {"state": "ok", "error": None, "since": None, "checked_at": None},
            "poll_interval": None,  # a stream no longer configured
            "behind": False,
            "first_poll": False,
        }
    ]
    assert other["dead_letters"] == {"total": 1, "by_reason": {"no email": 1}}
    assert report["outbox"] == {"pending": 0, "in_doubt": 0, "in_flight": 0, "done": 0}
    assert report["dead_letters"]["total"] == 2
    assert main(["--config", str(config), "status"]) == 0
    text = capsys.readouterr().out
    assert "location main: ok" in text
    assert "ghl/main" in text
    assert "total: dead letters: 2" in text


def test_dlq_list_show_drop_and_replay(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dead letters can be listed, shown with payload, replayed into the outbox and dropped."""
    config = write_config(tmp_path, ghl_sim)
    assert main(["--config", str(config), "once"]) == 0
    seed_dead_letters(tmp_path / "state.db")
    capsys.readouterr()

    assert main(["--config", str(config), "dlq", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    ids = {line.split()[4]: int(line.split()[0]) for line in lines}  # kind -> id

    assert main(["--config", str(config), "dlq", "show", str(ids["upsert_contact"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload"] == {"email": "bad"}
    assert shown["error"] == "HTTP 422: email must be an email"

    assert main(["--config", str(config), "dlq", "replay", str(ids["upsert_contact"])]) == 0
    assert "replayed 1 dead letter(s) as 1 op(s)" in capsys.readouterr().out
    assert main(["--config", str(config), "dlq", "drop", str(ids["event"])]) == 0
    assert main(["--config", str(config), "dlq", "drop", str(ids["event"])]) == 1

    async def outbox() -> dict[str, int]:
        async with Store.open(tmp_path / "state.db") as store:
            assert await store.dead_letter_count() == 0
            return await store.outbox_counts()

    # Pending, and in doubt: a replayed op is reconciled before it is sent again.
    assert asyncio.run(outbox())["in_doubt"] == 1


def test_event_dead_letter_payload_is_readable_json(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unmappable event is stored as JSON an operator can read, with the record inline."""
    config = write_config(tmp_path, ghl_sim)
    assert main(["--config", str(config), "once"]) == 0
    seed_dead_letters(tmp_path / "state.db")
    capsys.readouterr()
    assert main(["--config", str(config), "dlq", "list"]) == 0
    event_id = next(
        int(line.split()[0]) for line in capsys.readouterr().out.splitlines() if " event " in line
    )
    assert main(["--config", str(config), "dlq", "show", str(event_id)]) == 0
    shown = msgspec.json.decode(capsys.readouterr().out)
    assert shown["payload"]["data"] == {"x": 1}
    assert shown["error"] == "no email"


def test_sim_actionnetwork_serves_seeded_people() -> None:
    """`bridge sim actionnetwork` prints its key and URL and serves the seeded group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "sim", "actionnetwork", "--port", "0", "--people", "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        banner = proc.stdout.readline().strip()
        url = proc.stdout.readline().strip()
        key = banner.split("API key ")[1]

        async def first_page() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}/api/v2/people", headers={"OSDI-API-Token": key}) as resp,
            ):
                body = await resp.json(content_type=None)
                return len(body["_embedded"]["osdi:people"])

        assert asyncio.run(first_page()) == 25  # per_page is capped at 25
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_check_offline_compiles_rules_and_mappings(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule that does nothing is caught by `check --offline`, as `run` would catch it."""
    extra = """
[[sources.action_network]]
name = "an"
location = "main"
api_key = "key-1234567890"

[[sources.action_network.rules]]
name = "r"
when_tag = "x"
"""
    config = write_config(tmp_path, ghl_sim, extra)
    assert main(["--config", str(config), "check", "--offline"]) == EX_CONFIG
    assert "rules[0]: does nothing" in capsys.readouterr().err


def write_two_locations(tmp_path: Path, sim: SimProcess, second_token: str) -> Path:
    """Two locations on one simulator: ``main`` with its token, ``second`` with another."""
    second = f"""
[[ghl.locations]]
name = "second"
location_id = "{sim.location_id}"
base_url = "{sim.url}"
auth = {{ kind = "private_token", token = "{second_token}" }}
"""
    return write_config(tmp_path, sim, second)


def test_once_with_one_bad_location_finishes_the_rest_and_names_it(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """A location with a bad token is marked down at start; `once` runs the rest, exits 1
    naming it, and `status` shows why."""
    bad_token = "pit-00000000-0000-4000-8000-000000000000"
    config = write_two_locations(tmp_path, ghl_sim, bad_token)
    assert main(["--config", str(config), "once"]) == 1
    err = capsys.readouterr().err
    assert "bridge: fatal: finished everything else, but these are down" in err
    assert "GHL location 'second': AuthError: GHL location 'second'" in err
    assert bad_token not in err
    assert main(["--config", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    health = {g["location"]: g["health"] for g in report["locations"]}
    assert health["main"]["state"] == "ok"
    assert health["second"]["state"] == "down"
    assert health["second"]["error"].startswith("AuthError: GHL location 'second'")
    assert main(["--config", str(config), "status"]) == 0
    assert "location second: DOWN since" in capsys.readouterr().out


def test_start_fails_when_every_location_is_bad(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no usable location at all the start fails as before, with the first one's error."""
    bad = msgspec.structs.replace(ghl_sim, token="pit-00000000-0000-4000-8000-000000000000")
    config = write_two_locations(tmp_path, bad, bad.token)
    assert main(["--config", str(config), "once"]) == 1
    err = capsys.readouterr().err
    assert "bridge: fatal: GHL location 'main': the private integration token was rejected" in err


def test_once_logs_its_progress_off_a_terminal(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Off a TTY `once` logs a final `progress` event; --no-progress leaves it out."""
    config = str(write_config(tmp_path, ghl_sim))
    assert main(["--config", config, "once"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "{" in line]
    (final,) = [e for e in events if e["event"] == "progress"]
    assert final["final"] is True
    assert final["ops_open"] == 0
    assert main(["--config", config, "once", "--no-progress"]) == 0
    assert '"progress"' not in capsys.readouterr().out


def test_status_shows_the_token_kind_and_streams_behind(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` says what credential each location uses."""
    config = str(write_config(tmp_path, ghl_sim))
    assert main(["--config", config, "once"]) == 0
    capsys.readouterr()
    assert main(["--config", config, "status"]) == 0
    out = capsys.readouterr().out
    assert "token    private integration token" in out
    assert main(["--config", config, "status", "--json"]) == 0
    (location,) = json.loads(capsys.readouterr().out)["locations"]
    assert location["token"]["kind"] == "private"


def test_tail_runs_without_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge tail FILE` needs no config file and prints the filtered lines readably."""
    log = tmp_path / "bridge.log"
    log.write_text(
        '{"ts":"2026-11-21T10:00:00.000Z","level":"info","event":"op_sent","stream":"a"}\n'
        '{"ts":"2026-11-21T10:00:01.000Z","level":"warning","event":"op_retry_scheduled"}\n'
    )
    monkeypatch.setenv("BRIDGE_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["tail", str(log), "--level", "warning", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "op_retry_scheduled" in out
    assert "op_sent" not in out


def test_cursor_is_wired_and_names_unknown_streams(
    tmp_path: Path, ghl_sim: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cursor get` lists the cursors; an unknown stream is a usage error naming it."""
    config = str(write_config(tmp_path, ghl_sim))
    assert main(["--config", config, "cursor", "get"]) == 0
    assert main(["--config", config, "cursor", "reset", "nope.people"]) == EX_USAGE
    assert "nope.people" in capsys.readouterr().err
