"""The taggings stream of an Action Network group: tag changes the people window misses.

Adding or removing a tag does not move a person's ``modified_date`` (API_FACTS §7; the
simulator follows it), and taggings cannot be filtered, so this stream scans every tag's
taggings at its own, slower interval and compares each synced person's tags with the
tags the bridge last applied to their GHL contact. A person whose set differs becomes a
``tags`` event; so does a person who lost their last tag (known from the id map, since a
full scan cannot show an absence). People without a GHL contact yet are left to the
people stream, which carries tags with the person.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Protocol

import msgspec
import structlog

from bridge.clock import Clock
from bridge.connectors.actionnetwork import AnClient
from bridge.connectors.an_models import Tagging, href_id, person_key
from bridge.models import NewOp, Page, SourceEvent
from bridge.streams import Mapper, format_utc, make_event, unmapped

log = structlog.get_logger("bridge.actionnetwork")

EVENTS_PER_PAGE = 200


class TagsData(msgspec.Struct, frozen=True, kw_only=True):
    """A ``tags`` event's data: a person's whole current tag set."""

    person_key: str
    person_id: str
    tags: list[str]


class SyncedTags(Protocol):
    """What the bridge knows about contacts' source tags (the store)."""

    async def contact_tags(self, keys: Sequence[str]) -> dict[str, tuple[str, ...]]: ...

    async def tagged_keys(self, prefix: str) -> set[str]: ...


class AnTaggingsStream:
    """Full scans of a group's taggings, emitting people whose tags changed."""

    def __init__(
        self,
        client: AnClient,
        known: SyncedTags,
        *,
        source: str,
        clock: Clock,
        mapper: Mapper = unmapped,
        poll_interval: float = 900.0,
        own_tags: frozenset[str] = frozenset(),
    ) -> None:
        self.source = source
        self.name = f"{source}.taggings"
        self.poll_interval = poll_interval
        self._client = client
        self._known = known
        self._clock = clock
        self._mapper = mapper
        self._own_tags = own_tags  # added by the bridge from GHL replies: never forwarded

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        return self._mapper(event)

    async def pages(self, cursor: str | None) -> AsyncGenerator[Page, None]:
        started = datetime.fromtimestamp(self._clock.time(), UTC)
        names = {
            tag_id: name
            for tag_id, name in (await self._client.tag_names()).items()
            if name not in self._own_tags
        }
        carried: dict[str, set[str]] = defaultdict(set)
        for tag_id, name in names.items():
            async for batch in self._client.pages(Tagging, f"/tags/{tag_id}/taggings"):
                for tagging in batch:
                    ref = href_id(tagging.links, "osdi:person")
                    if ref is not None and ref[0] == "people":
                        carried[ref[1]].add(name)
        by_key = {person_key(self.source, pid): pid for pid in carried}
        synced = await self._known.contact_tags(list(by_key))
        events = [
            self._event(key, by_key[key], sorted(carried[by_key[key]]))
            for key, applied in synced.items()
            if sorted(carried[by_key[key]]) != list(applied)
        ]
        prefix = person_key(self.source, "")
        for key in sorted(await self._known.tagged_keys(prefix) - by_key.keys()):
            events.append(self._event(key, key[len(prefix) :], []))
        log.info("an_taggings_scanned", tags=len(names), people=len(carried), changed=len(events))
        for at in range(0, len(events), EVENTS_PER_PAGE):
            yield Page(events=events[at : at + EVENTS_PER_PAGE], cursor=None)
        # The cursor only records when the last full scan finished, for `bridge status`.
        yield Page(events=[], cursor=format_utc(started))

    def _event(self, key: str, person_id: str, tags: list[str]) -> SourceEvent:
        data = TagsData(person_key=key, person_id=person_id, tags=tags)
        return make_event(self.name, f"{self.source}:tags:{person_id}", "tags", data)
