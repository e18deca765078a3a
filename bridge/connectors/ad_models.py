"""msgspec Structs for ActiveDEMAND's responses and the normalised events read from them.

The v1 shapes (contacts as bare arrays of flattened dotted keys, the field catalogue,
forms and their fields) follow API_FACTS §1.3. Everything under "proposed feeds" is the
simulator's PROPOSED contract (§3): no API for conversations, messages or histories was
found, so these Structs ignore unknown fields and default every field they can.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

__all__ = [
    "CORE_KEYS",
    "EMAIL",
    "FINAL_STATUSES",
    "FIRST_NAME",
    "LAST_NAME",
    "PHONE",
    "AttachmentData",
    "CallData",
    "ContactData",
    "ConversationData",
    "FieldDef",
    "Form",
    "History",
    "MessageData",
    "MessageKind",
    "MessageStatus",
    "Scalar",
    "Sentence",
    "WireAttachment",
    "WireCall",
    "WireConversation",
    "WireMessage",
    "contact_data",
    "contact_key",
    "conversation_data",
    "conversation_key",
    "is_settled",
    "message_data",
    "message_key",
]

# Contact field keys of the v1 form-encoded API (API_FACTS §1.3): core fields by name,
# channels as dotted paths, custom fields as ``custom_<n>``.
FIRST_NAME, LAST_NAME = "first_name", "last_name"
EMAIL, PHONE = "emails.email_address", "phones.phone_number"
CORE_KEYS = frozenset({FIRST_NAME, LAST_NAME, EMAIL, PHONE})
_CUSTOM_PREFIX = "custom_"

Id = int | str
Scalar = str | int | float | bool | None
MessageKind = Literal["text", "media", "call"]
_KINDS: dict[str, MessageKind] = {"text": "text", "media": "media", "call": "call"}

# Delivery states after which a message does not change again (the sim's Twilio-like set,
# plus "read"); anything else, including a status the bridge has never seen, may change.
FINAL_STATUSES = frozenset({"delivered", "undelivered", "failed", "received", "read"})


class _Wire(msgspec.Struct, frozen=True, kw_only=True):
    """A response shape: unknown fields are ignored, since the proposed feeds are a guess."""


# --------------------------------------------------------------------------- v1


class FieldDef(_Wire, frozen=True, kw_only=True):
    """A contact field catalogue entry, or a form field (which adds ``required``)."""

    key: str
    label: str | None = None
    type: str | None = None
    options: list[str] = []
    required: bool | None = None
    login_url: str | None = None


class Form(_Wire, frozen=True, kw_only=True):
    """A web form of ``forms.json``."""

    id: Id
    name: str | None = None


# --------------------------------------------------------------------------- proposed feeds


class WireConversation(_Wire, frozen=True, kw_only=True):
    """A conversation of the proposed ``conversations.json``."""

    id: Id | None = None
    contact_id: Id | None = None
    channel: str | None = None
    status: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    message_count: int | None = None
    last_message_id: Id | None = None


class WireAttachment(_Wire, frozen=True, kw_only=True):
    """A media file of a message; ``url`` is on a storage host and takes no API key."""

    url: str
    id: Id | None = None
    file_name: str | None = None
    content_type: str | None = None
    size: int | None = None


class WireCall(_Wire, frozen=True, kw_only=True):
    """A call's facts; a URL is null while its recording or transcription does not exist."""

    duration: int | None = None
    recording_url: str | None = None
    transcription_url: str | None = None


class WireMessage(_Wire, frozen=True, kw_only=True):
    """A message of the proposed per-conversation feed: text, media or a call."""

    id: Id | None = None
    conversation_id: Id | None = None
    contact_id: Id | None = None
    channel: str | None = None
    direction: str | None = None
    type: str | None = None
    subject: str | None = None
    body: str | None = None
    # Not in the proposed feed; read if a live API names who sent it.
    sender: str | None = None
    status: str | None = None
    status_updated_at: datetime | None = None
    error: str | None = None
    created_at: datetime | None = None
    attachments: list[WireAttachment] = []
    call: WireCall | None = None


class MessageStatus(_Wire, frozen=True, kw_only=True):
    """The proposed ``messages/{id}/status.json``."""

    message_id: Id | None = None
    status: str | None = None
    status_updated_at: datetime | None = None
    error: str | None = None


class Sentence(_Wire, frozen=True, kw_only=True):
    """One line of a call transcription, timed in milliseconds from the call's start."""

    text: str = ""
    speaker: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    confidence: float | None = None


class History(_Wire, frozen=True, kw_only=True):
    """A contact history entry of the proposed ``histories.json``."""

    id: Id | None = None
    contact_id: Id | None = None
    kind: str | None = None
    text: str | None = None
    created_at: datetime | None = None
    form_id: Id | None = None


# --------------------------------------------------------------------------- normalised events


class ContactData(msgspec.Struct, frozen=True, kw_only=True):
    """A contact event's ``data``.

    Dotted wire keys are split out (``emails.email_address`` -> ``email``) because a
    mapping path cannot reach a key that itself contains a dot. ``other`` keeps any key
    that is neither core nor custom, so nothing read is lost.
    """

    id: str
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    custom: dict[str, Scalar]
    other: dict[str, Scalar]


class ConversationData(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation event's ``data``.

    ``updated_at``, the message count and the last message id are left out on purpose:
    they move with every message, and keeping them would change the hash (and re-send
    the conversation) for each one.
    """

    id: str
    contact_id: str | None
    contact_key: str | None
    channel: str | None
    status: str | None
    created: datetime | None


class AttachmentData(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    content_type: str | None
    size: int | None
    file_name: str | None


class CallData(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a call's recording and transcription can be fetched (by message id) yet."""

    duration: int | None
    recording: bool
    transcription: bool


class MessageData(msgspec.Struct, frozen=True, kw_only=True):
    """A message event's ``data``.

    The status, its error and the call's availability flags are part of it, so a status
    change or a transcription becoming ready changes the content hash and reaches the
    flows as the same key with new content.
    """

    id: str
    conversation_id: str
    conversation_key: str
    contact_id: str | None
    contact_key: str | None
    channel: str | None
    direction: str | None
    type: MessageKind
    subject: str | None
    body: str
    created: datetime | None
    sender: str | None
    status: str | None
    status_updated: datetime | None
    error: str | None
    attachments: list[AttachmentData]
    call: CallData | None
    # A call's transcription as "speaker: text" lines, read once it exists.
    transcript: str | None = None


# --------------------------------------------------------------------------- keys


def contact_key(source: str, contact_id: str) -> str:
    """The source key of a contact of the account named ``source``: the id map's key."""
    return f"{source}:contact:{contact_id}"


def conversation_key(source: str, conversation_id: str) -> str:
    return f"{source}:conversation:{conversation_id}"


def message_key(source: str, message_id: str) -> str:
    return f"{source}:message:{message_id}"


# --------------------------------------------------------------------------- normalisation


def contact_data(contact_id: str, record: dict[str, Any]) -> ContactData:
    """A contact event's data from one element of ``contacts.json``."""
    custom: dict[str, Scalar] = {}
    other: dict[str, Scalar] = {}
    for key, value in record.items():
        if key == "id" or key in CORE_KEYS:
            continue
        into = custom if key.startswith(_CUSTOM_PREFIX) else other
        into[key] = _scalar(value)
    return ContactData(
        id=contact_id,
        first_name=_text(record.get(FIRST_NAME)),
        last_name=_text(record.get(LAST_NAME)),
        email=_text(record.get(EMAIL)),
        phone=_text(record.get(PHONE)),
        custom=custom,
        other=other,
    )


def conversation_data(
    source: str, conversation_id: str, wire: WireConversation
) -> ConversationData:
    contact_id = _id(wire.contact_id)
    return ConversationData(
        id=conversation_id,
        contact_id=contact_id,
        contact_key=contact_key(source, contact_id) if contact_id is not None else None,
        channel=wire.channel,
        status=wire.status,
        created=_utc(wire.created_at),
    )


def message_data(
    source: str, message_id: str, wire: WireMessage, conversation: ConversationData
) -> MessageData:
    """A message event's data; the conversation fills in what the message leaves out."""
    contact_id = _id(wire.contact_id) or conversation.contact_id
    call = None
    if wire.call is not None:
        call = CallData(
            duration=wire.call.duration,
            recording=wire.call.recording_url is not None,
            transcription=wire.call.transcription_url is not None,
        )
    return MessageData(
        id=message_id,
        conversation_id=conversation.id,
        conversation_key=conversation_key(source, conversation.id),
        contact_id=contact_id,
        contact_key=contact_key(source, contact_id) if contact_id is not None else None,
        channel=wire.channel or conversation.channel,
        direction=wire.direction.lower() if wire.direction else None,
        type=_kind(wire),
        subject=wire.subject,
        body=wire.body or "",
        created=_utc(wire.created_at),
        sender=wire.sender,
        status=wire.status,
        status_updated=_utc(wire.status_updated_at),
        error=wire.error,
        attachments=[
            AttachmentData(
                url=a.url, content_type=a.content_type, size=a.size, file_name=a.file_name
            )
            for a in wire.attachments
        ],
        call=call,
    )


def is_settled(message: MessageData, *, now: datetime, settle_after: float) -> bool:
    """Whether a message can no longer change: a final status and, for a recorded call,
    its transcription; or older than ``settle_after`` seconds, whatever it still says."""
    if message.created is not None and (now - message.created).total_seconds() > settle_after:
        return True
    if message.status not in FINAL_STATUSES:
        return False
    call = message.call
    return call is None or not call.recording or call.transcription


def _kind(wire: WireMessage) -> MessageKind:
    # The type is read from the content when the feed's own word is not one of ours, so a
    # new or missing type cannot fail the page.
    known = _KINDS.get(wire.type or "")
    if known is not None:
        return known
    if wire.call is not None:
        return "call"
    return "media" if wire.attachments else "text"


def _id(value: Id | None) -> str | None:
    return None if value is None or value == "" else str(value)


def _text(value: object) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _scalar(value: object) -> Scalar:
    """A flat value as read; a nested one (not seen in v1) is kept as its JSON text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return msgspec.json.encode(value).decode()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
