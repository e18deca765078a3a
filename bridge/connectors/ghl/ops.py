"""The ops the GHL target performs: what flows put in the outbox, as tagged msgspec Structs.

Every op names the *person* it belongs to (the source key of the contact's record), so
the target finds the contact and conversation ids in the id map at send time: a
conversation op queued before its contact existed still works, because ops of one
person run in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from bridge.connectors.ghl.models import CallStatus, ContactUpsert, InboundType, ProviderStatus
from bridge.models import NewOp
from bridge.summary import SummaryItem, normalized, summary_key


class UpsertContact(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.upsert_contact"
):
    person: str
    fields: ContactUpsert


class EnsureConversation(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.ensure_conversation"
):
    person: str


class InboundMessage(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.inbound_message"
):
    """Record a source message or activity in the person's conversation (never sends it).

    The op's ``source_key`` is the message's own key; it becomes GHL's ``altId``.
    ``direction`` is "outbound" for a message the source sent to the person: GHL records
    it as sent from the business, and the inbound endpoint never delivers anything.
    """

    person: str
    type: InboundType = "SMS"
    direction: Literal["inbound", "outbound"] = "inbound"
    message: str
    date: str | None = None
    subject: str | None = None
    html: str | None = None
    attachments: list[str] = []
    # Source keys of UploadAttachment ops queued before this message: their GHL URLs are
    # added to ``attachments``; one that was dead-lettered is left out, the text still goes.
    attachment_keys: list[str] = []
    conversation_provider_id: str | None = None
    # For type "Call": GHL's call status (completed, no-answer, voicemail, ...).
    call_status: CallStatus | None = None


class UploadAttachment(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.upload_attachment"
):
    """Copy a source file into the person's conversation (``POST .../messages/upload``).

    The file is streamed from ``url`` to the state directory and from there to GHL; a
    type GHL refuses or a file over the limit is rejected before any byte is fetched
    when ``size`` says so, and otherwise as soon as the download passes the limit.
    With ``local`` instead of ``url`` the file is already in the state directory (a
    call recording another op fetched); it is uploaded and kept for its retention.
    """

    person: str
    url: str = ""
    file_name: str
    size: int | None = None
    local: str | None = None  # path relative to the state directory


class UpdateMessageStatus(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.update_message_status"
):
    """Mirror a message's delivery status; ``message_key`` is the message's source key."""

    person: str
    message_key: str
    status: ProviderStatus
    error: str | None = None


class ChangeTags(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.change_tags"):
    person: str
    add: list[str] = []
    remove: list[str] = []


class SyncTags(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.sync_tags"):
    """Make the contact carry exactly the source's tags among those the bridge set.

    The target adds what is new and removes only tags the bridge itself added before,
    so tags people add in GHL are left alone.
    """

    person: str
    tags: list[str]


class AddNote(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.add_note"):
    """A note on the contact, made once per source key (written into the body to find it).

    ``links`` maps a label to the source key of an UploadAttachment queued before the
    note: a "label: <GHL url>" line is added for each, or a line saying it is missing.
    """

    person: str
    body: str
    links: dict[str, str] = {}


class AddTask(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.add_task"):
    """A task on the contact, made once per source key; due ``due`` or ``due_in`` from sending."""

    person: str
    title: str
    body: str = ""
    due: str | None = None  # ISO 8601
    due_in: float | None = None  # seconds after the task is created


class UpdateConversation(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.update_conversation"
):
    person: str
    unread_count: int | None = None
    starred: bool | None = None


class AssignContact(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.assign_contact"
):
    """Give the contact (and so its conversation) to a GHL user: ``PUT /contacts/{id}``."""

    person: str
    user_id: str


class UpdateSummary(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ghl.update_summary"
):
    """Add to the person's summary ledger and keep their one summary note in step with it.

    ``items`` are added (replacing items of the same key); ``tags`` and ``email``, when
    given, replace what the ledger holds, and None keeps it. The note is written only
    when the digest of the whole ledger changed, and only once the person has activity.
    """

    person: str
    title: str
    items: list[SummaryItem] = []
    tags: list[str] | None = None
    email: str | None = None


GhlOp = (
    UpsertContact
    | EnsureConversation
    | InboundMessage
    | ChangeTags
    | SyncTags
    | AddNote
    | AddTask
    | UpdateConversation
    | UploadAttachment
    | UpdateMessageStatus
    | AssignContact
    | UpdateSummary
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[GhlOp] = msgspec.json.Decoder(GhlOp)


def decode_op(payload: bytes) -> GhlOp:
    return _decoder.decode(payload)


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


def summary_op(
    target: str,
    contact_key: str,
    items: Sequence[SummaryItem],
    *,
    title: str,
    tags: Sequence[str] | None = None,
    email: str | None = None,
) -> NewOp:
    """An outbox row that adds ``items`` to a person's summary and refreshes its note.

    ``contact_key`` is the person's source key (the op runs in order with their other
    ops); ``title`` is the note's first line. ``tags`` and ``email`` replace what the
    ledger holds; None keeps it. Every summary op of a person shares one source key, so
    an op identical to the last one applied completes without a call.
    """
    op = UpdateSummary(
        person=contact_key,
        title=title,
        items=[normalized(item) for item in items],
        tags=None if tags is None else sorted(set(tags)),
        email=None if email is None else email.strip().lower() or None,
    )
    return new_op(target, op, source_key=summary_key(contact_key))
