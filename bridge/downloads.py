"""Capped, streamed downloads: call recordings, attachments, any body too big to hold.

A body is never held whole: it is read in chunks, counted against a byte cap (a
Content-Length over the cap fails before the first byte is read, a chunked body as soon
as the count passes it), and written to ``<dest>.part``, renamed only when complete.
Opening goes through the same budget, rate-limit headers and status table as
:func:`bridge.rest.request`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import anyio

from bridge import rest
from bridge.clock import Clock
from bridge.errors import BridgeError, Rejected, Retryable
from bridge.ratelimit import TokenBucket

_CHUNK = 64 * 1024
# A session's total timeout would cut off a long but healthy download; what should fail
# is a connection that stops delivering bytes.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)

Translate = Callable[[BridgeError, int], BridgeError]
"""Turns the error of a failed open (and its HTTP status) into what the caller raises."""


@contextlib.asynccontextmanager
async def open_body(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str] | None,
    bucket: TokenBucket | None,
    clock: Clock,
    where: str,
    params: list[tuple[str, str]] | None = None,
    translate: Translate | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url`` and yield the 2xx response with its body unread; released on exit."""
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
            raise translate(error, response.status) if translate is not None else error
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


async def save_body(
    response: aiohttp.ClientResponse, dest: Path, *, max_bytes: int, where: str
) -> int:
    """A response body into ``dest``, capped at ``max_bytes``; returns its size."""
    return await save_chunks(body_chunks(response, max_bytes, where), dest)
