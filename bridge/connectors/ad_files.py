"""Capped, streamed downloads for ActiveDEMAND: call recordings and message attachments.

A body is never held whole: it is read in chunks, counted against a byte cap (a
Content-Length over the cap fails before the first byte is read, a chunked body as soon
as the count passes it), and written to ``<dest>.part``, renamed only when complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import anyio

from bridge import rest
from bridge.clock import Clock
from bridge.errors import AuthError, BridgeError, Rejected, Retryable, TokenExpired
from bridge.ratelimit import TokenBucket

__all__ = [
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "DEFAULT_MAX_RECORDING_BYTES",
    "body_chunks",
    "file_where",
    "open_body",
    "refused",
    "save_chunks",
]

# Call audio is about 1 MB a minute; far beyond hours of it is a broken response.
DEFAULT_MAX_RECORDING_BYTES = 100 * 1024 * 1024
# Above what GHL takes as an upload (5 MB by default) with room for a location that
# raises its limit; the flow checks the GHL limit itself.
DEFAULT_MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024

_CHUNK = 64 * 1024
# A session's total timeout would cut off a long but healthy download; what should fail
# is a connection that stops delivering bytes.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)


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


@contextlib.asynccontextmanager
async def open_body(
    session: aiohttp.ClientSession,
    url: str,
    *,
    storage: bool,
    headers: Mapping[str, str] | None,
    params: list[tuple[str, str]] | None,
    bucket: TokenBucket | None,
    clock: Clock,
    where: str,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url`` with its body unread: rest.request() (budget, status table, 429 pause)
    for bodies too big to hold in memory. The response is released on exit.

    ``storage`` marks a file URL from a response rather than the API: a 401/403 there
    means that one link is dead (an expired signature), which is the record's problem,
    so it is Rejected instead of stopping the account with an AuthError.
    """
    # Held until the headers arrive: by then the server has counted the request.
    lease = bucket.lease() if bucket is not None else contextlib.nullcontext()
    try:
        async with lease:
            response = await session.get(
                url, headers=headers, params=params, timeout=_STREAM_TIMEOUT
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise rest.classify_exception(exc, write=False, where=where) from None
    try:
        lowered = {k.lower(): v for k, v in response.headers.items()}
        if bucket is not None:
            rest.apply_rate_headers(bucket, lowered)
        if response.status >= 400:
            error = await _failure(response, lowered, bucket, clock, where)
            if storage and isinstance(error, AuthError):
                status = response.status
                error = Rejected(f"{where}: HTTP {status}: the file link was refused or expired")
            raise error
        yield response
    finally:
        response.release()


async def _failure(
    response: aiohttp.ClientResponse,
    headers: dict[str, str],
    bucket: TokenBucket | None,
    clock: Clock,
    where: str,
) -> BridgeError:
    try:
        body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return rest.classify_exception(exc, write=False, where=where)
    status = response.status
    error = rest.classify(status, headers, body, now=clock.time(), where=where)
    rest.pause_on_429(bucket, status, error, clock)
    if isinstance(error, TokenExpired):
        return refused(where)
    return error or Retryable(f"{where}: HTTP {status}")  # classify maps every status >= 400


async def body_chunks(
    response: aiohttp.ClientResponse, max_bytes: int, where: str
) -> AsyncGenerator[bytes, None]:
    """A response body in chunks; Rejected as soon as it is known to exceed ``max_bytes``."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise Rejected(f"{where}: body is {declared} bytes, over the cap of {max_bytes} bytes")
    total = 0
    try:
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                # Chunked bodies declare no length, so the count is the only guard.
                raise Rejected(f"{where}: body exceeds the cap of {max_bytes} bytes")
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise rest.classify_exception(exc, write=False, where=where) from None


async def save_chunks(chunks: AsyncGenerator[bytes, None], dest: Path) -> int:
    """Write chunks to ``dest.part``, then rename: ``dest`` never holds a partial file,
    and the part file is removed on any failure. Returns the size written."""
    part = anyio.Path(dest.with_name(dest.name + ".part"))
    total = 0
    done = False
    try:
        async with contextlib.aclosing(chunks), await anyio.open_file(part, "wb") as out:
            async for chunk in chunks:
                total += len(chunk)
                await out.write(chunk)
        await part.rename(dest)
        done = True
    finally:
        if not done:
            await part.unlink(missing_ok=True)
    return total
