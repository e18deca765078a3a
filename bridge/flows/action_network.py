"""Action Network events -> GHL ops: the product's promises for a group, in one place.

A person event becomes, in order: the contact upsert, its conversation (created only when
the contact has none), the sync of its Action Network tags, the write-back of the GHL ids
into Action Network, and the ops of any tag rule it now matches. An activity event becomes
an inbound message in the person's conversation (``altId`` = the activity's key, ``date`` =
when it happened) and the ops of any activity rule it matches.

With ``summary`` enabled, each event also ends in one summary op (see ``bridge.summary``):
a person's carries their tags and e-mail, an activity's its item, a tag change the new
tags. The GHL target folds them into the person's one summary note.

Every op of a person shares the person's key as its outbox entity, so they run in the
order written, after the ops of earlier events of that person. Rule ops carry a key of
their own (rule name plus the trigger), so a rule fires once per person and tag, or once
per activity, however often the person changes afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from bridge.config import (
    ActionNetworkSource,
    FieldRule,
    MappingProfile,
    MessageRule,
    NotifyRule,
)
from bridge.connectors.an_models import (
    ACTIVITY_TYPES,
    ActivityData,
    ActivityType,
    PersonData,
    person_key,
)
from bridge.connectors.an_taggings import TagsData
from bridge.connectors.an_target import WriteBackIds, write_back_op
from bridge.connectors.ghl.ops import (
    AddNote,
    AddTask,
    ChangeTags,
    EnsureConversation,
    GhlOp,
    InboundMessage,
    SyncTags,
    UpdateConversation,
    UpsertContact,
    new_op,
    summary_op,
)
from bridge.errors import ConfigError, Rejected
from bridge.flows.common import Message
from bridge.mapping import ContactMapping, render
from bridge.models import NewOp, SourceEvent
from bridge.summary import SummaryItem, SummaryKind

# Used when the config has no [mapping.<profile>] of the source's name; the same rules are
# spelt out in config.example.toml.
DEFAULT_PROFILE = MappingProfile(
    contact={
        "firstName": FieldRule(source="given_name", transforms=["trim"]),
        "lastName": FieldRule(source="family_name", transforms=["trim"]),
        "email": FieldRule(source="email", transforms=["trim", "lower"]),
        "phone": FieldRule(source="phone", transforms=["e164"]),
        "address1": FieldRule(source="postal_addresses.0.address_lines.0", transforms=["trim"]),
        "city": FieldRule(source="postal_addresses.0.locality", transforms=["trim"]),
        "state": FieldRule(source="postal_addresses.0.region", transforms=["trim"]),
        "postalCode": FieldRule(source="postal_addresses.0.postal_code", transforms=["trim"]),
        "country": FieldRule(source="postal_addresses.0.country", transforms=["upper"]),
        "source": FieldRule(
            source="origin_system", transforms=["default"], default="Action Network"
        ),
    },
)

# The messages an activity becomes unless the profile says otherwise. Bracketed parts are
# left out when the field inside is empty (see mapping.render).
DEFAULT_MESSAGES: Mapping[str, MessageRule] = {
    "signature": MessageRule(template='Signed petition[ "{action_title}"][: "{comments}"]'),
    "submission": MessageRule(template='Submitted form[ "{action_title}"]'),
    "attendance": MessageRule(template='RSVP[ "{status}"] to event[ "{action_title}"]'),
    "donation": MessageRule(
        template="Donated[ {amount}][ {currency}][ {recurring_label}] on"
        '[ fundraising page "{action_title}"]'
    ),
    "outreach": MessageRule(
        template='Wrote[ to {target_names}] via[ "{action_title}"][\nSubject: {subject}]'
        "[\n\n{message}]"
    ),
}

# What each activity type counts as in the summary.
SUMMARY_KINDS: Mapping[ActivityType, SummaryKind] = {
    "signature": "petition",
    "submission": "form",
    "attendance": "event",
    "donation": "donation",
    "outreach": "outreach",
}

_person_decoder = msgspec.json.Decoder(PersonData)
_activity_decoder = msgspec.json.Decoder(ActivityData)
_tags_decoder = msgspec.json.Decoder(TagsData)


class Rule:
    """A compiled notify rule."""

    def __init__(self, rule: NotifyRule, *, path: str) -> None:
        if (rule.when_tag is None) == (rule.when_activity is None):
            raise ConfigError(path, "set exactly one of when_tag and when_activity")
        if rule.when_activity is not None and rule.when_activity not in ACTIVITY_TYPES:
            known = ", ".join(ACTIVITY_TYPES)
            raise ConfigError(f"{path}.when_activity", f"unknown activity type ({known})")
        if rule.when_action is not None and rule.when_activity is None:
            raise ConfigError(f"{path}.when_action", "only applies with when_activity")
        acts = (rule.task, rule.note, rule.add_tags, rule.remove_tags, rule.unread, rule.starred)
        if not any(acts):
            raise ConfigError(
                path, "does nothing: set task, note, add_tags, remove_tags, unread or starred"
            )
        self.rule = rule

    def matches_activity(self, activity: ActivityData) -> bool:
        wanted = self.rule.when_action
        return self.rule.when_activity == activity.type and (
            wanted is None or wanted in (activity.action_title, activity.action_id)
        )

    def ops(self, target: str, person: str, key: str, record: Mapping[str, Any]) -> list[NewOp]:
        """The rule's actions for one trigger; ``key`` names the firing."""
        r = self.rule
        ops: list[NewOp] = []
        if r.add_tags or r.remove_tags:
            change = ChangeTags(person=person, add=list(r.add_tags), remove=list(r.remove_tags))
            ops.append(new_op(target, change, source_key=f"{key}:tags"))
        if r.unread or r.starred:
            status = UpdateConversation(
                person=person, unread_count=1 if r.unread else None, starred=r.starred or None
            )
            ops.append(new_op(target, status, source_key=f"{key}:status"))
        if r.note is not None:
            note = AddNote(person=person, body=render(r.note, record))
            ops.append(new_op(target, note, source_key=f"{key}:note"))
        if r.task is not None:
            task = AddTask(
                person=person,
                title=render(r.task.title, record) or r.name,
                body=render(r.task.body, record),
                due_in=float(r.task.due_in),
            )
            ops.append(new_op(target, task, source_key=f"{key}:task"))
        return ops

    @property
    def name(self) -> str:
        return self.rule.name


class ActionNetworkFlow:
    """Maps one Action Network group's events to ops for its GHL location and itself."""

    def __init__(
        self,
        source: ActionNetworkSource,
        profile: MappingProfile | None,
        *,
        ghl_target: str,
        an_target: str,
    ) -> None:
        path = f"$.mapping.{source.mapping}"
        profile = profile or DEFAULT_PROFILE
        self.contact = ContactMapping(profile, name=source.mapping)
        messages = {**DEFAULT_MESSAGES, **profile.messages}
        for kind in profile.messages:
            if kind not in ACTIVITY_TYPES:
                known = ", ".join(ACTIVITY_TYPES)
                raise ConfigError(f"{path}.messages.{kind}", f"unknown activity type ({known})")
        self.messages = {
            kind: Message(rule, path=f"{path}.messages.{kind}") for kind, rule in messages.items()
        }
        source_path = f"$.sources.action_network[name={source.name}]"
        self.rules = [
            Rule(rule, path=f"{source_path}.rules[{i}]") for i, rule in enumerate(source.rules)
        ]
        self.summary_title = _summary_title(source, path=f"{source_path}.summary.title")
        self.tags = "taggings" in source.streams
        self.write_back = source.write_back
        self.mirror = source.mirror
        self.source = source.name
        self.ghl = ghl_target
        self.an = an_target

    @property
    def own_fields(self) -> frozenset[str]:
        """The Action Network custom fields the bridge writes (kept out of content hashes)."""
        fields = (self.write_back.contact_id, self.write_back.conversation_id, *self.mirror.fields)
        return frozenset(f for f in fields if f)

    @property
    def own_tags(self) -> frozenset[str]:
        """The tags the bridge adds from GHL replies: not forwarded back, not a change."""
        return frozenset(self.mirror.add_tags)

    def __call__(self, event: SourceEvent) -> Sequence[NewOp]:
        try:
            if event.kind == "person":
                return self.person_ops(_person_decoder.decode(event.data))
            if event.kind == "activity":
                return self.activity_ops(event.key, _activity_decoder.decode(event.data))
            if event.kind == "tags":
                return self.tags_ops(event.key, _tags_decoder.decode(event.data))
        except msgspec.ValidationError as exc:
            raise Rejected(f"unreadable {event.kind} event: {exc}") from None
        raise Rejected(f"no flow for Action Network event kind {event.kind!r}")

    def person_ops(self, person: PersonData) -> list[NewOp]:
        key = person_key(self.source, person.id)
        record = person_record(person)
        ops = [
            self._ghl(UpsertContact(person=key, fields=self.contact.upsert(record))),
            self._ghl(EnsureConversation(person=key)),
        ]
        if self.tags:
            ops.append(self._ghl(SyncTags(person=key, tags=sorted(person.tags))))
        if self.own_fields:
            current = {f: str(person.custom_fields.get(f, "")) for f in sorted(self.own_fields)}
            write = WriteBackIds(
                person=key,
                person_id=person.id,
                contact_field=self.write_back.contact_id,
                conversation_field=self.write_back.conversation_id,
                current={f: v for f, v in current.items() if v},
            )
            ops.append(write_back_op(self.an, write))
        ops += self._summary(key, [], tags=person.tags, email=person.email)
        return ops + self._tag_rules(key, person.tags, record)

    def tags_ops(self, key: str, tags: TagsData) -> list[NewOp]:
        """A tag change found by the taggings scan: sync the tags, fire tag rules."""
        person = tags.person_key
        sync = new_op(self.ghl, SyncTags(person=person, tags=tags.tags), source_key=key)
        record = {"tags": tags.tags, "person_id": tags.person_id}
        summary = self._summary(person, [], tags=tags.tags)
        return [sync, *summary, *self._tag_rules(person, tags.tags, record)]

    def _tag_rules(
        self, person: str, tags: Sequence[str], record: Mapping[str, Any]
    ) -> list[NewOp]:
        ops: list[NewOp] = []
        for rule in self.rules:
            if rule.rule.when_tag in tags:
                ops += rule.ops(self.ghl, person, f"{person}:rule:{rule.name}", record)
        return ops

    def activity_ops(self, key: str, activity: ActivityData) -> list[NewOp]:
        person = activity.person_key
        record = activity_record(activity)
        message = self.messages[activity.type]
        text = render(message.rule.template, record)
        if not text:
            raise Rejected(f"the {activity.type} message template rendered empty text")
        inbound = InboundMessage(
            person=person,
            type=message.type,
            message=text,
            subject=(render(message.rule.subject, record) or None)
            if message.rule.subject
            else None,
            date=record.get("created_date"),
            conversation_provider_id=message.rule.conversation_provider_id,
        )
        ops = [new_op(self.ghl, inbound, source_key=key)]
        for rule in self.rules:
            if rule.matches_activity(activity):
                ops += rule.ops(self.ghl, person, f"{key}:rule:{rule.name}", record)
        return ops + self._summary(person, [summary_item(key, activity)])

    def _summary(
        self,
        person: str,
        items: Sequence[SummaryItem],
        *,
        tags: Sequence[str] | None = None,
        email: str | None = None,
    ) -> list[NewOp]:
        if self.summary_title is None:
            return []
        return [
            summary_op(self.ghl, person, items, title=self.summary_title, tags=tags, email=email)
        ]

    def _ghl(self, op: GhlOp) -> NewOp:
        return new_op(self.ghl, op)


def _summary_title(source: ActionNetworkSource, *, path: str) -> str | None:
    """The summary note's title line, or None when summaries are off."""
    if not source.summary.enabled:
        return None
    title = source.summary.title
    if not title.strip() or "\n" in title or "\r" in title:
        raise ConfigError(path, "must be one line of text (it is the note's first line)")
    return title.strip()


def summary_item(key: str, activity: ActivityData) -> SummaryItem:
    """What an activity adds to the person's summary; ``key`` is the activity's source key."""
    kind = SUMMARY_KINDS[activity.type]
    return SummaryItem(
        kind=kind,
        key=key,
        at=None if activity.created_date is None else activity.created_date.isoformat(),
        title=activity.action_title,
        amount=activity.amount if kind == "donation" else None,
        currency=activity.currency if kind == "donation" else None,
        status=activity.status if kind == "event" else None,
    )


def person_record(person: PersonData) -> dict[str, Any]:
    """What a person's mapping rules and rule templates read."""
    record: dict[str, Any] = msgspec.to_builtins(person)
    return record


def activity_record(activity: ActivityData) -> dict[str, Any]:
    """What message templates read: the activity's fields plus a few ready-made phrases."""
    record: dict[str, Any] = msgspec.to_builtins(activity)
    names = [_target_name(t.title, t.given_name, t.family_name) for t in activity.targets]
    record["target_names"] = ", ".join(n for n in names if n) or None
    record["recurring_label"] = "(recurring)" if activity.recurring else None
    return record


def _target_name(title: str | None, given: str | None, family: str | None) -> str:
    return " ".join(p for p in (title, given, family) if p)
