"""``bridge status`` on a real state file: what it says about a stream before its first cursor."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from bridge.config import Config, load_config
from bridge.models import BudgetRow
from bridge.status import status
from bridge.store import Store

CONFIG = """
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc1"
auth = { kind = "private_token", token = "pit-11111111-2222-4333-8444-555555555555" }

[[sources.action_network]]
name = "an"
location = "main"
api_key = "an-key-0123456789"
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "bridge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_config(path)


async def seed(config: Config, *, budgets_at: float, cursor: str | None = None) -> None:
    """A state file as the daemon leaves it: its budgets reported at ``budgets_at``."""
    async with Store.open(config.state.path) as store:
        if cursor is not None:
            await store.set_cursor("an.people", cursor)
        row = BudgetRow(
            api="actionnetwork",
            tenant="an",
            capacity=4,
            window=1.0,
            available=0,
            used_today=1_200,
            daily_cap=None,
            paused_until=None,
            updated_at=budgets_at,
        )
        await store.save_budgets([row])


async def report(config: Config) -> tuple[str, dict[str, object]]:
    """The text report's line for ``an.people``, and the stream in the JSON report."""
    text, as_json = io.StringIO(), io.StringIO()
    assert await status(config, text, as_json=False) == 0
    assert await status(config, as_json, as_json=True) == 0
    (line,) = [row for row in text.getvalue().splitlines() if "an.people" in row]
    (location,) = json.loads(as_json.getvalue())["locations"]
    (stream,) = [s for s in location["streams"] if s["stream"] == "an.people"]
    return line, stream


async def test_a_long_first_poll_is_reported_as_under_way(config: Config) -> None:
    """No cursor while the daemon reports its budgets: the first poll is under way."""
    await seed(config, budgets_at=time.time() - 2)
    line, stream = await report(config)
    assert "first poll under way" in line
    assert "never polled" not in line
    assert stream["cursor"] is None
    assert stream["first_poll"] is True


async def test_no_cursor_and_no_daemon_says_no_poll_has_completed(config: Config) -> None:
    """No cursor and budgets last reported long ago: no poll has completed, nothing more."""
    await seed(config, budgets_at=time.time() - 3_600)
    line, stream = await report(config)
    assert "no cursor yet: no poll has completed" in line
    assert stream["first_poll"] is False


async def test_a_stream_with_a_cursor_is_past_its_first_poll(config: Config) -> None:
    """Once its cursor is stored the stream shows it, whether or not the daemon runs."""
    await seed(config, budgets_at=time.time() - 2, cursor="2026-01-05T10:12:37Z")
    line, stream = await report(config)
    assert "cursor 2026-01-05T10:12:37Z" in line
    assert stream["first_poll"] is False
