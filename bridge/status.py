"""``bridge status``: what the daemon left in the state file, grouped by GHL location.

Each location gets its health (``ok``, or the error that took it down and since when),
its budgets, the streams of its sources, the outbox of its targets (``ghl:<location>``
and the write-backs ``an:<source>`` / ``ad:<source>`` of its sources) and their dead
letters. Whatever no configured location owns (a source since removed from the config)
is shown apart, and the totals close the report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TextIO

import msgspec

from bridge.app import (
    BUDGET_REPORT_INTERVAL,
    ad_target_name,
    an_target_name,
    ghl_target_name,
    poll_intervals,
    stream_names,
)
from bridge.config import ActionNetworkSource, ActiveDemandSource, Config, OAuthAuth
from bridge.models import BudgetRow, CursorRow
from bridge.observability.service import BEHIND_SLACK
from bridge.store import DeadLetterGroup, HealthRow, Store

_STATES = ("pending", "in_doubt", "in_flight", "done")
_REASONS_SHOWN = 10
# The daemon writes its budgets every second while it runs; budgets this fresh mean it
# runs (the same test as `bridge cursor`'s).
_RUNNING_WITHIN = 3 * BUDGET_REPORT_INTERVAL


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``down`` with why and since when, or ``ok``."""

    state: Literal["ok", "down"] = "ok"
    error: str | None = None
    since: float | None = None
    checked_at: float | None = None


class StreamReport(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    cursor: str | None
    cursor_age_seconds: float | None
    health: Health
    poll_interval: float | None = None
    # Its cursor has not moved for two poll intervals and a bit: the daemon is not
    # keeping up (or not running).
    behind: bool = False
    # No cursor yet while the daemon runs: its first poll is under way. A stream stores
    # its first cursor only when that poll has read everything, which can take hours.
    first_poll: bool = False


class Token(msgspec.Struct, frozen=True, kw_only=True):
    """The location's credential: a private token, or OAuth with the stored pair's expiry."""

    kind: Literal["private", "oauth"]
    stored: bool = True
    expires_at: float | None = None
    refreshed_at: float | None = None


class TargetReport(msgspec.Struct, frozen=True, kw_only=True):
    target: str
    outbox: dict[str, int]
    health: Health


class DeadLetters(msgspec.Struct, kw_only=True):
    total: int = 0
    by_reason: dict[str, int] = msgspec.field(default_factory=dict)


class Group(msgspec.Struct, kw_only=True):
    """One location's share of the state (``location`` None: owned by no location)."""

    location: str | None
    health: Health = msgspec.field(default_factory=Health)
    token: Token | None = None
    budgets: list[BudgetRow] = msgspec.field(default_factory=list)
    streams: list[StreamReport] = msgspec.field(default_factory=list)
    targets: list[TargetReport] = msgspec.field(default_factory=list)
    outbox: dict[str, int] = msgspec.field(default_factory=lambda: dict.fromkeys(_STATES, 0))
    dead_letters: DeadLetters = msgspec.field(default_factory=DeadLetters)

    def empty(self) -> bool:
        return not (self.budgets or self.streams or self.targets or self.dead_letters.total)


class Report(msgspec.Struct, kw_only=True):
    state: str
    locations: list[Group]
    other: Group | None
    outbox: dict[str, int]
    dead_letters: DeadLetters


class Owners:
    """Which location owns a stream, a target or a budget, from the config's names."""

    def __init__(self, config: Config) -> None:
        self.locations = [loc.name for loc in config.ghl.locations]
        sources: list[ActionNetworkSource | ActiveDemandSource] = [
            *config.sources.action_network,
            *config.sources.activedemand,
        ]
        self._sources = {s.name: s.location for s in sources}
        self.targets: dict[str, str] = {ghl_target_name(n): n for n in self.locations}
        self.targets |= {an_target_name(s.name): s.location for s in config.sources.action_network}
        self.targets |= {ad_target_name(s.name): s.location for s in config.sources.activedemand}

    def of_stream(self, stream: str) -> str | None:
        """``<source>.<what>`` belongs to the source's location, ``<location>.messages`` to it."""
        for name, location in self._sources.items():
            if stream.startswith(f"{name}."):
                return location
        return next((n for n in self.locations if stream.startswith(f"{n}.")), None)

    def of_budget(self, row: BudgetRow) -> str | None:
        tenant = row.tenant.split("/")[0]  # a reverse stream's share is "<location>/share"
        if row.api == "ghl":
            return tenant if tenant in self.locations else None
        return self._sources.get(tenant)

    def of_dead_letters(self, group: DeadLetterGroup) -> str | None:
        if group.target is not None:
            return self.targets.get(group.target)
        return self.of_stream(group.stream)  # an event that could not be mapped


async def status(config: Config, out: TextIO, *, as_json: bool) -> int:
    """Write the report (text, or one JSON object); exit status 0."""
    path = Path(config.state.path)
    if not path.exists():  # noqa: ASYNC240 - one stat before any I/O starts
        out.write(f"no state yet at {path}: the daemon has not run\n")
        return 0
    async with Store.open(path) as store:
        report = await _collect(config, store, now=time.time())
    if as_json:
        out.write(msgspec.json.encode(report).decode() + "\n")
    else:
        out.write(render(report, now=time.time()))
    return 0


async def _collect(config: Config, store: Store, *, now: float) -> Report:
    owners = Owners(config)
    groups = {name: Group(location=name) for name in owners.locations}
    other = Group(location=None)
    health = {(row.kind, row.name): row for row in await store.health()}

    def group(location: str | None) -> Group:
        return groups[location] if location is not None and location in groups else other

    cursors = {c.stream: c for c in await store.cursors()}
    intervals = poll_intervals(config)
    budgets = await store.budgets()
    running = any(now - row.updated_at < _RUNNING_WITHIN for row in budgets)
    configured = set(stream_names(config))
    for name in sorted(configured | set(cursors)):
        group(owners.of_stream(name)).streams.append(
            _stream(
                name,
                cursors.get(name),
                health.get(("stream", name)),
                intervals.get(name),
                now,
                polling=running and name in configured,
            )
        )
    for loc in config.ghl.locations:
        groups[loc.name].token = await _token(
            store, loc.name, oauth=isinstance(loc.auth, OAuthAuth)
        )
    by_target = await store.outbox_counts_by_target()
    # The GHL target first: a location's write-backs come after what it receives.
    for target in sorted(set(owners.targets) | set(by_target), key=_ghl_first):
        counts = by_target.get(target, dict.fromkeys(_STATES, 0))
        owner = group(owners.targets.get(target))
        owner.targets.append(
            TargetReport(
                target=target, outbox=counts, health=_health(health.get(("target", target)))
            )
        )
        _add(owner.outbox, counts)
    for location, g in groups.items():
        g.health = _health(health.get(("target", ghl_target_name(location))))
    for row in budgets:
        group(owners.of_budget(row)).budgets.append(row)
    dead = await store.dead_letter_groups()
    for entry in dead:
        _count(group(owners.of_dead_letters(entry)).dead_letters, [entry])
    totals = DeadLetters()
    _count(totals, dead)
    outbox = dict.fromkeys(_STATES, 0)
    for counts in by_target.values():
        _add(outbox, counts)
    return Report(
        state=str(store.path),
        locations=list(groups.values()),
        other=None if other.empty() else other,
        outbox=outbox,
        dead_letters=totals,
    )


def _stream(
    name: str,
    cursor: CursorRow | None,
    down: HealthRow | None,
    interval: float | None,
    now: float,
    *,
    polling: bool,
) -> StreamReport:
    """``polling``: the daemon runs and polls this stream (it is configured)."""
    age = now - cursor.updated_at if cursor is not None else None
    return StreamReport(
        stream=name,
        cursor=cursor.value if cursor is not None else None,
        cursor_age_seconds=age,
        health=_health(down),
        poll_interval=interval,
        behind=age is not None and interval is not None and age > 2 * interval + BEHIND_SLACK,
        first_poll=cursor is None and polling,
    )


async def _token(store: Store, location: str, *, oauth: bool) -> Token:
    if not oauth:
        return Token(kind="private")
    row = await store.load_token(location)
    if row is None:
        return Token(kind="oauth", stored=False)
    return Token(kind="oauth", expires_at=row.expires_at, refreshed_at=row.updated_at)


def _ghl_first(target: str) -> tuple[bool, str]:
    return (not target.startswith(ghl_target_name("")), target)


def _health(row: HealthRow | None) -> Health:
    if row is None:
        return Health()
    return Health(state="down", error=row.error, since=row.since, checked_at=row.checked_at)


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for state, n in counts.items():
        into[state] = into.get(state, 0) + n


def _count(into: DeadLetters, entries: Iterable[DeadLetterGroup]) -> None:
    reasons = Counter(into.by_reason)
    for entry in entries:
        into.total += entry.count
        reasons[entry.error] += entry.count
    into.by_reason = dict(reasons.most_common())


# -- text ---------------------------------------------------------------------------------------


def render(report: Report, *, now: float) -> str:
    """The report as an operator reads it: one block per location, then the totals."""
    lines = [f"state: {report.state}"]
    for g in report.locations:
        lines += _block(f"location {g.location}: {_verdict(g.health, now)}", g, now)
    if report.other is not None:
        lines += _block("not owned by a configured location:", report.other, now)
    lines.append(f"total: outbox {_counts(report.outbox)}")
    lines.append(f"total: dead letters: {report.dead_letters.total}")
    return "\n".join(lines) + "\n"


def _block(title: str, g: Group, now: float) -> list[str]:
    lines = [title]
    if g.token is not None:
        lines += _rows("token", [_token_line(g.token, now)])
    lines += _rows("budgets", [_budget(b, now) for b in g.budgets] or ["none reported yet"])
    lines += _rows("streams", [_stream_line(s, now) for s in g.streams] or ["none"])
    lines += _rows("outbox", [_target_line(t, g.health, now) for t in g.targets] or ["empty"])
    lines.append(f"  dead letters: {g.dead_letters.total}")
    lines += [
        f"    {n:>6} x {reason[:100]}"
        for reason, n in list(g.dead_letters.by_reason.items())[:_REASONS_SHOWN]
    ]
    return lines


def _rows(label: str, rows: list[str]) -> list[str]:
    return [f"  {label if i == 0 else '':<8} {row}" for i, row in enumerate(rows)]


def _verdict(health: Health, now: float) -> str:
    if health.state == "ok":
        return "ok"
    since = health.since or now
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since))
    return f"DOWN since {when}Z ({age(now - since)} ago): {health.error}"


def _stream_line(s: StreamReport, now: float) -> str:
    if s.first_poll:
        line = f"{s.stream:<32} first poll under way (its cursor is stored when it completes)"
    elif s.cursor is None or s.cursor_age_seconds is None:
        line = f"{s.stream:<32} no cursor yet: no poll has completed"
    else:
        line = f"{s.stream:<32} cursor {s.cursor:<28} moved {age(s.cursor_age_seconds)} ago"
        if s.behind and s.poll_interval is not None:
            line += f" — BEHIND (polls every {age(s.poll_interval)})"
    return line if s.health.state == "ok" else f"{line}; {_verdict(s.health, now)}"


def _token_line(token: Token, now: float) -> str:
    if token.kind == "private":
        return "private integration token (does not expire; GHL rejects it once revoked)"
    if not token.stored or token.expires_at is None:
        return "OAuth: none stored yet; run `bridge auth login --location <name>`"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(token.expires_at))
    left = token.expires_at - now
    state = f"in {age(left)}" if left > 0 else f"{age(-left)} ago (refreshed on next use)"
    refreshed = (
        "" if token.refreshed_at is None else f", stored {age(now - token.refreshed_at)} ago"
    )
    return f"OAuth access token expires {when}Z, {state}{refreshed}"


def _target_line(t: TargetReport, location: Health, now: float) -> str:
    line = f"{t.target:<32} {_counts(t.outbox)}"
    if t.health.state == "ok":
        return line
    if t.health == location:  # the location's own target: its title says why already
        return f"{line}; held while the location is down"
    return f"{line}; {_verdict(t.health, now)}"


def _budget(b: BudgetRow, now: float) -> str:
    daily = f"{b.used_today}/{b.daily_cap}" if b.daily_cap else f"{b.used_today}"
    paused = (
        f", paused until {time.strftime('%H:%M:%S', time.gmtime(b.paused_until))}Z"
        if b.paused_until and b.paused_until > now
        else ""
    )
    return (
        f"{b.api + '/' + b.tenant:<32} {b.available}/{b.capacity} free per {b.window:g}s,"
        f" today {daily}{paused}, reported {age(now - b.updated_at)} ago"
    )


def _counts(counts: dict[str, int]) -> str:
    return " · ".join(f"{state.replace('_', ' ')} {n}" for state, n in counts.items())


def age(seconds: float) -> str:
    """A short human duration: ``42s``, ``3.5m``, ``1.2h``, ``2.0d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
