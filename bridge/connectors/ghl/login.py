"""``bridge auth login``: install the marketplace app on a location and store its tokens."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TextIO
from urllib.parse import urlsplit

from aiohttp import web

from bridge.config import GhlLocation, OAuthAuth
from bridge.connectors.ghl.auth import OAuthTokens, authorize_url
from bridge.errors import AuthError, ConfigError
from bridge.models import TokenRow

LOGIN_TIMEOUT = 600.0
"""How long the loopback listener waits for the browser to come back with a code."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def wait_for_code(redirect_uri: str, *, wait: float = LOGIN_TIMEOUT) -> str:
    """Listen on the loopback redirect URI until the browser brings ``?code=``."""
    parts = urlsplit(redirect_uri)
    host = parts.hostname or ""
    if parts.scheme != "http" or not _loopback(host) or parts.port is None:
        # Anything else would mean listening on a public interface; the operator can
        # paste the code instead.
        raise ConfigError(
            "$.ghl.locations[].auth.redirect_uri",
            f"{redirect_uri!r} is not an http://127.0.0.1:PORT/... loopback address;"
            " use `bridge auth login --code CODE` to paste the code instead",
        )
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def callback(request: web.Request) -> web.Response:
        code = request.query.get("code")
        if not code:
            return web.Response(status=400, text="No ?code= in the redirect; try the link again.")
        if not received.done():
            received.set_result(code)
        return web.Response(text="bridge is authorized. You can close this window.")

    app = web.Application()
    app.router.add_get(parts.path or "/", callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, parts.port).start()
        return await asyncio.wait_for(received, wait)
    except TimeoutError:
        raise AuthError(f"no authorization code arrived at {redirect_uri} in time") from None
    finally:
        await runner.cleanup()


async def login(
    location: GhlLocation,
    tokens: OAuthTokens,
    out: TextIO,
    *,
    code: str | None = None,
    wait: float = LOGIN_TIMEOUT,
) -> TokenRow:
    """Print the authorize URL, get the code (listening or pasted), store the tokens."""
    auth = location.auth
    if not isinstance(auth, OAuthAuth):
        raise ConfigError(
            f"$.ghl.locations[{location.name}].auth.kind",
            '`bridge auth login` is for kind = "oauth"; private tokens need no login',
        )
    out.write(
        f"Open this address in a browser, choose location {location.location_id}"
        f" and approve:\n\n  {authorize_url(auth)}\n\n"
    )
    if code is None:
        out.write(f"Waiting for the redirect to {auth.redirect_uri} ...\n")
        out.flush()
        code = await wait_for_code(auth.redirect_uri, wait=wait)
    row = await tokens.exchange_code(code)
    scopes = row.scope or "none listed"
    out.write(
        f"Stored OAuth tokens for location {location.name!r} (scopes: {scopes})."
        " They refresh automatically.\n"
    )
    return row
