"""msgspec Structs for Action Network's HAL responses and the normalised events read from them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import msgspec

from bridge import json_items

__all__ = [
    "ACTIVITY_TYPES",
    "Action",
    "ActivityData",
    "ActivityType",
    "EmailAddress",
    "HalPage",
    "Items",
    "Link",
    "Location",
    "OutreachTarget",
    "Person",
    "PersonData",
    "PhoneNumber",
    "PostalAddress",
    "Record",
    "Recurrence",
    "Referrer",
    "Tag",
    "Tagging",
    "Unread",
    "activity_data",
    "an_id",
    "decode_page",
    "href_id",
    "person_data",
    "person_key",
    "read_items",
    "utc",
]

T = TypeVar("T")

ActivityType = Literal["submission", "signature", "attendance", "donation", "outreach"]

# Record type -> (per-person sub-collection, action collection, the record's link to its action).
ACTIVITY_TYPES: dict[ActivityType, tuple[str, str, str]] = {
    "submission": ("submissions", "forms", "osdi:form"),
    "signature": ("signatures", "petitions", "osdi:petition"),
    "attendance": ("attendances", "events", "osdi:event"),
    "donation": ("donations", "fundraising_pages", "osdi:fundraising_page"),
    "outreach": ("outreaches", "advocacy_campaigns", "osdi:advocacy_campaign"),
}

_AN_PREFIX = "action_network:"


class _Wire(msgspec.Struct, frozen=True, kw_only=True):
    """A response shape: unknown fields are ignored because Action Network keeps adding them."""


class Link(_Wire, frozen=True, kw_only=True):
    href: str = ""


# ``curies`` is a list of links, every other relation one link (or a list, for collections).
Links = dict[str, Link | list[Link]]


class HalPage(_Wire, Generic[T], frozen=True, kw_only=True):
    """One page of a collection; ``total_pages`` is absent on ``/people``."""

    page: int | None = None
    per_page: int | None = None
    total_pages: int | None = None
    total_records: int | None = None
    embedded: dict[str, list[T]] | None = msgspec.field(default=None, name="_embedded")


class EmailAddress(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    address: str | None = None
    primary: bool | None = None
    status: str | None = None


class PhoneNumber(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    number: str | None = None
    primary: bool | None = None
    number_type: str | None = None
    status: str | None = None


class Location(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    latitude: float | None = None
    longitude: float | None = None
    accuracy: str | None = None


class PostalAddress(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    primary: bool | None = None
    address_lines: list[str] = []
    locality: str | None = None
    region: str | None = None
    postal_code: str | None = None
    country: str | None = None
    language: str | None = None
    location: Location | None = None


CustomValue = str | int | float | bool | None


class Person(_Wire, frozen=True, kw_only=True):
    """A person resource as ``/people`` returns it."""

    identifiers: list[str] = []
    created_date: datetime | None = None
    modified_date: datetime | None = None
    given_name: str | None = None
    family_name: str | None = None
    email_addresses: list[EmailAddress] = []
    phone_numbers: list[PhoneNumber] = []
    postal_addresses: list[PostalAddress] = []
    languages_spoken: list[str] = []
    custom_fields: dict[str, CustomValue] = {}
    origin_system: str | None = None
    links: Links = msgspec.field(default_factory=dict, name="_links")


class Referrer(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    source: str | None = None
    referrer: str | None = None
    website: str | None = None
    url: str | None = None


class Recurrence(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    recurring: bool | None = None
    period: str | None = None


class OutreachTarget(_Wire, frozen=True, kw_only=True, omit_defaults=True):
    title: str | None = None
    given_name: str | None = None
    family_name: str | None = None
    ocdid: str | None = None


class Record(_Wire, frozen=True, kw_only=True):
    """A submission, signature, attendance, donation or outreach; type-specific fields optional."""

    identifiers: list[str] = []
    created_date: datetime | None = None
    modified_date: datetime | None = None
    comments: str | None = None
    status: str | None = None
    # Documented as a string ("20.01"); a bare number is accepted rather than failing the page.
    amount: str | int | float | None = None
    currency: str | None = None
    recurrence: Recurrence | None = msgspec.field(default=None, name="action_network:recurrence")
    type: str | None = None
    subject: str | None = None
    message: str | None = None
    targets: list[OutreachTarget] = []
    referrer: Referrer | None = msgspec.field(default=None, name="action_network:referrer_data")
    links: Links = msgspec.field(default_factory=dict, name="_links")


class Action(_Wire, frozen=True, kw_only=True):
    """A petition, form, event, fundraising page or advocacy campaign (only what events need)."""

    identifiers: list[str] = []
    title: str | None = None
    browser_url: str | None = None


class Tag(_Wire, frozen=True, kw_only=True):
    identifiers: list[str] = []
    name: str | None = None


class Tagging(_Wire, frozen=True, kw_only=True):
    identifiers: list[str] = []
    links: Links = msgspec.field(default_factory=dict, name="_links")


# --------------------------------------------------------------------------- normalised events


class PersonData(msgspec.Struct, frozen=True, kw_only=True):
    """A person event's ``data``: the profile and its sorted tag names.

    ``modified_date`` is left out on purpose: it bumps whenever the person takes an action,
    and keeping it would change the content hash (and re-send the contact) for every
    signature even when nothing about the person changed.
    """

    id: str
    identifiers: list[str]
    created_date: datetime | None
    given_name: str | None
    family_name: str | None
    email: str | None
    email_status: str | None
    phone: str | None
    phone_status: str | None
    email_addresses: list[EmailAddress]
    phone_numbers: list[PhoneNumber]
    postal_addresses: list[PostalAddress]
    languages_spoken: list[str]
    custom_fields: dict[str, CustomValue]
    tags: list[str]


class ActivityData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An activity event's ``data``: who did what on which action, plus the type's own fields."""

    id: str
    type: ActivityType
    person_key: str
    person_id: str
    action_id: str | None = None
    action_type: str | None = None
    action_title: str | None = None
    action_url: str | None = None
    created_date: datetime | None = None
    modified_date: datetime | None = None
    comments: str | None = None
    status: str | None = None
    amount: str | None = None
    currency: str | None = None
    recurring: bool | None = None
    outreach_type: str | None = None
    subject: str | None = None
    message: str | None = None
    targets: list[OutreachTarget] = []
    referrer: Referrer | None = None


# --------------------------------------------------------------------------- identifiers


def an_id(identifiers: list[str], links: Links | None = None) -> str | None:
    """Action Network's own uuid of a resource: from ``identifiers``, else the self link."""
    for ident in identifiers:
        if ident.startswith(_AN_PREFIX) and len(ident) > len(_AN_PREFIX):
            return ident[len(_AN_PREFIX) :]
    if links is not None:
        found = href_id(links, "self")
        if found is not None:
            return found[1]
    return None


def person_key(source: str, person_id: str) -> str:
    """The source key of a person of the group named ``source``: the id map's key."""
    return f"{source}:person:{person_id}"


def href_id(links: Links, rel: str) -> tuple[str, str] | None:
    """(collection, id) from the last two path segments of a link, e.g. ``("tags", "<uuid>")``.

    Only the path is used: the bridge builds its own URLs from the configured base, so a
    link can never send the key to another host.
    """
    link = links.get(rel)
    if not isinstance(link, Link) or not link.href:
        return None
    path = link.href.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    parts = path.rsplit("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


@overload
def utc(value: datetime) -> datetime: ...
@overload
def utc(value: None) -> None: ...
@overload
def utc(value: datetime | None) -> datetime | None: ...


def utc(value: datetime | None) -> datetime | None:
    """A timestamp as an aware UTC datetime; a naive one is read as UTC, as the API means it."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --------------------------------------------------------------------------- normalisation


def person_data(person: Person, person_id: str, tags: list[str]) -> PersonData:
    """A person event's data: the profile as read, with the primary channels picked out."""
    email = _primary(person.email_addresses)
    phone = _primary(person.phone_numbers)
    return PersonData(
        id=person_id,
        identifiers=sorted(person.identifiers),
        created_date=utc(person.created_date),
        given_name=person.given_name,
        family_name=person.family_name,
        email=email.address if email is not None else None,
        email_status=email.status if email is not None else None,
        phone=phone.number if phone is not None else None,
        phone_status=phone.status if phone is not None else None,
        email_addresses=person.email_addresses,
        phone_numbers=person.phone_numbers,
        postal_addresses=person.postal_addresses,
        languages_spoken=person.languages_spoken,
        custom_fields=person.custom_fields,
        tags=tags,
    )


def activity_data(
    kind: ActivityType,
    record: Record,
    *,
    record_id: str,
    person_id: str,
    person_key: str,
    action_id: str | None,
    action: Action | None,
) -> ActivityData:
    """An activity event's data: the record's own fields plus its action's title and page."""
    amount = record.amount
    return ActivityData(
        id=record_id,
        type=kind,
        person_key=person_key,
        person_id=person_id,
        action_id=action_id,
        action_type=ACTIVITY_TYPES[kind][1],
        action_title=action.title if action is not None else None,
        action_url=action.browser_url if action is not None else None,
        created_date=utc(record.created_date),
        modified_date=utc(record.modified_date),
        comments=record.comments,
        status=record.status,
        amount=None if amount is None else str(amount),
        currency=record.currency,
        recurring=record.recurrence.recurring if record.recurrence is not None else None,
        outreach_type=record.type,
        subject=record.subject,
        message=record.message,
        targets=record.targets,
        referrer=record.referrer,
    )


class _Entry(Protocol):
    @property
    def primary(self) -> bool | None: ...


E = TypeVar("E", bound=_Entry)


def _primary(entries: Sequence[E]) -> E | None:
    """The entry marked primary, else the first (AN keeps one e-mail and one phone)."""
    return next((e for e in entries if e.primary), entries[0] if entries else None)


# --------------------------------------------------------------------------- one item at a time


class Unread(msgspec.Struct, frozen=True, kw_only=True):
    """An item of a page that did not decode: its bytes, why, and its uuid if readable."""

    raw: bytes
    reason: str
    id: str | None


class Items(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A page's items: those that decoded, each with its bytes, and those that did not.

    The bytes are as served, unless msgspec refused the whole page and
    :mod:`bridge.json_items` wrote its items out again. ``where`` names the page
    (``GET /api/v2/people page 3``) for the reasons of dead letters.
    """

    where: str
    read: list[tuple[T, bytes]]
    unread: list[Unread]


_PAGE = msgspec.json.Decoder(HalPage[msgspec.Raw])
_ITEM_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_page(body: bytes) -> HalPage[msgspec.Raw]:
    """A page whose items are left as served, so that one bad item cannot fail the page.

    A body msgspec refuses as a whole is read by :mod:`bridge.json_items`, its items written
    out again to fail (or not) on their own. Raises msgspec.DecodeError (a bad envelope) or
    :class:`~bridge.json_items.Unsplittable` only when what is bad is outside the items.
    """
    try:
        return _PAGE.decode(body)
    except json_items.REFUSED:
        doc = json_items.loads(body)
    if not isinstance(doc, dict):
        raise json_items.Unsplittable("the page is not an object")
    page = _PAGE.decode(json_items.dumps({**doc, "_embedded": None}))
    found = doc.get("_embedded")
    if found is None:
        return page
    if not isinstance(found, dict):
        raise json_items.Unsplittable("_embedded is not an object")
    embedded = {name: [msgspec.Raw(i) for i in json_items.items(found, [name])] for name in found}
    return msgspec.structs.replace(page, embedded=embedded)


def read_items(tp: type[T], served: Sequence[bytes], *, where: str) -> Items[T]:
    """Each item decoded as ``tp`` on its own; one that does not fit is kept, with why."""
    decoder = _ITEM_DECODERS.get(tp)
    if decoder is None:
        decoder = _ITEM_DECODERS[tp] = msgspec.json.Decoder(tp)
    read: list[tuple[T, bytes]] = []
    unread: list[Unread] = []
    for index, raw in enumerate(served, 1):
        try:
            read.append((decoder.decode(raw), raw))
        except json_items.REFUSED as exc:
            reason = f"{where}, item {index} does not decode: {json_items.why(exc, raw)}"
            unread.append(Unread(raw=raw, reason=reason, id=_raw_id(raw)))
    return Items(where=where, read=read, unread=unread)


def _raw_id(raw: bytes) -> str | None:
    """The uuid of an item that did not decode, if its identifiers or self link still read."""
    item = json_items.salvage(raw)
    identifiers, links = item.get("identifiers"), item.get("_links")
    own = links.get("self") if isinstance(links, dict) else None
    href = own.get("href") if isinstance(own, dict) else None
    return an_id(
        [i for i in identifiers if isinstance(i, str)] if isinstance(identifiers, list) else [],
        {"self": Link(href=href)} if isinstance(href, str) else None,
    )
