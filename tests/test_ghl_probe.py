"""Start-up probes name exactly the scope a location's token lacks, and write nothing."""

from __future__ import annotations

import aiohttp

from bridge.clock import SystemClock
from bridge.connectors.ghl.probe import PROBES, check_location
from bridge.sim.ghl_state import LOCATION_SCOPES
from tests.conftest import GhlServer, StaticTokens


async def test_full_token_passes_every_probe(
    ghl_server: GhlServer, http_session: aiohttp.ClientSession
) -> None:
    """A token with every scope passes, and the write probes create nothing."""
    checks = await check_location(
        http_session,
        name="main",
        base_url=ghl_server.base_url,
        location_id=ghl_server.location_id,
        auth=StaticTokens(ghl_server.token),
        bucket=None,
        clock=SystemClock(),
    )
    assert [c.scope for c in checks] == [p[0] for p in PROBES]
    assert all(c.ok for c in checks)
    assert ghl_server.sim.contacts() == []
    assert ghl_server.sim.conversations() == []


async def test_missing_scopes_are_named(
    ghl_server: GhlServer, http_session: aiohttp.ClientSession
) -> None:
    """A token without two scopes fails exactly those two, each with the fix."""
    lacking = {"conversations/message.write", "contacts.readonly"}
    token = ghl_server.sim.add_private_token(ghl_server.location_id, LOCATION_SCOPES - lacking)
    checks = await check_location(
        http_session,
        name="main",
        base_url=ghl_server.base_url,
        location_id=ghl_server.location_id,
        auth=StaticTokens(token),
        bucket=None,
        clock=SystemClock(),
    )
    failed = {c.scope: c.fix for c in checks if not c.ok}
    assert set(failed) == lacking
    assert failed["contacts.readonly"] == (
        "grant contacts.readonly to the app or private integration of location 'main'"
    )
