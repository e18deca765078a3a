"""ActiveDEMAND events -> GHL and ActiveDEMAND ops: the promises for one account, in one place.

A **contact** becomes the GHL contact upsert and its conversation (created only if none).

A **conversation** makes sure the contact's GHL conversation exists and mirrors its status
through ``[sources.activedemand.conversation_status]`` (``PUT /conversations/{id}``:
unread, starred). GHL keeps one conversation per contact, so every ActiveDEMAND
conversation of a contact (SMS, e-mail, chat, phone) lands in that one thread.

A **message** becomes, in order:

1. one upload per attachment (``POST /conversations/messages/upload``; a refused or
   oversized file is dead-lettered, the text still goes);
2. for a recorded call, the recording fetched into the state directory (ActiveDEMAND
   target) and uploaded to the conversation;
3. the message itself, ``POST /conversations/messages/inbound`` with ``altId`` = its
   source key (which holds the ActiveDEMAND message id), ``date`` = when it was made,
   the GHL type of its channel, and the uploaded URLs; a message ActiveDEMAND sent to
   the contact is recorded with direction "outbound" (GHL sends nothing);
4. its delivery status, ``PUT /conversations/messages/{id}/status``, whenever it maps to
   a GHL status (queued/sent -> pending, delivered, read, failed/undelivered -> failed);
5. once a call has its transcription: a GHL note with the transcript and the recording
   link, the transcript written back into ActiveDEMAND (``[history]``), and the ops of
   every routing rule whose keywords or pattern match it (each match is logged).

Every op of a contact shares the contact's key as its outbox entity, so they run in the
order written across both targets. Ops that must happen once (files, note, history,
rule actions) carry keys of their own; a message re-read with a new status makes only
the status op do anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog

from bridge.config import (
    ActiveDemandSource,
    AdHistorySettings,
    ConversationState,
    FieldRule,
    MappingProfile,
    MessageRule,
    RoutingRule,
)
from bridge.connectors.ad_models import ContactData, ConversationData, MessageData
from bridge.connectors.ad_models import contact_key as make_contact_key
from bridge.connectors.ad_target import (
    AddHistory,
    FetchRecording,
    SubmitForm,
    new_ad_op,
    recording_file,
)
from bridge.connectors.ghl.models import CallStatus, ProviderStatus
from bridge.connectors.ghl.ops import (
    AddNote,
    AssignContact,
    ChangeTags,
    EnsureConversation,
    GhlOp,
    InboundMessage,
    UpdateConversation,
    UpdateMessageStatus,
    UploadAttachment,
    UpsertContact,
    new_op,
)
from bridge.errors import ConfigError, Rejected
from bridge.flows.common import Message
from bridge.mapping import ContactMapping, render
from bridge.models import NewOp, SourceEvent

log = structlog.get_logger("bridge.flows.activedemand")

# Used when the config has no [mapping.<profile>] of the source's name; the same rules are
# spelt out in config.example.toml.
DEFAULT_PROFILE = MappingProfile(
    contact={
        "firstName": FieldRule(source="first_name", transforms=["trim"]),
        "lastName": FieldRule(source="last_name", transforms=["trim"]),
        "email": FieldRule(source="email", transforms=["trim", "lower"]),
        "phone": FieldRule(source="phone", transforms=["e164"]),
        "source": FieldRule(source="other.source", transforms=["default"], default="ActiveDEMAND"),
    },
)

# Message rules by channel, "call" for calls and "default" for a channel not listed.
# ``{sender}`` is only set when the feed names who wrote the message.
DEFAULT_MESSAGES: Mapping[str, MessageRule] = {
    "sms": MessageRule(type="SMS", template="{body}[\n— {sender}]"),
    "email": MessageRule(type="Email", template="{body}[\n— {sender}]", subject="{subject}"),
    "web_chat": MessageRule(type="WebChat", template="{body}[\n— {sender}]"),
    "call": MessageRule(type="Call", template="{call_summary}"),
    "default": MessageRule(type="SMS", template="{body}[\n— {sender}]"),
}

# ActiveDEMAND delivery status -> GHL's; "received" (an inbound message) has no GHL status.
STATUS_MAP: Mapping[str, ProviderStatus] = {
    "queued": "pending",
    "sent": "pending",
    "delivered": "delivered",
    "read": "read",
    "failed": "failed",
    "undelivered": "failed",
}

_contact_decoder = msgspec.json.Decoder(ContactData)
_conversation_decoder = msgspec.json.Decoder(ConversationData)
_message_decoder = msgspec.json.Decoder(MessageData)


class Routing:
    """A compiled routing rule: a case-insensitive search over call transcripts."""

    def __init__(self, rule: RoutingRule, *, path: str) -> None:
        if bool(rule.keywords) == (rule.pattern is not None):
            raise ConfigError(path, "set exactly one of keywords and pattern")
        if not (rule.assign_to or rule.add_tags or rule.alert):
            raise ConfigError(path, "does nothing: set assign_to, add_tags or alert")
        if rule.pattern is not None:
            try:
                self.search = re.compile(rule.pattern, re.IGNORECASE)
            except re.error as exc:
                raise ConfigError(f"{path}.pattern", f"not a regular expression: {exc}") from None
        else:
            words = "|".join(re.escape(w.strip()) for w in rule.keywords)
            self.search = re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)
        self.rule = rule


class ActiveDemandFlow:
    """Maps one ActiveDEMAND account's events to ops for its GHL location and itself."""

    def __init__(
        self,
        source: ActiveDemandSource,
        profile: MappingProfile | None,
        *,
        ghl_target: str,
        ad_target: str,
    ) -> None:
        path = f"$.mapping.{source.mapping}"
        profile = profile or DEFAULT_PROFILE
        self.contact = ContactMapping(profile, name=source.mapping)
        rules = {**DEFAULT_MESSAGES, **profile.messages}
        self.messages = {
            kind: Message(rule, path=f"{path}.messages.{kind}") for kind, rule in rules.items()
        }
        source_path = f"$.sources.activedemand[name={source.name}]"
        _check_history(source.history, f"{source_path}.history")
        self.routing = [
            Routing(rule, path=f"{source_path}.routing[{i}]")
            for i, rule in enumerate(source.routing)
        ]
        if any(r.rule.alert for r in self.routing) and source.history.via == "none":
            raise ConfigError(
                f"{source_path}.history.via", 'routing alerts need "history" or "form", not "none"'
            )
        self.source = source.name
        self.history = source.history
        self.states: Mapping[str, ConversationState] = source.conversation_status
        self.record_outbound = source.outbound == "record"
        self.ghl = ghl_target
        self.ad = ad_target

    def __call__(self, event: SourceEvent) -> Sequence[NewOp]:
        try:
            if event.kind == "contact":
                return self.contact_ops(_contact_decoder.decode(event.data))
            if event.kind == "conversation":
                return self.conversation_ops(event.key, _conversation_decoder.decode(event.data))
            if event.kind == "message":
                return self.message_ops(event.key, _message_decoder.decode(event.data))
        except msgspec.ValidationError as exc:
            raise Rejected(f"unreadable {event.kind} event: {exc}") from None
        raise Rejected(f"no flow for ActiveDEMAND event kind {event.kind!r}")

    # ----------------------------------------------------------------- contacts

    def contact_ops(self, contact: ContactData) -> list[NewOp]:
        person = make_contact_key(self.source, contact.id)
        record: dict[str, Any] = msgspec.to_builtins(contact)
        return [
            self._ghl(UpsertContact(person=person, fields=self.contact.upsert(record))),
            self._ghl(EnsureConversation(person=person)),
        ]

    # ----------------------------------------------------------------- conversations

    def conversation_ops(self, key: str, conversation: ConversationData) -> list[NewOp]:
        person = _person(conversation.contact_key, "conversation")
        ops = [new_op(self.ghl, EnsureConversation(person=person), source_key=key)]
        state = self.states.get(conversation.status or "")
        if state is not None and (state.unread is not None or state.starred is not None):
            unread = None if state.unread is None else int(state.unread)
            change = UpdateConversation(person=person, unread_count=unread, starred=state.starred)
            ops.append(new_op(self.ghl, change, source_key=f"{key}:status"))
        return ops

    # ----------------------------------------------------------------- messages

    def message_ops(self, key: str, message: MessageData) -> list[NewOp]:
        person = _person(message.contact_key, "message")
        if message.direction == "outbound" and not self.record_outbound:
            return []
        record = message_record(message)
        ops: list[NewOp] = []
        attachment_keys: list[str] = []
        for i, attached in enumerate(message.attachments):
            upload = UploadAttachment(
                person=person,
                url=attached.url,
                file_name=_file_name(attached.url, attached.file_name, i),
                size=attached.size,
            )
            attachment_keys.append(f"{key}:file:{i}")
            ops.append(new_op(self.ghl, upload, source_key=attachment_keys[-1]))
        recording = None
        if message.call is not None and message.call.recording:
            recording = f"{key}:recording"
            file = recording_file(self.source, message.id)
            fetch = FetchRecording(person=person, message_id=message.id, file=file)
            ops.append(new_ad_op(self.ad, fetch, source_key=f"{recording}:fetch"))
            kept = UploadAttachment(person=person, file_name=PurePosixPath(file).name, local=file)
            ops.append(new_op(self.ghl, kept, source_key=recording))
            attachment_keys.append(recording)
        rule = self._message_rule(message)
        text = render(rule.rule.template, record)
        if not text and not attachment_keys:
            raise Rejected(f"the {message.type} message has no text and no files")
        inbound = InboundMessage(
            person=person,
            type=rule.type,
            direction="outbound" if message.direction == "outbound" else "inbound",
            message=text,
            subject=(render(rule.rule.subject, record) or None) if rule.rule.subject else None,
            date=record["created"],
            attachment_keys=attachment_keys,
            conversation_provider_id=rule.rule.conversation_provider_id,
            call_status=_call_status(message) if rule.type == "Call" else None,
        )
        ops.append(new_op(self.ghl, inbound, source_key=key))
        status = STATUS_MAP.get(message.status or "")
        if status is not None:
            update = UpdateMessageStatus(
                person=person, message_key=key, status=status, error=message.error
            )
            ops.append(new_op(self.ghl, update, source_key=f"{key}:status"))
        if message.transcript:
            ops += self._transcript_ops(key, person, message, record, recording)
        return ops

    def _message_rule(self, message: MessageData) -> Message:
        if message.type == "call" and "call" in self.messages:
            return self.messages["call"]
        return self.messages.get(message.channel or "", self.messages["default"])

    def _transcript_ops(
        self,
        key: str,
        person: str,
        message: MessageData,
        record: Mapping[str, Any],
        recording: str | None,
    ) -> list[NewOp]:
        transcript = message.transcript or ""
        title = f"Call transcript ({record['call_summary']}, {record['created'] or 'undated'})"
        note = AddNote(
            person=person,
            body=f"{title}\n\n{transcript}",
            links={"Recording": recording} if recording else {},
        )
        ops = [new_op(self.ghl, note, source_key=f"{key}:transcript")]
        ops += self._to_activedemand(
            f"{key}:transcript:ad", person, message, "transcript", f"{title}\n\n{transcript}"
        )
        for routing in self.routing:
            found = routing.search.search(transcript)
            if found is None:
                continue
            rule = routing.rule
            log.info(
                "routing_rule_matched",
                rule=rule.name,
                message_key=key,
                contact_key=person,
                matched=found.group(0),
            )
            fired = f"{key}:rule:{rule.name}"
            if rule.add_tags:
                tags = ChangeTags(person=person, add=list(rule.add_tags))
                ops.append(new_op(self.ghl, tags, source_key=f"{fired}:tags"))
            if rule.assign_to:
                assign = AssignContact(person=person, user_id=rule.assign_to)
                ops.append(new_op(self.ghl, assign, source_key=f"{fired}:assign"))
            if rule.alert:
                text = render(rule.alert, {**record, "rule": rule.name, "matched": found.group(0)})
                ops += self._to_activedemand(f"{fired}:alert", person, message, "alert", text)
        return ops

    def _to_activedemand(
        self, key: str, person: str, message: MessageData, kind: str, text: str
    ) -> list[NewOp]:
        """A transcript or alert written into ActiveDEMAND, as ``[history]`` says."""
        if message.contact_id is None:
            return []
        return to_activedemand(
            self.history,
            self.ad,
            key=key,
            person=person,
            contact_id=message.contact_id,
            kind=kind,
            text=text,
            message_id=message.id,
        )

    def _ghl(self, op: GhlOp) -> NewOp:
        return new_op(self.ghl, op)


def to_activedemand(
    settings: AdHistorySettings,
    target: str,
    *,
    key: str,
    person: str,
    contact_id: str,
    kind: str,
    text: str,
    message_id: str,
) -> list[NewOp]:
    """Text written into an ActiveDEMAND contact as ``settings`` say: a history entry, a
    form submission (its templates read ``kind``, ``text`` and ``message_id``), or nothing."""
    if settings.via == "none" or not text:
        return []
    if settings.via == "history":
        entry = AddHistory(person=person, contact_id=contact_id, kind=settings.kind, text=text)
        return [new_ad_op(target, entry, source_key=key)]
    assert settings.form_id is not None  # checked when the flow was built
    form = SubmitForm(
        person=person,
        contact_id=contact_id,
        form_id=settings.form_id,
        fields=dict(settings.fields),
        record={"kind": kind, "text": text, "message_id": message_id},
    )
    return [new_ad_op(target, form, source_key=key)]


def message_record(message: MessageData) -> dict[str, Any]:
    """What message templates read: the message's fields plus ready-made phrases."""
    record: dict[str, Any] = msgspec.to_builtins(message)
    record["call_summary"] = _call_summary(message)
    return record


def _call_summary(message: MessageData) -> str | None:
    call = message.call
    if call is None:
        return None
    way = "Outbound call" if message.direction == "outbound" else "Inbound call"
    if not call.duration:
        return "Missed call" if message.direction != "outbound" else "Unanswered call"
    minutes, seconds = divmod(call.duration, 60)
    return f"{way}, {minutes}m {seconds:02d}s"


def _call_status(message: MessageData) -> CallStatus:
    call = message.call
    if call is not None and call.duration:
        return "completed"
    return "no-answer"


def _person(contact_key: str | None, what: str) -> str:
    if contact_key is None:
        raise Rejected(f"the {what} names no contact, so it has no GHL conversation to go to")
    return contact_key


def _file_name(url: str, declared: str | None, index: int) -> str:
    name = PurePosixPath(declared or "").name or PurePosixPath(urlsplit(url).path).name
    return name or f"attachment-{index + 1}"


def _check_history(settings: AdHistorySettings, path: str) -> None:
    if settings.via != "form":
        return
    if not settings.form_id:
        raise ConfigError(f"{path}.form_id", 'via = "form" needs the form to submit')
    if not settings.fields:
        raise ConfigError(f"{path}.fields", 'via = "form" needs the form fields to fill')
