"""In-memory state and rules of the ActiveDEMAND simulator, with no HTTP in it.

Two layers, kept apart because their footing differs (see API_FACTS):

* the established v1 resources (contacts, the contact field catalogue, forms and form
  submissions), shaped as ActiveDEMAND's own code shows them;
* the PROPOSED partner-gated feeds (conversations, messages with media and calls,
  delivery status, histories). No API for these was found; their shape is this project's
  guess, written down here so the bridge has something to poll until the vendor's
  collection is seen. Every such choice carries a "Choice:" comment.
"""

from __future__ import annotations

import itertools
import random
import string
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bridge.sim.common import Clock, Faults, Journal, RawItems, RollingLimiter, random_id
from bridge.sim.ghl_state import small_wav

# Field keys of the v1 form-encoded API (API_FACTS §1.3): core fields by name, channels as
# dotted paths, custom fields as ``custom_<n>``.
FIRST_NAME, LAST_NAME = "first_name", "last_name"
EMAIL, PHONE = "emails.email_address", "phones.phone_number"
CORE_FIELDS: tuple[tuple[str, str, str], ...] = (
    (FIRST_NAME, "First Name", "text"),
    (LAST_NAME, "Last Name", "text"),
    (EMAIL, "Email Address", "email"),
    (PHONE, "Phone Number", "phone"),
)
CORE_KEYS = frozenset(k for k, _, _ in CORE_FIELDS)

# Choice: paging is not found (API_FACTS §2). ``page`` (1-based) and ``per_page`` are the
# first pair §3.2 says to probe; a larger per_page is capped silently, so a client that
# stops at "a page shorter than I asked for" stops too early unless it learns the cap.
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 100

# Choice (proposed feeds): the Conversations Inbox channels (API_FACTS §1.5) plus ``phone``
# for calls, which the inbox article does not list.
CHANNELS = frozenset({"sms", "email", "web_chat", "sales_note", "phone"})
MESSAGE_TYPES = frozenset({"text", "media", "call"})
DIRECTIONS = frozenset({"inbound", "outbound"})
# Choice: Twilio-like delivery states; inbound messages are ``received``.
STATUSES = frozenset({"queued", "sent", "delivered", "undelivered", "failed", "received"})
# Choice: a conversation is "open" or "closed" as the inbox shows it; the control endpoint
# may set any other non-empty string, so a client meets a status it has never seen.
CONVERSATION_STATUSES = frozenset({"open", "closed"})
# Choice: a closed set of history kinds; "form_submit" is what a form submission leaves.
HISTORY_KINDS = frozenset({"note", "sms", "email", "call", "web_chat", "form_submit"})

_CHUNK = 64 * 1024
_KEY_ALPHABET = string.ascii_lowercase + string.digits


class AdError(Exception):
    """A refusal the routes turn into the sim's ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def iso(ts: int) -> str:
    """Epoch seconds as a second-precision UTC string (the proposed feeds' timestamp form)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> int:
    """Epoch seconds from an ISO-8601 timestamp or date (naive means UTC); 400 if unreadable."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise AdError(400, f"Invalid timestamp: {value}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One entry of the contact field catalogue; ``login_url`` only for password fields."""

    key: str
    label: str
    type: str = "text"
    options: tuple[str, ...] = ()
    login_url: str | None = None


@dataclass(slots=True)
class Contact:
    """A contact as its field values keyed by catalogue key (``emails.email_address``...).

    ``updated`` and ``revision`` are the sim's change markers. Choice: neither is shown in
    the API, because no timestamp field of a contact was found (API_FACTS §2) and the
    bridge must detect changes by content hash (§3.2).
    """

    id: int
    created: int
    updated: int
    values: dict[str, str] = field(default_factory=dict)
    revision: int = 1

    @property
    def email(self) -> str | None:
        """The contact's e-mail address, if any."""
        return self.values.get(EMAIL)


@dataclass(slots=True)
class Form:
    """A web form: which catalogue fields it has and which it requires."""

    id: int
    name: str
    field_keys: tuple[str, ...]
    required: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Submission:
    """One accepted form post; ``ignored`` holds keys the form does not have."""

    id: int
    form_id: int
    contact_id: int
    created: int
    values: dict[str, str]
    ignored: dict[str, str]


@dataclass(slots=True)
class Attachment:
    """A file the sim serves at ``/files/{token}/{file_name}``.

    With ``data`` None the bytes are generated on download, so a huge file costs nothing
    to hold. ``send_length`` False streams it chunked with no Content-Length, so a client
    has to count bytes to enforce its own size limit.
    """

    id: int
    token: str
    file_name: str
    content_type: str
    size: int
    data: bytes | None = None
    send_length: bool = True

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes in chunks."""
        if self.data is not None:
            for start in range(0, len(self.data), _CHUNK):
                yield self.data[start : start + _CHUNK]
            return
        pattern = (f"ADSIM-{self.id}-".encode() * (_CHUNK // 8 + 1))[:_CHUNK]
        left = self.size
        while left > 0:
            yield pattern[: min(left, _CHUNK)]
            left -= _CHUNK


@dataclass(frozen=True, slots=True)
class Sentence:
    """One line of a call transcription, timed in milliseconds from the call's start."""

    speaker: str
    text: str
    start_ms: int
    end_ms: int
    confidence: float = 0.92


@dataclass(slots=True)
class Call:
    """A call's facts; None recording or transcript means none exists (yet)."""

    duration: int
    recording: bytes | None = None
    recording_type: str = "audio/wav"
    transcript: list[Sentence] | None = None


@dataclass(slots=True)
class Message:
    """One message of a conversation: text, media (with attachments) or a call."""

    id: int
    conversation_id: int
    contact_id: int
    channel: str
    direction: str
    type: str
    body: str
    created: int
    status: str
    status_updated: int
    subject: str | None = None
    error: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    call: Call | None = None


@dataclass(slots=True)
class Conversation:
    """A contact's thread on one channel; ``updated`` moves with every message or status.

    ``status`` is the conversation's own state (see ``CONVERSATION_STATUSES``), not a
    message's delivery status; a new conversation is "open".
    """

    id: int
    contact_id: int
    channel: str
    created: int
    updated: int
    message_ids: list[int] = field(default_factory=list)
    status: str = "open"


@dataclass(frozen=True, slots=True)
class History:
    """One contact history entry; ``source`` (not shown in the API) says who wrote it."""

    id: int
    contact_id: int
    kind: str
    text: str
    created: int
    source: str
    form_id: int | None = None


@dataclass(eq=False)
class Account:
    """Everything one account's API key sees."""

    id: str
    key: str
    fields: dict[str, FieldDef] = field(default_factory=dict)
    contacts: dict[int, Contact] = field(default_factory=dict)
    emails: dict[str, int] = field(default_factory=dict)
    forms: dict[int, Form] = field(default_factory=dict)
    submissions: list[Submission] = field(default_factory=list)
    conversations: dict[int, Conversation] = field(default_factory=dict)
    messages: dict[int, Message] = field(default_factory=dict)
    histories: dict[int, History] = field(default_factory=dict)


def _page(items: Sequence[Any], offset: int, limit: int) -> list[Any]:
    return list(items[offset : offset + limit])


# --------------------------------------------------------------------------- the simulator


class AdSim:
    """Everything one simulated ActiveDEMAND holds, plus the knobs tests turn.

    ``clock`` (monotonic seconds) drives the rate limit; ``wall`` (epoch seconds) stamps
    what clients see. Ids are integers from sim-wide counters, so a seeded build is
    reproducible and an id names one account's object.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        rate_limit: int = 5,
        rate_window: float = 1.0,
        require_application_key: bool = False,
        ignore_paging: bool = False,
    ) -> None:
        self.clock = clock
        self.wall = wall
        # Choice: no limit is documented (API_FACTS §2). 5/s sits above the bridge's own
        # budget of 2/s, so a well-behaved bridge never sees a 429 here.
        self.limiter = RollingLimiter(rate_limit, rate_window, clock=clock)
        # Counts every request of a known key, including ones a fault answered first.
        self.meter = RollingLimiter(1 << 62, rate_window, clock=clock)
        self.journal = Journal()
        self.faults = Faults(seed)
        self.require_application_key = require_application_key
        # An API that has no paging answers every page alike; the bridge must notice the
        # repeat (API_FACTS §3.2) rather than loop.
        self.ignore_paging = ignore_paging
        # ("contacts", "conversations" or "messages", id) -> the JSON served in that item's
        # place, so a test can make a list answer with a malformed record of its own.
        self.raw = RawItems()
        self._rng = random.Random(seed)
        self._accounts: dict[str, Account] = {}
        self._by_id: dict[str, Account] = {}
        self._applications: dict[str, frozenset[str] | None] = {}
        self._attachments: dict[str, Attachment] = {}
        self._contact_ids = itertools.count(10_001)
        self._custom_ids = itertools.count(53)
        self._form_ids = itertools.count(101)
        self._submission_ids = itertools.count(1)
        self._conversation_ids = itertools.count(5_001)
        self._message_ids = itertools.count(70_001)
        self._attachment_ids = itertools.count(1)
        self._history_ids = itertools.count(900_001)
        self._touches = itertools.count(1)

    # ----------------------------------------------------------------- setup and auth

    def now(self) -> int:
        """Wall-clock epoch seconds."""
        return int(self.wall())

    def add_account(self, key: str | None = None) -> str:
        """Register an account reachable with API key ``key`` (made up when None)."""
        key = key or f"sim-ad-{random_id(self._rng, 32, _KEY_ALPHABET)}"
        if key not in self._accounts:
            account = Account(f"account-{len(self._accounts) + 1}", key)
            for fkey, label, kind in CORE_FIELDS:
                account.fields[fkey] = FieldDef(fkey, label, kind)
            self._accounts[key] = account
            self._by_id[account.id] = account
        return key

    def add_application(
        self, app_key: str | None = None, *, accounts: Iterable[str] | None = None
    ) -> str:
        """Register a partner Application API Key, granted to ``accounts`` (keys; None = all)."""
        app_key = app_key or f"sim-ad-app-{random_id(self._rng, 24, _KEY_ALPHABET)}"
        grant = None if accounts is None else frozenset(self._account(k).id for k in accounts)
        self._applications[app_key] = grant
        return app_key

    def set_rate_limit(self, limit: int, window: float = 1.0) -> None:
        """Replace the per-account limiter and meter (their counters start over)."""
        self.limiter = RollingLimiter(limit, window, clock=self.clock)
        self.meter = RollingLimiter(1 << 62, window, clock=self.clock)

    def find_account(self, key: str | None) -> Account | None:
        """The account an API key opens, or None."""
        return self._accounts.get(key) if key else None

    def authenticate(self, key: str | None, app_key: str | None, *, partner: bool) -> Account:
        """Check the account key and, where needed, the partner application key.

        401 for a missing or unknown key of either kind (the Shopify app's reading of 401:
        invalid key); 403 for an application key not granted this account ("key lacks
        permission for that account"). Choice: the partner feeds always need an
        application key; v1 routes need one only when the sim is built to require it.
        An application key that is sent is checked even when not required.
        """
        account = self.find_account(key)
        if account is None:
            raise AdError(401, "Invalid API key")
        if app_key is None:
            if partner or self.require_application_key:
                raise AdError(401, "Missing application API key")
            return account
        if app_key not in self._applications:
            raise AdError(401, "Invalid application API key")
        grant = self._applications[app_key]
        if grant is not None and account.id not in grant:
            raise AdError(403, "This application is not authorised for this account")
        return account

    def _account(self, key: str) -> Account:
        account = self._accounts.get(key)
        if account is None:
            raise KeyError("unknown API key")
        return account

    def account_id(self, key: str) -> str:
        """The non-secret label of a key's account (used in the journal and stats)."""
        return self._account(key).id

    def key_for(self, account_id: str) -> str:
        """The API key of an account label (for control endpoints, which take labels)."""
        account = self._by_id.get(account_id)
        if account is None:
            raise KeyError(f"unknown account {account_id!r}")
        return account.key

    # ----------------------------------------------------------------- field catalogue

    def add_custom_field(
        self,
        key: str,
        label: str,
        *,
        type: str = "text",
        options: Sequence[str] = (),
    ) -> str:
        """Add a ``custom_<n>`` field to an account's catalogue; returns its key."""
        account = self._account(key)
        fkey = f"custom_{next(self._custom_ids)}"
        login = f"https://{account.id}.activedemand.example/login" if type == "password" else None
        account.fields[fkey] = FieldDef(fkey, label, type, tuple(options), login)
        return fkey

    def fields(self, key: str) -> list[FieldDef]:
        """``GET contacts/fields.json``: the catalogue, core fields first."""
        return list(self._account(key).fields.values())

    def field(self, key: str, field_key: str) -> FieldDef:
        """``GET contacts/field.json?field_key=``; 404 for an unknown key."""
        found = self._account(key).fields.get(field_key)
        if found is None:
            raise AdError(404, f"Field {field_key} not found")
        return found

    # ----------------------------------------------------------------- contacts

    def add_contact(
        self,
        key: str,
        values: Mapping[str, str] | None = None,
        *,
        created: int | None = None,
        **named: str,
    ) -> Contact:
        """Store a new contact from catalogue-keyed values (``first_name=`` etc. also work).

        No dedupe here: seeding and tests decide; the API's upsert rules live in
        ``upsert_contact``.
        """
        account = self._account(key)
        merged = {**(values or {}), **named}
        self._check_values(account, merged)
        ts = created if created is not None else self.now()
        contact = Contact(next(self._contact_ids), ts, ts, {k: v for k, v in merged.items() if v})
        account.contacts[contact.id] = contact
        if contact.email:
            account.emails.setdefault(contact.email.lower(), contact.id)
        return contact

    def update_contact(
        self, key: str, contact_id: int, changes: Mapping[str, str] | None = None
    ) -> Contact:
        """Change a contact as a user would in the UI (default: one custom value), bumping
        its updated marker and revision."""
        account = self._account(key)
        contact = self.contact(key, contact_id)
        if changes is None:
            fkey = next((k for k in account.fields if k not in CORE_KEYS), None)
            if fkey is None:
                fkey = self.add_custom_field(key, "Sim touch")
            changes = {fkey: f"touch {next(self._touches)}"}
        self._check_values(account, changes)
        self._merge(account, contact, changes)
        return contact

    def contact(self, key: str, contact_id: int) -> Contact:
        """One contact; 404 when the account has no such id."""
        found = self._account(key).contacts.get(contact_id)
        if found is None:
            raise AdError(404, f"Contact {contact_id} not found")
        return found

    def contacts(self, key: str) -> list[Contact]:
        """Every contact of an account in listing order."""
        return list(self._account(key).contacts.values())

    def list_contacts(
        self, key: str, offset: int = 0, limit: int = DEFAULT_PER_PAGE
    ) -> list[Contact]:
        """One page of ``GET contacts.json``.

        Choice: ascending id (sort order is not found). There is no change filter.
        """
        return _page(self.contacts(key), offset, limit)

    def upsert_contact(self, key: str, values: Mapping[str, str]) -> tuple[Contact, bool]:
        """``POST contacts.json``: (contact, created).

        Choice (dedupe not found): an e-mail address matching an existing contact's,
        ignoring case, updates that contact; otherwise a new one is made. A contact needs
        an e-mail or a phone. Empty values are ignored, never used to clear a field.
        """
        account = self._account(key)
        self._check_values(account, values)
        email, phone = values.get(EMAIL), values.get(PHONE)
        if not email and not phone:
            raise AdError(422, "A contact needs an email address or a phone number")
        existing = account.emails.get(email.lower()) if email else None
        if existing is not None:
            contact = account.contacts[existing]
            self._merge(account, contact, values)
            return contact, False
        return self.add_contact(key, values), True

    def _check_values(self, account: Account, values: Mapping[str, str]) -> None:
        unknown = sorted(k for k in values if k not in account.fields)
        if unknown:
            raise AdError(422, f"Unknown contact fields: {', '.join(unknown)}")
        email = values.get(EMAIL)
        if email and "@" not in email:
            raise AdError(422, f"Invalid email address: {email}")

    def _merge(self, account: Account, contact: Contact, values: Mapping[str, str]) -> None:
        old = contact.email
        contact.values.update({k: v for k, v in values.items() if v})
        if old != contact.email:
            if old and account.emails.get(old.lower()) == contact.id:
                del account.emails[old.lower()]
            if contact.email:
                account.emails.setdefault(contact.email.lower(), contact.id)
        # Every write bumps the marker, even one that changes nothing.
        contact.updated = max(contact.updated, self.now())
        contact.revision += 1

    # ----------------------------------------------------------------- forms

    def add_form(
        self,
        key: str,
        name: str,
        field_keys: Sequence[str],
        *,
        required: Sequence[str] = (EMAIL,),
    ) -> Form:
        """Create a web form over catalogue fields."""
        account = self._account(key)
        unknown = [k for k in (*field_keys, *required) if k not in account.fields]
        if unknown:
            raise ValueError(f"fields not in the catalogue: {unknown}")
        form = Form(next(self._form_ids), name, tuple(field_keys), tuple(required))
        account.forms[form.id] = form
        return form

    def forms(self, key: str) -> list[Form]:
        """``GET forms.json``."""
        return list(self._account(key).forms.values())

    def form(self, key: str, form_id: int) -> Form:
        """One form; 404 when unknown."""
        found = self._account(key).forms.get(form_id)
        if found is None:
            raise AdError(404, f"Form {form_id} not found")
        return found

    def form_fields(self, key: str, form_id: int) -> list[tuple[FieldDef, bool]]:
        """``GET forms/fields.json?form_id=``: each field with whether it is required."""
        account = self._account(key)
        form = self.form(key, form_id)
        return [(account.fields[k], k in form.required) for k in form.field_keys]

    def submit_form(self, key: str, form_id: int, values: Mapping[str, str]) -> Submission:
        """``POST forms/{id}``: upsert the contact by e-mail, keep the submission, add history.

        That a submission creates or updates the contact is API_FACTS' inference (§1.3).
        Choice: keys the form does not have are ignored, as a web form would, and kept in
        ``Submission.ignored`` so tests can see them; missing required fields are a 422.
        """
        account = self._account(key)
        form = self.form(key, form_id)
        accepted = {k: v for k, v in values.items() if k in form.field_keys}
        ignored = {k: v for k, v in values.items() if k not in form.field_keys}
        missing = [k for k in form.required if not accepted.get(k)]
        if missing:
            raise AdError(422, f"Required fields missing: {', '.join(missing)}")
        contact, _ = self.upsert_contact(key, accepted)
        submission = Submission(
            next(self._submission_ids), form.id, contact.id, self.now(), accepted, ignored
        )
        account.submissions.append(submission)
        text = f"Submitted form: {form.name}"
        self._history(account, contact.id, "form_submit", text, "form", form_id=form.id)
        return submission

    def submissions(self, key: str, form_id: int | None = None) -> list[Submission]:
        """Form submissions received, oldest first (optionally of one form)."""
        found = self._account(key).submissions
        return [s for s in found if form_id is None or s.form_id == form_id]

    # ----------------------------------------------------------------- conversations

    def add_conversation(
        self, key: str, contact_id: int, *, channel: str = "sms", created: int | None = None
    ) -> Conversation:
        """Open a conversation with a contact on a channel."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        account = self._account(key)
        self.contact(key, contact_id)
        ts = created if created is not None else self.now()
        conv = Conversation(next(self._conversation_ids), contact_id, channel, ts, ts)
        account.conversations[conv.id] = conv
        return conv

    def add_attachment(
        self,
        file_name: str,
        content_type: str,
        *,
        data: bytes | None = None,
        size: int | None = None,
        send_length: bool = True,
    ) -> Attachment:
        """Register a downloadable file: given ``data``, or ``size`` generated bytes."""
        if (data is None) == (size is None):
            raise ValueError("give exactly one of data or size")
        length = len(data) if data is not None else size
        assert length is not None
        token = random_id(self._rng, 24)
        att = Attachment(
            next(self._attachment_ids), token, file_name, content_type, length, data, send_length
        )
        self._attachments[token] = att
        return att

    def add_message(
        self,
        key: str,
        conversation_id: int,
        *,
        body: str = "",
        direction: str = "inbound",
        attachments: Sequence[Attachment] = (),
        status: str | None = None,
        subject: str | None = None,
        created: int | None = None,
    ) -> Message:
        """Append a text message, or a media message when ``attachments`` are given."""
        kind = "media" if attachments else "text"
        return self._append(
            key, conversation_id, kind, body, direction, status, subject, created, attachments
        )

    def add_call(
        self,
        key: str,
        conversation_id: int,
        *,
        duration: int,
        direction: str = "inbound",
        recording: bytes | None = None,
        transcript: Sequence[tuple[str, str]] | None = None,
        status: str | None = None,
        created: int | None = None,
    ) -> Message:
        """Append a call; ``recording`` None means none exists (a missed call)."""
        msg = self._append(key, conversation_id, "call", "", direction, status, None, created, ())
        msg.call = Call(duration, recording, transcript=_sentences(transcript))
        return msg

    def set_transcription(
        self, key: str, message_id: int, transcript: Sequence[tuple[str, str]]
    ) -> Message:
        """Make a call's transcription available (it is 404 until then)."""
        msg = self.message(key, message_id)
        if msg.call is None:
            raise ValueError("not a call")
        msg.call.transcript = _sentences(transcript)
        self._bump(self._account(key), msg.conversation_id)
        return msg

    def _append(
        self,
        key: str,
        conversation_id: int,
        kind: str,
        body: str,
        direction: str,
        status: str | None,
        subject: str | None,
        created: int | None,
        attachments: Sequence[Attachment],
    ) -> Message:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}")
        account = self._account(key)
        conv = self.conversation(key, conversation_id)
        status = status or ("received" if direction == "inbound" else "sent")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        ts = created if created is not None else self.now()
        msg = Message(
            next(self._message_ids),
            conv.id,
            conv.contact_id,
            conv.channel,
            direction,
            kind,
            body,
            ts,
            status,
            ts,
            subject=subject,
            attachments=list(attachments),
        )
        account.messages[msg.id] = msg
        conv.message_ids.append(msg.id)
        conv.updated = max(conv.updated, ts)
        return msg

    def set_status(
        self, key: str, message_id: int, status: str, *, error: str | None = None
    ) -> Message:
        """Move a message to a delivery status; its conversation's ``updated`` follows."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        account = self._account(key)
        msg = self.message(key, message_id)
        msg.status, msg.error = status, error
        msg.status_updated = max(msg.status_updated, self.now())
        self._bump(account, msg.conversation_id)
        return msg

    def set_conversation_status(self, key: str, conversation_id: int, status: str) -> Conversation:
        """Set a conversation's status, moving its ``updated`` as a new message would.

        Any non-empty string is taken (see ``CONVERSATION_STATUSES``); setting the status
        it already has still moves ``updated``, as every contact write does.
        """
        if not status:
            raise ValueError("status must not be empty")
        account = self._account(key)
        conv = self.conversation(key, conversation_id)
        conv.status = status
        self._bump(account, conv.id)
        return conv

    def _bump(self, account: Account, conversation_id: int) -> None:
        conv = account.conversations[conversation_id]
        conv.updated = max(conv.updated, self.now())

    def conversation(self, key: str, conversation_id: int) -> Conversation:
        """One conversation; 404 when unknown."""
        found = self._account(key).conversations.get(conversation_id)
        if found is None:
            raise AdError(404, f"Conversation {conversation_id} not found")
        return found

    def list_conversations(
        self,
        key: str,
        *,
        updated_since: int | None = None,
        offset: int = 0,
        limit: int = DEFAULT_PER_PAGE,
    ) -> list[Conversation]:
        """One page of the proposed ``GET conversations.json``.

        Choice: ordered by (updated, id) ascending, with an inclusive ``updated_since`` so
        a poller with an overlap window loses nothing at a second boundary. A conversation
        that changes while a client pages moves to the end, as it would live.
        """
        found = [
            c
            for c in self._account(key).conversations.values()
            if updated_since is None or c.updated >= updated_since
        ]
        found.sort(key=lambda c: (c.updated, c.id))
        return _page(found, offset, limit)

    def list_messages(
        self,
        key: str,
        conversation_id: int,
        *,
        since_id: int | None = None,
        offset: int = 0,
        limit: int = DEFAULT_PER_PAGE,
    ) -> list[Message]:
        """One page of a conversation's messages, oldest first; ``since_id`` is exclusive."""
        account = self._account(key)
        conv = self.conversation(key, conversation_id)
        ids = [i for i in conv.message_ids if since_id is None or i > since_id]
        return [account.messages[i] for i in _page(ids, offset, limit)]

    def message(self, key: str, message_id: int) -> Message:
        """One message; 404 when unknown."""
        found = self._account(key).messages.get(message_id)
        if found is None:
            raise AdError(404, f"Message {message_id} not found")
        return found

    def recording(self, key: str, message_id: int) -> tuple[bytes, str]:
        """A call's audio and its content type; 404 for non-calls and calls without one."""
        call = self.message(key, message_id).call
        if call is None or call.recording is None:
            raise AdError(404, f"No recording for message {message_id}")
        return call.recording, call.recording_type

    def transcription(self, key: str, message_id: int) -> list[Sentence]:
        """A call's transcription; 404 for non-calls and until one is ready."""
        call = self.message(key, message_id).call
        if call is None or call.transcript is None:
            raise AdError(404, f"No transcription for message {message_id}")
        return call.transcript

    def attachment(self, token: str) -> Attachment:
        """The file behind a download token; 404 when unknown."""
        found = self._attachments.get(token)
        if found is None:
            raise AdError(404, "File not found")
        return found

    # ----------------------------------------------------------------- histories

    def add_history(self, key: str, contact_id: int, kind: str, text: str) -> History:
        """The proposed ``POST histories.json``: one entry on a contact's history."""
        account = self._account(key)
        if kind not in HISTORY_KINDS:
            raise AdError(422, f"Unknown history kind: {kind}")
        if not text.strip():
            raise AdError(422, "History text must not be empty")
        self.contact(key, contact_id)
        return self._history(account, contact_id, kind, text, "api")

    def _history(
        self,
        account: Account,
        contact_id: int,
        kind: str,
        text: str,
        source: str,
        *,
        form_id: int | None = None,
    ) -> History:
        entry = History(
            next(self._history_ids), contact_id, kind, text, self.now(), source, form_id
        )
        account.histories[entry.id] = entry
        return entry

    def seed_history(
        self, key: str, contact_id: int, kind: str, text: str, *, created: int
    ) -> History:
        """A history entry as if written inside ActiveDEMAND (source ``seed``)."""
        account = self._account(key)
        entry = History(next(self._history_ids), contact_id, kind, text, created, "seed")
        account.histories[entry.id] = entry
        return entry

    def list_histories(
        self,
        key: str,
        *,
        contact_id: int | None = None,
        kind: str | None = None,
        since_id: int | None = None,
        offset: int = 0,
        limit: int = DEFAULT_PER_PAGE,
    ) -> list[History]:
        """One page of the proposed ``GET histories.json``, ascending id, filters applied."""
        found = [
            h
            for h in self._account(key).histories.values()
            if (contact_id is None or h.contact_id == contact_id)
            and (kind is None or h.kind == kind)
            and (since_id is None or h.id > since_id)
        ]
        return _page(found, offset, limit)

    def histories(self, key: str, *, source: str | None = None) -> list[History]:
        """Every history entry, oldest first; ``source`` "api", "form" or "seed" narrows."""
        found = self._account(key).histories.values()
        return [h for h in found if source is None or h.source == source]

    # ----------------------------------------------------------------- inspection

    def counts(self, key: str) -> dict[str, int]:
        """How many of each object an account holds."""
        a = self._account(key)
        messages = a.messages.values()
        return {
            "contacts": len(a.contacts),
            "fields": len(a.fields),
            "forms": len(a.forms),
            "submissions": len(a.submissions),
            "conversations": len(a.conversations),
            "messages": len(a.messages),
            "media_messages": sum(1 for m in messages if m.type == "media"),
            "calls": sum(1 for m in messages if m.type == "call"),
            "histories": len(a.histories),
        }

    def max_rate_seen(self, key: str) -> int:
        """Most requests this key sent within any rolling window (429s and faults included)."""
        return self.meter.max_attempted_in_window().get(self.account_id(key), 0)

    def rate_limited(self, key: str) -> int:
        """How many of this key's requests were answered 429."""
        return self.limiter.rejected().get(self.account_id(key), 0)

    def stats(self) -> dict[str, Any]:
        """Sim-side counters for ``/_sim/stats``, keyed by account label, never by key."""
        return {
            "rateLimited": self.limiter.rejected(),
            "maxInWindow": self.limiter.max_in_window(),
            "maxAttemptedInWindow": self.meter.max_attempted_in_window(),
            "accounts": {a.id: self.counts(k) for k, a in self._accounts.items()},
        }


def _sentences(transcript: Sequence[tuple[str, str]] | None) -> list[Sentence] | None:
    """Timed sentences, one every 2.5 s, from (speaker, text) pairs."""
    if transcript is None:
        return None
    return [
        Sentence(speaker, text, i * 2_500, i * 2_500 + 2_300)
        for i, (speaker, text) in enumerate(transcript)
    ]


def default_recording(seconds: float = 0.25) -> bytes:
    """A small valid WAV standing in for call audio."""
    return small_wav(seconds)
