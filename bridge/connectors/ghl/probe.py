"""Start-up checks of a GHL location: does the token work, and which scopes does it lack.

Read scopes are probed with the cheapest read that needs them. Write scopes are probed
with an empty body: GHL checks the token's scope before validating the body, so a
missing scope answers 401 "not authorized for this scope" while a granted one answers
400/422 for the missing fields, and nothing is written either way.
"""

from __future__ import annotations

import aiohttp
import msgspec

from bridge.clock import Clock
from bridge.connectors.ghl.client import TokenSource
from bridge.errors import AuthError, Rejected, TokenExpired
from bridge.ratelimit import TokenBucket
from bridge.rest import request

CONVERSATIONS = "2021-04-15"
CONTACTS = "2021-07-28"

# (scope, method, path, query, version); the location id is added to query and body.
PROBES: tuple[tuple[str, str, str, dict[str, str], str], ...] = (
    (
        "contacts.readonly",
        "GET",
        "/contacts/search/duplicate",
        {"email": "probe@bridge.invalid"},
        CONTACTS,
    ),
    ("contacts.write", "POST", "/contacts/upsert", {}, CONTACTS),
    ("conversations.readonly", "GET", "/conversations/search", {"limit": "1"}, CONVERSATIONS),
    ("conversations.write", "POST", "/conversations/", {}, CONVERSATIONS),
    # A message that does not exist: 404 once the scope is granted. Not the export, which
    # a token may be refused while it reads messages (the reverse stream falls back then).
    (
        "conversations/message.readonly",
        "GET",
        "/conversations/messages/bridge-scope-probe",
        {},
        CONVERSATIONS,
    ),
    ("conversations/message.write", "POST", "/conversations/messages/inbound", {}, CONVERSATIONS),
)


class ScopeCheck(msgspec.Struct, frozen=True):
    """One scope's verdict; ``fix`` says what the operator should do when it fails."""

    scope: str
    ok: bool
    fix: str = ""


async def check_location(
    session: aiohttp.ClientSession,
    *,
    name: str,
    base_url: str,
    location_id: str,
    auth: TokenSource,
    bucket: TokenBucket | None,
    clock: Clock,
) -> list[ScopeCheck]:
    """Probe every scope the bridge needs; raises AuthError if the token itself is bad."""
    results = []
    for scope, method, path, query, version in PROBES:
        ok = await _probe(
            session,
            method,
            base_url.rstrip("/") + path,
            query={**query, "locationId": location_id} if method == "GET" else None,
            body={} if method == "POST" else None,
            version=version,
            auth=auth,
            bucket=bucket,
            clock=clock,
        )
        fix = "" if ok else f"grant {scope} to the app or private integration of location {name!r}"
        results.append(ScopeCheck(scope, ok, fix))
    return results


async def _probe(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    query: dict[str, str] | None,
    body: dict[str, str] | None,
    version: str,
    auth: TokenSource,
    bucket: TokenBucket | None,
    clock: Clock,
) -> bool:
    token = await auth.token()
    for attempt in range(2):
        headers = {
            "Authorization": f"Bearer {token}",
            "Version": version,
            "Accept": "application/json",
        }
        try:
            await request(
                session,
                method,
                url,
                bucket=bucket,
                write=False,  # an empty body changes nothing; a failure is safe to repeat
                clock=clock,
                headers=headers,
                params=query,
                json=body,
            )
        except TokenExpired:
            if attempt:
                raise AuthError("the access token is rejected even after a refresh") from None
            token = await auth.refresh(token)
            continue
        except AuthError as exc:
            if "scope" in str(exc):
                return False
            raise
        except Rejected as exc:
            # The body was refused, or the probe's made-up id was not found: either way the
            # scope check, which comes first, passed.
            return method == "POST" or exc.status == 404
        return True
    return False  # pragma: no cover - the loop always returns or raises
