"""A person's summary: the activity items behind it and the deterministic text they make.

Each person with source activity gets one GHL note that says, in a fixed format, what
they did: petitions, forms, events, donations, outreaches, their tags and the last GHL
conversation activity. Flows send what they learn as items (``ghl.update_summary`` ops);
the GHL target keeps every item in a ledger in the store, renders this text from the
whole ledger and writes the note only when the text changed. ``bridge summarize`` renders
the same text from the same ledger, so it prints exactly what the note holds.

The text is a pure function of the ledger: no clock, stable order, fixed formatting. An
unchanged ledger always gives the same bytes, which is what makes "no change, no call" work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Final, Literal

import msgspec

from bridge.models import marker
from bridge.streams import parse_time

SummaryKind = Literal["petition", "form", "event", "donation", "outreach", "ghl_message"]

ACTIVITY_KINDS: Final = ("petition", "form", "event", "donation", "outreach")
"""Kinds that are source activity: a person needs one of them to get a note."""

LAST_GHL_MESSAGE: Final = "ghl_message:last"
"""The one ledger slot for GHL conversation activity: only the newest shows, so a busy
conversation replaces it instead of growing the ledger by a row per message."""

TITLE_WIDTH: Final = 80
"""Titles (action names, message text) are cut to this many characters in the digest."""

# RSVPs that say the person is not coming do not count as attending.
_NOT_ATTENDING: Final = frozenset({"declined", "cancelled", "canceled"})
_COUNTED: Final = (
    ("petition", "Petitions signed"),
    ("form", "Forms submitted"),
    ("event", "Events attended"),
)


class SummaryItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing a person did, as the summary counts it.

    ``key`` is the activity's stable source key: the ledger holds one item per key, so an
    activity read again (or edited) replaces its item instead of counting twice. ``at``
    is when it happened (ISO 8601; ``summary_op`` normalises it to UTC). ``amount`` is
    decimal text as the source gives it ("25.00"), so totals are exact. ``status`` is an
    RSVP's status: declined and cancelled RSVPs are not counted as attended.
    """

    kind: SummaryKind
    key: str
    at: str | None = None
    title: str | None = None
    amount: str | None = None
    currency: str | None = None
    status: str | None = None


class SummaryState(msgspec.Struct, frozen=True, kw_only=True):
    """What the store holds for one person's summary: its inputs and where it was written.

    ``digest`` is the content hash of the text last written to the note ``note_id``.
    """

    contact_key: str
    title: str
    email: str | None
    tags: tuple[str, ...]
    items: tuple[SummaryItem, ...]
    note_id: str | None = None
    digest: str | None = None


def summary_key(contact_key: str) -> str:
    """The source key of a person's summary op, and what its note's marker line names."""
    return f"{contact_key}:summary"


def ledger_key(item: SummaryItem) -> str:
    """The ledger row an item goes to: its own key, or the one GHL message slot."""
    return LAST_GHL_MESSAGE if item.kind == "ghl_message" else item.key


def normalized(item: SummaryItem) -> SummaryItem:
    """The item with ``at`` as ``YYYY-MM-DDTHH:MM:SSZ`` (None if unreadable), so ledger rows
    compare and sort as text, whichever offset the source wrote."""
    moment = parse_time(item.at)
    at = None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return item if at == item.at else msgspec.structs.replace(item, at=at)


def has_activity(items: Iterable[SummaryItem]) -> bool:
    return any(item.kind in ACTIVITY_KINDS for item in items)


def summary_text(state: SummaryState) -> str:
    """The note body for ``state``: what the note holds and ``bridge summarize`` prints."""
    return render(state.title, state.items, state.tags, contact_key=state.contact_key)


def render(
    title: str, items: Sequence[SummaryItem], tags: Iterable[str], *, contact_key: str
) -> str:
    """The digest: the title line, one line per kind, tags, GHL activity and the marker line.

    The marker line is how the bridge finds its note again after a lost reply; it names
    the person, so the title may change and two sources may share one.
    """
    by_kind: dict[str, list[SummaryItem]] = {}
    for item in items:
        by_kind.setdefault(item.kind, []).append(item)
    events = [e for e in by_kind.get("event", []) if _attending(e)]
    counted = {**by_kind, "event": events}
    lines = [title.strip()]
    lines += [_count_line(label, counted.get(kind, [])) for kind, label in _COUNTED]
    lines.append(_donation_line(by_kind.get("donation", [])))
    lines.append(_count_line("Outreaches", by_kind.get("outreach", [])))
    names = sorted({t.strip() for t in tags if t.strip()})
    lines.append(f"Tags: {', '.join(names) if names else 'none'}")
    last = _latest(by_kind.get("ghl_message", []))
    lines.append(f"Last GHL conversation activity: {_describe(last) if last else 'none'}")
    return "\n".join(lines) + "\n\n" + marker(summary_key(contact_key))


def _count_line(label: str, items: Sequence[SummaryItem]) -> str:
    latest = _latest(items)
    if latest is None:
        return f"{label}: 0"
    described = _describe(latest)
    return f"{label}: {len(items)}" + (f", latest {described}" if described else "")


def _donation_line(donations: Sequence[SummaryItem]) -> str:
    last = _latest(donations)
    if last is None:
        return "Donations: 0"
    totals: dict[str, Decimal] = {}
    for item in donations:
        value = _money(item.amount)
        if value is not None:
            currency = _currency(item.currency)
            totals[currency] = totals.get(currency, Decimal(0)) + value
    text = f"Donations: {len(donations)}"
    if totals:
        text += ", total " + " + ".join(_amount(totals[c], c) for c in sorted(totals))
    parts = [
        _date(last.at),
        _amount(_money(last.amount), _currency(last.currency)),
        _quote(last.title),
    ]
    described = " ".join(p for p in parts if p)
    return text + (f", last {described}" if described else "")


def _latest(items: Sequence[SummaryItem]) -> SummaryItem | None:
    # The key breaks ties, so two items of the same second always pick the same one.
    return max(items, key=lambda i: (i.at or "", i.key), default=None)


def _describe(item: SummaryItem) -> str:
    return " ".join(p for p in (_date(item.at), _quote(item.title)) if p)


def _attending(item: SummaryItem) -> bool:
    return (item.status or "").strip().lower() not in _NOT_ATTENDING


def _date(value: str | None) -> str:
    moment = parse_time(value)
    return "" if moment is None else moment.strftime("%Y-%m-%d")


def _quote(title: str | None) -> str:
    text = " ".join((title or "").split())  # one line, whatever the source put in it
    if not text:
        return ""
    if len(text) > TITLE_WIDTH:
        text = text[: TITLE_WIDTH - 1].rstrip() + "…"
    return f'"{text}"'


def _money(amount: str | None) -> Decimal | None:
    if amount is None:
        return None
    try:
        value = Decimal(amount.strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _currency(code: str | None) -> str:
    return (code or "").strip().upper()


def _amount(value: Decimal | None, currency: str) -> str:
    if value is None:
        return ""
    return f"{value:.2f} {currency}".rstrip()
