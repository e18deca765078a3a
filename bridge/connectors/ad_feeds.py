"""Where ActiveDEMAND's list feeds live and how they page, as config, plus page reading rules.

The conversation, message and history feeds are a PROPOSAL (API_FACTS §3): no API for them
was found, so their paths, envelope, id and change fields and paging parameters are
settings with defaults matching the simulator. When the vendor's collection is seen, the
operator adjusts ``[sources.activedemand.feeds.*]`` instead of the code. Paging of
``contacts.json`` is not documented either (§2), so it is a feed setting too.

This module does no I/O: :func:`page_records` turns one decoded response into keyed
records and :class:`PageRule` decides when a walk ends or has gone wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any

import msgspec

from bridge.errors import Fatal
from bridge.models import content_hash
from bridge.streams import parse_time

__all__ = [
    "FeedConfig",
    "Feeds",
    "KeyedRecord",
    "PageRule",
    "page_records",
    "parse_time",
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
    versions mean the record has not changed. ``updated`` is the parsed timestamp.
    """

    id: str
    version: str
    updated: datetime | None
    record: dict[str, Any]


def page_records(doc: object, feed: FeedConfig, *, label: str, where: str) -> list[KeyedRecord]:
    """The records of one decoded response, keyed; a shape the config does not describe is Fatal.

    A wrong envelope or id field is a configuration (or contract) problem that every
    page would repeat, so the stream stops with the setting to look at.
    """
    found = doc
    for part in feed.records.split(".") if feed.records else ():
        if not isinstance(found, Mapping) or part not in found:
            raise Fatal(
                f"{where}: no {feed.records!r} in the response; check feeds.{label}.records"
            )
        found = found[part]
    if found is None:
        return []
    if not isinstance(found, list):
        hint = "set" if feed.records is None else "check"
        raise Fatal(f"{where}: records are not a list; {hint} feeds.{label}.records")
    return [_keyed(item, feed, label, where) for item in found]


def _keyed(item: object, feed: FeedConfig, label: str, where: str) -> KeyedRecord:
    if not isinstance(item, dict):
        raise Fatal(f"{where}: a record is not an object; check feeds.{label}.records")
    raw_id = item.get(feed.id_field)
    if raw_id is None or isinstance(raw_id, bool | dict | list) or raw_id == "":
        raise Fatal(f"{where}: a record has no {feed.id_field!r}; check feeds.{label}.id_field")
    updated: datetime | None = None
    if feed.updated_field is not None:
        raw = item.get(feed.updated_field)
        updated = parse_time(raw)
        if updated is None and raw is not None:
            raise Fatal(
                f"{where}: {feed.updated_field!r} is not a timestamp; "
                f"check feeds.{label}.updated_field"
            )
        version = "" if raw is None else str(raw)
    else:
        version = content_hash(_ENCODER.encode(item))
    return KeyedRecord(id=str(raw_id), version=version, updated=updated, record=item)


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
