"""GHL auth: private tokens, OAuth login, single-flight refresh and crash-safe rotation."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from bridge.clock import FakeClock, SystemClock
from bridge.config import GhlLocation, OAuthAuth
from bridge.connectors.ghl.auth import OAuthTokens, PrivateToken, agency_key, authorize_url
from bridge.connectors.ghl.login import login
from bridge.errors import AuthError, TokenExpired
from bridge.rest import make_session, request
from bridge.secrets import Secret
from bridge.sim.common import FaultRule, serve
from bridge.sim.ghl import build_app
from bridge.sim.ghl_state import GhlSim
from bridge.store import Store

LOCATION_ID = "ve9EPM428h8vShlRW1KT"
CLIENT_ID = "bridge-app"
CLIENT_SECRET = "bridge-app-secret-9f8e7d"


def location(base_url: str, **auth: object) -> GhlLocation:
    oauth = OAuthAuth(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET), **auth)  # type: ignore[arg-type]
    return GhlLocation(name="main", location_id=LOCATION_ID, base_url=base_url, auth=oauth)


class Env:
    def __init__(
        self, sim: GhlSim, base_url: str, store: Store, session: aiohttp.ClientSession
    ) -> None:
        self.sim = sim
        self.base_url = base_url
        self.store = store
        self.session = session

    def tokens(self, *, margin: float = 300.0, **auth: object) -> OAuthTokens:
        loc = location(self.base_url, **auth)
        assert isinstance(loc.auth, OAuthAuth)
        return OAuthTokens(
            loc,
            loc.auth,
            store=self.store,
            session=self.session,
            clock=SystemClock(),
            margin=margin,
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    sim = GhlSim(access_token_ttl=86_399)
    sim.add_location(LOCATION_ID)
    sim.add_oauth_app(CLIENT_ID, CLIENT_SECRET)
    async with (
        serve(build_app(sim)) as base_url,
        Store.open(tmp_path / "state.db") as store,
        make_session() as session,
    ):
        yield Env(sim, base_url, store, session)


async def read_contact_search(env: Env, tokens: OAuthTokens) -> int:
    """What the GHL client does on every call: use the token, refresh once on expiry."""
    url = f"{env.base_url}/conversations/search"
    params = {"locationId": LOCATION_ID, "limit": "1"}
    token = await tokens.token()
    for _ in range(2):
        try:
            headers = {"Authorization": f"Bearer {token}", "Version": "2021-04-15"}
            response = await request(
                env.session,
                "GET",
                url,
                bucket=None,
                write=False,
                clock=SystemClock(),
                headers=headers,
                params=params,
            )
            return response.status
        except TokenExpired:
            token = await tokens.refresh(token)
    raise AssertionError("refreshed twice")


def test_authorize_url_uses_current_path() -> None:
    """The install link uses the /v2/oauth/chooselocation path with the app's scopes."""
    url = authorize_url(location("http://x").auth)  # type: ignore[arg-type]
    assert url.startswith("https://marketplace.gohighlevel.com/v2/oauth/chooselocation?")
    assert "response_type=code" in url
    assert "client_id=bridge-app" in url
    assert "conversations%2Fmessage.write" in url
    assert CLIENT_SECRET not in url


async def test_private_token_rejection_is_an_operator_error() -> None:
    """A rejected private integration token cannot be refreshed: AuthError naming the fix."""
    source = PrivateToken("main", "pit-11111111-2222-3333-4444-555555555555")
    assert await source.token() == "pit-11111111-2222-3333-4444-555555555555"
    with pytest.raises(AuthError, match="Private Integrations") as caught:
        await source.refresh("pit-11111111-2222-3333-4444-555555555555")
    assert "pit-1111" not in str(caught.value)


async def test_login_with_loopback_redirect(env: Env, unused_tcp_port: int) -> None:
    """Login prints the authorize URL, receives the code on the loopback port and stores tokens."""
    tokens = env.tokens(redirect_uri=f"http://127.0.0.1:{unused_tcp_port}/callback")
    out = io.StringIO()
    task = asyncio.create_task(
        login(
            location(env.base_url, redirect_uri=f"http://127.0.0.1:{unused_tcp_port}/callback"),
            tokens,
            out,
            wait=10,
        )
    )
    code = env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID)
    for _ in range(100):  # the listener starts asynchronously
        try:
            async with env.session.get(
                f"http://127.0.0.1:{unused_tcp_port}/callback", params={"code": code}
            ) as resp:
                assert resp.status == 200
                break
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.02)
    row = await asyncio.wait_for(task, 10)
    assert "/v2/oauth/chooselocation" in out.getvalue()
    assert row.access_token not in out.getvalue()
    stored = await env.store.load_token("main")
    assert stored is not None
    assert stored.refresh_token == row.refresh_token
    assert await read_contact_search(env, tokens) == 200


async def test_login_with_pasted_code_and_wrong_location(env: Env) -> None:
    """A pasted code works; a code for another location is refused with a clear reason."""
    tokens = env.tokens()
    code = env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID)
    await login(location(env.base_url), tokens, io.StringIO(), code=code)
    assert await env.store.load_token("main") is not None

    other = env.sim.issue_auth_code("otherLocation000000A", client_id=CLIENT_ID)
    with pytest.raises(AuthError, match="installed on location otherLocation000000A"):
        await login(location(env.base_url), env.tokens(), io.StringIO(), code=other)


async def test_hundred_callers_on_expired_token_refresh_once(env: Env) -> None:
    """100 concurrent calls that all hit an expired access token cause exactly one refresh."""
    env.sim.access_token_ttl = 1
    tokens = env.tokens()
    await tokens.exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    # The bridge believes its token is good for a day; the server expires it in 1 s.
    row = await env.store.load_token("main")
    assert row is not None
    await env.store.save_token(msgspec.structs.replace(row, expires_at=row.expires_at + 86_400))
    tokens = env.tokens()
    await asyncio.sleep(1.1)
    env.sim.access_token_ttl = 86_399
    statuses = await asyncio.gather(*(read_contact_search(env, tokens) for _ in range(100)))
    assert statuses == [200] * 100
    assert env.sim.refreshes[LOCATION_ID] == 1


async def test_proactive_refresh_before_expiry(env: Env) -> None:
    """A token within the refresh margin is refreshed before use, not after a 401."""
    tokens = env.tokens()
    first = await tokens.exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    # A day-long token with 100 s left: inside the 5 min margin.
    now = time.time()
    await env.store.save_token(
        msgspec.structs.replace(first, updated_at=now - 86_300, expires_at=now + 100)
    )
    token = await env.tokens().token()
    assert token != first.access_token
    assert env.sim.refreshes[LOCATION_ID] == 1


async def test_a_short_lived_token_is_not_refreshed_before_every_call(env: Env) -> None:
    """A token living 2 min (under the 5 min margin) serves calls for its first 3/4, and is
    refreshed once in its last quarter: the margin is a quarter of its lifetime."""
    env.sim.access_token_ttl = 120
    clock = FakeClock(wall=time.time())
    loc = location(env.base_url)
    assert isinstance(loc.auth, OAuthAuth)
    tokens = OAuthTokens(loc, loc.auth, store=env.store, session=env.session, clock=clock)
    first = await tokens.exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    for _ in range(5):
        assert await tokens.token() == first.access_token
    await clock.advance(89.0)
    assert await tokens.token() == first.access_token
    assert env.sim.refreshes[LOCATION_ID] == 0
    await clock.advance(2.0)  # 91 s of 120: within the last 30 s
    assert await tokens.token() != first.access_token
    assert env.sim.refreshes[LOCATION_ID] == 1


async def test_a_refresh_whose_caller_is_cancelled_still_commits_the_new_pair(env: Env) -> None:
    """Cancelled while GHL has already rotated the pair (a drain running out, a stop during
    the start-up checks): the caller waits for the commit, so the next refresh works."""
    tokens = env.tokens()
    row = await tokens.exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    # GHL rotates at once, its answer comes a second later.
    env.sim.faults.add(FaultRule(route="/oauth/token", delay=1.0, after=True, times=1))
    caller = asyncio.create_task(tokens.refresh(row.access_token))
    await asyncio.sleep(0.3)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    stored = await env.store.load_token("main")
    assert stored is not None
    assert stored.refresh_token != row.refresh_token
    await env.tokens().refresh(stored.access_token)  # a reused refresh token is refused
    assert env.sim.refreshes[LOCATION_ID] == 2


async def test_failed_refresh_keeps_the_stored_pair(env: Env) -> None:
    """A revoked refresh token is an AuthError naming the fix; the stored pair is kept."""
    tokens = env.tokens()
    row = await tokens.exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    env.sim.revoke(LOCATION_ID)
    with pytest.raises(AuthError, match="bridge auth login --location main") as caught:
        await tokens.refresh(row.access_token)
    assert row.refresh_token not in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value)
    assert await env.store.load_token("main") == row


async def test_missing_tokens_tell_the_operator_to_log_in(env: Env) -> None:
    """With no stored tokens the error names the login command."""
    with pytest.raises(AuthError, match="bridge auth login --location main"):
        await env.tokens().token()


async def test_agency_install_exchanges_for_a_location_token(env: Env) -> None:
    """An agency (Company) install stores the agency pair and a location token derived from it."""
    env.sim.add_location(LOCATION_ID, env.sim.company_id)
    tokens = env.tokens(
        user_type="Company",
        company_id=env.sim.company_id,
        scopes=["oauth.write", "oauth.readonly", "conversations.readonly"],
    )
    code = env.sim.issue_auth_code(
        None, ["oauth.write", "oauth.readonly", "conversations.readonly"], client_id=CLIENT_ID
    )
    row = await tokens.exchange_code(code)
    assert await env.store.load_token(agency_key("main")) is not None
    assert row.location == "main"
    assert await read_contact_search(env, tokens) == 200


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from bridge.clock import SystemClock
    from bridge.config import GhlLocation, OAuthAuth
    from bridge.connectors.ghl.auth import OAuthTokens
    from bridge.rest import make_session
    from bridge.secrets import Secret
    from bridge.store import Store

    async def main() -> None:
        base_url, db = sys.argv[1], sys.argv[2]
        auth = OAuthAuth(client_id="bridge-app", client_secret=Secret("bridge-app-secret-9f8e7d"))
        loc = GhlLocation(
            name="main", location_id="ve9EPM428h8vShlRW1KT", base_url=base_url, auth=auth
        )
        async with Store.open(db) as store, make_session() as session:
            tokens = OAuthTokens(loc, auth, store=store, session=session, clock=SystemClock())
            current = await store.load_token("main")
            await tokens.refresh(current.access_token)
            print("refreshed", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_rotated_refresh_token_survives_kill_after_refresh(env: Env, tmp_path: Path) -> None:
    """A process killed right after a refresh has already committed the rotated refresh token."""
    await env.tokens().exchange_code(env.sim.issue_auth_code(LOCATION_ID, client_id=CLIENT_ID))
    before = await env.store.load_token("main")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        env.base_url,
        str(tmp_path / "state.db"),
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert child.stdout is not None
    line = b""
    while line.strip() != b"refreshed":  # skip the child's log lines
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line, "child exited before refreshing"
    child.send_signal(signal.SIGKILL)
    await child.wait()

    after = await env.store.load_token("main")
    assert after is not None
    assert before is not None
    assert after.refresh_token != before.refresh_token
    # A fresh process refreshes again with the rotated token; the simulator refuses reuse.
    await env.tokens().refresh(after.access_token)
    assert env.sim.refreshes[LOCATION_ID] == 2
