"""What a GHL message read back becomes in the sources that asked to learn about it.

The reverse stream hands over messages that are not the bridge's own, each with the
source records mapped to its contact. For an Action Network person the message fills the
configured custom fields (the newest message wins) and adds or removes tags once; for an
ActiveDEMAND contact it becomes a history entry (or form submission, as ``[history]``
says), and each delivery status it reaches another one, each made once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from bridge.config import ActionNetworkSource, ActiveDemandSource, GhlLocation
from bridge.connectors.an_target import MirrorFields, MirrorTags, mirror_fields_op, mirror_tags_op
from bridge.connectors.ghl.ops import summary_op
from bridge.connectors.ghl.reverse import ReplyData, message_key
from bridge.errors import Rejected
from bridge.flows.activedemand import to_activedemand
from bridge.mapping import render
from bridge.models import NewOp, SourceEvent
from bridge.summary import SummaryItem

_decoder = msgspec.json.Decoder(ReplyData)
_Source = TypeVar("_Source")


def mirrors(source: ActionNetworkSource | ActiveDemandSource) -> bool:
    """Whether a source wants anything from the reverse stream (a summary note shows the
    last GHL conversation activity, so it counts)."""
    if isinstance(source, ActionNetworkSource):
        m = source.mirror
        return bool(m.fields or m.add_tags or m.remove_tags or source.summary.enabled)
    m2 = source.mirror
    return source.history.via != "none" and bool(m2.reply or m2.statuses)


def conversation_url(location: GhlLocation, conversation_id: str) -> str:
    """Where a person opens the conversation in the GHL web app."""
    base = location.app_url.rstrip("/")
    return (
        f"{base}/v2/location/{location.location_id}/conversations/conversations/{conversation_id}"
    )


def reply_record(reply: ReplyData, location: GhlLocation) -> dict[str, Any]:
    """What mirror templates read."""
    record: dict[str, Any] = msgspec.to_builtins(reply)
    record["conversation_url"] = conversation_url(location, reply.conversation_id)
    record.pop("links", None)
    return record


class ReverseFlow:
    """The reverse flow of one GHL location, over the sources that send to it."""

    def __init__(
        self,
        location: GhlLocation,
        *,
        ghl_target: str,
        action_network: Mapping[str, tuple[ActionNetworkSource, str]],
        activedemand: Mapping[str, tuple[ActiveDemandSource, str]],
    ) -> None:
        """``action_network`` / ``activedemand``: source name -> (settings, target name)."""
        self.location = location
        self.ghl = ghl_target
        self._an = {
            f"{name}:person:": (source, target)
            for name, (source, target) in action_network.items()
            if mirrors(source)
        }
        self._ad = {
            f"{name}:contact:": (source, target)
            for name, (source, target) in activedemand.items()
            if mirrors(source)
        }

    @property
    def active(self) -> bool:
        """Whether any source of the location mirrors anything (else no stream is needed)."""
        return bool(self._an or self._ad)

    def __call__(self, event: SourceEvent) -> Sequence[NewOp]:
        if event.kind != "ghl_message":
            raise Rejected(f"no reverse flow for event kind {event.kind!r}")
        try:
            reply = _decoder.decode(event.data)
        except msgspec.ValidationError as exc:
            raise Rejected(f"unreadable GHL message event: {exc}") from None
        record = reply_record(reply, self.location)
        ops: list[NewOp] = []
        for link in reply.links:
            ops += self._to_action_network(link, reply, record)
            ops += self._to_activedemand(event.key, link, reply, record)
        return ops

    def _to_action_network(
        self, link: str, reply: ReplyData, record: Mapping[str, Any]
    ) -> list[NewOp]:
        found = _match(self._an, link)
        if found is None:
            return []
        (source, target), person_id = found
        mirror = source.mirror
        ops: list[NewOp] = []
        if source.summary.enabled:
            # Any direction: the summary shows the conversation's last activity.
            text = reply.body or (reply.type or "message").removeprefix("TYPE_").lower()
            item = SummaryItem(
                kind="ghl_message",
                key=message_key(reply.location, reply.id),
                at=reply.date,
                title=f"{reply.direction}: {text}",
            )
            ops.append(summary_op(self.ghl, link, [item], title=source.summary.title))
        if reply.direction not in mirror.directions:
            return ops
        if mirror.fields:
            fields = {name: render(t, record) for name, t in sorted(mirror.fields.items())}
            write = MirrorFields(
                person=link,
                person_id=person_id,
                message_id=reply.id,
                at=reply.date,
                fields=fields,
            )
            ops.append(mirror_fields_op(target, write))
        if mirror.add_tags or mirror.remove_tags:
            tags = MirrorTags(
                person=link,
                person_id=person_id,
                add=sorted(mirror.add_tags),
                remove=sorted(mirror.remove_tags),
            )
            ops.append(mirror_tags_op(target, tags))
        return ops

    def _to_activedemand(
        self, key: str, link: str, reply: ReplyData, record: Mapping[str, Any]
    ) -> list[NewOp]:
        found = _match(self._ad, link)
        if found is None:
            return []
        (source, target), contact_id = found
        mirror = source.mirror
        if reply.direction not in mirror.directions:
            return []
        # Each entry is made once under its own key: the reply, then each status reached.
        entries = [("reply", f"{key}:{source.name}:reply", mirror.reply)]
        if reply.status in mirror.statuses:
            status_key = f"{key}:{source.name}:status:{reply.status}"
            entries.append(("status", status_key, mirror.status))
        ops: list[NewOp] = []
        for kind, entry_key, template in entries:
            ops += to_activedemand(
                source.history,
                target,
                key=entry_key,
                person=link,
                contact_id=contact_id,
                kind=kind,
                text=render(template, record) if template else "",
                message_id=reply.id,
            )
        return ops


def _match(by_prefix: Mapping[str, _Source], link: str) -> tuple[_Source, str] | None:
    """The source a link belongs to, and the record's id in that source."""
    for prefix, value in by_prefix.items():
        if link.startswith(prefix) and len(link) > len(prefix):
            return value, link[len(prefix) :]
    return None
