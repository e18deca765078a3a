"""In-memory state and rules of the HighLevel simulator, with no HTTP in it."""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
import time
import uuid
import wave
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from bridge.sim.common import Clock, Faults, Journal, RollingLimiter, random_id

CONVERSATIONS_VERSION = "2021-04-15"
CONTACTS_VERSION = "2021-07-28"

LOCATION_SCOPES = frozenset(
    {
        "conversations.readonly",
        "conversations.write",
        "conversations/message.readonly",
        "conversations/message.write",
        "contacts.readonly",
        "contacts.write",
        "locations.readonly",
        "locations/customFields.readonly",
        "locations/customFields.write",
        "locations/tags.readonly",
        "locations/tags.write",
    }
)
AGENCY_SCOPES = LOCATION_SCOPES | {"oauth.readonly", "oauth.write"}

# The numeric message type is the 1-based position in GHL's enum without TYPE_RCS, which
# reproduces every documented pairing (1 call, 2 SMS, 3 email, 10 voicemail, 34 custom
# call); RCS arrived later, so it takes the next free number.
_TYPE_ORDER = [
    "TYPE_CALL",
    "TYPE_SMS",
    "TYPE_EMAIL",
    "TYPE_SMS_REVIEW_REQUEST",
    "TYPE_WEBCHAT",
    "TYPE_SMS_NO_SHOW_REQUEST",
    "TYPE_CAMPAIGN_SMS",
    "TYPE_CAMPAIGN_CALL",
    "TYPE_CAMPAIGN_EMAIL",
    "TYPE_CAMPAIGN_VOICEMAIL",
    "TYPE_FACEBOOK",
    "TYPE_CAMPAIGN_FACEBOOK",
    "TYPE_CAMPAIGN_MANUAL_CALL",
    "TYPE_CAMPAIGN_MANUAL_SMS",
    "TYPE_GMB",
    "TYPE_CAMPAIGN_GMB",
    "TYPE_REVIEW",
    "TYPE_INSTAGRAM",
    "TYPE_WHATSAPP",
    "TYPE_CUSTOM_SMS",
    "TYPE_CUSTOM_EMAIL",
    "TYPE_CUSTOM_PROVIDER_SMS",
    "TYPE_CUSTOM_PROVIDER_EMAIL",
    "TYPE_IVR_CALL",
    "TYPE_ACTIVITY_CONTACT",
    "TYPE_ACTIVITY_INVOICE",
    "TYPE_ACTIVITY_PAYMENT",
    "TYPE_ACTIVITY_OPPORTUNITY",
    "TYPE_LIVE_CHAT",
    "TYPE_LIVE_CHAT_INFO_MESSAGE",
    "TYPE_ACTIVITY_APPOINTMENT",
    "TYPE_FACEBOOK_COMMENT",
    "TYPE_INSTAGRAM_COMMENT",
    "TYPE_CUSTOM_CALL",
    "TYPE_INTERNAL_COMMENT",
    "TYPE_ACTIVITY_EMPLOYEE_ACTION_LOG",
    "TYPE_TIKTOK",
    "TYPE_TIKTOK_COMMENT",
    "TYPE_ACTIVITY_WHATSAPP",
    "TYPE_FORM_SUBMISSION",
    "TYPE_SMS_REACTION",
    "TYPE_RCS",
]
TYPE_CODES = {name: i + 1 for i, name in enumerate(_TYPE_ORDER)}

# Body ``type`` of send/inbound/outbound → stored messageType.
BODY_TYPES = {
    "SMS": "TYPE_SMS",
    "RCS": "TYPE_RCS",
    "Email": "TYPE_EMAIL",
    "WhatsApp": "TYPE_WHATSAPP",
    "GMB": "TYPE_GMB",
    "IG": "TYPE_INSTAGRAM",
    "FB": "TYPE_FACEBOOK",
    "Custom": "TYPE_CUSTOM_PROVIDER_SMS",
    "WebChat": "TYPE_WEBCHAT",
    "Live_Chat": "TYPE_LIVE_CHAT",
    "Call": "TYPE_CALL",
    "IVR_Call": "TYPE_IVR_CALL",
    "Campaign_Call": "TYPE_CAMPAIGN_CALL",
    "Campaign_VoiceMail": "TYPE_CAMPAIGN_VOICEMAIL",
    "TIKTOK": "TYPE_TIKTOK",
    "ALL_IN_ONE_CHAT": "TYPE_LIVE_CHAT",
    "FORM_SUBMISSION": "TYPE_FORM_SUBMISSION",
}
CALL_TYPES = frozenset(
    {
        "TYPE_CALL",
        "TYPE_IVR_CALL",
        "TYPE_CAMPAIGN_CALL",
        "TYPE_CAMPAIGN_VOICEMAIL",
        "TYPE_CAMPAIGN_MANUAL_CALL",
        "TYPE_CUSTOM_CALL",
    }
)
EMAIL_TYPES = frozenset(
    {"TYPE_EMAIL", "TYPE_CUSTOM_EMAIL", "TYPE_CUSTOM_PROVIDER_EMAIL", "TYPE_CAMPAIGN_EMAIL"}
)
EXPORT_CHANNELS: dict[str, frozenset[str]] = {
    "Call": CALL_TYPES,
    "SMS": frozenset(
        {"TYPE_SMS", "TYPE_CUSTOM_SMS", "TYPE_CUSTOM_PROVIDER_SMS", "TYPE_CAMPAIGN_SMS"}
    ),
    "Email": EMAIL_TYPES,
    "WhatsApp": frozenset({"TYPE_WHATSAPP"}),
    "Instagram": frozenset({"TYPE_INSTAGRAM"}),
    "Facebook": frozenset({"TYPE_FACEBOOK"}),
}

INVALID_JWT = "Invalid JWT"
TOKEN_INVALID = "Invalid token: access token is invalid"
SCOPE_DENIED = "The token is not authorized for this scope."
LOCATION_DENIED = "The token does not have access to this location."


class GhlError(Exception):
    """A refusal the routes turn into an HTTP error; ``body`` replaces the NestJS shape."""

    def __init__(
        self,
        status: int,
        message: str | list[str],
        *,
        error: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error
        self.body = body


def _forbidden() -> GhlError:
    return GhlError(403, LOCATION_DENIED, error="Forbidden")


def _oauth_error(status: int, error: str, description: str) -> GhlError:
    body = {"statusCode": status, "error": error, "error_description": description}
    return GhlError(status, description, body=body | {"message": description})


def iso(ms: int) -> str:
    """Epoch milliseconds as the ISO-8601 UTC string GHL returns."""
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def parse_time_ms(value: str, name: str = "date") -> int:
    """Epoch milliseconds from a digits-only string or an ISO-8601 date(-time); else a 422."""
    if value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise GhlError(
            422, [f"{name} must be a valid ISO 8601 date string"], error="Unprocessable Entity"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def normalize_phone(phone: str) -> str:
    """E.164-ish form used for matching: GHL stores +<country><number>."""
    digits = re.sub(r"\D", "", phone)
    if phone.strip().startswith("+"):
        return "+" + digits
    if len(digits) == 10:
        return "+1" + digits
    return "+" + digits


def small_wav(seconds: float = 0.25, rate: int = 8000) -> bytes:
    """A valid mono 16-bit PCM WAV of silence, standing in for a call recording."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Location:
    id: str
    company_id: str
    allow_duplicates: bool = False
    custom_fields: dict[str, str] = field(default_factory=dict)  # key -> field id
    providers: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Token:
    """An access token or PIT; ``principal`` is the app (or PIT) half of the rate bucket."""

    value: str
    kind: Literal["pit", "oauth"]
    user_type: Literal["Location", "Company"]
    location_id: str | None
    company_id: str
    scopes: frozenset[str]
    principal: str
    expires_at: float | None = None
    revoked: bool = False

    @property
    def bucket(self) -> str:
        """Rate-limit key: one budget per app (or PIT) per location (or company)."""
        return f"{self.principal}@{self.location_id or self.company_id}"


@dataclass(slots=True)
class Grant:
    """What a refresh token or authorization code stands for."""

    client_id: str
    user_type: Literal["Location", "Company"]
    location_id: str | None
    company_id: str
    scopes: frozenset[str]
    user_id: str
    used: bool = False
    revoked: bool = False


@dataclass(slots=True)
class Contact:
    id: str
    location_id: str
    fields: dict[str, Any]
    tags: list[str]
    custom: dict[str, Any]
    date_added: int
    date_updated: int
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class Conversation:
    id: str
    location_id: str
    contact_id: str
    date_added: int
    created_mono: float
    type_code: int
    date_updated: int = 0
    last_message_date: int = 0
    last_message_body: str | None = None
    last_message_type: str | None = None
    last_message_direction: str | None = None
    unread_count: int = 0
    starred: bool = False
    assigned_to: str | None = None
    feedback: dict[str, Any] | None = None
    message_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Message:
    id: str
    seq: int
    location_id: str
    contact_id: str
    conversation_id: str
    message_type: str
    direction: str
    status: str
    date_added: int
    date_updated: int
    created_mono: float
    source: str
    body: str | None = None
    attachments: list[str] = field(default_factory=list)
    alt_id: str | None = None
    user_id: str | None = None
    provider_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    email: dict[str, Any] | None = None
    email_message_id: str | None = None
    via_send: bool = False


# --------------------------------------------------------------------------- the simulator


class GhlSim:
    """Everything one simulated HighLevel holds, plus the knobs tests turn.

    ``clock`` (monotonic seconds) drives token expiry, search lag, the status-403 window and
    rate limits, so a test can move time without sleeping; ``wall`` (epoch seconds) only
    stamps dates shown to clients.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        burst_limit: int = 100,
        burst_window: float = 10.0,
        daily_limit: int = 200_000,
        access_token_ttl: int = 86_399,
        token_expires_in: int | None = None,
        search_lag: float = 0.0,
        status_403_window: float = 10.0,
        upload_limit: int = 5 * 1024 * 1024,
        company_id: str = "sim-company",
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.access_token_ttl = access_token_ttl
        # What ``expires_in`` tells clients (None: the truth). Set above the real lifetime,
        # tokens die before the client expects, as after a revocation or clock skew, and
        # only a 401 tells it so.
        self.token_expires_in = token_expires_in
        self.search_lag = search_lag
        self.status_403_window = status_403_window
        self.upload_limit = upload_limit
        self.company_id = company_id
        # Some tokens may read messages but not export them (API_FACTS §2.2 names a scope
        # only); a test turns this on to drive the bridge's search-and-list fallback.
        self.export_denied = False
        self.journal = Journal()
        self.faults = Faults(seed)
        self.limiter = RollingLimiter(
            burst_limit, burst_window, daily_limit=daily_limit, clock=clock
        )
        self.rate_limited = 0
        self.refreshes: Counter[str] = Counter()
        self.dropped_inbound = 0
        self.sent_outbound: list[dict[str, Any]] = []
        self.uploads: list[dict[str, Any]] = []
        self._rng = random.Random(seed)
        self._seq = 0
        self._locations: dict[str, Location] = {}
        self._apps: dict[str, str] = {}
        self._tokens: dict[str, Token] = {}
        self._refresh: dict[str, Grant] = {}
        self._codes: dict[str, Grant] = {}
        self._pits = 0
        self._contacts: dict[str, Contact] = {}
        self._conversations: dict[str, Conversation] = {}
        self._match_index: dict[tuple[str, str], list[str]] = {}
        self._conv_by_contact: dict[str, str] = {}
        self._messages: dict[str, Message] = {}
        self._email_ids: dict[str, str] = {}
        self._recordings: dict[str, bytes] = {}
        self._transcripts: dict[str, list[str]] = {}

    # ----------------------------------------------------------------- setup helpers

    def new_id(self) -> str:
        """A fresh 20-character alphanumeric id, like GHL's."""
        return random_id(self._rng)

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds."""
        return int(self.wall() * 1000)

    def set_rate_limit(
        self, burst_limit: int, burst_window: float, daily_limit: int | None
    ) -> None:
        """Replace the limiter (its counters start over)."""
        self.limiter = RollingLimiter(
            burst_limit, burst_window, daily_limit=daily_limit, clock=self.clock
        )

    def add_location(
        self, location_id: str, company_id: str | None = None, *, allow_duplicates: bool = False
    ) -> None:
        """Register a sub-account (idempotent)."""
        if location_id not in self._locations:
            self._locations[location_id] = Location(
                location_id, company_id or self.company_id, allow_duplicates
            )

    def add_custom_field(self, location_id: str, key: str, field_id: str | None = None) -> str:
        """Define a contact custom field so upserts may name it by ``key``; returns its id."""
        self.add_location(location_id)
        fid = field_id or self.new_id()
        self._locations[location_id].custom_fields[key] = fid
        return fid

    def add_conversation_provider(self, location_id: str, provider_id: str | None = None) -> str:
        """Register a custom conversation provider (24-hex id) on a location."""
        self.add_location(location_id)
        pid = provider_id or random_id(self._rng, 24, "0123456789abcdef")
        self._locations[location_id].providers.add(pid)
        return pid

    def add_private_token(self, location_id: str, scopes: Iterable[str] = LOCATION_SCOPES) -> str:
        """Create a Sub-Account Private Integration Token and return it."""
        self.add_location(location_id)
        self._pits += 1
        value = f"pit-{uuid.UUID(int=self._rng.getrandbits(128), version=4)}"
        self._tokens[value] = Token(
            value,
            "pit",
            "Location",
            location_id,
            self._locations[location_id].company_id,
            frozenset(scopes),
            principal=f"pit{self._pits}",
        )
        return value

    def add_oauth_app(self, client_id: str, client_secret: str) -> None:
        """Register a marketplace app's credentials."""
        self._apps[client_id] = client_secret

    def issue_auth_code(
        self,
        location_id: str | None,
        scopes: Iterable[str] | None = None,
        *,
        client_id: str | None = None,
        company_id: str | None = None,
    ) -> str:
        """What the browser redirect would carry; ``location_id=None`` asks for a Company token."""
        if client_id is None:
            client_id = next(iter(self._apps), "sim-client")
            self._apps.setdefault(client_id, "sim-secret")
        if location_id is not None:
            self.add_location(location_id, company_id)
            company = self._locations[location_id].company_id
        else:
            company = company_id or self.company_id
        default = LOCATION_SCOPES if location_id else AGENCY_SCOPES
        code = self._token_value(32)
        self._codes[code] = Grant(
            client_id,
            "Location" if location_id else "Company",
            location_id,
            company,
            frozenset(scopes if scopes is not None else default),
            user_id=self.new_id(),
        )
        return code

    def revoke(self, location_id: str) -> None:
        """Invalidate every access token, PIT and refresh token of a location (an uninstall)."""
        for token in self._tokens.values():
            if token.location_id == location_id:
                token.revoked = True
        for grant in self._refresh.values():
            if grant.location_id == location_id:
                grant.revoked = True

    def set_recording(self, message_id: str, data: bytes) -> None:
        """Seed the audio a recording download returns (e.g. a larger file)."""
        self._recordings[message_id] = data

    def set_transcription(self, message_id: str, sentences: list[str]) -> None:
        """Seed the sentences a transcription returns."""
        self._transcripts[message_id] = list(sentences)

    def _token_value(self, nbytes: int) -> str:
        return f"{self._rng.getrandbits(nbytes * 8):0{nbytes * 2}x}"

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ----------------------------------------------------------------- auth

    def authenticate(self, header: str | None) -> Token:
        """The token behind an ``Authorization`` header, or the 401 GHL would answer."""
        scheme, _, value = (header or "").partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise GhlError(401, INVALID_JWT)
        expired = token.expires_at is not None and self.clock() >= token.expires_at
        if token.revoked or expired:
            raise GhlError(401, TOKEN_INVALID, error="Unauthorized")
        return token

    @staticmethod
    def require_scope(token: Token, scope: str) -> None:
        """401 unless the token carries ``scope`` (GHL does not use 403 for this)."""
        if scope not in token.scopes:
            raise GhlError(401, SCOPE_DENIED)

    @staticmethod
    def require_location(token: Token, location_id: str | None) -> None:
        """403 unless the token is a Sub-Account token for ``location_id``."""
        if token.location_id is None or token.location_id != location_id:
            raise _forbidden()

    def exchange_token(self, form: Mapping[str, str]) -> dict[str, Any]:
        """``POST /oauth/token``: redeem a code or rotate a refresh token."""
        missing = [k for k in ("client_id", "client_secret", "grant_type") if not form.get(k)]
        if missing:
            raise GhlError(
                422, [f"{k} should not be empty" for k in missing], error="Unprocessable Entity"
            )
        client_id = form["client_id"]
        if self._apps.get(client_id) != form["client_secret"]:
            raise _oauth_error(401, "invalid_client", "Invalid client credentials")
        grant_type = form["grant_type"]
        if grant_type == "authorization_code":
            grant = self._codes.get(form.get("code", ""))
            if grant is None or grant.used or grant.client_id != client_id:
                raise _oauth_error(400, "invalid_grant", "Invalid authorization code")
            grant.used = True
        elif grant_type == "refresh_token":
            grant = self._refresh.get(form.get("refresh_token", ""))
            if grant is None or grant.client_id != client_id:
                raise _oauth_error(400, "invalid_grant", "Invalid refresh token")
            if grant.used or grant.revoked:
                # Rotation: a refresh token works once; replaying an old one is refused.
                raise _oauth_error(400, "invalid_grant", "Refresh token is no longer valid")
            grant.used = True
            self.refreshes[grant.location_id or grant.company_id] += 1
        else:
            raise _oauth_error(400, "unsupported_grant_type", f"Unsupported grant {grant_type}")
        return self._issue_pair(grant)

    def location_token(self, agency: Token, form: Mapping[str, str]) -> dict[str, Any]:
        """``POST /oauth/locationToken``: a Location token from an agency (Company) token."""
        if agency.kind != "oauth" or agency.user_type != "Company":
            raise GhlError(401, SCOPE_DENIED)
        self.require_scope(agency, "oauth.write")
        missing = [k for k in ("companyId", "locationId") if not form.get(k)]
        if missing:
            raise GhlError(
                422, [f"{k} should not be empty" for k in missing], error="Unprocessable Entity"
            )
        location = self._locations.get(form["locationId"])
        if form["companyId"] != agency.company_id or location is None:
            raise _forbidden()
        if location.company_id != agency.company_id:
            raise _forbidden()
        grant = Grant(
            agency.principal.removeprefix("app:"),
            "Location",
            location.id,
            location.company_id,
            agency.scopes - {"oauth.readonly", "oauth.write"},
            user_id=self.new_id(),
        )
        return self._issue_pair(grant)

    def _issue_pair(self, grant: Grant) -> dict[str, Any]:
        access = self._token_value(32)
        refresh = self._token_value(32)
        self._tokens[access] = Token(
            access,
            "oauth",
            grant.user_type,
            grant.location_id,
            grant.company_id,
            grant.scopes,
            principal=f"app:{grant.client_id}",
            expires_at=self.clock() + self.access_token_ttl,
        )
        self._refresh[refresh] = Grant(
            grant.client_id,
            grant.user_type,
            grant.location_id,
            grant.company_id,
            grant.scopes,
            grant.user_id,
        )
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": (
                self.access_token_ttl if self.token_expires_in is None else self.token_expires_in
            ),
            "refresh_token": refresh,
            "scope": " ".join(sorted(grant.scopes)),
            "userType": grant.user_type,
            "companyId": grant.company_id,
            "userId": grant.user_id,
        }
        if grant.location_id is not None:
            body["locationId"] = grant.location_id
        else:
            body["approvedLocations"] = sorted(
                loc.id for loc in self._locations.values() if loc.company_id == grant.company_id
            )
        return body

    # ----------------------------------------------------------------- contacts

    def _contact(self, token: Token, contact_id: str) -> Contact:
        contact = self._contacts.get(contact_id)
        if contact is None:
            raise GhlError(404, "Contact not found")
        self.require_location(token, contact.location_id)
        return contact

    def find_duplicate(
        self, location_id: str, *, email: str | None = None, phone: str | None = None
    ) -> Contact | None:
        """The contact an upsert would match: email first, then phone (oldest wins)."""
        keys = []
        if email:
            keys.append((location_id, "email:" + email.lower()))
        if phone:
            keys.append((location_id, "phone:" + normalize_phone(phone)))
        for key in keys:
            ids = self._match_index.get(key)
            if ids:
                return self._contacts[ids[0]]
        return None

    @staticmethod
    def _match_keys(contact: Contact) -> set[tuple[str, str]]:
        keys = set()
        if contact.fields.get("email"):
            keys.add((contact.location_id, "email:" + str(contact.fields["email"]).lower()))
        if contact.fields.get("phone"):
            keys.add((contact.location_id, "phone:" + str(contact.fields["phone"])))
        return keys

    def _index(self, contact: Contact, old: set[tuple[str, str]]) -> None:
        """Keep the email/phone index in step so matching stays O(1) at benchmark sizes."""
        new = self._match_keys(contact) if contact.id in self._contacts else set()
        for key in old - new:
            self._match_index[key].remove(contact.id)
        for key in new - old:
            self._match_index.setdefault(key, []).append(contact.id)

    def _apply_contact_fields(self, contact: Contact, body: Mapping[str, Any]) -> None:
        location = self._locations[contact.location_id]
        custom: dict[str, Any] = {}
        for item in body.get("customFields") or []:
            fid = item.get("id") or location.custom_fields.get(item.get("key", ""))
            if fid is None:
                raise GhlError(
                    422,
                    [f"customFields key {item.get('key')} does not exist"],
                    error="Unprocessable Entity",
                )
            custom[fid] = item.get("field_value")
        old = self._match_keys(contact) if contact.id in self._contacts else set()
        for key, value in body.items():
            if key in ("locationId", "createNewIfDuplicateAllowed", "customFields"):
                continue
            if key == "tags":
                contact.tags = list(dict.fromkeys(value))  # upsert/PUT replace all tags
            elif key == "phone" and value is not None:
                contact.fields["phone"] = normalize_phone(value)
            else:
                contact.fields[key] = value
        contact.custom.update(custom)
        contact.date_updated = self.now_ms()
        self._index(contact, old)

    def upsert_contact(self, token: Token, body: Mapping[str, Any]) -> tuple[bool, Contact]:
        """``POST /contacts/upsert``: match by email then phone, else create."""
        location_id = body["locationId"]
        self.require_location(token, location_id)
        location = self._locations[location_id]
        existing = None
        if not (location.allow_duplicates and body.get("createNewIfDuplicateAllowed")):
            existing = self.find_duplicate(
                location_id, email=body.get("email"), phone=body.get("phone")
            )
        if existing is not None:
            self._apply_contact_fields(existing, body)
            return False, existing
        now = self.now_ms()
        contact = Contact(self.new_id(), location_id, {}, [], {}, now, now)
        self._apply_contact_fields(contact, body)
        self._contacts[contact.id] = contact
        self._index(contact, set())
        return True, contact

    def get_contact(self, token: Token, contact_id: str) -> Contact:
        """``GET /contacts/{id}``."""
        return self._contact(token, contact_id)

    def update_contact(self, token: Token, contact_id: str, body: Mapping[str, Any]) -> Contact:
        """``PUT /contacts/{id}``: set given fields; ``tags`` replaces."""
        contact = self._contact(token, contact_id)
        self._apply_contact_fields(contact, body)
        return contact

    def delete_contact(self, token: Token, contact_id: str) -> None:
        """``DELETE /contacts/{id}``, taking its conversation along."""
        contact = self._contact(token, contact_id)
        old = self._match_keys(contact)
        del self._contacts[contact.id]
        self._index(contact, old)
        conv_id = self._conv_by_contact.get(contact.id)
        if conv_id is not None:
            self._drop_conversation(self._conversations[conv_id])

    def change_tags(
        self, token: Token, contact_id: str, tags: list[str], *, add: bool
    ) -> list[str]:
        """Add or remove tags, leaving every other tag alone."""
        contact = self._contact(token, contact_id)
        if add:
            contact.tags = list(dict.fromkeys([*contact.tags, *tags]))
        else:
            contact.tags = [t for t in contact.tags if t not in set(tags)]
        contact.date_updated = self.now_ms()
        return list(contact.tags)

    def add_note(self, token: Token, contact_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /contacts/{id}/notes``."""
        contact = self._contact(token, contact_id)
        note = {"id": self.new_id(), "contactId": contact.id, "dateAdded": iso(self.now_ms())}
        note |= {"userId": None, "title": None, "color": None, "pinned": False} | dict(body)
        contact.notes[note["id"]] = note
        return dict(note)

    def update_note(
        self, token: Token, contact_id: str, note_id: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``PUT /contacts/{id}/notes/{noteId}``: edit a note in place."""
        note = self._contact(token, contact_id).notes.get(note_id)
        if note is None:
            raise GhlError(404, "Note not found")
        note.update(body)
        return dict(note)

    def notes(self, token: Token, contact_id: str) -> list[dict[str, Any]]:
        """``GET /contacts/{id}/notes``."""
        return [dict(n) for n in self._contact(token, contact_id).notes.values()]

    def delete_note(self, token: Token, contact_id: str, note_id: str) -> None:
        """``DELETE /contacts/{id}/notes/{noteId}``."""
        if self._contact(token, contact_id).notes.pop(note_id, None) is None:
            raise GhlError(404, "Note not found")

    def add_task(self, token: Token, contact_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /contacts/{id}/tasks``."""
        contact = self._contact(token, contact_id)
        task_id = self.new_id()
        task: dict[str, Any] = {"id": task_id, "contactId": contact.id, "body": None}
        task |= {"assignedTo": None} | dict(body)
        contact.tasks[task_id] = task
        return dict(task)

    def tasks(self, token: Token, contact_id: str) -> list[dict[str, Any]]:
        """``GET /contacts/{id}/tasks``."""
        return [dict(t) for t in self._contact(token, contact_id).tasks.values()]

    @staticmethod
    def contact_json(contact: Contact) -> dict[str, Any]:
        """A contact as the API returns it: custom fields read back as ``{id, value}``."""
        f = contact.fields
        first, last = f.get("firstName"), f.get("lastName")
        name = f.get("name") or " ".join(p for p in (first, last) if p) or None
        out: dict[str, Any] = {
            "id": contact.id,
            "locationId": contact.location_id,
            "firstName": first,
            "lastName": last,
            "email": f.get("email"),
            "phone": f.get("phone"),
            "dnd": False,
            "type": "lead",
        }
        out |= f
        out |= {
            "name": name,
            "contactName": name,
            "emailLowerCase": f["email"].lower() if f.get("email") else None,
            "tags": list(contact.tags),
            "customFields": [{"id": k, "value": v} for k, v in contact.custom.items()],
            "dateAdded": iso(contact.date_added),
            "dateUpdated": iso(contact.date_updated),
        }
        return out

    # ----------------------------------------------------------------- conversations

    def _conversation(self, token: Token, conversation_id: str) -> Conversation:
        conv = self._conversations.get(conversation_id)
        if conv is None:
            raise GhlError(404, "Conversation not found")
        self.require_location(token, conv.location_id)
        return conv

    def _new_conversation(self, contact: Contact) -> Conversation:
        now = self.now_ms()
        # Conversation type 1 = phone, 2 = email: a contact reachable only by email is type 2.
        type_code = 2 if contact.fields.get("email") and not contact.fields.get("phone") else 1
        conv = Conversation(
            self.new_id(), contact.location_id, contact.id, now, self.clock(), type_code
        )
        conv.date_updated = conv.last_message_date = now
        self._conversations[conv.id] = conv
        self._conv_by_contact[contact.id] = conv.id
        return conv

    def _drop_conversation(self, conv: Conversation) -> None:
        for mid in conv.message_ids:
            msg = self._messages.pop(mid, None)
            if msg is not None and msg.email_message_id:
                self._email_ids.pop(msg.email_message_id, None)
        del self._conversations[conv.id]
        self._conv_by_contact.pop(conv.contact_id, None)

    def create_conversation(self, token: Token, location_id: str, contact_id: str) -> Conversation:
        """``POST /conversations/``: one conversation per contact, a second create is a 400."""
        self.require_location(token, location_id)
        contact = self._contact(token, contact_id)
        if contact.id in self._conv_by_contact:
            raise GhlError(400, f"Conversation with the contact id:{contact.id} already exists!")
        return self._new_conversation(contact)

    def get_conversation(self, token: Token, conversation_id: str) -> Conversation:
        """``GET /conversations/{id}``."""
        return self._conversation(token, conversation_id)

    def update_conversation(
        self, token: Token, conversation_id: str, body: Mapping[str, Any]
    ) -> Conversation:
        """``PUT /conversations/{id}``."""
        conv = self._conversation(token, conversation_id)
        self.require_location(token, body["locationId"])
        if "unreadCount" in body:
            conv.unread_count = int(body["unreadCount"])
        if "starred" in body:
            conv.starred = bool(body["starred"])
        if "feedback" in body:
            conv.feedback = body["feedback"]
        conv.date_updated = self.now_ms()
        return conv

    def delete_conversation(self, token: Token, conversation_id: str) -> None:
        """``DELETE /conversations/{id}`` with its messages."""
        self._drop_conversation(self._conversation(token, conversation_id))

    def searchable(self, conv: Conversation) -> bool:
        """Search is eventually consistent: new conversations hide for ``search_lag`` seconds."""
        return self.clock() - conv.created_mono >= self.search_lag

    def search_conversations(
        self, token: Token, q: Mapping[str, str], limit: int
    ) -> tuple[list[Conversation], int]:
        """``GET /conversations/search``: filter, sort, then page with ``startAfterDate``."""
        self.require_location(token, q.get("locationId"))
        pool: Iterable[Conversation] = self._conversations.values()
        if q.get("contactId"):
            # The reconciliation lookup; a dict hit keeps it cheap with many conversations.
            conv_id = self._conv_by_contact.get(q["contactId"])
            pool = [self._conversations[conv_id]] if conv_id else []
        items = [c for c in pool if c.location_id == q["locationId"] and self.searchable(c)]
        items = [c for c in items if self._search_match(c, q)]
        descending = q.get("sort", "desc") != "asc"
        items.sort(key=lambda c: (c.last_message_date, c.date_added), reverse=descending)
        total = len(items)
        if q.get("startAfterDate"):
            after = parse_time_ms(q["startAfterDate"], "startAfterDate")
            # Strictly past the cursor, as live: conversations sharing that instant are skipped.
            items = [
                c
                for c in items
                if (c.last_message_date < after if descending else c.last_message_date > after)
            ]
        return items[:limit], total

    def _search_match(self, conv: Conversation, q: Mapping[str, str]) -> bool:
        contact = self._contacts.get(conv.contact_id)
        if q.get("contactId") and conv.contact_id != q["contactId"]:
            return False
        if q.get("id") and conv.id != q["id"]:
            return False
        if q.get("assignedTo"):
            wanted = set(q["assignedTo"].split(","))
            assigned = conv.assigned_to or "unassigned"
            if assigned not in wanted:
                return False
        status = q.get("status", "all")
        if (status == "unread" and conv.unread_count == 0) or (
            status == "read" and conv.unread_count > 0
        ):
            return False
        if status == "starred" and not conv.starred:
            return False
        if (
            q.get("lastMessageDirection")
            and conv.last_message_direction != q["lastMessageDirection"]
        ):
            return False
        if q.get("lastMessageType") and conv.last_message_type != q["lastMessageType"]:
            return False
        if q.get("startDate") and conv.date_added < parse_time_ms(q["startDate"], "startDate"):
            return False
        if q.get("endDate") and conv.date_added > parse_time_ms(q["endDate"], "endDate"):
            return False
        if q.get("query"):
            needle = q["query"].lower()
            hay = [conv.last_message_body or ""]
            if contact is not None:
                f = contact.fields
                hay += [str(f.get(k) or "") for k in ("firstName", "lastName", "name", "email")]
                hay.append(str(f.get("phone") or ""))
            if not any(needle in h.lower() for h in hay):
                return False
        return True

    def conversation_json(self, conv: Conversation, *, flat: bool = True) -> dict[str, Any]:
        """``flat`` is the GET shape; otherwise the search-item shape with contact details."""
        out: dict[str, Any] = {
            "id": conv.id,
            "locationId": conv.location_id,
            "contactId": conv.contact_id,
            "deleted": False,
            "inbox": True,
            "unreadCount": conv.unread_count,
            "starred": conv.starred,
            "assignedTo": conv.assigned_to,
            "lastMessageBody": conv.last_message_body,
            "lastMessageType": conv.last_message_type,
            "lastMessageDirection": conv.last_message_direction,
        }
        if flat:
            out |= {
                "type": conv.type_code,
                "dateAdded": iso(conv.date_added),
                "dateUpdated": iso(conv.date_updated),
                "lastMessageDate": iso(conv.last_message_date),
            }
            return out
        contact = self._contacts.get(conv.contact_id)
        cj = self.contact_json(contact) if contact is not None else {}
        out |= {
            "type": "TYPE_EMAIL" if conv.type_code == 2 else "TYPE_PHONE",
            "dateAdded": conv.date_added,
            "dateUpdated": conv.date_updated,
            "lastMessageDate": conv.last_message_date,
            "fullName": cj.get("name"),
            "contactName": cj.get("name"),
            "email": cj.get("email"),
            "phone": cj.get("phone"),
            "tags": cj.get("tags", []),
        }
        return out

    @staticmethod
    def created_json(conv: Conversation) -> dict[str, Any]:
        """The conversation object inside the create response."""
        return {
            "id": conv.id,
            "dateUpdated": iso(conv.date_updated),
            "dateAdded": iso(conv.date_added),
            "deleted": False,
            "contactId": conv.contact_id,
            "locationId": conv.location_id,
            "lastMessageDate": iso(conv.last_message_date),
            "assignedTo": conv.assigned_to,
        }

    # ----------------------------------------------------------------- messages

    def _message(self, token: Token, message_id: str) -> Message:
        msg = self._messages.get(message_id)
        if msg is None:
            raise GhlError(404, "Message not found")
        self.require_location(token, msg.location_id)
        return msg

    def _add_message(
        self,
        conv: Conversation,
        message_type: str,
        direction: str,
        *,
        status: str,
        source: str,
        body: Mapping[str, Any],
        date_ms: int | None = None,
        user_id: str | None = None,
        via_send: bool = False,
    ) -> Message:
        now = self.now_ms()
        msg = Message(
            id=self.new_id(),
            seq=self._next_seq(),
            location_id=conv.location_id,
            contact_id=conv.contact_id,
            conversation_id=conv.id,
            message_type=message_type,
            direction=direction,
            status=status,
            date_added=date_ms if date_ms is not None else now,
            date_updated=now,
            created_mono=self.clock(),
            source=source,
            body=body.get("message"),
            attachments=list(body.get("attachments") or []),
            alt_id=body.get("altId"),
            user_id=user_id,
            provider_id=body.get("conversationProviderId"),
            via_send=via_send,
        )
        call = body.get("call")
        if message_type in CALL_TYPES:
            msg.meta = {"callDuration": "3", "callStatus": (call or {}).get("status", "completed")}
        if message_type in EMAIL_TYPES:
            msg.email_message_id = self.new_id()
            self._email_ids[msg.email_message_id] = msg.id
            msg.meta = {"email": {"messageIds": [msg.email_message_id]}}
            msg.email = {
                k: body.get(k)
                for k in ("subject", "html", "emailFrom", "emailTo", "emailCc", "emailBcc")
            }
        self._messages[msg.id] = msg
        conv.message_ids.append(msg.id)
        if msg.date_added >= conv.last_message_date:
            conv.last_message_date = msg.date_added
            conv.last_message_body = msg.body
            conv.last_message_type = message_type
            conv.last_message_direction = direction
        if direction == "inbound":
            conv.unread_count += 1
        conv.date_updated = now
        return msg

    def _conversation_for(self, token: Token, body: Mapping[str, Any]) -> Conversation:
        """The thread an inbound/outbound record goes to: by id, or found/created by contact."""
        conv_id, contact_id = body.get("conversationId"), body.get("contactId")
        if conv_id:
            conv = self._conversations.get(conv_id)
            if conv is None:
                raise GhlError(400, f"Conversation with id {conv_id} not found")
            self.require_location(token, conv.location_id)
            if contact_id and contact_id != conv.contact_id:
                raise GhlError(400, "contactId does not belong to this conversation")
            return conv
        if not contact_id:
            raise GhlError(
                422, ["conversationId should not be empty"], error="Unprocessable Entity"
            )
        contact = self._contact(token, contact_id)
        existing = self._conv_by_contact.get(contact.id)
        return self._conversations[existing] if existing else self._new_conversation(contact)

    def _check_provider(self, token: Token, provider_id: str | None) -> None:
        if provider_id is None:
            return
        location = self._locations.get(token.location_id or "")
        if location is None or provider_id not in location.providers:
            raise GhlError(400, "Invalid conversationProviderId")

    def send_message(self, token: Token, body: Mapping[str, Any]) -> Message:
        """``POST /conversations/messages``: GHL itself delivers it (the bridge must not use it)."""
        contact = self._contact(token, body["contactId"])
        self._check_provider(token, body.get("conversationProviderId"))
        existing = self._conv_by_contact.get(contact.id)
        conv = self._conversations[existing] if existing else self._new_conversation(contact)
        scheduled = body.get("scheduledTimestamp") is not None
        msg = self._add_message(
            conv,
            BODY_TYPES[body["type"]],
            "outbound",
            status="scheduled" if scheduled else "pending",
            source="api",
            body=body,
            via_send=True,
        )
        self.sent_outbound.append(
            {
                "messageId": msg.id,
                "conversationId": conv.id,
                "contactId": contact.id,
                "type": body["type"],
                "body": dict(body),
            }
        )
        return msg

    def add_inbound(self, token: Token, body: Mapping[str, Any]) -> Message | None:
        """``POST /conversations/messages/inbound``; None when the live API would drop it."""
        provider = body.get("conversationProviderId")
        if body["type"] == "Custom" and not provider:
            # Live: a custom-provider message without its provider id is accepted with an
            # empty 201 and never stored; the sim reproduces the trap and counts it.
            self.dropped_inbound += 1
            return None
        self._check_provider(token, provider)
        conv = self._conversation_for(token, body)
        date_ms = parse_time_ms(body["date"]) if body.get("date") else None
        return self._add_message(
            conv,
            BODY_TYPES[body["type"]],
            body.get("direction") or "outbound",  # the live default, hence "send it explicitly"
            status="delivered",
            source="api",
            body=body,
            date_ms=date_ms,
        )

    def add_outbound_call(self, token: Token, body: Mapping[str, Any]) -> Message:
        """``POST /conversations/messages/outbound``: log an external outbound call."""
        self._check_provider(token, body["conversationProviderId"])
        conv = self._conversation_for(token, body)
        date_ms = parse_time_ms(body["date"]) if body.get("date") else None
        return self._add_message(
            conv,
            "TYPE_CALL",
            "outbound",
            status="completed",
            source="api",
            body=body,
            date_ms=date_ms,
        )

    def add_reply(
        self,
        conversation_id: str,
        body: str,
        *,
        direction: str = "outbound",
        message_type: str = "SMS",
        user_id: str | None = None,
        date_ms: int | None = None,
    ) -> dict[str, Any]:
        """A message typed by a GHL user in the app (for two-way sync tests)."""
        conv = self._conversations[conversation_id]
        msg = self._add_message(
            conv,
            BODY_TYPES[message_type],
            direction,
            status="delivered",
            source="app",
            body={"message": body},
            date_ms=date_ms,
            user_id=user_id or self.new_id(),
        )
        return self.message_json(msg)

    def set_message_status(self, message_id: str, status: str) -> dict[str, Any]:
        """A delivery report arriving in GHL for a message (for two-way sync tests)."""
        msg = self._messages[message_id]
        msg.status = status
        msg.date_updated = self.now_ms()
        return self.message_json(msg)

    def get_message(self, token: Token, message_id: str) -> Message:
        """``GET /conversations/messages/{id}``."""
        return self._message(token, message_id)

    def get_email(self, token: Token, email_message_id: str) -> Message:
        """``GET /conversations/messages/email/{id}``: by email message id."""
        message_id = self._email_ids.get(email_message_id)
        if message_id is None:
            raise GhlError(404, "Email message not found")
        return self._message(token, message_id)

    def list_messages(
        self,
        token: Token,
        conversation_id: str,
        *,
        last_message_id: str | None,
        limit: int,
        types: frozenset[str] | None,
    ) -> tuple[list[Message], bool]:
        """Newest first, strictly after ``last_message_id``; returns (page, nextPage)."""
        conv = self._conversation(token, conversation_id)
        msgs = [self._messages[m] for m in conv.message_ids]
        msgs.sort(key=lambda m: (m.date_added, m.seq), reverse=True)
        if types is not None:
            msgs = [m for m in msgs if m.message_type in types]
        if last_message_id:
            ids = [m.id for m in msgs]
            if last_message_id not in ids:
                raise GhlError(400, f"Message with id {last_message_id} not found")
            msgs = msgs[ids.index(last_message_id) + 1 :]
        return msgs[:limit], len(msgs) > limit

    def export_messages(
        self, token: Token, q: Mapping[str, str], limit: int
    ) -> tuple[list[Message], str | None, int]:
        """``GET /conversations/messages/export``: (page, nextCursor, total)."""
        location_id = q.get("locationId")
        self.require_location(token, location_id)
        if self.export_denied:
            raise GhlError(401, SCOPE_DENIED)
        by_updated = q.get("sortBy") == "updatedAt"
        descending = q.get("sortOrder", "desc") != "asc"
        channel = q.get("channel")
        allowed = EXPORT_CHANNELS[channel] if channel else None
        start = parse_time_ms(q["startDate"], "startDate") if q.get("startDate") else None
        end = parse_time_ms(q["endDate"], "endDate") if q.get("endDate") else None

        def keep(m: Message) -> bool:
            if m.location_id != location_id:
                return False
            if allowed is None and m.message_type in EMAIL_TYPES:
                return False
            if allowed is not None and m.message_type not in allowed:
                return False
            if q.get("conversationId") and m.conversation_id != q["conversationId"]:
                return False
            if q.get("contactId") and m.contact_id != q["contactId"]:
                return False
            return (start is None or m.date_added >= start) and (end is None or m.date_added <= end)

        def sort_key(m: Message) -> tuple[int, int]:
            return (m.date_updated if by_updated else m.date_added, m.seq)

        msgs = sorted(filter(keep, self._messages.values()), key=sort_key, reverse=descending)
        total = len(msgs)
        if q.get("cursor"):
            after = _decode_cursor(q["cursor"])
            msgs = [m for m in msgs if (sort_key(m) < after if descending else sort_key(m) > after)]
        page = msgs[:limit]
        next_cursor = _encode_cursor(sort_key(page[-1])) if len(msgs) > limit else None
        return page, next_cursor, total

    def update_status(self, token: Token, message_id: str, status: str) -> Message:
        """``PUT /conversations/messages/{id}/status``, refused for a while after a send."""
        msg = self._message(token, message_id)
        if msg.via_send and self.clock() - msg.created_mono < self.status_403_window:
            # Live: the provider hand-off takes ~5-10 s; until then the message has no owner.
            raise GhlError(
                403, "No conversation provider found for this message", error="Forbidden"
            )
        msg.status = status
        msg.date_updated = self.now_ms()
        return msg

    def cancel_schedule(self, token: Token, message_id: str, *, email: bool) -> dict[str, Any]:
        """Cancel a scheduled message; the outcome is in the body's numeric ``status``."""
        if email:
            mid = self._email_ids.get(message_id)
            if mid is None:
                raise GhlError(404, "Email message not found")
            message_id = mid
        msg = self._message(token, message_id)
        if msg.status != "scheduled":
            return {"status": 400, "message": "Message is not scheduled"}
        msg.status = "canceled"
        msg.date_updated = self.now_ms()
        return {"status": 200, "message": "Scheduled message cancelled successfully"}

    def record_upload(
        self, token: Token, form: Mapping[str, str], files: list[tuple[str, int]]
    ) -> dict[str, str]:
        """Remember an accepted upload; returns ``{filename: url}``."""
        self.require_location(token, form["locationId"])
        conv = self._conversations.get(form["conversationId"])
        if conv is None:
            # Live answers an unknown conversation with a 500, not a 4xx.
            raise GhlError(500, f"Conversation with id {form['conversationId']} not found")
        self.require_location(token, conv.location_id)
        urls = {}
        for name, size in files:
            ext = name.rsplit(".", 1)[-1].lower()
            blob = uuid.UUID(int=self._rng.getrandbits(128), version=4)
            url = f"https://storage.googleapis.com/msgsndr/{conv.location_id}/media/{blob}.{ext}"
            urls[name] = url
            self.uploads.append({"conversationId": conv.id, "name": name, "size": size, "url": url})
        return urls

    def recording(self, token: Token, location_id: str, message_id: str) -> bytes:
        """The call audio of a message; 404 for anything but calls."""
        self.require_location(token, location_id)
        msg = self._message(token, message_id)
        if msg.message_type not in CALL_TYPES:
            raise GhlError(404, "Recording not found")
        return self._recordings.get(msg.id) or small_wav()

    def transcription(
        self, token: Token, location_id: str, message_id: str
    ) -> list[dict[str, Any]]:
        """The call's sentences with timings in ms; 404 for anything but calls."""
        self.require_location(token, location_id)
        msg = self._message(token, message_id)
        if msg.message_type not in CALL_TYPES:
            raise GhlError(404, "Transcription not found")
        sentences = self._transcripts.get(msg.id) or [
            "Hello, this is a simulated call.",
            "Thanks, goodbye.",
        ]
        return [
            {
                "mediaChannel": 1 + i % 2,
                "sentenceIndex": i,
                "startTime": i * 2000,
                "endTime": i * 2000 + 1800,
                "transcript": text,
                "confidence": 0.9,
            }
            for i, text in enumerate(sentences)
        ]

    def message_json(self, msg: Message, *, in_list: bool = False) -> dict[str, Any]:
        """A message as get/export return it; list items drop email bodies, as live does."""
        out: dict[str, Any] = {
            "id": msg.id,
            "type": TYPE_CODES[msg.message_type],
            "messageType": msg.message_type,
            "locationId": msg.location_id,
            "contactId": msg.contact_id,
            "conversationId": msg.conversation_id,
            "dateAdded": iso(msg.date_added),
            "dateUpdated": iso(msg.date_updated),
            "body": msg.body,
            "direction": msg.direction,
            "status": msg.status,
            "contentType": "text/html" if msg.email is not None else "text/plain",
            "attachments": [] if msg.message_type in CALL_TYPES else list(msg.attachments),
            "meta": dict(msg.meta),
            "source": msg.source,
        }
        if in_list and msg.message_type in EMAIL_TYPES:
            del out["body"]
        for key, value in (
            ("altId", msg.alt_id),
            ("userId", msg.user_id),
            ("conversationProviderId", msg.provider_id),
        ):
            if value is not None:
                out[key] = value
        return out

    def email_json(self, msg: Message) -> dict[str, Any]:
        """The email view of a message (``GET /conversations/messages/email/{id}``)."""
        email = msg.email or {}
        to = email.get("emailTo")
        return {
            "id": msg.email_message_id,
            "altId": msg.alt_id,
            "threadId": msg.email_message_id,
            "locationId": msg.location_id,
            "contactId": msg.contact_id,
            "conversationId": msg.conversation_id,
            "dateAdded": iso(msg.date_added),
            "subject": email.get("subject"),
            "body": email.get("html") or msg.body or "",
            "direction": msg.direction,
            "status": msg.status,
            "contentType": "text/html",
            "attachments": list(msg.attachments),
            "provider": "Leadconnector",
            "from": email.get("emailFrom"),
            "to": [to] if to else [],
            "cc": list(email.get("emailCc") or []),
            "bcc": list(email.get("emailBcc") or []),
            "source": msg.source,
        }

    # ----------------------------------------------------------------- inspection

    def contacts(self, location_id: str | None = None) -> list[dict[str, Any]]:
        """Every contact (of one location), as the API would show it."""
        return [
            self.contact_json(c)
            for c in self._contacts.values()
            if location_id is None or c.location_id == location_id
        ]

    def conversations(self, location_id: str | None = None) -> list[dict[str, Any]]:
        """Every conversation (of one location), flat shape, ignoring search lag."""
        return [
            self.conversation_json(c)
            for c in self._conversations.values()
            if location_id is None or c.location_id == location_id
        ]

    def messages(
        self, conversation_id: str | None = None, location_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every message in creation order, optionally for one conversation or location."""
        return [
            self.message_json(m)
            for m in sorted(self._messages.values(), key=lambda m: m.seq)
            if (conversation_id is None or m.conversation_id == conversation_id)
            and (location_id is None or m.location_id == location_id)
        ]

    def tag_contact(self, contact_id: str, tags: Iterable[str]) -> None:
        """Add tags to a contact as a user would in the GHL app."""
        contact = self._contacts[contact_id]
        contact.tags = list(dict.fromkeys([*contact.tags, *tags]))

    def all_tasks(self) -> list[dict[str, Any]]:
        """Every task of every contact."""
        return [dict(t) for c in self._contacts.values() for t in c.tasks.values()]

    def all_notes(self) -> list[dict[str, Any]]:
        """Every note of every contact."""
        return [dict(n) for c in self._contacts.values() for n in c.notes.values()]

    def messages_by_alt_id(self) -> dict[str, int]:
        """How many stored messages carry each altId (a count above 1 is a duplicate)."""
        return dict(Counter(m.alt_id for m in self._messages.values() if m.alt_id is not None))

    def stats(self) -> dict[str, Any]:
        """Sim-side counters for ``/_sim/stats`` and tests."""
        alt = self.messages_by_alt_id()
        return {
            "rateLimited": self.rate_limited,
            "rateLimitedByBucket": self.limiter.rejected(),
            "maxInWindow": self.limiter.max_in_window(),
            "maxAttemptedInWindow": self.limiter.max_attempted_in_window(),
            "refreshes": dict(self.refreshes),
            "contacts": len(self._contacts),
            "conversations": len(self._conversations),
            "messages": len(self._messages),
            "duplicateAltIds": {k: n for k, n in alt.items() if n > 1},
            "sentOutbound": len(self.sent_outbound),
            "droppedInbound": self.dropped_inbound,
        }


def _encode_cursor(key: tuple[int, int]) -> str:
    raw = json.dumps({"lastSort": [key[0]], "lastId": key[1]}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return int(raw["lastSort"][0]), int(raw["lastId"])
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error) as exc:
        raise GhlError(400, "Invalid cursor") from exc
