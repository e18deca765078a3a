"""The ops the GHL target performs: what flows put in the outbox, as tagged msgspec Structs.

Every op names the *person* it belongs to (the source key of the contact's record), so
the target finds the contact and conversation ids in the id map at send time: a
conversation op queued before its contact existed still works, because ops of one
person run in order.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from bridge.models import NewOp


class CustomFieldValue(msgspec.Struct, frozen=True, omit_defaults=True):
    """A contact custom field on write: by id, or by key (``contact.my_field``)."""

    id: str | None = None
    key: str | None = None
    field_value: str | int | float | list[str] | None = None


class ContactFields(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Mapped contact fields; None fields are not sent, so GHL keeps what it has."""

    firstName: str | None = None
    lastName: str | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    address1: str | None = None
    city: str | None = None
    state: str | None = None
    postalCode: str | None = None
    country: str | None = None
    website: str | None = None
    timezone: str | None = None
    companyName: str | None = None
    source: str | None = None
    customFields: list[CustomFieldValue] | None = None


class UpsertContact(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.upsert_contact"
):
    person: str
    fields: ContactFields


class EnsureConversation(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.ensure_conversation"
):
    person: str


InboundType = Literal["SMS", "Email", "Custom", "Call", "WhatsApp", "FB", "IG", "GMB", "Live_Chat"]


class InboundMessage(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.inbound_message"
):
    """Record a source message or activity in the person's conversation (never sends it).

    The op's ``source_key`` is the message's own key; it becomes GHL's ``altId``.
    """

    person: str
    type: InboundType = "SMS"
    message: str
    date: str | None = None
    subject: str | None = None
    html: str | None = None
    attachments: list[str] = []
    conversation_provider_id: str | None = None


class ChangeTags(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.change_tags"):
    person: str
    add: list[str] = []
    remove: list[str] = []


class AddNote(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.add_note"):
    """A note on the contact; its source key is written into the body for reconciliation."""

    person: str
    body: str


class AddTask(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.add_task"):
    person: str
    title: str
    body: str = ""
    due: str  # ISO 8601, as GHL requires


class UpdateConversation(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.update_conversation"
):
    person: str
    unread_count: int | None = None
    starred: bool | None = None


GhlOp = (
    UpsertContact
    | EnsureConversation
    | InboundMessage
    | ChangeTags
    | AddNote
    | AddTask
    | UpdateConversation
)

_encoder = msgspec.json.Encoder()
decode_op = msgspec.json.Decoder(GhlOp).decode


def new_op(target: str, op: GhlOp, *, source_key: str | None = None) -> NewOp:
    """An outbox row for ``op``, ordered with everything else of its person.

    ``source_key`` defaults to the person: ops about the contact itself record their
    ids under the person's key; a message passes its own key (its ``altId``).
    """
    return NewOp(
        target=target,
        entity=op.person,
        kind=str(op.__struct_config__.tag),
        source_key=source_key or op.person,
        payload=_encoder.encode(op),
    )
