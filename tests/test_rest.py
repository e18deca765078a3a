"""Tests for the HTTP plumbing: the status table, transport errors, backoff and request()."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bridge.clock import FakeClock
from bridge.errors import (
    AlreadyExists,
    AuthError,
    BridgeError,
    InDoubt,
    MissingScope,
    Rejected,
    Retryable,
    TokenExpired,
)
from bridge.ratelimit import TokenBucket
from bridge.rest import (
    DEFAULT_429_PAUSE,
    USER_AGENT,
    backoff_delay,
    classify,
    classify_exception,
    make_session,
    parse_retry_after,
    request,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ECHOED_KEY = "an0echoed0key0123456789"
LONG = "x" * 1000
GHL_422 = b'{"statusCode":422,"message":["email must be an email","phone too short"],"error":"x"}'
SCOPE_401 = b'{"statusCode":401,"message":"The token is not authorized for this scope."}'
AN_403 = b'{"error":"API Key invalid or not present: ' + ECHOED_KEY.encode() + b'"}'
LOCATION_403 = b'{"statusCode":403,"message":"The token does not have access to this location."}'
EXISTS = "Conversation with the contact id:abc already exists!"
EXISTS_400 = b'{"statusCode":400,"message":"%s"}' % EXISTS.encode()


def row(
    status: int,
    body: bytes = b"",
    expected: type[BridgeError] | None = None,
    *,
    headers: dict[str, str] | None = None,
    write: bool = False,
    retry_after: float | None = None,
    details: tuple[str, ...] = (),
    id: str,
) -> object:
    return pytest.param(status, headers or {}, body, write, expected, retry_after, details, id=id)


@pytest.mark.parametrize(
    ("status", "headers", "body", "write", "expected", "retry_after", "details"),
    [
        row(200, b'{"ok":true}', None, id="200"),
        row(201, b"", None, write=True, id="201-write"),
        row(304, b"", None, id="304"),
        row(429, b"", Retryable, headers={"Retry-After": "7"}, retry_after=7.0, id="429-seconds"),
        row(
            429,
            b"",
            Retryable,
            headers={"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"},
            write=True,
            retry_after=30.0,
            id="429-date-write",
        ),
        row(429, b'{"error":"Too many"}', Retryable, retry_after=DEFAULT_429_PAUSE, id="429-bare"),
        row(408, b"", Retryable, id="408"),
        row(425, b"", Retryable, write=True, id="425-write"),
        row(500, b'{"statusCode":500,"message":"oops"}', Retryable, id="500-read"),
        row(500, b"", InDoubt, write=True, id="500-write"),
        row(502, b"<html>bad gateway</html>", Retryable, id="502-read"),
        row(
            503,
            b"",
            Retryable,
            headers={"Retry-After": "120"},
            write=True,
            retry_after=120.0,
            id="503-write",
        ),
        row(504, b"", InDoubt, write=True, id="504-write"),
        row(599, b"", Retryable, id="599"),
        row(401, b'{"statusCode":401,"message":"Invalid JWT"}', TokenExpired, id="401-jwt"),
        row(401, b"", TokenExpired, id="401-empty"),
        row(401, SCOPE_401, MissingScope, id="401-scope"),
        row(403, LOCATION_403, AuthError, id="403-location"),
        row(403, AN_403, AuthError, id="403-an-echoes-key"),
        row(
            403,
            b'{"statusCode":403,"message":"No conversation provider found for this message"}',
            Retryable,
            write=True,
            retry_after=10.0,
            id="403-provider-race",
        ),
        row(
            400,
            EXISTS_400,
            AlreadyExists,
            write=True,
            details=(EXISTS,),
            id="400-exists",
        ),
        row(
            400,
            b'{"statusCode":400,"message":"Bad Request"}',
            Rejected,
            details=("Bad Request",),
            id="400",
        ),
        row(
            404,
            b'{"error":"Couldn\'t find person with id = 7"}',
            Rejected,
            details=("Couldn't find person with id = 7",),
            id="404-an",
        ),
        row(409, b"conflict", Rejected, details=("conflict",), id="409-text"),
        row(413, b"", Rejected, id="413-empty"),
        row(415, b"  \n", Rejected, id="415-blank"),
        row(
            422,
            GHL_422,
            Rejected,
            details=("email must be an email", "phone too short"),
            id="422-list",
        ),
        row(
            400,
            b"no api-key=s3cr3tvalue99 here",
            Rejected,
            details=("no api-key=[REDACTED] here",),
            id="400-redacted",
        ),
        row(400, LONG.encode(), Rejected, details=(LONG[:299] + "…",), id="400-truncated"),
        row(418, b'{"message":{"nested":1}}', Rejected, details=('{"nested":1}',), id="418-other"),
    ],
)
def test_classify_maps_each_status_to_the_error_tree(
    status: int,
    headers: dict[str, str],
    body: bytes,
    write: bool,
    expected: type[BridgeError] | None,
    retry_after: float | None,
    details: tuple[str, ...],
) -> None:
    """classify() turns every status/body combination into the right error class and fields."""
    error = classify(status, headers, body, now=NOW, write=write, where="POST /x")
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    if isinstance(error, Retryable):
        assert error.retry_after == retry_after
    if isinstance(error, Rejected):
        assert error.details == details
    message = str(error)
    assert message.startswith(f"POST /x: HTTP {status}")
    assert len(message) <= 300
    assert ECHOED_KEY not in message
    assert "s3cr3tvalue99" not in message


@pytest.mark.parametrize(
    ("exc", "write", "expected"),
    [
        (TimeoutError(), False, Retryable),
        (TimeoutError(), True, InDoubt),
        (aiohttp.ServerTimeoutError("read timeout"), True, InDoubt),
        (aiohttp.SocketTimeoutError("read timeout"), False, Retryable),
        (aiohttp.ServerDisconnectedError(), True, InDoubt),
        (aiohttp.ServerDisconnectedError(), False, Retryable),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), True, InDoubt),
        (
            aiohttp.ClientOSError(32, "Can not write request body for http://h/p?api-key=k3y"),
            True,
            InDoubt,
        ),
        (aiohttp.ClientPayloadError("truncated"), True, InDoubt),
        (aiohttp.ClientPayloadError("truncated"), False, Retryable),
        (
            aiohttp.ConnectionTimeoutError("Connection timeout to host http://h/?api-key=k3y"),
            True,
            Retryable,
        ),
        (ValueError("surprise"), False, Retryable),
        (ValueError("surprise"), True, InDoubt),
    ],
)
def test_classify_exception_maps_transport_failures(
    exc: BaseException, write: bool, expected: type[BridgeError]
) -> None:
    """Failures after sending are in doubt for writes; never-sent failures are always retryable."""
    error = classify_exception(exc, write=write, where="POST /contacts/")
    assert type(error) is expected
    assert str(error).startswith("POST /contacts/: ")
    assert "k3y" not in str(error)


@pytest.mark.parametrize(
    ("value", "cap", "expected"),
    [
        ("7", 300.0, 7.0),
        (" 12 ", 300.0, 12.0),
        ("1.5", 300.0, 1.5),
        ("0", 300.0, 0.0),
        ("-3", 300.0, 0.0),
        ("Thu, 01 Jan 2026 00:01:00 GMT", 300.0, 60.0),
        ("Thu, 01 Jan 2026 00:01:00 -0000", 300.0, 60.0),
        ("Wed, 31 Dec 2025 23:00:00 GMT", 300.0, 0.0),
        ("Fri, 02 Jan 2026 00:00:00 GMT", 300.0, 300.0),
        ("100000", 300.0, 300.0),
        ("100", 30.0, 30.0),
        ("soon", 300.0, None),
        ("inf", 300.0, None),
        ("", 300.0, None),
        (None, 300.0, None),
    ],
)
def test_parse_retry_after(value: str | None, cap: float, expected: float | None) -> None:
    """Retry-After is read as seconds or an HTTP-date, floored at 0, capped, and None if garbage."""
    assert parse_retry_after(value, now=NOW, cap=cap) == expected


def test_backoff_delay_stays_within_full_jitter_bounds() -> None:
    """Delays lie in [0, min(cap, base*2**attempt)], spread out, and never overflow."""
    rng = random.Random(42)
    for attempt in range(40):
        ceiling = min(60.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, base=0.5, cap=60.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2
    assert 0.0 <= backoff_delay(10_000, base=0.5, cap=60.0, rng=rng) <= 60.0


def test_backoff_delay_treats_retry_after_as_a_floor() -> None:
    """Retry-After raises the delay to at least its value and at most max(cap, retry_after)."""
    rng = random.Random(1)
    for attempt in range(12):
        for retry_after in (0.0, 5.0, 120.0):
            delay = backoff_delay(attempt, base=1.0, cap=30.0, retry_after=retry_after, rng=rng)
            assert retry_after <= delay <= max(30.0, retry_after)


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    """A real aiohttp.web server on 127.0.0.1 with one route per behaviour under test."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ua": request.headers.get("User-Agent")})

    async def limited(request: web.Request) -> web.Response:
        return web.json_response({"error": "Too many"}, status=429, headers={"Retry-After": "7"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async def rated(request: web.Request) -> web.Response:
        headers = {
            "X-RateLimit-Remaining": "3",
            "X-RateLimit-Max": "100",
            "X-RateLimit-Interval-Milliseconds": "10000",
            "X-RateLimit-Daily-Remaining": "150000",
        }
        return web.json_response({}, headers=headers)

    async def invalid(request: web.Request) -> web.Response:
        return web.Response(body=GHL_422, status=422, content_type="application/json")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/limited", limited)
    app.router.add_route("*", "/slow", slow)
    app.router.add_get("/rated", rated)
    app.router.add_post("/invalid", invalid)
    # handler_cancellation: the slow handler stops when the timed-out client hangs up.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def ghl_bucket(clock: FakeClock) -> TokenBucket:
    return TokenBucket("ghl", "loc1", capacity=100, window=10.0, daily_cap=200_000, clock=clock)


async def test_request_returns_the_response_and_sends_the_user_agent(base_url: str) -> None:
    """A 200 comes back as a Response with lower-case headers; the User-Agent was sent."""
    clock = FakeClock()
    bucket = ghl_bucket(clock)
    async with make_session() as session:
        response = await request(
            session, "GET", f"{base_url}/ok", bucket=bucket, write=False, clock=clock
        )
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.body == b'{"ua": "%s"}' % USER_AGENT.encode()
    assert bucket.state().available == 99


async def test_request_429_pauses_the_bucket_and_raises_retryable(base_url: str) -> None:
    """A 429 with Retry-After pauses the bucket for that long and raises Retryable."""
    clock = FakeClock()
    bucket = ghl_bucket(clock)
    async with make_session() as session:
        with pytest.raises(Retryable) as caught:
            await request(
                session, "GET", f"{base_url}/limited", bucket=bucket, write=False, clock=clock
            )
    assert caught.value.retry_after == 7.0
    assert bucket.state().paused_until == clock.monotonic() + 7.0


async def test_request_tightens_the_bucket_from_rate_limit_headers(base_url: str) -> None:
    """X-RateLimit-* headers on a response make the bucket stricter."""
    clock = FakeClock()
    bucket = ghl_bucket(clock)
    async with make_session() as session:
        await request(session, "GET", f"{base_url}/rated", bucket=bucket, write=False, clock=clock)
    state = bucket.state()
    assert (state.available, state.used_today) == (3, 50_000)


async def test_request_422_raises_rejected_with_details(base_url: str) -> None:
    """A 422 raises Rejected carrying GHL's list of messages, with no query string in the text."""
    async with make_session() as session:
        with pytest.raises(Rejected) as caught:
            await request(
                session,
                "POST",
                f"{base_url}/invalid?api-key=k3y",
                bucket=None,
                write=True,
                clock=FakeClock(),
                json={},
            )
    assert caught.value.details == ("email must be an email", "phone too short")
    assert str(caught.value).startswith("POST /invalid: HTTP 422: ")


@pytest.mark.parametrize(("write", "expected"), [(True, InDoubt), (False, Retryable)])
async def test_request_timeout_is_in_doubt_for_writes_only(
    base_url: str, write: bool, expected: type[BridgeError]
) -> None:
    """A server slower than the client timeout gives InDoubt for a write, Retryable for a read."""
    async with make_session(timeout=0.3) as session:
        with pytest.raises(BridgeError) as caught:
            await request(
                session, "POST", f"{base_url}/slow", bucket=None, write=write, clock=FakeClock()
            )
    assert type(caught.value) is expected


async def test_request_to_a_refused_port_is_retryable_even_for_a_write() -> None:
    """A refused connection sent nothing, so it is Retryable even for a write; no query shown."""
    # Bound but not listening: connecting is refused, and the port cannot be reused meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with make_session() as session:
            with pytest.raises(BridgeError) as caught:
                await request(
                    session,
                    "POST",
                    f"http://127.0.0.1:{port}/x?api-key=k3y",
                    bucket=None,
                    write=True,
                    clock=FakeClock(),
                )
    assert type(caught.value) is Retryable
    assert "k3y" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
