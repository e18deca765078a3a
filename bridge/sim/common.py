"""Pieces every simulator shares: journal, fault injection, rolling limits, validation, serving."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import random
import signal
import socket
import string
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

CONTROL_PREFIX = "/_sim/"

# Set by a simulator's gate so the journal can attribute a request and every response
# (errors included) can carry the sim's headers, e.g. rate-limit counters.
TENANT: web.RequestKey[str] = web.RequestKey("sim_tenant", str)
EXTRA_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("sim_extra_headers", dict)

Clock = Callable[[], float]
Gate = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
ErrorBody = Callable[[int, str], web.StreamResponse]

ALNUM = string.ascii_letters + string.digits


def random_id(rng: random.Random, length: int = 20, alphabet: str = ALNUM) -> str:
    """Return an id drawn from ``rng`` so a seeded simulator hands out the same ids."""
    return "".join(rng.choice(alphabet) for _ in range(length))


# --------------------------------------------------------------------------- journal


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request as the simulator saw it; ``status`` 0 means the connection was reset.

    ``ts`` is when the answer went out (or the connection was dropped) and ``started``
    when the request came in, so overlapping requests can be told apart.
    """

    seq: int
    ts: float
    method: str
    path: str
    route: str
    query: dict[str, str]
    status: int
    tenant: str | None
    body_size: int
    fault: str | None = None
    started: float | None = None


class Journal:
    """Append-only record of API requests, with exact counts even when old entries roll off."""

    def __init__(self, max_entries: int | None = 200_000) -> None:
        self._entries: deque[JournalEntry] = deque(maxlen=max_entries)
        self._by_route: Counter[tuple[str, str]] = Counter()
        self._by_status: Counter[int] = Counter()
        self._seq = 0

    def record(
        self,
        *,
        ts: float,
        method: str,
        path: str,
        route: str,
        query: Mapping[str, str],
        status: int,
        tenant: str | None,
        body_size: int,
        fault: str | None = None,
        started: float | None = None,
    ) -> JournalEntry:
        """Append one entry and update the counters."""
        self._seq += 1
        entry = JournalEntry(
            self._seq,
            ts,
            method,
            path,
            route,
            dict(query),
            status,
            tenant,
            body_size,
            fault,
            started,
        )
        self._entries.append(entry)
        self._by_route[(method, route)] += 1
        self._by_status[status] += 1
        return entry

    @property
    def entries(self) -> list[JournalEntry]:
        """The retained entries, oldest first."""
        return list(self._entries)

    def __len__(self) -> int:
        return sum(self._by_route.values())

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest entry; pass it as ``since`` to read only what follows."""
        return self._seq

    def count(self, method: str | None = None, route: str | None = None) -> int:
        """Requests seen for a method and/or route template (None matches any)."""
        return sum(
            n
            for (m, r), n in self._by_route.items()
            if (method is None or m == method) and (route is None or r == route)
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests seen by (method, route template)."""
        return dict(self._by_route)

    def status_counts(self) -> dict[int, int]:
        """Responses by status code (0 = reset)."""
        return dict(self._by_status)

    def select(
        self,
        *,
        method: str | None = None,
        route: str | None = None,
        tenant: str | None = None,
        since: int = 0,
    ) -> list[JournalEntry]:
        """Retained entries matching every given filter, with ``seq`` greater than ``since``."""
        return [
            e
            for e in self._entries
            if e.seq > since
            and (method is None or e.method == method)
            and (route is None or e.route == route)
            and (tenant is None or e.tenant == tenant)
        ]

    def clear(self) -> None:
        """Forget everything (the sequence keeps counting so ``since`` cursors stay valid)."""
        self._entries.clear()
        self._by_route.clear()
        self._by_status.clear()


# --------------------------------------------------------------------------- faults


@dataclass(slots=True)
class FaultRule:
    """What to do to a share of requests whose method and route match.

    ``route`` is a glob matched against both the route template
    (``/conversations/{conversationId}``) and the concrete path. With ``after`` the handler
    runs first, so the write lands and only the response is delayed, replaced or lost:
    the case a client must treat as "in doubt". A delay without ``after`` is a slow server:
    the handler still runs when the delay ends, even if the client has given up by then.
    ``retry_after`` adds a ``Retry-After`` header (seconds) to an injected status.
    """

    route: str = "*"
    method: str = "*"
    share: float = 1.0
    status: int | None = None
    delay: float = 0.0
    reset: bool = False
    after: bool = False
    times: int | None = None
    retry_after: float | None = None

    @property
    def kind(self) -> str:
        """A short label for the journal: reset, status or delay."""
        if self.reset:
            return "reset"
        if self.status is not None:
            return f"status:{self.status}"
        return "delay"

    def matches(self, method: str, route: str, path: str) -> bool:
        """Whether this rule applies to a request."""
        if self.method not in ("*", method):
            return False
        return fnmatch.fnmatchcase(route, self.route) or fnmatch.fnmatchcase(path, self.route)


_RULE_KEYS = frozenset(FaultRule.__dataclass_fields__)


def fault_rule_from_json(raw: Mapping[str, Any]) -> FaultRule:
    """Build a rule from control-endpoint JSON, refusing unknown keys and bad values."""
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"unknown fault rule keys: {sorted(unknown)}")
    rule = FaultRule(**raw)
    if not 0.0 <= rule.share <= 1.0:
        raise ValueError("share must be within 0..1")
    if rule.status is None and not rule.reset and rule.delay <= 0:
        raise ValueError("a rule needs a status, a delay or reset")
    if rule.status is not None and not 100 <= rule.status <= 599:
        raise ValueError("status must be an HTTP status code")
    if rule.retry_after is not None and (rule.status is None or rule.retry_after < 0):
        raise ValueError("retry_after needs a status and must not be negative")
    return rule


class Faults:
    """Ordered fault rules drawn from a seeded random generator, so runs are reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._rules: list[FaultRule] = []
        self.fired: Counter[str] = Counter()

    @property
    def rules(self) -> list[FaultRule]:
        """The active rules in match order."""
        return list(self._rules)

    def set(self, rules: Iterable[FaultRule], seed: int | None = None) -> None:
        """Replace every rule (and reseed when ``seed`` is given)."""
        self._rules = list(rules)
        if seed is not None:
            self._rng.seed(seed)

    def add(self, rule: FaultRule) -> None:
        """Append a rule; earlier rules win when several match."""
        self._rules.append(rule)

    def clear(self) -> None:
        """Remove every rule."""
        self._rules.clear()

    def fail_next(self, route: str, n: int, status: int = 503, *, method: str = "*") -> None:
        """Answer the next ``n`` matching requests with ``status`` (placed before other rules)."""
        self._rules.insert(0, FaultRule(route=route, method=method, status=status, times=n))

    def reset_next(self, route: str, n: int = 1, *, method: str = "*", after: bool = False) -> None:
        """Drop the connection of the next ``n`` matching requests without a response."""
        self._rules.insert(
            0, FaultRule(route=route, method=method, reset=True, after=after, times=n)
        )

    def pick(self, method: str, route: str, path: str) -> FaultRule | None:
        """Return the rule that fires for this request, if any, consuming one of its ``times``."""
        for rule in self._rules:
            if not rule.matches(method, route, path):
                continue
            # Draw only for partial shares so a share-1 rule never shifts the random sequence.
            if rule.share < 1.0 and self._rng.random() >= rule.share:
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._rules.remove(rule)
            self.fired[rule.kind] += 1
            return rule
        return None


# --------------------------------------------------------------------------- raw items


@dataclass(frozen=True, slots=True)
class RawJson:
    """JSON text served byte for byte, for what no encoder writes (invalid UTF-8, bad JSON)."""

    text: bytes


class RawItems:
    """Items a test serves in place of the simulator's own, keyed by (collection, id).

    A value is any JSON-able object, or :class:`RawJson` for bytes no encoder would write.
    Only what is shown changes: the simulator's own record keeps its place in the
    collection and its paging, so a malformed record sits exactly where a real one would.
    Empty (the default), the simulator serves what it always did.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Any] = {}

    def set(self, collection: str, item_id: object, value: Any) -> None:
        """Serve ``value`` instead of item ``item_id`` of ``collection`` from now on."""
        self._items[(collection, str(item_id))] = value

    def clear(self) -> None:
        """Serve the simulator's own items again."""
        self._items.clear()

    def served(self, collection: str, item_id: object, body: Any) -> Any:
        """``body``, or what a test put in its place."""
        if not self._items:
            return body
        return self._items.get((collection, str(item_id)), body)


def json_bytes(value: Any) -> bytes:
    """``value`` as ``json.dumps`` writes it, with each :class:`RawJson` inside spliced in as is."""
    spliced: dict[str, bytes] = {}

    def default(obj: object) -> str:
        if not isinstance(obj, RawJson):
            raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
        # A fresh random marker cannot collide with text a test or the simulator wrote.
        mark = f"raw-json-{uuid.uuid4().hex}"
        spliced[mark] = obj.text
        return mark

    text = json.dumps(value, default=default).encode()
    for mark, raw in spliced.items():
        text = text.replace(f'"{mark}"'.encode(), raw, 1)
    return text


def json_response(
    value: Any, *, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    """What ``web.json_response`` answers (same bytes and headers), but RawJson-aware."""
    return web.Response(
        body=json_bytes(value), status=status, content_type=content_type, charset="utf-8"
    )


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """The outcome of one request against a limiter, with what to report in headers."""

    allowed: bool
    limit: int
    remaining: int
    window: float
    daily_limit: int | None
    daily_remaining: int | None
    retry_after: float


@dataclass(slots=True)
class _Bucket:
    accepted: deque[float] = field(default_factory=deque)
    attempts: deque[float] = field(default_factory=deque)
    day: int = 0
    day_count: int = 0
    max_accepted: int = 0
    max_attempted: int = 0
    rejected: int = 0


class RollingLimiter:
    """Per key: at most ``limit`` accepted requests in any rolling ``window`` seconds.

    Rejected requests do not use up the window, so a client that backs off recovers as
    soon as the oldest accepted request ages out. The daily cap counts fixed periods of
    ``day`` seconds from the limiter's creation (the sim has no calendar).
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        daily_limit: int | None = None,
        clock: Clock = time.monotonic,
        day: float = 86_400.0,
    ) -> None:
        self.limit = limit
        self.window = window
        self.daily_limit = daily_limit
        self._clock = clock
        self._day = day
        self._origin = clock()
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
        cutoff = now - self.window
        while bucket.accepted and bucket.accepted[0] <= cutoff:
            bucket.accepted.popleft()
        while bucket.attempts and bucket.attempts[0] <= cutoff:
            bucket.attempts.popleft()
        day = int((now - self._origin) // self._day)
        if day != bucket.day:
            bucket.day, bucket.day_count = day, 0
        return bucket

    def _decision(self, bucket: _Bucket, allowed: bool, now: float) -> LimitDecision:
        retry = 0.0
        if not allowed and bucket.accepted:
            retry = max(0.0, bucket.accepted[0] + self.window - now)
        daily_remaining = None
        if self.daily_limit is not None:
            daily_remaining = max(0, self.daily_limit - bucket.day_count)
        return LimitDecision(
            allowed=allowed,
            limit=self.limit,
            remaining=max(0, self.limit - len(bucket.accepted)),
            window=self.window,
            daily_limit=self.daily_limit,
            daily_remaining=daily_remaining,
            retry_after=retry,
        )

    def hit(self, key: str) -> LimitDecision:
        """Count one request for ``key`` and say whether it is admitted."""
        now = self._clock()
        bucket = self._bucket(key, now)
        bucket.attempts.append(now)
        bucket.max_attempted = max(bucket.max_attempted, len(bucket.attempts))
        over_daily = self.daily_limit is not None and bucket.day_count >= self.daily_limit
        if len(bucket.accepted) >= self.limit or over_daily:
            bucket.rejected += 1
            return self._decision(bucket, False, now)
        bucket.accepted.append(now)
        bucket.day_count += 1
        bucket.max_accepted = max(bucket.max_accepted, len(bucket.accepted))
        return self._decision(bucket, True, now)

    def peek(self, key: str) -> LimitDecision:
        """The current state for ``key`` without counting a request."""
        now = self._clock()
        bucket = self._bucket(key, now)
        return self._decision(bucket, len(bucket.accepted) < self.limit, now)

    def max_in_window(self) -> dict[str, int]:
        """Most accepted requests seen in any rolling window, per key."""
        return {k: b.max_accepted for k, b in self._buckets.items()}

    def max_attempted_in_window(self) -> dict[str, int]:
        """Most requests (admitted or not) seen in any rolling window, per key."""
        return {k: b.max_attempted for k, b in self._buckets.items()}

    def rejected(self) -> dict[str, int]:
        """Requests refused, per key."""
        return {k: b.rejected for k, b in self._buckets.items() if b.rejected}


# --------------------------------------------------------------------------- validation


FieldKind = Literal["str", "bool", "num", "strs", "obj", "objs", "any"]


@dataclass(frozen=True, slots=True)
class Field:
    """One declared body property; ``fields`` describes a nested object or list items."""

    kind: FieldKind
    required: bool = False
    choices: tuple[str, ...] = ()
    fields: Mapping[str, Field] | None = None


Schema = Mapping[str, Field]

_TYPE_MESSAGES: dict[str, str] = {
    "str": "{k} must be a string",
    "bool": "{k} must be a boolean value",
    "num": "{k} must be a number conforming to the specified constraints",
    "strs": "{k} must be an array",
    "obj": "{k} must be an object",
    "objs": "{k} must be an array",
}


def _type_ok(kind: FieldKind, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "num":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("strs", "objs"):
        return isinstance(value, list)
    if kind == "obj":
        return isinstance(value, dict)
    return True


def validate(body: Any, schema: Schema, prefix: str = "") -> list[str]:
    """Check a JSON body against a schema; return class-validator style messages (empty = ok).

    Undeclared properties are refused because the live API does so (whitelisting with
    ``forbidNonWhitelisted``), and clients must learn to send only declared fields.
    """
    if not isinstance(body, dict):
        return [f"{prefix or 'body'} must be an object"]
    errors = [f"property {prefix}{k} should not exist" for k in body if k not in schema]
    for key, spec in schema.items():
        name = prefix + key
        value = body.get(key)
        if value is None:
            if spec.required:
                errors.append(f"{name} should not be empty")
                if spec.kind in _TYPE_MESSAGES:
                    errors.append(_TYPE_MESSAGES[spec.kind].format(k=name))
            continue
        if not _type_ok(spec.kind, value):
            errors.append(_TYPE_MESSAGES[spec.kind].format(k=name))
            continue
        if spec.choices and value not in spec.choices:
            errors.append(f"{name} must be one of the following values: {', '.join(spec.choices)}")
        if spec.kind == "strs" and not all(isinstance(v, str) for v in value):
            errors.append(f"each value in {name} must be a string")
        if spec.kind == "obj" and spec.fields is not None:
            errors.extend(validate(value, spec.fields, f"{name}."))
        if spec.kind == "objs" and spec.fields is not None:
            for i, item in enumerate(value):
                errors.extend(validate(item, spec.fields, f"{name}.{i}."))
    return errors


# --------------------------------------------------------------------------- middleware


def default_error_body(status: int, message: str) -> web.StreamResponse:
    """A JSON error in the NestJS shape GHL uses; other sims pass their own."""
    return web.json_response({"statusCode": status, "message": message}, status=status)


def route_template(request: web.Request) -> str:
    """The matched route's template (``/contacts/{contactId}``), or the raw path if none."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return request.path
    return resource.canonical


class _ConnectionDropped(web.HTTPException):
    """Raised after the transport is gone so aiohttp finds nothing to write and logs no error."""

    status_code = 599


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close into a TCP RST, what a crashed proxy looks like to clients.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _ConnectionDropped()


def sim_middleware(
    journal: Journal,
    faults: Faults,
    *,
    gate: Gate | None = None,
    error_body: ErrorBody = default_error_body,
    clock: Clock = time.time,
) -> Middleware:
    """Build the middleware that injects faults, runs the sim's gate, and journals requests.

    Order per request: a fault rule (unless ``after``), then ``gate`` (auth, rate limits;
    it returns a response to stop there, sets ``TENANT`` and ``EXTRA_HEADERS``), then the
    handler, then an ``after`` fault. ``/_sim/`` control requests skip all of it.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        started = clock()
        route = route_template(request)
        rule = faults.pick(request.method, route, request.path)
        status = 500
        try:
            response = await _respond(request, handler, rule, gate, error_body)
            for key, value in request.get(EXTRA_HEADERS, {}).items():
                response.headers[key] = value
            status = response.status
            return response
        except _ConnectionDropped:
            status = 0
            raise
        finally:
            journal.record(
                ts=clock(),
                method=request.method,
                path=request.path,
                route=route,
                query=dict(request.query),
                status=status,
                tenant=request.get(TENANT),
                body_size=request.content_length or 0,
                fault=rule.kind if rule is not None else None,
                started=started,
            )

    return middleware


async def _apply_fault(
    request: web.Request, rule: FaultRule, error_body: ErrorBody
) -> web.StreamResponse | None:
    if rule.delay > 0:
        await asyncio.sleep(rule.delay)
    if rule.reset:
        _drop_connection(request)
    if rule.status is not None:
        response = error_body(rule.status, "Injected fault")
        if rule.retry_after is not None:
            response.headers["Retry-After"] = f"{rule.retry_after:g}"
        return response
    return None


async def _respond(
    request: web.Request,
    handler: Handler,
    rule: FaultRule | None,
    gate: Gate | None,
    error_body: ErrorBody,
) -> web.StreamResponse:
    if rule is not None and not rule.after:
        injected = await _apply_fault(request, rule, error_body)
        if injected is not None:
            return injected
    try:
        response = await gate(request) if gate is not None else None
        if response is None:
            response = await handler(request)
    except web.HTTPException as exc:
        if isinstance(exc, _ConnectionDropped):
            raise
        response = error_body(exc.status, exc.reason)
    if rule is not None and rule.after:
        # Compare with None: a response is a (usually empty, hence falsy) mapping.
        injected = await _apply_fault(request, rule, error_body)
        if injected is not None:
            return injected
    return response


# --------------------------------------------------------------------------- control endpoints


def _entry_json(entry: JournalEntry) -> dict[str, Any]:
    return asdict(entry)


def add_control_routes(
    app: web.Application,
    journal: Journal,
    faults: Faults,
    *,
    stats: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Mount ``/_sim/journal``, ``/_sim/stats``, ``/_sim/faults`` and friends on ``app``."""

    async def get_journal(request: web.Request) -> web.Response:
        q = request.query
        entries = journal.select(
            method=q.get("method"),
            route=q.get("route"),
            tenant=q.get("tenant"),
            since=int(q.get("since", "0")),
        )
        if "limit" in q:
            entries = entries[-int(q["limit"]) :]
        return web.json_response(
            {
                "entries": [_entry_json(e) for e in entries],
                "total": len(journal),
                "lastSeq": journal.last_seq,
            }
        )

    async def get_stats(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "requests": {f"{m} {r}": n for (m, r), n in sorted(journal.counts().items())},
            "statuses": {str(s): n for s, n in sorted(journal.status_counts().items())},
            "total": len(journal),
            "faults_fired": dict(faults.fired),
        }
        if stats is not None:
            body.update(stats())
        return web.json_response(body)

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response({"rules": [asdict(r) for r in faults.rules]})

    async def post_faults(request: web.Request) -> web.Response:
        try:
            raw = await request.json()
            raw_rules = raw["rules"] if isinstance(raw, dict) else raw
            rules = [fault_rule_from_json(r) for r in raw_rules]
            seed = raw.get("seed") if isinstance(raw, dict) else None
            append = bool(raw.get("append")) if isinstance(raw, dict) else False
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if append:
            for rule in rules:
                faults.add(rule)
        else:
            faults.set(rules, seed=seed)
        return await get_faults(request)

    async def reset_faults(request: web.Request) -> web.Response:
        faults.clear()
        return await get_faults(request)

    async def reset_journal(request: web.Request) -> web.Response:
        journal.clear()
        return web.json_response({"total": len(journal)})

    app.router.add_get("/_sim/journal", get_journal)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", post_faults)
    app.router.add_post("/_sim/reset-faults", reset_faults)
    app.router.add_post("/_sim/reset-journal", reset_journal)


# --------------------------------------------------------------------------- serving


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0 = a free port) and yield its base URL."""
    # A short shutdown grace: delay faults would otherwise hold teardown for a minute.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


def run_forever(app: web.Application, port: int, host: str = "127.0.0.1") -> None:
    """Serve ``app`` until SIGINT/SIGTERM, printing the base URL once listening (for the CLI)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve(app, host, port) as base_url:
            # The URL on stdout lets a parent process started with port 0 find the sim.
            print(base_url, flush=True)
            await stop.wait()

    asyncio.run(main())
