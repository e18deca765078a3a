"""In-memory state and rules of the Action Network simulator, with no HTTP in it."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import re
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Protocol, TypeVar

from bridge.sim.common import Clock, Faults, Journal, RawItems, RollingLimiter

MAX_PER_PAGE = 25
EMAIL_STATUSES = frozenset({"subscribed", "unsubscribed", "bouncing", "previous bounce"}) | {
    "spam complaint",
    "previous spam complaint",
}
PHONE_STATUSES = frozenset({"subscribed", "unsubscribed"})
RECORD_FILTERS = frozenset({"identifier", "created_date", "modified_date"})
PEOPLE_FILTERS = RECORD_FILTERS | frozenset(
    {"family_name", "given_name", "email_address", "phone_number", "region", "postal_code"}
)
ACTION_FILTERS = RECORD_FILTERS | {"origin_system", "title"}
EVENT_FILTERS = ACTION_FILTERS | {"start_date", "end_date"}
DATE_FIELDS = frozenset({"created_date", "modified_date", "start_date", "end_date"})
_PERSON_KEYS = frozenset({"given_name", "family_name", "email_addresses", "phone_numbers"})
_PERSON_KEYS |= {"postal_addresses", "languages_spoken", "custom_fields", "identifiers"}
# System-set fields a client may echo back from a GET; they are ignored, not refused.
_PERSON_READ_ONLY = frozenset({"created_date", "modified_date", "_links", "_embedded"})
# Candidate ranges up to this size are listed by sorting; larger ones are walked lazily.
_SORT_LIMIT = 50_000
_CACHE_SIZE = 64


class AnError(Exception):
    """A refusal the routes turn into Action Network's flat ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Kind:
    """One action type and its records: ``petitions`` hold ``signatures``, and so on."""

    actions: str
    records: str
    record: str

    @property
    def action_rel(self) -> str:
        """The record's link to its action, e.g. ``osdi:petition``."""
        return f"osdi:{self.actions[:-1]}"

    @property
    def helper_rel(self) -> str:
        """The action's link to its record helper, e.g. ``osdi:record_signature_helper``."""
        return f"osdi:record_{self.record}_helper"

    @property
    def total_field(self) -> str:
        """The action's record count field; events count RSVPs as ``total_accepted``."""
        return "total_accepted" if self.actions == "events" else f"total_{self.records}"

    @property
    def id_field(self) -> str:
        """The record's convenience id of its action, e.g. ``action_network:petition_id``."""
        return f"action_network:{self.actions[:-1]}_id"


KINDS: dict[str, Kind] = {
    k.actions: k
    for k in (
        Kind("petitions", "signatures", "signature"),
        Kind("forms", "submissions", "submission"),
        Kind("events", "attendances", "attendance"),
        Kind("fundraising_pages", "donations", "donation"),
        Kind("advocacy_campaigns", "outreaches", "outreach"),
    )
}
BY_RECORDS: dict[str, Kind] = {k.records: k for k in KINDS.values()}


# --------------------------------------------------------------------------- dates and filters


def iso(ts: int) -> str:
    """Epoch seconds as the second-precision UTC string Action Network returns."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_date(value: str) -> int:
    """Epoch seconds from a bare date or an ISO-8601 timestamp (naive = UTC); fractions dropped."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise AnError(400, f"Invalid date in filter: {value}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # Stored dates have one-second resolution, so a sub-second bound compares as its second.
    return math.floor(parsed.timestamp())


@dataclass(frozen=True, slots=True)
class Clause:
    """One ``field op 'value'`` term; date values are epoch seconds."""

    field: str
    op: str
    value: str | int


_CLAUSE = re.compile(r"\s*([a-z_]+)\s+(eq|gt|lt)\s+'((?:[^']|'')*)'\s*")
_AND = re.compile(r"and\b")


def parse_filter(text: str | None, allowed: frozenset[str]) -> tuple[Clause, ...]:
    """Parse the documented OData subset: ``eq``/``gt``/``lt``, quoted values, joined by ``and``.

    Anything else (``or``, ``ne``, unquoted values, fields the docs do not list) is refused
    with a 400: live behaviour for those is not documented, and a client must not come to
    depend on a filter that may be silently ignored.
    """
    if text is None or not text.strip():
        return ()
    clauses: list[Clause] = []
    pos = 0
    while True:
        m = _CLAUSE.match(text, pos)
        if m is None:
            raise AnError(400, f"Invalid filter: {text}")
        name, op, raw = m.group(1), m.group(2), m.group(3).replace("''", "'")
        if name not in allowed:
            raise AnError(400, f"Filtering on {name} is not supported")
        if name in DATE_FIELDS:
            clauses.append(Clause(name, op, parse_date(raw)))
        elif op != "eq":
            raise AnError(400, f"Only eq is supported for {name}")
        else:
            clauses.append(Clause(name, op, raw))
        pos = m.end()
        if pos == len(text):
            return tuple(clauses)
        joiner = _AND.match(text, pos)
        if joiner is None:
            raise AnError(400, f"Invalid filter: {text}")
        pos = joiner.end()


def _bounds(clauses: Iterable[Clause], name: str) -> tuple[int | None, int | None]:
    """Exclusive (lower, upper) bounds the clauses put on one date field."""
    lower: int | None = None
    upper: int | None = None
    for c in clauses:
        if c.field != name or not isinstance(c.value, int):
            continue
        lo, hi = {"gt": (c.value, None), "lt": (None, c.value)}.get(
            c.op, (c.value - 1, c.value + 1)
        )
        if lo is not None:
            lower = lo if lower is None else max(lower, lo)
        if hi is not None:
            upper = hi if upper is None else min(upper, hi)
    return lower, upper


def _holds(clause: Clause, value: Any) -> bool:
    if isinstance(clause.value, int):
        if clause.op == "gt":
            return bool(value > clause.value)
        if clause.op == "lt":
            return bool(value < clause.value)
        return bool(value == clause.value)
    if isinstance(value, list):
        return clause.value in value
    return value is not None and value == clause.value


def digits(number: str) -> str:
    """A phone number reduced to its digits, the form matching compares."""
    return re.sub(r"\D", "", number)


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Person:
    """A person as this group sees them; ``index`` is set when the generator made them."""

    id: str
    created: int
    modified: int
    given_name: str | None = None
    family_name: str | None = None
    emails: list[dict[str, Any]] = field(default_factory=list)
    phones: list[dict[str, Any]] = field(default_factory=list)
    addresses: list[dict[str, Any]] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    custom_fields: dict[str, str] = field(default_factory=dict)
    identifiers: list[str] = field(default_factory=list)
    index: int | None = None
    seq: int = 0
    # What filters see until ``indexed_at`` (monotonic): the index lags behind writes.
    prev: Person | None = None
    indexed_at: float = 0.0

    @property
    def email(self) -> str | None:
        """The primary e-mail address, if any."""
        return _primary(self.emails, "address")

    @property
    def phone(self) -> str | None:
        """The primary phone number, if any."""
        return _primary(self.phones, "number")

    def address(self) -> dict[str, Any]:
        """The primary postal address (empty when there is none)."""
        return next(
            (a for a in self.addresses if a.get("primary")),
            self.addresses[0] if self.addresses else {},
        )

    def filter_value(self, name: str) -> Any:
        """The value a people filter compares for ``name``."""
        if name == "identifier":
            return [f"action_network:{self.id}", *self.identifiers]
        if name == "email_address":
            return (self.email or "").lower() or None
        if name == "phone_number":
            return digits(self.phone or "") or None
        if name in ("region", "postal_code"):
            return self.address().get(name)
        return {
            "created_date": self.created,
            "modified_date": self.modified,
            "given_name": self.given_name,
            "family_name": self.family_name,
        }[name]


def _primary(entries: list[dict[str, Any]], key: str) -> str | None:
    chosen = next((e for e in entries if e.get("primary")), entries[0] if entries else None)
    value = chosen.get(key) if chosen else None
    return value if isinstance(value, str) else None


@dataclass(slots=True)
class Action:
    """A petition, form, event, fundraising page or advocacy campaign."""

    id: str
    kind: Kind
    title: str
    created: int
    modified: int
    fields: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


@dataclass(slots=True)
class Activity:
    """One record a person left on an action; ``index`` is set when generated."""

    id: str
    kind: Kind
    action_id: str
    person_id: str
    created: int
    modified: int
    fields: dict[str, Any] = field(default_factory=dict)
    index: int | None = None
    seq: int = 0
    indexed_at: float = 0.0


@dataclass(slots=True)
class Tag:
    """A tag of the group; taggings link it to people."""

    id: str
    name: str
    created: int
    modified: int


@dataclass(slots=True)
class Tagging:
    """One person carrying one tag; ``index`` is the person's index when generated."""

    id: str
    tag_id: str
    person_id: str
    created: int
    modified: int
    index: int | None = None
    seq: int = 0


class Population(Protocol):
    """People, activities and taggings computed from an index instead of stored.

    The generator (``an_data``) implements it. Person ``i`` is created in index order and
    all their dates lie within a bounded slack after ``created_at(i)``; that lets date
    filters shrink to an index range instead of scanning everyone.
    """

    count: int
    per_person: int
    person_slack: int
    activity_slack: int
    salt: int

    def person_id(self, i: int) -> str: ...
    def person_index(self, person_id: str) -> int | None: ...
    def created_at(self, i: int) -> int: ...
    def modified_at(self, i: int) -> int: ...
    def person(self, i: int) -> Person: ...
    def index_of_email(self, address: str) -> int | None: ...
    def index_of_phone(self, number: str) -> int | None: ...
    def index_range(self, lower: int | None, upper: int | None, slack: int) -> tuple[int, int]: ...
    def activity(self, f: int) -> Activity: ...
    def activity_id(self, f: int) -> str: ...
    def activity_index(self, activity_id: str) -> int | None: ...
    def activity_dates(self, f: int) -> tuple[int, int]: ...
    def activity_action(self, f: int) -> str: ...
    def action_family(self, action_id: str) -> tuple[int, int, int] | None: ...
    def tagging(self, i: int) -> Tagging | None: ...
    def tagging_index(self, tagging_id: str) -> int | None: ...
    def tag_family(self, tag_id: str) -> tuple[int, int, int] | None: ...


class Order:
    """A stable pseudo-random bijection of ``range(count)``: where member k sits in listings.

    A small Feistel network over the next even power of two, cycle-walked back into range,
    inverts in O(1) per member, so a million-member family pages without sorting and no
    trace of creation order shows through.
    """

    __slots__ = ("_half", "_keys", "_mask", "count")

    def __init__(self, count: int, salt: int) -> None:
        self.count = count
        bits = max(2, (count - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = (1 << self._half) - 1
        self._keys = tuple(zlib.crc32(f"{salt}:{r}".encode()) for r in range(4))

    def _round(self, key: int, x: int) -> int:
        return ((x * 0x9E3779B1 + key) ^ (x >> 3) ^ key >> 7) * 0x85EBCA6B >> 11 & self._mask

    def _forward(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ self._round(key, right)
        return (left << self._half) | right

    def _backward(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for key in reversed(self._keys):
            left, right = right ^ self._round(key, left), left
        return (left << self._half) | right

    def pos(self, k: int) -> int:
        """Listing position of member ``k``."""
        if self.count <= 1:
            return 0
        x = self._forward(k)
        while x >= self.count:
            x = self._forward(x)
        return x

    def at(self, p: int) -> int:
        """Member at listing position ``p``."""
        if self.count <= 1:
            return 0
        x = self._backward(p)
        while x >= self.count:
            x = self._backward(x)
        return x


T = TypeVar("T")
SortKey = tuple[int, int, int]


def _listing(
    order: Order,
    family: tuple[int, int, int],
    krange: tuple[int, int],
    gen: Callable[[int], T | None],
    stored: list[tuple[SortKey, T]],
) -> Iterator[T]:
    """Generated members k in ``krange`` (``gen`` maps first+step*k to an item or None) merged
    with stored items, in listing order."""
    first, step, _count = family
    klo, khi = krange
    if khi - klo <= _SORT_LIMIT:
        entries = list(stored)
        for k in range(klo, khi):
            item = gen(first + step * k)
            if item is not None:
                entries.append(((order.pos(k), 0, k), item))
        entries.sort(key=itemgetter(0))
        return (item for _, item in entries)

    def generated() -> Iterator[tuple[SortKey, T]]:
        for p in range(order.count):
            k = order.at(p)
            if klo <= k < khi:
                item = gen(first + step * k)
                if item is not None:
                    yield (p, 0, k), item

    merged = heapq.merge(generated(), sorted(stored, key=itemgetter(0)), key=itemgetter(0))
    return (item for _, item in merged)


def _stored_key(seq: int, count: int) -> SortKey:
    # API-created items interleave with generated ones at a hashed position.
    return ((seq * 2654435761) % max(count, 1), 1, seq)


# --------------------------------------------------------------------------- groups


@dataclass(eq=False)
class Group:
    """Everything one API key sees: a group's people, actions, activities and tags."""

    id: str
    key: str
    pop: Population | None = None
    order: Order = field(default_factory=lambda: Order(0, 0))
    people: dict[str, Person] = field(default_factory=dict)
    shadow: dict[int, str] = field(default_factory=dict)
    emails: dict[str, str] = field(default_factory=dict)
    phones: dict[str, str] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    activities: dict[str, Activity] = field(default_factory=dict)
    by_person: dict[str, list[Activity]] = field(default_factory=dict)
    by_action: dict[str, list[Activity]] = field(default_factory=dict)
    tags: dict[str, Tag] = field(default_factory=dict)
    tag_names: dict[str, str] = field(default_factory=dict)
    taggings: dict[str, Tagging] = field(default_factory=dict)
    person_tags: dict[str, dict[str, Tagging]] = field(default_factory=dict)
    tag_members: dict[str, dict[str, Tagging]] = field(default_factory=dict)
    tombstones: set[int] = field(default_factory=set)
    custom_fields: dict[str, int] = field(default_factory=dict)
    # ``version`` moves on every change; ``members`` only when something is added or
    # removed, which is all an unfiltered listing depends on (it resolves items live).
    version: int = 0
    members: int = 0
    pending_until: float = 0.0

    @property
    def generated(self) -> int:
        """How many people the generator provides."""
        return self.pop.count if self.pop is not None else 0


Handle = int | Person
RecordHandle = int | Activity


def _grew(g: Group) -> None:
    g.version += 1
    g.members += 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _salt(text: str) -> int:
    return zlib.crc32(text.encode())


def _entry(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The primary (else first) entry of a person's e-mail/phone/address list in a body."""
    raw = body.get(name)
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise AnError(400, f"{name} must be an array of objects")
    return next((e for e in raw if e.get("primary")), raw[0] if raw else None)


def _str_or_none(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise AnError(400, f"{name} must be a string")
    return value


_ADDRESS_KEYS = frozenset(
    {"address_lines", "locality", "region", "postal_code", "country", "language", "location"}
)
RECORD_BODY_FIELDS: dict[str, frozenset[str]] = {
    "signatures": frozenset({"comments"}),
    "submissions": frozenset(),
    "attendances": frozenset({"status"}),
    "donations": frozenset(
        {"amount", "currency", "recipients", "payment", "action_network:recurrence"}
    ),
    "outreaches": frozenset({"type", "subject", "message", "targets"}),
}


# --------------------------------------------------------------------------- the simulator


class AnSim:
    """Everything one simulated Action Network holds, plus the knobs tests turn.

    ``clock`` (monotonic seconds) drives the rate limit and the index lag, so a test can
    move time without sleeping; ``wall`` (epoch seconds) stamps the dates clients see.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        rate_limit: int = 4,
        rate_window: float = 1.0,
        index_lag: float = 0.0,
        background_delay: float = 0.0,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.index_lag = index_lag
        self.background_delay = background_delay
        self.journal = Journal()
        self.faults = Faults(seed)
        self.limiter = RollingLimiter(rate_limit, rate_window, clock=clock)
        # Counts every request a key sends, including ones a fault answered before the
        # limiter saw them, so ``max_rate_seen`` is what the client really sent.
        self.meter = RollingLimiter(1 << 62, rate_window, clock=clock)
        self.background: dict[str, int] = {"accepted": 0, "applied": 0, "failed": 0}
        # ("people" or a record collection such as "signatures", id) -> the JSON served in
        # that item's place, so a test can make the API answer with a malformed record.
        self.raw = RawItems()
        self.ignored_tag_names: list[str] = []
        self._rng = random.Random(seed)
        self._seq = itertools.count(1)
        self._touches = itertools.count(1)
        self._groups: dict[str, Group] = {}
        self._cache: OrderedDict[tuple[Any, ...], tuple[int, Iterator[Any]]] = OrderedDict()
        self._totals: OrderedDict[tuple[Any, ...], int] = OrderedDict()

    # ----------------------------------------------------------------- setup

    def new_id(self) -> str:
        """A fresh lowercase uuid4 drawn from the seeded generator."""
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def now(self) -> int:
        """Wall-clock epoch seconds: the resolution of every date the API shows."""
        return int(self.wall())

    def add_group(self, key: str | None = None, *, group_id: str | None = None) -> str:
        """Register a group reachable with API key ``key`` (made up when None); returns the key."""
        key = key or f"sim-an-key-{self._rng.getrandbits(96):024x}"
        if key not in self._groups:
            self._groups[key] = Group(group_id or f"group-{len(self._groups) + 1}", key)
        return key

    def set_population(self, key: str, pop: Population) -> None:
        """Serve ``pop``'s generated people, activities and taggings in this group."""
        g = self._group(key)
        g.pop, g.order = pop, Order(pop.count, pop.salt)
        _grew(g)

    def population(self, key: str) -> Population | None:
        """The generated population behind a group, if it was seeded."""
        return self._group(key).pop

    def set_rate_limit(self, limit: int, window: float = 1.0) -> None:
        """Replace the per-key limiter and meter (their counters start over)."""
        self.limiter = RollingLimiter(limit, window, clock=self.clock)
        self.meter = RollingLimiter(1 << 62, window, clock=self.clock)

    def authenticate(self, key: str | None) -> Group | None:
        """The group an ``OSDI-API-Token`` value opens, or None."""
        return self._groups.get(key) if key else None

    def _group(self, key: str) -> Group:
        g = self._groups.get(key)
        if g is None:
            raise KeyError("unknown API key")
        return g

    def _locate(self, person_id: str, key: str | None) -> tuple[Group, Handle]:
        groups = [self._group(key)] if key is not None else list(self._groups.values())
        for g in groups:
            h = self._find(g, person_id)
            if h is not None:
                return g, h
        raise AnError(404, f"Couldn't find person with id = {person_id}")

    # ----------------------------------------------------------------- paging machinery

    def _page(
        self,
        g: Group,
        what: tuple[Any, ...],
        make: Callable[[], Iterator[T]],
        offset: int,
        n: int,
        *,
        live: bool,
    ) -> list[T]:
        # Sequential pages of one query continue the same iterator, so a lazy walk over a
        # million generated people costs O(page) per request instead of O(offset). A
        # ``live`` (unfiltered) walk survives edits, so a client writing while it pages
        # does not turn every page into a fresh walk.
        cacheable = live or self.clock() >= g.pending_until
        ck = (g.id, "members", g.members, *what) if live else (g.id, g.version, *what)
        entry = self._cache.pop(ck, None) if cacheable else None
        if entry is not None and entry[0] == offset:
            it = entry[1]
        else:
            it = make()
            next(itertools.islice(it, offset, offset), None)
        items = list(itertools.islice(it, n))
        if cacheable:
            self._cache[ck] = (offset + n, it)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return items

    def _total(self, g: Group, what: tuple[Any, ...], make: Callable[[], Iterator[Any]]) -> int:
        ck = (g.id, g.version, *what)
        cached = self._totals.get(ck)
        if cached is not None and self.clock() >= g.pending_until:
            return cached
        total = sum(1 for _ in make())
        self._totals[ck] = total
        while len(self._totals) > _CACHE_SIZE:
            self._totals.popitem(last=False)
        return total

    # ----------------------------------------------------------------- people

    def _find(self, g: Group, person_id: str) -> Handle | None:
        p = g.people.get(person_id)
        if p is not None:
            return p
        if g.pop is not None:
            i = g.pop.person_index(person_id)
            if i is not None and i not in g.shadow:
                return i
        return None

    def _resolve(self, g: Group, h: Handle) -> Person:
        if isinstance(h, Person):
            return h
        pid = g.shadow.get(h)
        if pid is not None:
            return g.people[pid]
        assert g.pop is not None
        return g.pop.person(h)

    def _materialize(self, g: Group, h: Handle) -> Person:
        """A generated person becomes a stored one the first time anything changes them."""
        if isinstance(h, Person):
            return h
        p = self._resolve(g, h)
        g.people[p.id] = p
        g.shadow[h] = p.id
        self._index_contacts(g, p, None, None)
        return p

    def _index_contacts(
        self, g: Group, p: Person, old_email: str | None, old_phone: str | None
    ) -> None:
        if old_email and g.emails.get(old_email.lower()) == p.id:
            del g.emails[old_email.lower()]
        if old_phone and g.phones.get(digits(old_phone)) == p.id:
            del g.phones[digits(old_phone)]
        if p.email:
            g.emails[p.email.lower()] = p.id
        if p.phone:
            g.phones[digits(p.phone)] = p.id

    def _by_email(self, g: Group, address: str) -> Handle | None:
        pid = g.emails.get(address.lower())
        if pid is not None:
            return g.people[pid]
        i = g.pop.index_of_email(address) if g.pop is not None else None
        return i if i is not None and i not in g.shadow else None

    def _by_phone(self, g: Group, number: str) -> Handle | None:
        pid = g.phones.get(digits(number))
        if pid is not None:
            return g.people[pid]
        i = g.pop.index_of_phone(number) if g.pop is not None else None
        return i if i is not None and i not in g.shadow else None

    def _view(self, p: Person) -> Person | None:
        """What the filter index holds for ``p`` (None: not indexed yet)."""
        return p if self.clock() >= p.indexed_at else p.prev

    def _snapshot(self, p: Person) -> Person | None:
        if self.index_lag <= 0:
            return None
        return replace(
            p,
            emails=[dict(e) for e in p.emails],
            phones=[dict(e) for e in p.phones],
            addresses=[dict(a) for a in p.addresses],
            custom_fields=dict(p.custom_fields),
            identifiers=list(p.identifiers),
            prev=None,
        )

    def _changed(self, g: Group, p: Person, before: Person | None) -> None:
        g.version += 1
        p.modified = self.now()
        if self.index_lag > 0:
            mono = self.clock()
            if p.indexed_at <= mono:
                p.prev = before  # the index still holds the pre-write state
            p.indexed_at = mono + self.index_lag
            g.pending_until = max(g.pending_until, p.indexed_at)

    def person(self, person_id: str, key: str | None = None) -> Person:
        """The current state of a person (in ``key``'s group, else in any group)."""
        g, h = self._locate(person_id, key)
        return self._resolve(g, h)

    def get_person(self, key: str, person_id: str) -> Person:
        """``GET /people/{id}``."""
        return self.person(person_id, key)

    def list_people(
        self, key: str, clauses: tuple[Clause, ...] = (), offset: int = 0, limit: int = 25
    ) -> list[Person]:
        """One page of ``GET /people``, in the stable unsorted order, filters applied."""
        g = self._group(key)
        norm = tuple(_normalize(c) for c in clauses)
        handles = self._page(
            g, ("people", norm), lambda: self._people_iter(g, norm), offset, limit, live=not norm
        )
        return [self._resolve(g, h) for h in handles]

    def _people_iter(self, g: Group, clauses: tuple[Clause, ...]) -> Iterator[Handle]:
        count = g.generated
        krange = self._people_range(g, clauses) if clauses and g.pop is not None else (0, count)
        # Filtered: every stored person is a candidate wherever their data now puts them.
        # Unfiltered: changed generated people are looked up live at their own position.
        stored: list[tuple[SortKey, Handle]] = [
            (
                (g.order.pos(p.index), 0, p.index)
                if p.index is not None
                else _stored_key(p.seq, count),
                p,
            )
            for p in g.people.values()
            if clauses or p.index is None
        ]

        def gen(i: int) -> Handle | None:
            if i not in g.shadow:
                return i
            return None if clauses else g.people[g.shadow[i]]

        it = _listing(g.order, (0, 1, count), krange, gen, stored)
        if not clauses:
            return it
        return (h for h in it if self._person_matches(g, h, clauses))

    def _people_range(self, g: Group, clauses: tuple[Clause, ...]) -> tuple[int, int]:
        pop = g.pop
        assert pop is not None
        lo, hi = 0, pop.count
        for name, slack in (("created_date", 0), ("modified_date", pop.person_slack)):
            lower, upper = _bounds(clauses, name)
            if lower is not None or upper is not None:
                a, b = pop.index_range(lower, upper, slack)
                lo, hi = max(lo, a), min(hi, b)
        for c in clauses:
            value = str(c.value)
            if c.field == "email_address":
                i = pop.index_of_email(value)
            elif c.field == "phone_number":
                i = pop.index_of_phone(value)
            elif c.field == "identifier":
                i = pop.person_index(value.removeprefix("action_network:"))
                i = i if value.startswith("action_network:") else None
            else:
                continue
            lo, hi = (max(lo, i), min(hi, i + 1)) if i is not None else (0, 0)
        return lo, max(lo, hi)

    def _person_matches(self, g: Group, h: Handle, clauses: tuple[Clause, ...]) -> bool:
        if isinstance(h, Person):
            view = self._view(h)
            return view is not None and all(_holds(c, view.filter_value(c.field)) for c in clauses)
        pop = g.pop
        assert pop is not None
        built: Person | None = None
        for c in clauses:
            if c.field == "created_date":
                value: Any = pop.created_at(h)
            elif c.field == "modified_date":
                value = pop.modified_at(h)
            else:
                built = built or pop.person(h)
                value = built.filter_value(c.field)
            if not _holds(c, value):
                return False
        return True

    def update_person(self, key: str, person_id: str, body: Any) -> Person:
        """``PUT /people/{id}``: sent fields change, custom fields merge, modified_date bumps."""
        g = self._group(key)
        if not isinstance(body, Mapping):
            raise AnError(400, "The request body must be a JSON object")
        h = self._find(g, person_id)
        if h is None:
            raise AnError(404, f"Couldn't find person with id = {person_id}")
        p = self._materialize(g, h)
        before = self._snapshot(p)
        self._apply(g, p, body)
        self._changed(g, p, before)
        return p

    def touch_person(
        self, person_id: str, changes: Mapping[str, Any] | None = None, *, key: str | None = None
    ) -> Person:
        """Change a person as an organiser would in the UI (default: one custom field)."""
        g, h = self._locate(person_id, key)
        p = self._materialize(g, h)
        before = self._snapshot(p)
        self._apply(g, p, changes or {"custom_fields": {"Sim touch": str(next(self._touches))}})
        self._changed(g, p, before)
        return p

    def add_person(self, key: str, **person: Any) -> str:
        """Create (or upsert by e-mail) a person through the signup helper's rules."""
        return self.signup(key, {"person": person}).id

    def signup(self, key: str, body: Any) -> Person:
        """``POST /people``: upsert by e-mail (mobile-only people by phone), then retag."""
        g = self._group(key)
        if not isinstance(body, Mapping) or not isinstance(body.get("person"), Mapping):
            raise AnError(400, "You must specify a person")
        fields: Mapping[str, Any] = body["person"]
        add, remove = _names(body, "add_tags"), _names(body, "remove_tags")
        email_entry, phone_entry = (
            _entry(fields, "email_addresses"),
            _entry(fields, "phone_numbers"),
        )
        email = email_entry.get("address") if email_entry else None
        phone = phone_entry.get("number") if phone_entry else None
        if not isinstance(email, str) and not isinstance(phone, str):
            raise AnError(400, "A person needs an email address or a phone number")
        h = self._by_email(g, email) if isinstance(email, str) else None
        if h is None and not isinstance(email, str) and isinstance(phone, str):
            h = self._by_phone(g, phone)
        if h is None:
            now = self.now()
            p = Person(self.new_id(), now, now, seq=next(self._seq))
            before = None
            self._apply(g, p, fields, new=True)
            g.people[p.id] = p
            _grew(g)
        else:
            p = self._materialize(g, h)
            before = self._snapshot(p)
            self._apply(g, p, fields)
        self._retag(g, p, add, remove)
        self._changed(g, p, before)
        return p

    def _apply(self, g: Group, p: Person, body: Mapping[str, Any], *, new: bool = False) -> None:
        """Validate every field first, then assign, so a refused write changes nothing."""
        unknown = sorted(set(body) - _PERSON_KEYS - _PERSON_READ_ONLY)
        if unknown:
            raise AnError(400, f"Unknown person fields: {', '.join(unknown)}")
        names = {n: _str_or_none(body, n) for n in ("given_name", "family_name") if n in body}
        emails = self._channel(g, p, body, "email_addresses", "address", EMAIL_STATUSES, new)
        phones = self._channel(g, p, body, "phone_numbers", "number", PHONE_STATUSES, new)
        address = _entry(body, "postal_addresses")
        if address is not None and set(address) - _ADDRESS_KEYS - {"primary"}:
            raise AnError(400, "Unknown postal address fields")
        languages = body.get("languages_spoken")
        if languages is not None and not (
            isinstance(languages, list) and all(isinstance(x, str) for x in languages)
        ):
            raise AnError(400, "languages_spoken must be an array of strings")
        custom = body.get("custom_fields")
        if custom is not None and not (
            isinstance(custom, dict)
            and all(isinstance(v, str) or v is None for v in custom.values())
        ):
            raise AnError(400, "custom_fields must be an object of string values")
        idents = body.get("identifiers")
        if idents is not None and not (
            isinstance(idents, list) and all(isinstance(x, str) and ":" in x for x in idents)
        ):
            raise AnError(400, "identifiers must be an array of 'system:id' strings")
        old_email, old_phone = p.email, p.phone
        for name, value in names.items():
            setattr(p, name, value)
        if emails is not None:
            p.emails = emails
        if phones is not None:
            p.phones = phones
        if address is not None:
            merged = {**p.address(), **{k: v for k, v in address.items() if k in _ADDRESS_KEYS}}
            p.addresses = [{"primary": True, **merged}]
        if languages is not None:
            p.languages = list(languages)
        if custom:
            # Unknown names are accepted and catalogued: the API has no other way to create
            # a custom field, and the docs say the signup helper takes any name.
            merged_fields = dict(p.custom_fields)
            for name, value in custom.items():
                if value is None:
                    merged_fields.pop(name, None)
                else:
                    merged_fields[name] = value
                    g.custom_fields.setdefault(name, self.now())
            p.custom_fields = merged_fields
        if idents:
            extra = [x for x in idents if not x.startswith("action_network:")]
            p.identifiers = list(dict.fromkeys([*p.identifiers, *extra]))
        self._index_contacts(g, p, old_email, old_phone)

    def _channel(
        self,
        g: Group,
        p: Person,
        body: Mapping[str, Any],
        name: str,
        value_key: str,
        statuses: frozenset[str],
        new: bool,
    ) -> list[dict[str, Any]] | None:
        """The new one-entry e-mail or phone list a body asks for (None: leave as is)."""
        entry = _entry(body, name)
        if entry is None:
            return None
        value, status = entry.get(value_key), entry.get("status")
        if value is not None and not isinstance(value, str):
            raise AnError(400, f"{name}.{value_key} must be a string")
        if status is not None and status not in statuses:
            raise AnError(400, f"{name}.status must be one of: {', '.join(sorted(statuses))}")
        current = dict(p.emails[0] if name == "email_addresses" and p.emails else {})
        if name == "phone_numbers":
            current = dict(p.phones[0]) if p.phones else {}
        if value is not None:
            if name == "email_addresses":
                if "@" not in value:
                    raise AnError(400, "Invalid email address")
                other = self._by_email(g, value)
            else:
                value = digits(value)
                if not value:
                    raise AnError(400, "Invalid phone number")
                other = None
            other_id = self._id_of(g, other)
            # A collision with someone else's address is refused (live behaviour is not
            # documented; refusing is the safe reading of "dedupe by e-mail").
            if other_id is not None and other_id != p.id:
                raise AnError(400, "That email address is already in use by another person")
            if str(current.get(value_key, "")).lower() != value.lower():
                current[value_key] = value  # matching in another case keeps the stored one
        elif value_key not in current:
            return None  # a bare status with no address to attach it to changes nothing
        if status is not None:
            current["status"] = status
        elif new or "status" not in current:
            current["status"] = "subscribed"
        current["primary"] = True
        if name == "phone_numbers":
            current.setdefault("number_type", "Mobile")
        return [current]

    def _id_of(self, g: Group, h: Handle | None) -> str | None:
        if h is None:
            return None
        if isinstance(h, Person):
            return h.id
        assert g.pop is not None
        return g.pop.person_id(h)

    # ----------------------------------------------------------------- tags and taggings

    def add_tag(
        self, key: str, name: str, *, tag_id: str | None = None, created: int | None = None
    ) -> str:
        """``POST /tags``; an existing name returns the existing tag (tags are unique by name)."""
        g = self._group(key)
        if not isinstance(name, str) or not name.strip():
            raise AnError(400, "A tag needs a name")
        existing = g.tag_names.get(name)
        if existing is not None:
            return existing
        ts = created if created is not None else self.now()
        tag = Tag(tag_id or self.new_id(), name, ts, ts)
        g.tags[tag.id] = tag
        g.tag_names[name] = tag.id
        _grew(g)
        return tag.id

    def get_tag(self, key: str, tag_id: str) -> Tag:
        """``GET /tags/{id}``."""
        tag = self._group(key).tags.get(tag_id)
        if tag is None:
            raise AnError(404, f"Couldn't find tag with id = {tag_id}")
        return tag

    def list_tags(self, key: str, offset: int = 0, limit: int = 25) -> tuple[list[Tag], int]:
        """One page of ``GET /tags`` and the total."""
        tags = list(self._group(key).tags.values())
        return tags[offset : offset + limit], len(tags)

    def _tag_family(self, g: Group, tag_id: str) -> tuple[int, int, int]:
        fam = g.pop.tag_family(tag_id) if g.pop is not None else None
        return fam or (0, 1, 0)

    def _generated_tagging(self, g: Group, p: Person | int) -> Tagging | None:
        i = p if isinstance(p, int) else p.index
        if i is None or g.pop is None or i in g.tombstones:
            return None
        return g.pop.tagging(i)

    def _person_taggings(self, g: Group, h: Handle) -> list[Tagging]:
        pid = self._id_of(g, h) or ""
        found = list(g.person_tags.get(pid, {}).values())
        generated = self._generated_tagging(g, h)
        if generated is not None:
            found.append(generated)
        return found

    def _tag_person(self, g: Group, tag_id: str, p: Person) -> Tagging:
        for t in self._person_taggings(g, p):
            if t.tag_id == tag_id:
                return t
        now = self.now()
        tagging = Tagging(self.new_id(), tag_id, p.id, now, now, seq=next(self._seq))
        g.taggings[tagging.id] = tagging
        g.person_tags.setdefault(p.id, {})[tag_id] = tagging
        g.tag_members.setdefault(tag_id, {})[tagging.id] = tagging
        _grew(g)
        return tagging

    def _untag(self, g: Group, tagging: Tagging) -> None:
        if tagging.index is not None:
            g.tombstones.add(tagging.index)
        else:
            del g.taggings[tagging.id]
            del g.person_tags[tagging.person_id][tagging.tag_id]
            del g.tag_members[tagging.tag_id][tagging.id]
        _grew(g)

    def _retag(self, g: Group, p: Person, add: list[str], remove: list[str]) -> None:
        # Names of tags that do not exist are skipped, as the docs require tags to exist
        # already; they are recorded so a test can see a client relying on auto-creation.
        for name in add:
            tag_id = g.tag_names.get(name)
            if tag_id is None:
                self.ignored_tag_names.append(name)
            else:
                self._tag_person(g, tag_id, p)
        for name in remove:
            tag_id = g.tag_names.get(name)
            for t in self._person_taggings(g, p):
                if t.tag_id == tag_id:
                    self._untag(g, t)

    def add_tagging(self, key: str, tag_id: str, person_id: str) -> Tagging:
        """``POST /tags/{id}/taggings``; tagging someone twice returns the first tagging.

        Taggings do not bump the person's ``modified_date`` (not documented either way; a
        client must not count on seeing tag changes in the people feed).
        """
        g = self._group(key)
        self.get_tag(key, tag_id)
        h = self._find(g, person_id)
        if h is None:
            raise AnError(400, "You must specify a valid person id")
        existing = [t for t in self._person_taggings(g, h) if t.tag_id == tag_id]
        if existing:
            return existing[0]
        return self._tag_person(g, tag_id, self._materialize(g, h))

    def get_tagging(
        self, key: str, tagging_id: str, *, tag_id: str | None = None, person_id: str | None = None
    ) -> Tagging:
        """``GET /tags/{t}/taggings/{id}`` or ``GET /people/{p}/taggings/{id}``."""
        g = self._group(key)
        tagging = g.taggings.get(tagging_id)
        if tagging is None and g.pop is not None:
            i = g.pop.tagging_index(tagging_id)
            if i is not None and i not in g.tombstones:
                tagging = g.pop.tagging(i)
        if (
            tagging is None
            or (tag_id is not None and tagging.tag_id != tag_id)
            or (person_id is not None and tagging.person_id != person_id)
        ):
            raise AnError(404, f"Couldn't find tagging with id = {tagging_id}")
        return tagging

    def remove_tagging(self, key: str, tag_id: str, tagging_id: str) -> None:
        """``DELETE /tags/{t}/taggings/{id}``."""
        g = self._group(key)
        self._untag(g, self.get_tagging(key, tagging_id, tag_id=tag_id))

    def list_taggings(
        self,
        key: str,
        *,
        tag_id: str | None = None,
        person_id: str | None = None,
        offset: int = 0,
        limit: int = 25,
    ) -> tuple[list[Tagging], int]:
        """One page of a tag's or a person's taggings, and the total."""
        g = self._group(key)
        if person_id is not None:
            h = self._find(g, person_id)
            if h is None:
                raise AnError(404, f"Couldn't find person with id = {person_id}")
            found = sorted(self._person_taggings(g, h), key=lambda t: t.id)
            return found[offset : offset + limit], len(found)
        if tag_id is None:
            raise ValueError("tag_id or person_id is required")
        self.get_tag(key, tag_id)
        fam = self._tag_family(g, tag_id)
        explicit = g.tag_members.get(tag_id, {})
        removed = sum(1 for t in self._tombstoned(g) if t.tag_id == tag_id)

        def make() -> Iterator[int | Tagging]:
            stored: list[tuple[SortKey, int | Tagging]] = [
                (_stored_key(t.seq, fam[2]), t) for t in explicit.values()
            ]
            order = Order(fam[2], _salt(tag_id))
            return _listing(order, fam, (0, fam[2]), self._untombstoned(g), stored)

        page = self._page(g, ("taggings", tag_id), make, offset, limit, live=True)
        return [self._resolve_tagging(g, h) for h in page], fam[2] - removed + len(explicit)

    def _resolve_tagging(self, g: Group, h: int | Tagging) -> Tagging:
        if isinstance(h, Tagging):
            return h
        tagging = g.pop.tagging(h) if g.pop is not None else None
        assert tagging is not None
        return tagging

    def _tombstoned(self, g: Group) -> Iterator[Tagging]:
        for i in g.tombstones:
            t = g.pop.tagging(i) if g.pop is not None else None
            if t is not None:
                yield t

    @staticmethod
    def _untombstoned(g: Group) -> Callable[[int], int | None]:
        return lambda i: None if i in g.tombstones else i

    # ----------------------------------------------------------------- actions

    def add_action(
        self,
        key: str,
        kind: str,
        title: str,
        *,
        action_id: str | None = None,
        created: int | None = None,
        **fields: Any,
    ) -> str:
        """Create a petition/form/event/fundraising page/advocacy campaign; returns its id.

        ``kind`` is the collection name (``petitions``...). Extra ``fields`` are shown as
        given; ``start_date``/``end_date`` are epoch seconds.
        """
        g = self._group(key)
        if kind not in KINDS:
            raise ValueError(f"unknown action kind {kind!r}; expected one of {sorted(KINDS)}")
        ts = created if created is not None else self.now()
        action = Action(action_id or self.new_id(), KINDS[kind], title, ts, ts, dict(fields))
        action.seq = next(self._seq)
        g.actions[action.id] = action
        _grew(g)
        return action.id

    def get_action(self, key: str, kind: str, action_id: str) -> Action:
        """``GET /{kind}/{id}``."""
        action = self._group(key).actions.get(action_id)
        if action is None or action.kind.actions != kind:
            raise AnError(404, f"Couldn't find {kind} with id = {action_id}")
        return action

    def list_actions(
        self,
        key: str,
        kind: str,
        clauses: tuple[Clause, ...] = (),
        offset: int = 0,
        limit: int = 25,
    ) -> tuple[list[Action], int]:
        """One page of an action collection (stable hashed order, filtered) and the total."""
        g = self._group(key)
        found = [
            a
            for a in g.actions.values()
            if a.kind.actions == kind and all(_holds(c, _action_value(a, c.field)) for c in clauses)
        ]
        found.sort(key=lambda a: _salt(a.id))
        return found[offset : offset + limit], len(found)

    def action_total(self, key: str, action_id: str) -> int:
        """How many records an action holds (its ``total_*`` field)."""
        g = self._group(key)
        fam = g.pop.action_family(action_id) if g.pop is not None else None
        return (fam[2] if fam else 0) + len(g.by_action.get(action_id, []))

    # ----------------------------------------------------------------- activities

    def add_activity(
        self,
        key: str,
        action_id: str,
        person_id: str,
        *,
        created: int | None = None,
        **fields: Any,
    ) -> str:
        """Record that a person acted (signed, submitted, RSVPed, gave, wrote); returns the id.

        The record's kind follows the action's; ``fields`` are its own JSON fields
        (``comments``, ``status``, ``amount``, ``subject``...). The person's modified_date
        bumps, as it does live whenever someone takes an action.
        """
        g = self._group(key)
        action = g.actions.get(action_id)
        if action is None:
            raise AnError(404, f"Couldn't find action with id = {action_id}")
        _, h = self._locate(person_id, key)
        return self._record(g, action, self._materialize(g, h), created, fields).id

    def _record(
        self, g: Group, action: Action, p: Person, created: int | None, fields: Mapping[str, Any]
    ) -> Activity:
        before = self._snapshot(p)
        ts = created if created is not None else self.now()
        act = Activity(
            self.new_id(), action.kind, action.id, p.id, ts, ts, dict(fields), seq=next(self._seq)
        )
        if self.index_lag > 0:
            act.indexed_at = self.clock() + self.index_lag
            g.pending_until = max(g.pending_until, act.indexed_at)
        g.activities[act.id] = act
        g.by_person.setdefault(p.id, []).append(act)
        g.by_action.setdefault(action.id, []).append(act)
        _grew(g)
        self._changed(g, p, before)
        return act

    def record_helper(self, key: str, kind: str, action_id: str, body: Any) -> Activity:
        """``POST /{kind}/{id}/{records}``: an inline ``person`` (upserted) or a person link."""
        g = self._group(key)
        action = self.get_action(key, kind, action_id)
        if not isinstance(body, Mapping):
            raise AnError(400, "The request body must be a JSON object")
        link = (
            body.get("_links", {}).get("osdi:person", {})
            if isinstance(body.get("_links"), dict)
            else {}
        )
        href = link.get("href") if isinstance(link, dict) else None
        if isinstance(body.get("person"), Mapping):
            tags = {"add_tags": body["add_tags"]} if "add_tags" in body else {}
            p = self.signup(key, {"person": body["person"], **tags})
        elif isinstance(href, str):
            h = self._find(g, href.rstrip("/").rsplit("/", 1)[-1])
            if h is None:
                raise AnError(400, "You must specify a valid person id")
            p = self._materialize(g, h)
            self._retag(g, p, _names(body, "add_tags"), [])
        else:
            raise AnError(400, "You must specify a valid person id")
        allowed = RECORD_BODY_FIELDS[action.kind.records] | {"action_network:referrer_data"}
        fields = {k: v for k, v in body.items() if k in allowed}
        return self._record(g, action, p, None, fields)

    def _resolve_record(self, g: Group, h: RecordHandle) -> Activity:
        if isinstance(h, Activity):
            return h
        assert g.pop is not None
        return g.pop.activity(h)

    def get_record(
        self,
        key: str,
        records: str,
        record_id: str,
        *,
        action_id: str | None = None,
        person_id: str | None = None,
    ) -> Activity:
        """One signature/submission/attendance/donation/outreach, by its own id."""
        g = self._group(key)
        act = g.activities.get(record_id)
        if act is None and g.pop is not None:
            f = g.pop.activity_index(record_id)
            act = g.pop.activity(f) if f is not None else None
        if (
            act is None
            or act.kind.records != records
            or (action_id is not None and act.action_id != action_id)
            or (person_id is not None and act.person_id != person_id)
        ):
            raise AnError(404, f"Couldn't find {records[:-1]} with id = {record_id}")
        return act

    def list_records(
        self,
        key: str,
        records: str,
        *,
        action_id: str | None = None,
        person_id: str | None = None,
        clauses: tuple[Clause, ...] = (),
        offset: int = 0,
        limit: int = 25,
    ) -> tuple[list[Activity], int]:
        """One page of an action's, a person's or (donations) the group's records, and the total."""
        g = self._group(key)
        kind = BY_RECORDS[records]
        if person_id is not None:
            found = [
                a
                for a in self._person_records(g, person_id, kind)
                if self._record_matches(g, a, clauses)
            ]
            found.sort(key=lambda a: a.id)
            return found[offset : offset + limit], len(found)
        if action_id is not None:
            actions = [self.get_action(key, kind.actions, action_id)]
        else:
            actions = [a for a in g.actions.values() if a.kind is kind]

        def make() -> Iterator[RecordHandle]:
            return itertools.chain.from_iterable(
                self._action_records(g, a, clauses) for a in actions
            )

        what = ("records", records, action_id, clauses)
        handles = self._page(g, what, make, offset, limit, live=not clauses)
        page = [self._resolve_record(g, h) for h in handles]
        if clauses:
            return page, self._total(g, what, make)
        return page, sum(self.action_total(key, a.id) for a in actions)

    def _person_records(self, g: Group, person_id: str, kind: Kind) -> list[Activity]:
        h = self._find(g, person_id)
        if h is None:
            raise AnError(404, f"Couldn't find person with id = {person_id}")
        found: list[RecordHandle] = []
        index = h if isinstance(h, int) else h.index
        pop = g.pop
        if index is not None and pop is not None:
            for f in range(index * pop.per_person, (index + 1) * pop.per_person):
                action = g.actions.get(pop.activity_action(f))
                if action is not None and action.kind is kind:
                    found.append(f)
        found.extend(a for a in g.by_person.get(person_id, []) if a.kind is kind)
        return [self._resolve_record(g, x) for x in found]

    def _action_records(
        self, g: Group, action: Action, clauses: tuple[Clause, ...]
    ) -> Iterator[RecordHandle]:
        fam = (g.pop.action_family(action.id) if g.pop is not None else None) or (0, 1, 0)
        krange = self._records_range(g, fam, clauses) if clauses else (0, fam[2])
        stored: list[tuple[SortKey, RecordHandle]] = [
            (_stored_key(a.seq, fam[2]), a) for a in g.by_action.get(action.id, [])
        ]
        order = Order(fam[2], _salt(action.id))
        it = _listing(order, fam, krange, lambda f: f, stored)
        if not clauses:
            return it
        return (h for h in it if self._record_matches(g, h, clauses))

    def _records_range(
        self, g: Group, fam: tuple[int, int, int], clauses: tuple[Clause, ...]
    ) -> tuple[int, int]:
        pop = g.pop
        first, step, count = fam
        if pop is None or count == 0:
            return 0, 0
        lo_i, hi_i = 0, pop.count
        for name in ("created_date", "modified_date"):
            lower, upper = _bounds(clauses, name)
            if lower is not None or upper is not None:
                a, b = pop.index_range(lower, upper, pop.activity_slack)
                lo_i, hi_i = max(lo_i, a), min(hi_i, b)
        flo, fhi = lo_i * pop.per_person, hi_i * pop.per_person
        for c in clauses:
            if c.field == "identifier":
                value = str(c.value)
                f = pop.activity_index(value.removeprefix("action_network:"))
                if f is None or not value.startswith("action_network:"):
                    return 0, 0
                flo, fhi = max(flo, f), min(fhi, f + 1)
        klo = max(0, _ceil_div(flo - first, step))
        khi = min(count, _ceil_div(fhi - first, step))
        return klo, max(klo, khi)

    def _record_matches(self, g: Group, h: RecordHandle, clauses: tuple[Clause, ...]) -> bool:
        if not clauses:
            return True
        if isinstance(h, Activity):
            if self.clock() < h.indexed_at:
                return False
            rid, created, modified = h.id, h.created, h.modified
        else:
            assert g.pop is not None
            rid = g.pop.activity_id(h)
            created, modified = g.pop.activity_dates(h)
        values = {
            "identifier": [f"action_network:{rid}"],
            "created_date": created,
            "modified_date": modified,
        }
        return all(_holds(c, values[c.field]) for c in clauses)

    # ----------------------------------------------------------------- inspection

    def custom_field_names(self, key: str) -> dict[str, int]:
        """The group's custom field catalogue: name -> epoch seconds first seen."""
        return dict(self._group(key).custom_fields)

    def counts(self, key: str) -> dict[str, int]:
        """People, actions, records by kind, tags and taggings in a group."""
        g = self._group(key)
        created = sum(1 for p in g.people.values() if p.index is None)
        result = {"people": g.generated + created, "stored_people": len(g.people)}
        result["actions"] = len(g.actions)
        for kind in KINDS.values():
            result[kind.records] = sum(
                self.action_total(key, a.id) for a in g.actions.values() if a.kind is kind
            )
        result["tags"] = len(g.tags)
        generated = sum(self._tag_family(g, t)[2] for t in g.tags)
        removed = sum(1 for _ in self._tombstoned(g))
        result["taggings"] = generated - removed + len(g.taggings)
        return result

    def max_rate_seen(self, key: str) -> int:
        """Most requests this key sent within any rolling window (429s and faults included)."""
        return self.meter.max_attempted_in_window().get(self._group(key).id, 0)

    def rate_limited(self, key: str) -> int:
        """How many of this key's requests were answered 429."""
        return self.limiter.rejected().get(self._group(key).id, 0)

    def group_id(self, key: str) -> str:
        """The non-secret label of a key's group (used in the journal and stats)."""
        return self._group(key).id

    def stats(self) -> dict[str, Any]:
        """Sim-side counters for ``/_sim/stats`` and tests, keyed by group id, never by key."""
        return {
            "rateLimited": self.limiter.rejected(),
            "maxInWindow": self.limiter.max_in_window(),
            "maxAttemptedInWindow": self.meter.max_attempted_in_window(),
            "groups": {g.id: self.counts(k) for k, g in self._groups.items()},
            "background": dict(self.background),
            "ignoredTagNames": list(self.ignored_tag_names),
        }


def _action_value(a: Action, name: str) -> Any:
    if name == "identifier":
        return [f"action_network:{a.id}"]
    if name == "title":
        return a.title
    if name == "origin_system":
        return a.fields.get("origin_system", "Action Network")
    if name in ("created_date", "modified_date"):
        return a.created if name == "created_date" else a.modified
    return a.fields.get(name)


def _normalize(c: Clause) -> Clause:
    if c.field == "email_address":
        return Clause(c.field, c.op, str(c.value).lower())
    if c.field == "phone_number":
        return Clause(c.field, c.op, digits(str(c.value)))
    return c


def _names(body: Mapping[str, Any], key: str) -> list[str]:
    raw = body.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise AnError(400, f"{key} must be an array of tag names")
    return raw
