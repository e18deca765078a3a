"""ActiveDEMAND's downloads (call recordings, message attachments): caps, how file URLs
are named in errors, and how a refusal is read. The streaming is :mod:`bridge.downloads`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp

from bridge import downloads
from bridge.clock import Clock
from bridge.errors import AuthError, BridgeError, Rejected, TokenExpired
from bridge.ratelimit import TokenBucket

__all__ = [
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "DEFAULT_MAX_RECORDING_BYTES",
    "file_where",
    "open_body",
    "refused",
]

# Call audio is about 1 MB a minute; far beyond hours of it is a broken response.
DEFAULT_MAX_RECORDING_BYTES = 100 * 1024 * 1024
# Above what GHL takes as an upload (5 MB by default) with room for a location that
# raises its limit; the flow checks the GHL limit itself.
DEFAULT_MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024


def refused(where: str) -> AuthError:
    """ActiveDEMAND's 401: a refused account or application key (nothing to refresh)."""
    return AuthError(f"{where}: HTTP 401: the API key or application key was refused")


def file_where(url: str) -> str:
    """How errors name a file URL: host and path only, since a signed URL's query is a
    credential; anything but http(s) is refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Rejected(f"attachment URL scheme {parts.scheme!r} is not http(s)")
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"GET {host}{port}{parts.path}"


def open_body(
    session: aiohttp.ClientSession,
    url: str,
    *,
    storage: bool,
    headers: Mapping[str, str] | None,
    params: list[tuple[str, str]] | None,
    bucket: TokenBucket | None,
    clock: Clock,
    where: str,
) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """:func:`bridge.downloads.open_body` with ActiveDEMAND's reading of a refusal.

    A 401 is a refused key (nothing to refresh). ``storage`` marks a file URL from a
    response rather than the API: a 401/403 there means that one link is dead (an expired
    signature), which is the record's problem, so it is Rejected instead of stopping the
    account with an AuthError.
    """

    def translate(error: BridgeError, status: int) -> BridgeError:
        if isinstance(error, TokenExpired):
            error = refused(where)
        if storage and isinstance(error, AuthError):
            return Rejected(f"{where}: HTTP {status}: the file link was refused or expired")
        return error

    return downloads.open_body(
        session,
        url,
        headers=headers,
        params=params,
        bucket=bucket,
        clock=clock,
        where=where,
        translate=translate,
    )
