"""``bridge check``'s live probes against the simulators: OK lines, fixes, failures, no secrets."""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.app import open_app
from bridge.checks import live_checks
from bridge.config import Config, load_config
from bridge.demo import AD_SOURCE, LOCATION_ID, SOURCE, World, sim_world
from bridge.redact import clear_secrets


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """open_app registers the config's secrets process-wide; later tests must not see them."""
    yield
    clear_secrets()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with sim_world(tmp_path, people=3) as made:
        yield made


def edited(world: World, old: str, new: str) -> Config:
    """The world's config with one value replaced, written back and loaded."""
    text = world.config_path.read_text(encoding="utf-8")
    assert old in text
    world.config_path.write_text(text.replace(old, new), encoding="utf-8")
    return load_config(world.config_path)


async def run_checks(config: Config) -> tuple[bool, str]:
    out = io.StringIO()
    async with open_app(config) as app:
        ok = await live_checks(app, out)
    text = out.getvalue()
    for secret in config.secret_values():
        assert secret not in text
    return ok, text


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_everything_configured_is_ok(world: World) -> None:
    """With the simulators' own credentials every API answers OK and the check passes."""
    config = load_config(world.config_path)
    an_calls = len(world.an.journal)
    ok, out = await run_checks(config)
    assert ok, out
    ghl = [line for line in out.splitlines() if line.startswith("GHL demo: ")]
    assert len(ghl) == 6
    assert all(line.endswith(" OK") for line in ghl), out
    assert f"Action Network {SOURCE}: OK (key accepted, people readable)" in out
    assert f"ActiveDEMAND {AD_SOURCE}: OK (key accepted, " in out
    assert len(world.an.journal) == an_calls + 1  # one request of the 4/s budget


async def test_wrong_action_network_key_prints_the_fix(world: World) -> None:
    """A refused Action Network key fails the check with where to find a good one."""
    config = edited(world, world.an_key, "an-wrong-key-000000")
    ok, out = await run_checks(config)
    assert not ok
    assert (
        f"Action Network {SOURCE}: FAILED: the API key is refused: set"
        " sources.action_network[0].api_key to a key from"
        " Start Organizing > Details > API & Sync"
    ) in out
    assert "an-wrong-key-000000" not in out
    assert f"ActiveDEMAND {AD_SOURCE}: OK" in out


async def test_wrong_activedemand_key_prints_the_fix(world: World) -> None:
    """A refused ActiveDEMAND key fails the check and names the config keys to change."""
    config = edited(world, world.ad_seeded.key, "ad-wrong-key-000000")
    ok, out = await run_checks(config)
    assert not ok
    assert (
        f"ActiveDEMAND {AD_SOURCE}: FAILED: the API key is refused: set"
        " sources.activedemand[0].api_key"
    ) in out
    assert "sources.activedemand[0].application_key" in out
    assert "ad-wrong-key-000000" not in out
    assert f"Action Network {SOURCE}: OK" in out


async def test_revoked_ghl_token_fails(world: World) -> None:
    """A GHL token revoked at the server fails its location with the reason, no scope lines."""
    world.ghl.revoke(LOCATION_ID)
    ok, out = await run_checks(load_config(world.config_path))
    assert not ok
    (line,) = [line for line in out.splitlines() if line.startswith("GHL demo: ")]
    assert line.startswith("GHL demo: FAILED: ")
    assert "token was rejected" in line


async def test_unreachable_base_url_is_named(world: World) -> None:
    """A closed port fails the source with its base URL and the connection error."""
    base_url = load_config(world.config_path).sources.action_network[0].base_url
    dead = f"http://127.0.0.1:{closed_port()}/api/v2"
    ok, out = await run_checks(edited(world, base_url, dead))
    assert not ok
    (line,) = [line for line in out.splitlines() if line.startswith("Action Network")]
    assert line.startswith(f"Action Network {SOURCE}: FAILED: cannot reach {dead}: ")
    assert "could not connect" in line
