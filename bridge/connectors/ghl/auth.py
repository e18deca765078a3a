"""Access tokens for a GHL location: a static private integration token, or OAuth with rotation.

OAuth refresh tokens rotate on use and a replayed one is refused, so a lost refresh
token means reinstalling the app. Hence the order in :meth:`OAuthTokens._refresh`:
exchange, commit the new pair to SQLite, and only then hand out the new access token;
a failed exchange never touches the stored pair; a caller cancelled mid-refresh (a drain
running out, a stop during the start-up checks) lets the refresh finish first; and one
lock per location makes refreshes single-flight (GHL's own SDKs do not serialise them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

import aiohttp
import msgspec
import structlog

from bridge.clock import Clock
from bridge.config import GhlLocation, OAuthAuth
from bridge.errors import AuthError, InDoubt, Rejected, Retryable
from bridge.models import TokenRow
from bridge.redact import register_secret
from bridge.rest import request
from bridge.store import Store

log = structlog.get_logger("bridge.ghl.auth")

REFRESH_MARGIN = 300.0
"""Refresh this many seconds before expiry, so a token never expires mid-request..."""

REFRESH_SHARE = 0.25
"""...or this share of the token's lifetime, when that is less: a token that lives under
the margin would otherwise be refreshed before every call."""

LOCATION_TOKEN_VERSION = "2021-07-28"  # noqa: S105 - an API version, not a secret


class TokenResponse(msgspec.Struct, kw_only=True):
    """``POST /oauth/token`` and ``/oauth/locationToken`` replies (fields we use)."""

    access_token: str
    expires_in: float
    refresh_token: str = ""
    scope: str = ""
    userType: str | None = None
    locationId: str | None = None
    companyId: str | None = None


_decode_token = msgspec.json.Decoder(TokenResponse).decode

T = TypeVar("T")


class PrivateToken:
    """A private integration token: static; when GHL rejects it, only an operator can help."""

    def __init__(self, location: str, token: str) -> None:
        self._location = location
        self._token = token

    async def token(self) -> str:
        return self._token

    async def refresh(self, rejected: str) -> str:
        raise AuthError(
            f"GHL location {self._location!r}: the private integration token was rejected as"
            " invalid or expired; create a new one under Settings > Private Integrations and"
            " update the config"
        )


def authorize_url(oauth: OAuthAuth) -> str:
    """The page where an admin installs the app on a location (current ``/v2/`` path)."""
    query = urlencode(
        {
            "response_type": "code",
            "redirect_uri": oauth.redirect_uri,
            "client_id": oauth.client_id,
            "scope": " ".join(oauth.scopes),
        }
    )
    return f"{oauth.authorize_url}?{query}"


def agency_key(location: str) -> str:
    """Where an agency (Company) token pair is stored for a location's install."""
    return f"agency:{location}"


class OAuthTokens:
    """OAuth tokens of one location, kept in the store and refreshed single-flight."""

    def __init__(
        self,
        location: GhlLocation,
        oauth: OAuthAuth,
        *,
        store: Store,
        session: aiohttp.ClientSession,
        clock: Clock,
        margin: float = REFRESH_MARGIN,
    ) -> None:
        self._location = location
        self._oauth = oauth
        self._store = store
        self._session = session
        self._clock = clock
        self._margin = margin
        self._lock = asyncio.Lock()
        self._current: TokenRow | None = None
        self.refreshes = 0

    @property
    def name(self) -> str:
        return self._location.name

    @property
    def expires_at(self) -> float | None:
        """Wall time the access token in use expires (None before the first load)."""
        return None if self._current is None else self._current.expires_at

    async def token(self) -> str:
        current = self._current or await self._load()
        if self._fresh(current):
            return current.access_token
        return await self.refresh(current.access_token)

    async def refresh(self, rejected: str) -> str:
        """A fresh access token; concurrent callers share one exchange."""
        async with self._lock:
            current = await self._load()
            # Someone else refreshed while we waited for the lock: use their token.
            if current.access_token != rejected and self._fresh(current):
                return current.access_token
            return await _finish_first(self._refresh(current))

    def _fresh(self, row: TokenRow) -> bool:
        """Whether ``row`` is still good for use: not within its refresh margin of expiry.

        The margin is ``margin`` (5 min), or a quarter of the token's lifetime (issue to
        expiry) when that is less, so a short-lived token is used for most of its life.
        """
        lifetime = max(0.0, row.expires_at - row.updated_at)
        margin = min(self._margin, REFRESH_SHARE * lifetime)
        return row.expires_at - margin > self._clock.time()

    async def _load(self) -> TokenRow:
        row = await self._store.load_token(self.name)
        if row is None:
            raise AuthError(
                f"GHL location {self.name!r}: no OAuth tokens stored yet; run"
                f" `bridge auth login --location {self.name}`"
            )
        register_secret(row.access_token)
        register_secret(row.refresh_token)
        self._current = row
        return row

    async def _refresh(self, current: TokenRow) -> str:
        if current.refresh_token:
            reply = await self._exchange(
                {"grant_type": "refresh_token", "refresh_token": current.refresh_token},
                what="refresh",
            )
        else:
            # A location token obtained from an agency token without a refresh token
            # (older API versions): derive a new one from the agency install.
            reply = await self._from_agency()
        row = await self.save(self.name, reply)
        self.refreshes += 1
        log.info("oauth_token_refreshed", location=self.name, expires_at=round(row.expires_at))
        return row.access_token

    async def save(self, key: str, reply: TokenResponse) -> TokenRow:
        """Commit a token pair, then (and only then) make it the one in use."""
        register_secret(reply.access_token)
        if reply.refresh_token:
            register_secret(reply.refresh_token)
        row = TokenRow(
            location=key,
            access_token=reply.access_token,
            refresh_token=reply.refresh_token,
            expires_at=self._clock.time() + reply.expires_in,
            scope=reply.scope,
            updated_at=self._clock.time(),
        )
        await self._store.save_token(row)
        if key == self.name:
            self._current = row
        return row

    async def exchange_code(self, code: str) -> TokenRow:
        """Redeem an authorization code from the install flow and store the tokens."""
        user_type: Literal["Location", "Company"] = self._oauth.user_type
        reply = await self._exchange(
            {
                "grant_type": "authorization_code",
                "code": code,
                "user_type": user_type,
                "redirect_uri": self._oauth.redirect_uri,
            },
            what="code exchange",
        )
        if user_type == "Company":
            await self.save(agency_key(self.name), reply)
            return await self.save(self.name, await self._from_agency())
        if reply.locationId and reply.locationId != self._location.location_id:
            raise AuthError(
                f"GHL location {self.name!r}: the app was installed on location"
                f" {reply.locationId}, but the config says {self._location.location_id}"
            )
        return await self.save(self.name, reply)

    async def _from_agency(self) -> TokenResponse:
        agency = await self._store.load_token(agency_key(self.name))
        if agency is None or not self._oauth.company_id:
            raise AuthError(
                f"GHL location {self.name!r}: no refresh token and no agency install to derive"
                f" one from; run `bridge auth login --location {self.name}`"
            )
        if not self._fresh(agency):
            refreshed = await self._exchange(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": agency.refresh_token,
                    "user_type": "Company",
                },
                what="agency refresh",
            )
            agency = await self.save(agency_key(self.name), refreshed)
        return await self._call(
            "/oauth/locationToken",
            {"companyId": self._oauth.company_id, "locationId": self._location.location_id},
            headers={
                "Authorization": f"Bearer {agency.access_token}",
                "Version": LOCATION_TOKEN_VERSION,
            },
            what="location token from agency token",
        )

    async def _exchange(self, form: dict[str, str], *, what: str) -> TokenResponse:
        form = {
            "client_id": self._oauth.client_id,
            "client_secret": self._oauth.client_secret.reveal(),
            **form,
        }
        return await self._call("/oauth/token", form, headers={}, what=what)

    async def _call(
        self, path: str, form: dict[str, str], *, headers: dict[str, str], what: str
    ) -> TokenResponse:
        url = self._location.base_url.rstrip("/") + path
        try:
            # Token calls are not counted against the location's API budget: they are
            # rare, and a refresh must not wait behind a backlog of writes.
            response = await request(
                self._session,
                "POST",
                url,
                bucket=None,
                write=True,
                clock=self._clock,
                headers={"Accept": "application/json", **headers},
                data=form,
            )
        except (Retryable, InDoubt) as exc:
            # The stored pair is untouched; the next attempt uses it again. (After an
            # in-doubt refresh GHL may have rotated already: then the next attempt gets
            # invalid_grant and the operator is told to log in again.)
            raise Retryable(f"GHL location {self.name!r}: OAuth {what} failed: {exc}") from None
        except (Rejected, AuthError) as exc:
            raise AuthError(
                f"GHL location {self.name!r}: OAuth {what} was refused ({exc}); the refresh"
                " token is revoked or was already used, or the app credentials are wrong."
                f" Run `bridge auth login --location {self.name}` to install again"
            ) from None
        try:
            return _decode_token(response.body)
        except msgspec.DecodeError:
            raise Retryable(
                f"GHL location {self.name!r}: OAuth {what} returned an unreadable reply"
            ) from None


async def _finish_first(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile, then cancel.

    GHL may rotate the pair as soon as the exchange reaches it, and a rotated pair that is
    not committed means a new login. So a cancelled caller (still holding the refresh
    lock) waits for the exchange and the commit, bounded by the request timeout, and only
    then sees its CancelledError.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # unlike awaiting it, cancelling this leaves it running
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller is gone and gets its cancellation
        raise asyncio.CancelledError
    return task.result()


def token_source(
    location: GhlLocation, *, store: Store, session: aiohttp.ClientSession, clock: Clock
) -> PrivateToken | OAuthTokens:
    """The token source for a configured location."""
    auth = location.auth
    if isinstance(auth, OAuthAuth):
        return OAuthTokens(location, auth, store=store, session=session, clock=clock)
    return PrivateToken(location.name, auth.token.reveal())
