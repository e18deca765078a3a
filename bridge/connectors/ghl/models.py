"""msgspec Structs for every HighLevel request body, query and response the GHL client uses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

SendType = Literal["SMS", "RCS", "Email", "WhatsApp", "IG", "FB", "Custom", "Live_Chat", "TIKTOK"]
InboundType = Literal[
    "SMS",
    "RCS",
    "Email",
    "WhatsApp",
    "GMB",
    "IG",
    "FB",
    "Custom",
    "WebChat",
    "Live_Chat",
    "Call",
    "IVR_Call",
    "Campaign_Call",
    "Campaign_VoiceMail",
    "TIKTOK",
    "ALL_IN_ONE_CHAT",
    "FORM_SUBMISSION",
]
CallStatus = Literal[
    "pending", "completed", "answered", "busy", "no-answer", "failed", "canceled", "voicemail"
]
ProviderStatus = Literal["delivered", "failed", "pending", "read"]
SearchSortBy = Literal[
    "last_manual_message_date", "last_message_date", "score_profile", "overdue_at", "due_at"
]
ExportChannel = Literal["Call", "SMS", "Email", "WhatsApp", "Instagram", "Facebook"]


class _Body(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """A request body: unset (None) fields are never sent, since GHL answers an undeclared
    property with 422 "property x should not exist"."""


class _Query(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Query parameters; the client drops None values and joins lists with commas."""


class _Reply(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A response: unknown fields are ignored because GHL keeps adding them."""


# --------------------------------------------------------------------------- queries


class ConversationSearch(_Query, frozen=True, kw_only=True):
    """Filters of ``GET /conversations/search``; ``locationId`` is added by the client.

    ``start_after_date`` is the sort value (``lastMessageDate``, epoch ms) of the last item
    already seen; ``start_date``/``end_date`` filter ``dateAdded`` in epoch ms.
    """

    contact_id: str | None = None
    assigned_to: tuple[str, ...] | None = None
    followers: tuple[str, ...] | None = None
    mentions: tuple[str, ...] | None = None
    query: str | None = None
    sort: Literal["asc", "desc"] | None = None
    start_after_date: int | None = None
    id: str | None = None
    limit: int | None = None
    last_message_type: str | None = None
    last_message_action: Literal["automated", "manual"] | None = None
    last_message_direction: Literal["inbound", "outbound"] | None = None
    status: Literal["all", "read", "unread", "starred", "recents"] | None = None
    sort_by: SearchSortBy | None = None
    sort_score_profile: str | None = None
    score_profile: str | None = None
    score_profile_min: float | None = None
    score_profile_max: float | None = None
    start_date: int | None = None
    end_date: int | None = None

    def __post_init__(self) -> None:
        # The pager stops on a short page, so a limit the server clamps (100 in practice,
        # API_FACTS §2.1) would end paging after one page; refuse it up front instead.
        if self.limit is not None and not 1 <= self.limit <= 100:
            raise ValueError(f"conversation search limit must be 1..100, got {self.limit}")


class MessageExport(_Query, frozen=True, kw_only=True):
    """Filters of ``GET /conversations/messages/export``; the client adds locationId and cursor.

    ``sort_by`` defaults to ``updatedAt`` so a poller also sees status changes.
    """

    limit: int | None = None
    sort_by: Literal["createdAt", "updatedAt"] = "updatedAt"
    sort_order: Literal["asc", "desc"] | None = None
    conversation_id: str | None = None
    contact_id: str | None = None
    channel: ExportChannel | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and not 10 <= self.limit <= 500:
            raise ValueError(f"message export limit must be 10..500, got {self.limit}")


# --------------------------------------------------------------------------- conversation bodies


class CreateConversationBody(_Body, frozen=True, kw_only=True):
    location_id: str
    contact_id: str


class UpdateConversationBody(_Body, frozen=True, kw_only=True):
    location_id: str
    unread_count: int | None = None
    starred: bool | None = None
    feedback: dict[str, Any] | None = None


# --------------------------------------------------------------------------- message bodies


class SendMessage(_Body, frozen=True, kw_only=True):
    """Body of ``POST /conversations/messages`` (GHL itself delivers the message)."""

    type: SendType
    contact_id: str
    message: str | None = None
    html: str | None = None
    subject: str | None = None
    attachments: tuple[str, ...] | None = None
    email_from: str | None = None
    email_to: str | None = None
    email_cc: tuple[str, ...] | None = None
    email_bcc: tuple[str, ...] | None = None
    email_reply_mode: Literal["reply", "reply_all"] | None = None
    reply_message_id: str | None = None
    thread_id: str | None = None
    template_id: str | None = None
    appointment_id: str | None = None
    scheduled_timestamp: int | None = None  # UTC epoch seconds
    conversation_provider_id: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    custom_subtype_id: str | None = None
    status: ProviderStatus | None = None


class CallData(_Body, frozen=True, kw_only=True):
    """The ``call`` object of inbound and outbound-call records."""

    to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    status: CallStatus | None = None


class InboundMessage(_Body, frozen=True, kw_only=True):
    """A message that arrived through the bridge's own channel; ``alt_id`` is its source key.

    There is no ``direction`` here: the client always sends ``inbound`` because the API
    defaults to ``outbound``. Set ``conversation_provider_id`` only for a custom provider.
    """

    type: InboundType
    conversation_id: str
    contact_id: str
    alt_id: str
    message: str | None = None
    attachments: tuple[str, ...] | None = None
    html: str | None = None
    subject: str | None = None
    email_from: str | None = None
    email_to: str | None = None
    email_cc: tuple[str, ...] | None = None
    email_bcc: tuple[str, ...] | None = None
    email_message_id: str | None = None
    date: datetime | None = None
    call: CallData | None = None
    conversation_provider_id: str | None = None


class InboundBody(InboundMessage, frozen=True, kw_only=True):
    # Required (no default) so omit_defaults can never drop it.
    direction: Literal["inbound", "outbound"]


class OutboundCall(_Body, frozen=True, kw_only=True):
    """An external outbound call to log (``POST /conversations/messages/outbound``)."""

    conversation_id: str
    conversation_provider_id: str
    alt_id: str | None = None
    attachments: tuple[str, ...] | None = None
    date: datetime | None = None
    call: CallData | None = None


class OutboundCallBody(OutboundCall, frozen=True, kw_only=True):
    type: Literal["Call"]


class MessageError(_Body, frozen=True, kw_only=True):
    """The provider error attached to a ``failed`` status update."""

    code: str
    type: str
    message: str


class MessageStatusBody(_Body, frozen=True, kw_only=True):
    status: ProviderStatus
    error: MessageError | None = None
    email_message_id: str | None = None
    recipients: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- contact bodies


class DndSetting(_Body, frozen=True, kw_only=True):
    status: Literal["active", "inactive", "permanent"]
    message: str | None = None
    code: str | None = None


class DndSettings(_Body, frozen=True, kw_only=True):
    call: DndSetting | None = msgspec.field(default=None, name="Call")
    email: DndSetting | None = msgspec.field(default=None, name="Email")
    sms: DndSetting | None = msgspec.field(default=None, name="SMS")
    whatsapp: DndSetting | None = msgspec.field(default=None, name="WhatsApp")
    gmb: DndSetting | None = msgspec.field(default=None, name="GMB")
    fb: DndSetting | None = msgspec.field(default=None, name="FB")


class InboundDndSetting(_Body, frozen=True, kw_only=True):
    status: Literal["active", "inactive"]
    message: str | None = None


class InboundDndSettings(_Body, frozen=True, kw_only=True):
    all_: InboundDndSetting | None = msgspec.field(default=None, name="all")


class CustomFieldValue(_Body, frozen=True, kw_only=True):
    """One custom field on write; reads come back as ``{id, value}`` instead."""

    id: str
    key: str | None = None
    field_value: str | int | float | list[str] | None = msgspec.field(
        default=None, name="field_value"
    )


class ContactUpdate(_Body, frozen=True, kw_only=True):
    """Fields of ``PUT /contacts/{id}``; tags are left out on purpose (they would replace
    every tag): use the tag endpoints."""

    first_name: str | None = None
    last_name: str | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    address1: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    website: str | None = None
    timezone: str | None = None
    dnd: bool | None = None
    dnd_settings: DndSettings | None = None
    inbound_dnd_settings: InboundDndSettings | None = None
    custom_fields: tuple[CustomFieldValue, ...] | None = None
    source: str | None = None
    date_of_birth: str | None = None
    assigned_to: str | None = None


class ContactUpsert(ContactUpdate, frozen=True, kw_only=True):
    """Fields of ``POST /contacts/upsert`` (matched on email/phone); locationId is added."""

    gender: str | None = None
    company_name: str | None = None
    create_new_if_duplicate_allowed: bool | None = None


class UpsertBody(ContactUpsert, frozen=True, kw_only=True):
    location_id: str


class TagsBody(_Body, frozen=True, kw_only=True):
    tags: tuple[str, ...]


class NewNote(_Body, frozen=True, kw_only=True):
    body: str
    user_id: str | None = None
    title: str | None = None
    color: str | None = None
    pinned: bool | None = None


class NoteUpdate(_Body, frozen=True, kw_only=True):
    body: str | None = None
    user_id: str | None = None
    title: str | None = None
    color: str | None = None
    pinned: bool | None = None


class NewTask(_Body, frozen=True, kw_only=True):
    title: str
    due_date: datetime
    completed: bool
    body: str | None = None
    assigned_to: str | None = None


# --------------------------------------------------------------------------- responses


class Conversation(_Reply, frozen=True, kw_only=True):
    """A conversation as GET (flat) and PUT (under ``conversation``) return it."""

    id: str
    contact_id: str
    location_id: str
    deleted: bool = False
    inbox: bool | None = None
    type: int | None = None
    unread_count: int = 0
    starred: bool | None = None
    assigned_to: str | None = None
    last_message_body: str | None = None
    last_message_type: str | None = None
    last_message_date: str | int | None = None
    date_added: str | int | None = None
    date_updated: str | int | None = None


class ConversationEnvelope(_Reply, frozen=True, kw_only=True):
    conversation: Conversation
    success: bool = True


class ConversationSummary(_Reply, frozen=True, kw_only=True):
    """A search item; ``last_message_date`` (epoch ms) is the paging cursor."""

    id: str
    contact_id: str
    location_id: str
    last_message_date: int | None = None
    last_message_body: str | None = None
    last_message_type: str | None = None
    last_message_direction: str | None = None
    type: str | None = None
    unread_count: int = 0
    starred: bool | None = None
    assigned_to: str | None = None
    full_name: str | None = None
    contact_name: str | None = None
    email: str | None = None
    phone: str | None = None


class ConversationPage(_Reply, frozen=True, kw_only=True):
    conversations: list[ConversationSummary]
    total: int | None = None


class CreatedConversation(_Reply, frozen=True, kw_only=True):
    id: str
    contact_id: str
    location_id: str
    date_added: str | None = None
    date_updated: str | None = None
    last_message_date: str | None = None
    assigned_to: str | None = None


class CreatedEnvelope(_Reply, frozen=True, kw_only=True):
    conversation: CreatedConversation
    success: bool = True


class EnsuredConversation(msgspec.Struct, frozen=True, kw_only=True):
    """The conversation of a contact after a create; ``existed`` when GHL already had one."""

    id: str
    contact_id: str
    existed: bool


class Success(_Reply, frozen=True, kw_only=True):
    success: bool = True


class MessageMetaEmail(_Reply, frozen=True, kw_only=True):
    message_ids: list[str] = []


class MessageMeta(_Reply, frozen=True, kw_only=True):
    call_duration: str | int | None = None
    call_status: str | None = None
    email: MessageMetaEmail | None = None


class Message(_Reply, frozen=True, kw_only=True):
    """One message (``GetMessageResponseDto`` plus ``altId``, added to list items in 2025)."""

    id: str
    conversation_id: str
    contact_id: str
    location_id: str
    date_added: str
    date_updated: str | None = None
    type: int | None = None
    message_type: str | None = None
    body: str | None = None
    direction: str | None = None
    status: str | None = None
    content_type: str | None = None
    attachments: list[str] = []
    meta: MessageMeta | None = None
    source: str | None = None
    user_id: str | None = None
    conversation_provider_id: str | None = None
    alt_id: str | None = None
    chat_widget_id: str | None = None


class MessageEnvelope(_Reply, frozen=True, kw_only=True):
    message: Message


class MessagePage(_Reply, frozen=True, kw_only=True):
    """One page of a conversation's messages, newest first."""

    messages: list[Message]
    next_page: bool = False
    last_message_id: str | None = None


class MessageListEnvelope(_Reply, frozen=True, kw_only=True):
    # Live nests the page one level deeper than the spec (API_FACTS §2.2, issue #54).
    messages: MessagePage


class ExportPage(_Reply, frozen=True, kw_only=True):
    messages: list[Message]
    next_cursor: str | None = None
    total: int | None = None


class EmailMessage(_Reply, frozen=True, kw_only=True):
    """``GET /conversations/messages/email/{id}``: list items carry no email body."""

    id: str
    conversation_id: str
    contact_id: str
    body: str = ""
    alt_id: str | None = None
    thread_id: str | None = None
    location_id: str | None = None
    date_added: str | None = None
    subject: str | None = None
    direction: str | None = None
    status: str | None = None
    content_type: str | None = None
    attachments: list[str] = []
    provider: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: list[str] = []
    cc: list[str] = []
    bcc: list[str] = []
    reply_to_message_id: str | None = None
    source: str | None = None


class SendResult(_Reply, frozen=True, kw_only=True):
    """Answer of send and of a status update; GMB sends return ``message_ids`` instead."""

    conversation_id: str
    message_id: str | None = None
    status: str | None = None
    email_message_id: str | None = None
    message_ids: list[str] = []
    msg: str | None = None


class ProcessedMessage(_Reply, frozen=True, kw_only=True):
    """Answer of inbound and outbound-call records."""

    conversation_id: str
    message_id: str
    success: bool = True
    message: str | None = None
    contact_id: str | None = None
    date_added: str | None = None
    email_message_id: str | None = None


class UploadResult(_Reply, frozen=True, kw_only=True):
    uploaded_files: dict[str, str]
    twilio_media_sids: list[str] = []


class CancelResult(_Reply, frozen=True, kw_only=True):
    """The numeric ``status`` in the body says whether the cancel worked."""

    status: int
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the cancel took effect (the HTTP status is 200 either way)."""
        return 200 <= self.status < 300


class TranscriptSentence(_Reply, frozen=True, kw_only=True):
    sentence_index: int
    transcript: str
    media_channel: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    confidence: float | None = None


class CustomFieldRead(_Reply, frozen=True, kw_only=True):
    id: str
    value: Any = None


class Contact(_Reply, frozen=True, kw_only=True):
    id: str
    location_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    company_name: str | None = None
    source: str | None = None
    assigned_to: str | None = None
    dnd: bool | None = None
    tags: list[str] = []
    custom_fields: list[CustomFieldRead] = []
    date_added: str | None = None
    date_updated: str | None = None


class UpsertResult(_Reply, frozen=True, kw_only=True):
    new: bool
    contact: Contact
    trace_id: str | None = None


class ContactEnvelope(_Reply, frozen=True, kw_only=True):
    contact: Contact


class DuplicateEnvelope(_Reply, frozen=True, kw_only=True):
    contact: Contact | None = None


class TagsEnvelope(_Reply, frozen=True, kw_only=True):
    tags: list[str] = []


class Note(_Reply, frozen=True, kw_only=True):
    id: str
    body: str | None = None
    user_id: str | None = None
    contact_id: str | None = None
    date_added: str | None = None
    title: str | None = None
    color: str | None = None
    pinned: bool | None = None


class NoteEnvelope(_Reply, frozen=True, kw_only=True):
    note: Note


class NotesEnvelope(_Reply, frozen=True, kw_only=True):
    notes: list[Note]


class Task(_Reply, frozen=True, kw_only=True):
    id: str
    title: str | None = None
    body: str | None = None
    assigned_to: str | None = None
    due_date: str | None = None
    completed: bool | None = None
    contact_id: str | None = None


class TaskEnvelope(_Reply, frozen=True, kw_only=True):
    task: Task


class TasksEnvelope(_Reply, frozen=True, kw_only=True):
    tasks: list[Task]
