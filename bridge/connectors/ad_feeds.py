"""Where ActiveDEMAND's list feeds live and how they page, as config, plus page reading rules.

The conversation, message and history feeds are a PROPOSAL (API_FACTS §3): no API for them
was found, so their paths, envelope, id and change fields and paging parameters are
settings with defaults matching the simulator. When the vendor's collection is seen, the
operator adjusts ``[sources.activedemand.feeds.*]`` instead of the code. Paging of
``contacts.json`` is not documented either (§2), so it is a feed setting too.

This module does no I/O: :func:`read_page` turns one response body into keyed records and
bad ones (dead-letter material), and :class:`PageRule` decides when a walk ends or has
gone wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec

from bridge import json_items
from bridge.errors import Fatal, Retryable
from bridge.models import content_hash
from bridge.streams import parse_time

__all__ = [
    "BadRecord",
    "FeedConfig",
    "FeedPage",
    "Feeds",
    "KeyedRecord",
    "PageRule",
    "parse_time",
    "read_one",
    "read_page",
    "read_record",
]

_PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
_Field = Annotated[str, msgspec.Meta(min_length=1)]
_ENCODER = msgspec.json.Encoder(order="deterministic")


class FeedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One list endpoint: where it is, where its records sit, and how it pages and filters."""

    # Path under the API root, with its format suffix; the messages feed names its
    # conversation as "{conversation_id}".
    path: str
    # Dotted path to the record list inside a JSON object ("data" or "result.items");
    # unset for a bare JSON array, which is what every v1 list seen returns.
    records: str | None = None
    # Field holding a record's id.
    id_field: _Field = "id"
    # Field holding when a record last changed (an ISO timestamp or epoch seconds); unset
    # means change is told by a content hash of the whole record.
    updated_field: str | None = None
    # Query parameter of the 1-based page number; unset means the feed answers in one page.
    page_param: str | None = "page"
    # Query parameter of the page size; unset means the server's own size is used.
    per_page_param: str | None = "per_page"
    # Page size asked for. A page shorter than this ends the walk, so it must not exceed
    # the server's cap (the simulator's is 100): a capped page would look like the last.
    per_page: _PositiveInt = 100
    # Query parameter of the change filter: a timestamp for conversations, the last id
    # seen for messages and histories. Unset means every poll reads the whole feed.
    since_param: str | None = None

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.records is not None and not all(self.records.split(".")):
            raise ValueError(
                f"records must be a dotted path like 'data.items', got {self.records!r}"
            )


def _feed(**fields: Any) -> Callable[[], FeedConfig]:
    """A default factory for a FeedConfig field."""
    return lambda: FeedConfig(**fields)


class Feeds(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every feed of one ActiveDEMAND account; defaults are the simulator's proposed contract."""

    # GET contacts.json: paging not documented (API_FACTS §2); no change filter exists.
    contacts: FeedConfig = msgspec.field(default_factory=_feed(path="/contacts.json"))
    # PROPOSED: ordered by (updated_at, id), updated_since inclusive.
    conversations: FeedConfig = msgspec.field(
        default_factory=_feed(
            path="/conversations.json", updated_field="updated_at", since_param="updated_since"
        )
    )
    # PROPOSED: one conversation's messages, oldest first; since_id exclusive.
    messages: FeedConfig = msgspec.field(
        default_factory=_feed(
            path="/conversations/{conversation_id}/messages.json", since_param="since_id"
        )
    )
    # PROPOSED: read and written at the same path; since_id exclusive.
    histories: FeedConfig = msgspec.field(
        default_factory=_feed(path="/histories.json", since_param="since_id")
    )
    # PROPOSED single-contact resource ("Get a Contact" exists per Make, its path was not
    # found: API_FACTS §1.4, §2), answering one object shaped like one element of
    # contacts.json; "{contact_id}" is filled in. None (from code) or "" (TOML has no null)
    # means the account has no such endpoint, and lookups walk contacts.json instead.
    contact_path: str | None = "/contacts/{contact_id}.json"
    # PROPOSED single-message resources; "{message_id}" is filled in.
    message_status_path: str = "/messages/{message_id}/status.json"
    recording_path: str = "/messages/{message_id}/recording"
    transcription_path: str = "/messages/{message_id}/transcription.json"
    transcription_text_path: str = "/messages/{message_id}/transcription/download"

    def __post_init__(self) -> None:
        if self.contacts.since_param is not None or self.contacts.updated_field is not None:
            # No change filter for contacts was found; a setting that looks like one
            # would quietly do nothing, so it is refused.
            raise ValueError(
                "contacts has no change filter: leave since_param and updated_field unset"
            )
        _check_template("messages.path", self.messages.path, "conversation_id")
        if self.contact_path:
            _check_template("contact_path", self.contact_path, "contact_id")
        for name, path in (
            ("message_status_path", self.message_status_path),
            ("recording_path", self.recording_path),
            ("transcription_path", self.transcription_path),
            ("transcription_text_path", self.transcription_text_path),
        ):
            _check_template(name, path, "message_id")


def _check_template(name: str, path: str, placeholder: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"{name} must start with '/', got {path!r}")
    try:
        filled = path.format_map({placeholder: "1"})
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{name} may use only {{{placeholder}}}, got {path!r}") from None
    if filled == path:
        raise ValueError(f"{name} must contain {{{placeholder}}}, got {path!r}")


# --------------------------------------------------------------------------- reading a page


class KeyedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One record of a feed page with what the feed config says about it.

    ``version`` is the updated field's raw value or, without one, a content hash: equal
    versions mean the record has not changed. ``updated`` is the parsed timestamp. ``raw``
    is the record's JSON (as served unless its page had to be split by
    :mod:`bridge.json_items`), for a dead letter if it later proves unreadable.
    """

    id: str
    version: str
    updated: datetime | None
    record: dict[str, Any]
    raw: bytes


class BadRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A record of a page that cannot be read: its JSON, why, and its id if known.

    ``keyless`` marks a record that is not an object or has no id field at all: what
    every record looks like when the ``records`` or ``id_field`` setting is wrong.
    """

    id: str | None
    raw: bytes
    reason: str
    keyless: bool = False

    @property
    def identity(self) -> str:
        """Its id, or a digest of its bytes: what tells it apart on a page."""
        return self.id if self.id is not None else "#" + content_hash(self.raw)


class FeedPage(msgspec.Struct, frozen=True, kw_only=True):
    """One response of a feed: the records read, and those that could not be."""

    records: list[KeyedRecord]
    bad: list[BadRecord]

    @property
    def ids(self) -> list[str]:
        """Every record's identity, good and bad, for the page rule's size and repeat tests."""
        return [r.id for r in self.records] + [b.identity for b in self.bad]


def read_page(
    body: bytes, feed: FeedConfig, *, label: str, where: str, identified: bool = False
) -> FeedPage:
    """The records of one response body, keyed, and the ones that are bad.

    A record that is not an object, has no usable id, an unreadable updated field, or
    bytes that are not valid JSON (invalid UTF-8, a lone surrogate escape) is a
    :class:`BadRecord`, to be dead-lettered while the rest of the page goes on.

    What only a wrong config (or contract) explains is :class:`Fatal`, since every page
    would repeat it: no object at the ``records`` path, records that are not a list, or
    a non-empty page on which no record is an object carrying the id field at all. That
    last rule cannot tell a wrong ``id_field`` from one broken record alone on its page,
    so once the feed has served an identified record (``identified``, which the caller
    tracks and a wrong setting never lets happen) such a page is read as bad records.

    A body that cannot be split into records at all (cut short, or malformed between
    records) is :class:`Retryable`, as a bad body always was: nothing on it can be
    told apart, so nothing is dead-lettered.
    """
    items = _split(body, feed, label=label, where=where)
    records: list[KeyedRecord] = []
    bad: list[BadRecord] = []
    for raw in items:
        read = read_record(raw, feed, label=label, where=where)
        if isinstance(read, BadRecord):
            bad.append(read)
        else:
            records.append(read)
    if bad and not records and not identified and all(b.keyless for b in bad):
        raise Fatal(
            f"{where}: no record of {len(bad)} has {feed.id_field!r}; "
            f"check feeds.{label}.id_field and feeds.{label}.records"
        )
    return FeedPage(records=records, bad=bad)


def read_record(raw: bytes, feed: FeedConfig, *, label: str, where: str) -> KeyedRecord | BadRecord:
    """One record from its JSON: keyed, or bad with a one-line reason."""
    try:
        item = _RECORD.decode(raw)
    except json_items.REFUSED as exc:
        # The id only if it is clean text: it becomes the dead letter's key.
        record_id = _usable_id(json_items.salvage(raw).get(feed.id_field))
        named = record_id if record_id is not None else "(id unreadable)"
        reason = f"{where}: {label} record {named}: {json_items.why(exc, raw)}"
        return BadRecord(id=record_id, raw=raw, reason=reason)
    if not isinstance(item, dict):
        return BadRecord(
            id=None,
            raw=raw,
            reason=f"{where}: a {label} record is {_kind(item)}, not an object",
            keyless=True,
        )
    if feed.id_field not in item:
        return BadRecord(
            id=None,
            raw=raw,
            reason=f"{where}: a {label} record has no {feed.id_field!r} field",
            keyless=True,
        )
    record_id = _usable_id(item[feed.id_field])
    if record_id is None:
        return BadRecord(
            id=None,
            raw=raw,
            reason=f"{where}: a {label} record's {feed.id_field!r} is "
            f"{_kind(item[feed.id_field])}, not an id",
        )
    updated: datetime | None = None
    if feed.updated_field is not None:
        value = item.get(feed.updated_field)
        updated = _time(value)
        if updated is None and value is not None:
            return BadRecord(
                id=record_id,
                raw=raw,
                reason=f"{where}: {label} record {record_id}: {feed.updated_field!r} is "
                f"{_kind(value)} that is not a timestamp",
            )
        version = "" if value is None else str(value)
    else:
        version = content_hash(_ENCODER.encode(item))
    return KeyedRecord(id=record_id, version=version, updated=updated, record=item, raw=raw)


def read_one(body: bytes, feed: FeedConfig, *, label: str, where: str) -> KeyedRecord | BadRecord:
    """A single-record answer (one bare object), read like one element of a page.

    A body that is not one JSON value at all is :class:`Retryable`, as a garbled list is.
    """
    read = read_record(body, feed, label=label, where=where)
    if isinstance(read, BadRecord) and not read.keyless:
        try:
            json_items.loads(body)
        except json_items.Unsplittable as exc:
            raise Retryable(f"{where}: the body is not one JSON value ({exc})") from None
    return read


_RECORD = msgspec.json.Decoder()
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_LIST = msgspec.json.Decoder(list[msgspec.Raw] | None)


def _split(body: bytes, feed: FeedConfig, *, label: str, where: str) -> list[bytes]:
    """Each record's JSON from the list at the feed's ``records`` path.

    A body msgspec refuses as a whole is split by :mod:`bridge.json_items`, each record
    then judged on its own. Such a body cannot show a config mismatch (it may be a
    proxy's error page), so its shape is never Fatal, only unsplittable.
    """
    parts = feed.records.split(".") if feed.records else []
    try:
        doc: bytes | msgspec.Raw = body
        for part in parts:
            try:
                members = _OBJECT.decode(doc)
            except msgspec.ValidationError:
                raise _no_records(feed, label, where) from None
            if part not in members:
                raise _no_records(feed, label, where)
            doc = members[part]
        try:
            found = _LIST.decode(doc)
        except msgspec.ValidationError:
            raise _not_a_list(feed, label, where) from None
        return [] if found is None else [bytes(item) for item in found]
    except json_items.REFUSED:
        try:
            return json_items.items(json_items.loads(body), parts)
        except json_items.Unsplittable as exc:
            reason = f"{where}: the body cannot be split into records ({exc})"
            raise Retryable(reason) from None


def _usable_id(value: object) -> str | None:
    if value is None or isinstance(value, bool | dict | list) or value == "":
        return None
    return str(value)


def _time(value: object) -> datetime | None:
    try:
        return parse_time(value)
    except (OverflowError, OSError, ValueError):
        return None  # an epoch beyond what datetime can hold


def _kind(value: object) -> str:
    """What a JSON value is, in words, without its content (which may be huge or personal)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return "a list" if isinstance(value, list) else "an object"


def _no_records(feed: FeedConfig, label: str, where: str) -> Fatal:
    return Fatal(f"{where}: no {feed.records!r} in the response; check feeds.{label}.records")


def _not_a_list(feed: FeedConfig, label: str, where: str) -> Fatal:
    hint = "set" if feed.records is None else "check"
    return Fatal(f"{where}: records are not a list; {hint} feeds.{label}.records")


class PageRule:
    """When a walk over a feed's pages ends, and when it must stop because it would loop.

    The walk ends on an empty page or on one shorter than the size in force; a page whose
    ids repeat the previous page's means the server ignores the page parameter, which
    would loop forever, so it is :class:`Fatal`. A page *longer* than asked for means the
    server has its own page size: that size is adopted for the short-page test, and if
    the page parameter is ignored as well, the repeat rule catches it on the next page.
    """

    def __init__(self, feed: FeedConfig, *, where: str) -> None:
        self._paged = feed.page_param is not None
        self._size = feed.per_page if feed.per_page_param is not None else None
        self._where = where
        self._previous: list[str] | None = None
        self.number = 1
        self.adopted: int | None = None

    def check(self, ids: list[str]) -> None:
        """Raise Fatal if this page repeats the previous one."""
        if ids and ids == self._previous:
            raise Fatal(
                f"{self._where}: page {self.number} repeats page {self.number - 1}; "
                "the server ignores the page parameter and paging would loop"
            )

    def more(self, ids: list[str]) -> bool:
        """After a page was used: whether to ask for the next one."""
        if not ids or not self._paged:
            return False
        if self._size is not None:
            if len(ids) > self._size:
                self._size = self.adopted = len(ids)
            elif len(ids) < self._size:
                return False
        self._previous = ids
        self.number += 1
        return True
