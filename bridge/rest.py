"""HTTP plumbing shared by every connector: the session, one status-to-error table, backoff."""

from __future__ import annotations

import contextlib
import email.utils
import random
import re
from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import msgspec

from bridge import __version__
from bridge.clock import Clock
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
from bridge.redact import redact

__all__ = [
    "DEFAULT_429_PAUSE",
    "USER_AGENT",
    "Response",
    "apply_rate_headers",
    "backoff_delay",
    "classify",
    "classify_exception",
    "decode_body",
    "make_session",
    "parse_retry_after",
    "pause_on_429",
    "request",
]

USER_AGENT = f"bridge/{__version__}"

# Whether GHL sends Retry-After on a 429 is "not found" (API_FACTS §5) and AN documents no
# headers at all, so a bare 429 pauses for one whole GHL burst window: after 10 s every
# request the server counted against us has aged out.
DEFAULT_429_PAUSE = 10.0

# GHL answers a message status update with 403 for ~5-10 s after the send while the
# provider hand-off completes (API_FACTS §10.8): that is "too early", not a credential.
_PROVIDER_RACE_DELAY = 10.0

_MAX_TEXT = 300
# Error bodies can be whole HTML pages; only the head is ever shown, so only it is scrubbed.
_MAX_SCAN = 65_536
# Refused before the server acted on it, so even a write can simply be sent again.
_NOT_APPLIED = frozenset({408, 425, 429, 503})

# RFC 9110 says digits only; a sign or a fraction is read rather than thrown away.
_DELTA_SECONDS = re.compile(r"[+-]?\d+(?:\.\d+)?")

_Params = Mapping[str, str | int | float] | Sequence[tuple[str, str | int | float]] | None


class Response(msgspec.Struct, frozen=True):
    """A successful response, fully read; header names are lower-case."""

    status: int
    headers: dict[str, str]
    body: bytes


def make_session(
    *, timeout: float = 30.0, connect_timeout: float = 10.0, limit: int = 100
) -> aiohttp.ClientSession:
    """A session with the bridge's timeouts, connection limit and User-Agent.

    ``timeout`` bounds each request as a whole (connecting included, so the connect
    timeout is never longer); a GHL location's session takes the location's ``timeout``.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(connect_timeout, timeout)),
        headers={"User-Agent": USER_AGENT},
        connector=aiohttp.TCPConnector(limit=limit),
    )


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    write: bool = False,
    where: str = "",
) -> BridgeError | None:
    """Map a response to the error tree (None for success); ``now`` is unix wall time."""
    if status < 400:
        return None
    prefix = f"{where}: HTTP {status}" if where else f"HTTP {status}"
    texts = _body_texts(body)
    # Matching only: raw text never reaches a message without going through redact().
    lowered = " ".join(texts).lower()
    if status in _NOT_APPLIED or status >= 500:
        if write and status not in _NOT_APPLIED:
            # A gateway error or crash after a write reached the server says nothing about
            # whether it was applied; resending a create blindly could duplicate it.
            return InDoubt(f"{prefix} after a write was sent; outcome unknown", status=status)
        retry_after = parse_retry_after(_header(headers, "retry-after"), now=now)
        if status == 429 and retry_after is None:
            retry_after = DEFAULT_429_PAUSE
        return Retryable(_join(prefix, _safe(texts)), retry_after, status=status)
    # 401/403 bodies may echo the credential (Action Network does), so their messages are
    # built from known phrases only.
    if status == 401:
        if "not authorized for this scope" in lowered:
            return MissingScope(
                f"{prefix}: token lacks a required scope (refreshing will not help)"
            )
        return TokenExpired(f"{prefix}: access token expired or invalid")
    if status == 403:
        if "no conversation provider found" in lowered:
            return Retryable(
                f"{prefix}: no conversation provider found for this message yet",
                _PROVIDER_RACE_DELAY,
                status=status,
            )
        if "does not have access to this location" in lowered:
            return AuthError(f"{prefix}: the token does not have access to this location")
        return AuthError(f"{prefix}: forbidden; the credentials lack access")
    details = _safe(texts)
    kind = AlreadyExists if status == 400 and "already exists" in lowered else Rejected
    return kind(_join(prefix, details), details, status=status)


def classify_exception(exc: BaseException, *, write: bool, where: str = "") -> BridgeError:
    """Map a transport exception to the error tree; the message never includes the URL."""
    label = where or "request"
    name = type(exc).__name__
    # A connector error or connect timeout means nothing was sent, so a write is safe to
    # repeat. ClientConnectorError subclasses ClientOSError, so it must be tested first.
    if isinstance(exc, aiohttp.ClientConnectorError):
        # strerror is the OS reason ("Connection refused"); str(exc) would be safe too, but
        # some aiohttp messages embed the full URL, api-key parameter included.
        return Retryable(f"{label}: could not connect ({name}: {exc.strerror}); nothing was sent")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Retryable(f"{label}: connect timed out ({name}); nothing was sent")
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError and aiohttp.ServerTimeoutError
        what = "timed out"
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        what = "lost the connection"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        what = "got a broken response body"
    else:
        what = "failed unexpectedly"
    if write:
        return InDoubt(f"{label}: {what} after a write may have been sent ({name})")
    return Retryable(f"{label}: {what} ({name})")


def parse_retry_after(value: str | None, *, now: float, cap: float = 300.0) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None."""
    text = (value or "").strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return min(max(0.0, seconds), cap)


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None = None, rng: random.Random
) -> float:
    """Full-jitter exponential backoff with Retry-After as a floor.

    The result lies in [0, min(cap, base * 2**attempt)], raised to ``retry_after`` if that
    is larger, so it never exceeds max(cap, retry_after).
    """
    # Past 2**60 the ceiling is the cap anyway; the exponent bound keeps floats finite.
    ceiling = min(cap, base * 2.0 ** min(max(0, attempt), 60))
    delay = rng.uniform(0.0, ceiling)
    return max(delay, retry_after) if retry_after is not None else delay


def apply_rate_headers(bucket: TokenBucket, headers: Mapping[str, str]) -> None:
    """Tighten ``bucket`` from GHL's X-RateLimit-* headers (lower-case names), where present."""
    remaining = _header_int(headers, "x-ratelimit-remaining")
    if remaining is not None:
        interval_ms = _header_int(headers, "x-ratelimit-interval-milliseconds")
        bucket.tighten(
            remaining,
            window=interval_ms / 1000 if interval_ms else None,
            limit=_header_int(headers, "x-ratelimit-max"),
        )
    daily = _header_int(headers, "x-ratelimit-daily-remaining")
    if daily is not None:
        bucket.tighten_daily(daily)


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    bucket: TokenBucket | None,
    write: bool,
    clock: Clock,
    headers: Mapping[str, str] | None = None,
    params: _Params = None,
    json: Any = None,
    data: Any = None,
) -> Response:
    """Spend a token, send, and return the 2xx response or raise its :mod:`bridge.errors` class.

    ``write`` says whether the call changes state on the server, which decides whether an
    interrupted call is merely retryable or in doubt.
    """
    # Method and path only: query strings can carry an api-key.
    where = f"{method.upper()} {urlsplit(url).path or '/'}"
    # The token is held until the reply is in: the server counted the request somewhere
    # in between, so no rolling window at the server can hold more than the budget.
    lease = bucket.lease() if bucket is not None else contextlib.nullcontext()
    try:
        async with (
            lease,
            session.request(
                method, url, headers=headers, params=params, json=json, data=data
            ) as resp,
        ):
            body = await resp.read()
            status = resp.status
            resp_headers = _lower_keys(resp.headers)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        # `from None`: aiohttp puts the full URL, query string included, in some messages.
        raise classify_exception(exc, write=write, where=where) from None
    if bucket is not None:
        apply_rate_headers(bucket, resp_headers)
    error = classify(status, resp_headers, body, now=clock.time(), write=write, where=where)
    if error is None:
        return Response(status=status, headers=resp_headers, body=body)
    pause_on_429(bucket, status, error, clock)
    raise error


def pause_on_429(
    bucket: TokenBucket | None, status: int, error: BridgeError | None, clock: Clock
) -> None:
    """After a 429, hold that bucket alone for Retry-After (or DEFAULT_429_PAUSE)."""
    if status == 429 and bucket is not None and isinstance(error, Retryable):
        bucket.throttle(clock.monotonic() + (error.retry_after or DEFAULT_429_PAUSE))


T = TypeVar("T")
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_body(tp: type[T], response: Response, *, write: bool, where: str) -> T:
    """Decode a 2xx body into ``tp``, with one decoder per type built on first use.

    A body that does not fit is not the record's fault: a read is retried, and a write
    may still have happened, so it is in doubt.
    """
    decoder = _DECODERS.get(tp)
    if decoder is None:
        decoder = _DECODERS[tp] = msgspec.json.Decoder(tp)
    try:
        return cast(T, decoder.decode(response.body))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for bytes that are not UTF-8.
        reason = f"{where}: HTTP {response.status} with an unexpected body ({exc})"
        raise (InDoubt(reason) if write else Retryable(reason)) from None


def _body_texts(body: bytes) -> list[str]:
    """The human-readable messages in an error body: JSON message(s) or error, else the text."""
    raw = body[:_MAX_SCAN]
    if not raw.strip():
        return []
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return [raw.decode("utf-8", "replace").strip()]
    if isinstance(doc, dict):
        # GHL: {"statusCode", "message": str | [str, ...], "error"}; AN: {"error": str}.
        doc = doc.get("message") or doc.get("error") or doc.get("errors") or doc
    if isinstance(doc, list):
        return [item if isinstance(item, str) else _json_text(item) for item in doc]
    if isinstance(doc, str):
        return [doc]
    return [_json_text(doc)]


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _safe(texts: list[str]) -> tuple[str, ...]:
    # Redact before clipping: a clip first could cut a secret so the scrubber misses it.
    return tuple(_clip(redact(text)) for text in texts if text)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _join(prefix: str, details: tuple[str, ...]) -> str:
    return _clip(f"{prefix}: {'; '.join(details)}") if details else f"{prefix} (empty body)"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        lower = key.lower()
        # Repeated headers fold into one comma-separated value, as RFC 9110 allows.
        out[lower] = f"{out[lower]}, {value}" if lower in out else value
    return out
