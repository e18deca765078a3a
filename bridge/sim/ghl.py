"""HTTP face of the HighLevel simulator: routes, auth gate, rate limits and request validation."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import BodyPartReader, web

from bridge.sim.common import (
    EXTRA_HEADERS,
    TENANT,
    Field,
    LimitDecision,
    Schema,
    add_control_routes,
    route_template,
    sim_middleware,
    validate,
)
from bridge.sim.ghl_state import (
    AGENCY_SCOPES,
    BODY_TYPES,
    CONTACTS_VERSION,
    CONVERSATIONS_VERSION,
    EXPORT_CHANNELS,
    LOCATION_SCOPES,
    TYPE_CODES,
    GhlError,
    GhlSim,
    Message,
    Token,
    iso,
)

__all__ = ["AGENCY_SCOPES", "LOCATION_SCOPES", "GhlSim", "build_app"]

AUTH: web.RequestKey[Token] = web.RequestKey("ghl_token", Token)

Op = Callable[[GhlSim, web.Request, Token], Awaitable[web.StreamResponse]]

_UNPROCESSABLE = "Unprocessable Entity"
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
UPLOAD_EXTENSIONS = frozenset(
    [
        "jpg",
        "jpeg",
        "png",
        "mp4",
        "mpeg",
        "zip",
        "rar",
        "pdf",
        "doc",
        "docx",
        "txt",
        "mp3",
        "wav",
        "vcf",
    ]
)

# --------------------------------------------------------------------------- body schemas

STR, BOOL, NUM, STRS, OBJ, ANY = (
    Field("str"),
    Field("bool"),
    Field("num"),
    Field("strs"),
    Field("obj"),
    Field("any"),
)
REQ_STR = Field("str", required=True)

_DND_ONE: Schema = {
    "status": Field("str", True, ("active", "inactive", "permanent")),
    "message": STR,
    "code": STR,
}
_DND: Schema = {
    ch: Field("obj", fields=_DND_ONE) for ch in ("Call", "Email", "SMS", "WhatsApp", "GMB", "FB")
}
_INBOUND_DND: Schema = {
    "all": Field(
        "obj", fields={"status": Field("str", True, ("active", "inactive")), "message": STR}
    )
}
_CUSTOM_FIELD: Schema = {"id": STR, "key": STR, "field_value": ANY}
_CONTACT_FIELDS: Schema = {
    **dict.fromkeys(
        [
            "firstName",
            "lastName",
            "name",
            "email",
            "phone",
            "address1",
            "city",
            "state",
            "postalCode",
            "website",
            "timezone",
            "source",
            "country",
            "assignedTo",
        ],
        STR,
    ),
    "dnd": BOOL,
    "dndSettings": Field("obj", fields=_DND),
    "inboundDndSettings": Field("obj", fields=_INBOUND_DND),
    "tags": STRS,
    "customFields": Field("objs", fields=_CUSTOM_FIELD),
    "dateOfBirth": ANY,  # the spec types it "object"; live accepts several date formats
}
UPSERT: Schema = {
    **_CONTACT_FIELDS,
    "locationId": REQ_STR,
    "gender": STR,
    "companyName": STR,
    "createNewIfDuplicateAllowed": BOOL,
}
UPDATE_CONTACT: Schema = _CONTACT_FIELDS
TAGS: Schema = {"tags": Field("strs", required=True)}
NOTE: Schema = {"userId": STR, "body": REQ_STR, "title": STR, "color": STR, "pinned": BOOL}
NOTE_UPDATE: Schema = {"userId": STR, "body": STR, "title": STR, "color": STR, "pinned": BOOL}
TASK: Schema = {
    "title": REQ_STR,
    "body": STR,
    "dueDate": REQ_STR,
    "completed": Field("bool", required=True),
    "assignedTo": STR,
}
CREATE_CONVERSATION: Schema = {"locationId": REQ_STR, "contactId": REQ_STR}
UPDATE_CONVERSATION: Schema = {
    "locationId": REQ_STR,
    "unreadCount": NUM,
    "starred": BOOL,
    "feedback": OBJ,
}
_STATUSES = ("delivered", "failed", "pending", "read")
SEND: Schema = {
    "type": Field(
        "str",
        True,
        ("SMS", "RCS", "Email", "WhatsApp", "IG", "FB", "Custom", "Live_Chat", "TIKTOK"),
    ),
    "contactId": REQ_STR,
    # The 2026 spec marks subType and status required; real callers omit them (API_FACTS §2.3).
    "subType": ANY,
    "status": Field("str", choices=_STATUSES),
    **dict.fromkeys(
        [
            "appointmentId",
            "emailFrom",
            "html",
            "message",
            "subject",
            "replyMessageId",
            "templateId",
            "threadId",
            "conversationProviderId",
            "emailTo",
            "customSubtypeId",
            "fromNumber",
            "toNumber",
        ],
        STR,
    ),
    "attachments": STRS,
    "emailCc": STRS,
    "emailBcc": STRS,
    "scheduledTimestamp": NUM,
    "emailReplyMode": Field("str", choices=("reply", "reply_all")),
    "forward": OBJ,
    "usesNativeSchedulingAi": BOOL,
    "optimizationPeriod": Field("str", choices=("24h", "48h", "72h")),
}
_CALL: Schema = {
    "to": STR,
    "from": STR,
    "status": Field(
        "str",
        choices=(
            "pending",
            "completed",
            "answered",
            "busy",
            "no-answer",
            "failed",
            "canceled",
            "voicemail",
        ),
    ),
}
INBOUND: Schema = {
    "type": Field("str", True, tuple(BODY_TYPES)),
    # Spec requires conversationId and conversationProviderId; live needs neither for
    # default providers (contactId-only flow), so the sim checks them by hand.
    **dict.fromkeys(
        [
            "message",
            "conversationId",
            "contactId",
            "conversationProviderId",
            "html",
            "subject",
            "emailFrom",
            "emailTo",
            "emailMessageId",
            "altId",
            "date",
        ],
        STR,
    ),
    "attachments": STRS,
    "emailCc": STRS,
    "emailBcc": STRS,
    "direction": Field("str", choices=("inbound", "outbound")),
    "call": Field("obj", fields=_CALL),
}
OUTBOUND_CALL: Schema = {
    "type": Field("str", True, ("Call",)),
    "conversationId": REQ_STR,
    "conversationProviderId": REQ_STR,
    "attachments": STRS,
    "altId": STR,
    "date": STR,
    "call": Field("obj", fields=_CALL),
}
STATUS: Schema = {
    "status": Field("str", True, _STATUSES),
    "error": Field("obj", fields={"code": REQ_STR, "type": REQ_STR, "message": REQ_STR}),
    "emailMessageId": STR,
    "recipients": STRS,
}
_UPLOAD_FIELDS = frozenset(
    {"conversationId", "contactId", "locationId", "chatServiceSid", "isGroupSms"}
)

_SEARCH_ENUMS: Mapping[str, tuple[str, ...]] = {
    "sort": ("asc", "desc"),
    "sortBy": (
        "last_manual_message_date",
        "last_message_date",
        "score_profile",
        "overdue_at",
        "due_at",
    ),
    "status": ("all", "read", "unread", "starred", "recents"),
    "lastMessageDirection": ("inbound", "outbound"),
    "lastMessageAction": ("automated", "manual"),
}
_LIST_TYPES = frozenset(
    [
        "TYPE_CALL",
        "TYPE_SMS",
        "TYPE_RCS",
        "TYPE_EMAIL",
        "TYPE_FACEBOOK",
        "TYPE_GMB",
        "TYPE_INSTAGRAM",
        "TYPE_WHATSAPP",
        "TYPE_ACTIVITY_APPOINTMENT",
        "TYPE_ACTIVITY_CONTACT",
        "TYPE_ACTIVITY_INVOICE",
        "TYPE_ACTIVITY_PAYMENT",
        "TYPE_ACTIVITY_OPPORTUNITY",
        "TYPE_LIVE_CHAT",
        "TYPE_INTERNAL_COMMENTS",
        "TYPE_ACTIVITY_EMPLOYEE_ACTION_LOG",
        "TYPE_TIKTOK",
        "TYPE_ACTIVITY_WHATSAPP",
        "TYPE_FORM_SUBMISSION",
    ]
)

# --------------------------------------------------------------------------- helpers


def _unprocessable(messages: list[str]) -> GhlError:
    return GhlError(422, messages, error=_UNPROCESSABLE)


def error_response(exc: GhlError) -> web.Response:
    """The JSON body GHL sends for a refusal, with a fresh traceId as live bodies carry."""
    if exc.body is not None:
        return web.json_response(exc.body, status=exc.status)
    body: dict[str, Any] = {"statusCode": exc.status, "message": exc.message}
    if exc.error:
        body["error"] = exc.error
    body["traceId"] = str(uuid.uuid4())
    return web.json_response(body, status=exc.status)


def _error_body(status: int, message: str) -> web.StreamResponse:
    return error_response(GhlError(status, message))


def _ok(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(dict(body), status=status)


def _trace() -> str:
    return str(uuid.uuid4())


async def _json_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """Parse and validate a JSON body; non-JSON content counts as an empty object, as in NestJS."""
    raw: Any = {}
    if request.content_type == "application/json" and request.can_read_body:
        text = await request.text()
        if text.strip():
            try:
                raw = json.loads(text)
            except ValueError as exc:
                raise GhlError(400, "Unexpected token in JSON body", error="Bad Request") from exc
    if not isinstance(raw, dict):
        raise _unprocessable(["body must be an object"])
    errors = validate(raw, schema)
    if errors:
        raise _unprocessable(errors)
    return raw


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        return {}
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}


def _int_query(
    q: Mapping[str, str], name: str, default: int, low: int, high: int, *, clamp: bool
) -> int:
    """An integer query parameter, clamped, or refused with 422 where the range is documented."""
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _unprocessable(
            [f"{name} must be a number conforming to the specified constraints"]
        ) from None
    if clamp:
        return max(low, min(high, value))
    if value < low:
        raise _unprocessable([f"{name} must not be less than {low}"])
    if value > high:
        raise _unprocessable([f"{name} must not be greater than {high}"])
    return value


def _enum_query(
    q: Mapping[str, str], enums: Mapping[str, tuple[str, ...] | frozenset[str]]
) -> None:
    errors = [
        f"{name} must be one of the following values: {', '.join(sorted(choices))}"
        for name, choices in enums.items()
        if q.get(name) and q[name] not in choices
    ]
    if errors:
        raise _unprocessable(errors)


def _require_query(q: Mapping[str, str], *names: str) -> None:
    missing = [f"{n} should not be empty" for n in names if not q.get(n)]
    if missing:
        raise _unprocessable(missing)


def _check_email(body: Mapping[str, Any]) -> None:
    email = body.get("email")
    if email and not _EMAIL_RE.match(email):
        raise _unprocessable(["email must be an email"])


def _check_custom_fields(body: Mapping[str, Any]) -> None:
    errors = [
        f"customFields.{i}.id should not be empty"
        for i, item in enumerate(body.get("customFields") or [])
        if not item.get("id") and not item.get("key")
    ]
    if errors:
        raise _unprocessable(errors)


def _limit_headers(d: LimitDecision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit-Daily": str(d.daily_limit),
        "X-RateLimit-Daily-Remaining": str(d.daily_remaining),
        "X-RateLimit-Interval-Milliseconds": str(int(d.window * 1000)),
        "X-RateLimit-Max": str(d.limit),
        "X-RateLimit-Remaining": str(d.remaining),
    }


# --------------------------------------------------------------------------- contacts


async def upsert_contact(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, UPSERT)
    _check_email(body)
    _check_custom_fields(body)
    new, contact = sim.upsert_contact(token, body)
    return _ok({"new": new, "contact": sim.contact_json(contact), "traceId": _trace()})


async def get_contact(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    contact = sim.get_contact(token, request.match_info["contactId"])
    return _ok({"contact": sim.contact_json(contact)})


async def update_contact(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, UPDATE_CONTACT)
    _check_email(body)
    _check_custom_fields(body)
    contact = sim.update_contact(token, request.match_info["contactId"], body)
    return _ok({"succeded": True, "contact": sim.contact_json(contact)})  # sic, as live


async def delete_contact(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    sim.delete_contact(token, request.match_info["contactId"])
    return _ok({"succeded": True})


async def duplicate_contact(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    q = request.query
    _require_query(q, "locationId")
    sim.require_location(token, q["locationId"])
    if not q.get("email") and not q.get("number"):
        raise GhlError(400, "Either email or number is required", error="Bad Request")
    found = sim.find_duplicate(q["locationId"], email=q.get("email"), phone=q.get("number"))
    return _ok({"contact": sim.contact_json(found) if found is not None else None})


async def add_tags(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, TAGS)
    tags = sim.change_tags(token, request.match_info["contactId"], body["tags"], add=True)
    return _ok({"tags": tags}, 201)


async def remove_tags(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, TAGS)
    tags = sim.change_tags(token, request.match_info["contactId"], body["tags"], add=False)
    return _ok({"tags": tags})


async def add_note(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, NOTE)
    return _ok({"note": sim.add_note(token, request.match_info["contactId"], body)}, 201)


async def update_note(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, NOTE_UPDATE)
    m = request.match_info
    return _ok({"note": sim.update_note(token, m["contactId"], m["id"], body)})


async def list_notes(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    return _ok({"notes": sim.notes(token, request.match_info["contactId"])})


async def delete_note(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    sim.delete_note(token, request.match_info["contactId"], request.match_info["id"])
    return _ok({"succeded": True})


async def add_task(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, TASK)
    return _ok({"task": sim.add_task(token, request.match_info["contactId"], body)}, 201)


async def list_tasks(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    return _ok({"tasks": sim.tasks(token, request.match_info["contactId"])})


# --------------------------------------------------------------------------- conversations


async def search_conversations(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    q = request.query
    _require_query(q, "locationId")
    _enum_query(q, {**_SEARCH_ENUMS, "lastMessageType": frozenset(TYPE_CODES)})
    # The spec states no maximum; third-party clients treat 100 as one, so larger is clamped.
    limit = _int_query(q, "limit", 20, 1, 100, clamp=True)
    items, total = sim.search_conversations(token, q, limit)
    return _ok(
        {
            "conversations": [sim.conversation_json(c, flat=False) for c in items],
            "total": total,
            "traceId": _trace(),
        }
    )


async def get_conversation(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    conv = sim.get_conversation(token, request.match_info["conversationId"])
    return _ok(sim.conversation_json(conv))  # flat, per spec


async def create_conversation(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    body = await _json_body(request, CREATE_CONVERSATION)
    conv = sim.create_conversation(token, body["locationId"], body["contactId"])
    return _ok({"success": True, "conversation": sim.created_json(conv)}, 201)


async def update_conversation(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    body = await _json_body(request, UPDATE_CONVERSATION)
    conv = sim.update_conversation(token, request.match_info["conversationId"], body)
    return _ok({"success": True, "conversation": sim.conversation_json(conv)})


async def delete_conversation(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    sim.delete_conversation(token, request.match_info["conversationId"])
    return _ok({"success": True})


# --------------------------------------------------------------------------- messages


async def list_messages(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    q = request.query
    types = None
    if q.get("type"):
        types = frozenset(t.strip() for t in q["type"].split(","))
        if types - _LIST_TYPES:
            raise _unprocessable(
                [f"type must be one of the following values: {', '.join(sorted(_LIST_TYPES))}"]
            )
    # Maximum not documented: clamp rather than refuse, so only paging behaviour matters.
    limit = _int_query(q, "limit", 20, 1, 100, clamp=True)
    page, more = sim.list_messages(
        token,
        request.match_info["conversationId"],
        last_message_id=q.get("lastMessageId"),
        limit=limit,
        types=types,
    )
    inner = {
        "lastMessageId": page[-1].id if page else None,
        "nextPage": more,
        "messages": [sim.message_json(m, in_list=True) for m in page],
    }
    return _ok({"messages": inner})  # live nests the page one level deeper than the spec


async def get_message(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    msg = sim.get_message(token, request.match_info["id"])
    return _ok({"message": sim.message_json(msg), "traceId": _trace()})  # wrapped, as live


async def get_email(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    return _ok(sim.email_json(sim.get_email(token, request.match_info["id"])))


async def export_messages(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    q = request.query
    _require_query(q, "locationId")
    _enum_query(
        q,
        {
            "sortBy": ("createdAt", "updatedAt"),
            "sortOrder": ("asc", "desc"),
            "channel": tuple(EXPORT_CHANNELS),
        },
    )
    limit = _int_query(q, "limit", 100, 10, 500, clamp=False)
    page, cursor, total = sim.export_messages(token, q, limit)
    return _ok(
        {"messages": [sim.message_json(m) for m in page], "nextCursor": cursor, "total": total}
    )


def _send_response(msg_id: str, conv_id: str, status: str, email_id: str | None) -> web.Response:
    body: dict[str, Any] = {"conversationId": conv_id, "messageId": msg_id, "status": status}
    if email_id is not None:
        body["emailMessageId"] = email_id
    return _ok(body)


async def send_message(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, SEND)
    msg = sim.send_message(token, body)
    status = "pending" if msg.status == "scheduled" else msg.status
    return _send_response(msg.id, msg.conversation_id, status, msg.email_message_id)


def _process_response(sim: GhlSim, msg: Message) -> web.Response:
    body: dict[str, Any] = {
        "success": True,
        "conversationId": msg.conversation_id,
        "messageId": msg.id,
        "message": "Message added successfully",
        "contactId": msg.contact_id,
        "dateAdded": iso(msg.date_added),
    }
    if msg.email_message_id is not None:
        body["emailMessageId"] = msg.email_message_id
    return _ok(body)


async def add_inbound(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, INBOUND)
    msg = sim.add_inbound(token, body)
    if msg is None:
        return web.Response(status=201)
    return _process_response(sim, msg)


async def add_outbound_call(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, OUTBOUND_CALL)
    msg = sim.add_outbound_call(token, body)
    return _process_response(sim, msg)


def _upload_error(status: int, message: str) -> GhlError:
    return GhlError(status, message, body={"status": status, "message": message})


async def upload(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    form: dict[str, str] = {}
    urls: list[str] = []
    files: list[tuple[str, int]] = []
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _upload_error(400, "Nested multipart is not supported")
            name = part.name or ""
            if name == "fileAttachment":
                files.append(await _read_file_part(sim, part))
            elif name in ("attachmentUrls", "attachmentUrls[]"):
                urls.append(await part.text())
            elif name in _UPLOAD_FIELDS:
                form[name] = await part.text()
            else:
                raise _unprocessable([f"property {name} should not exist"])
    _require_query(form, "conversationId", "contactId", "locationId")
    if not files and not urls:
        raise _unprocessable(["attachmentUrls must contain at least 1 elements"])
    if form.get("isGroupSms") == "true" and len(files) > 1:
        raise _upload_error(400, "Only one file can be uploaded per request for group SMS")
    uploaded = sim.record_upload(token, form, files)
    uploaded |= {url.rsplit("/", 1)[-1]: url for url in urls}
    return _ok({"uploadedFiles": uploaded, "twilioMediaSids": []})


async def _read_file_part(sim: GhlSim, part: BodyPartReader) -> tuple[str, int]:
    filename = part.filename or ""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if ext not in UPLOAD_EXTENSIONS:
        raise _upload_error(415, f"File type .{ext} is not supported")
    size = 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > sim.upload_limit:
            raise _upload_error(413, f"File exceeds the maximum size of {sim.upload_limit} bytes")
    return filename, size


async def update_status(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    body = await _json_body(request, STATUS)
    msg = sim.update_status(token, request.match_info["messageId"], body["status"])
    return _send_response(msg.id, msg.conversation_id, msg.status, msg.email_message_id)


async def cancel_schedule(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    return _ok(sim.cancel_schedule(token, request.match_info["messageId"], email=False))


async def cancel_email_schedule(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    return _ok(sim.cancel_schedule(token, request.match_info["emailMessageId"], email=True))


async def recording(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    m = request.match_info
    audio = sim.recording(token, m["locationId"], m["messageId"])
    return web.Response(
        body=audio,
        content_type="audio/x-wav",
        headers={"Content-Disposition": "attachment; filename=audio.wav"},
    )


async def transcription(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    m = request.match_info
    return web.json_response(sim.transcription(token, m["locationId"], m["messageId"]))


async def transcription_download(
    sim: GhlSim, request: web.Request, token: Token
) -> web.StreamResponse:
    m = request.match_info
    sentences = sim.transcription(token, m["locationId"], m["messageId"])
    text = "".join(f"{s['transcript']}\n" for s in sentences)
    return web.Response(
        text=text,
        content_type="text/plain",
        headers={"Content-Disposition": 'attachment; filename="transcription.txt"'},
    )


# --------------------------------------------------------------------------- oauth


async def location_token(sim: GhlSim, request: web.Request, token: Token) -> web.StreamResponse:
    return _ok(sim.location_token(token, await _form(request)))


async def oauth_token(sim: GhlSim, request: web.Request) -> web.StreamResponse:
    # No bearer and no rate limit here; the tenant is set only so the journal can attribute it.
    try:
        body = sim.exchange_token(await _form(request))
    except GhlError as exc:
        return error_response(exc)
    request[TENANT] = body.get("locationId") or body["companyId"]
    return _ok(body)


# --------------------------------------------------------------------------- routing

_V1, _V2 = CONVERSATIONS_VERSION, CONTACTS_VERSION
_CR, _CW = "conversations.readonly", "conversations.write"
_MR, _MW = "conversations/message.readonly", "conversations/message.write"
_KR, _KW = "contacts.readonly", "contacts.write"

# Order matters: aiohttp tries routes in registration order, so fixed paths come before
# the templates that would swallow them (/conversations/search before /conversations/{id}).
OPS: tuple[tuple[str, str, str, str, Op], ...] = (
    ("POST", "/contacts/upsert", _V2, _KW, upsert_contact),
    ("GET", "/contacts/search/duplicate", _V2, _KR, duplicate_contact),
    ("GET", "/contacts/{contactId}", _V2, _KR, get_contact),
    ("PUT", "/contacts/{contactId}", _V2, _KW, update_contact),
    ("DELETE", "/contacts/{contactId}", _V2, _KW, delete_contact),
    ("POST", "/contacts/{contactId}/tags", _V2, _KW, add_tags),
    ("DELETE", "/contacts/{contactId}/tags", _V2, _KW, remove_tags),
    ("GET", "/contacts/{contactId}/notes", _V2, _KR, list_notes),
    ("POST", "/contacts/{contactId}/notes", _V2, _KW, add_note),
    ("PUT", "/contacts/{contactId}/notes/{id}", _V2, _KW, update_note),
    ("DELETE", "/contacts/{contactId}/notes/{id}", _V2, _KW, delete_note),
    ("GET", "/contacts/{contactId}/tasks", _V2, _KR, list_tasks),
    ("POST", "/contacts/{contactId}/tasks", _V2, _KW, add_task),
    ("GET", "/conversations/search", _V1, _CR, search_conversations),
    ("POST", "/conversations/", _V1, _CW, create_conversation),
    ("POST", "/conversations", _V1, _CW, create_conversation),
    ("GET", "/conversations/messages/export", _V1, _MR, export_messages),
    ("POST", "/conversations/messages", _V1, _MW, send_message),
    ("POST", "/conversations/messages/inbound", _V1, _MW, add_inbound),
    ("POST", "/conversations/messages/outbound", _V1, _MW, add_outbound_call),
    ("POST", "/conversations/messages/upload", _V1, _MW, upload),
    ("GET", "/conversations/messages/email/{id}", _V1, _MR, get_email),
    (
        "DELETE",
        "/conversations/messages/email/{emailMessageId}/schedule",
        _V1,
        _MW,
        cancel_email_schedule,
    ),
    ("GET", "/conversations/messages/{id}", _V1, _MR, get_message),
    ("PUT", "/conversations/messages/{messageId}/status", _V1, _MW, update_status),
    ("DELETE", "/conversations/messages/{messageId}/schedule", _V1, _MW, cancel_schedule),
    (
        "GET",
        "/conversations/messages/{messageId}/locations/{locationId}/recording",
        _V1,
        _MR,
        recording,
    ),
    (
        "GET",
        "/conversations/locations/{locationId}/messages/{messageId}/transcription",
        _V1,
        _MR,
        transcription,
    ),
    (
        "GET",
        "/conversations/locations/{locationId}/messages/{messageId}/transcription/download",
        _V1,
        _MR,
        transcription_download,
    ),
    ("GET", "/conversations/{conversationId}", _V1, _CR, get_conversation),
    ("PUT", "/conversations/{conversationId}", _V1, _CW, update_conversation),
    ("DELETE", "/conversations/{conversationId}", _V1, _CW, delete_conversation),
    ("GET", "/conversations/{conversationId}/messages", _V1, _MR, list_messages),
    ("POST", "/oauth/locationToken", _V2, "oauth.write", location_token),
)


def _make_gate(
    sim: GhlSim, requirements: Mapping[tuple[str, str], tuple[str, str]]
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    async def gate(request: web.Request) -> web.StreamResponse | None:
        need = requirements.get((request.method, route_template(request)))
        if need is None:
            return None  # /oauth/token and unknown paths
        version, scope = need
        try:
            token = sim.authenticate(request.headers.get("Authorization"))
        except GhlError as exc:
            return error_response(exc)
        request[AUTH] = token
        request[TENANT] = token.location_id or token.company_id
        decision = sim.limiter.hit(token.bucket)
        request[EXTRA_HEADERS] = _limit_headers(decision)
        if not decision.allowed:
            sim.rate_limited += 1
            # No Retry-After: live sends none that anyone documented (API_FACTS §5).
            return web.json_response(
                {"statusCode": 429, "message": "Too many requests"}, status=429
            )
        if request.headers.get("Version") != version:
            # Live behaviour for a missing/wrong Version is "not found" in API_FACTS; the sim
            # is strict on purpose so a client that forgets the header fails in tests.
            return error_response(
                GhlError(
                    400, f"Version header must be {version} for this endpoint", error="Bad Request"
                )
            )
        if scope == "oauth.write":
            return None  # location_token() also refuses non-agency tokens, so it checks itself
        try:
            sim.require_scope(token, scope)
        except GhlError as exc:
            return error_response(exc)
        return None

    return gate


def _bind(sim: GhlSim, op: Op) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await op(sim, request, request[AUTH])
        except GhlError as exc:
            return error_response(exc)

    return handler


def build_app(sim: GhlSim) -> web.Application:
    """The simulator as an aiohttp app: GHL's routes plus ``/_sim/`` control endpoints."""
    requirements = {(method, path): (version, scope) for method, path, version, scope, _ in OPS}
    app = web.Application(
        middlewares=[
            sim_middleware(
                sim.journal, sim.faults, gate=_make_gate(sim, requirements), error_body=_error_body
            )
        ]
    )

    async def token_handler(request: web.Request) -> web.StreamResponse:
        return await oauth_token(sim, request)

    app.router.add_post("/oauth/token", token_handler)
    for method, path, _version, _scope, op in OPS:
        app.router.add_route(method, path, _bind(sim, op))
    add_control_routes(app, sim.journal, sim.faults, stats=sim.stats)
    _add_inspection_routes(app, sim)
    return app


# --------------------------------------------------------------------------- /_sim/ghl


def _add_inspection_routes(app: web.Application, sim: GhlSim) -> None:
    """JSON mirrors of the Python helpers, for the demo and benchmarks run out of process."""

    async def read(request: web.Request) -> dict[str, Any]:
        raw = await request.json() if request.can_read_body else {}
        if not isinstance(raw, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return raw

    async def add_location(request: web.Request) -> web.Response:
        raw = await read(request)
        sim.add_location(
            raw["locationId"],
            raw.get("companyId"),
            allow_duplicates=bool(raw.get("allowDuplicates")),
        )
        return _ok({"locationId": raw["locationId"]})

    async def add_private_token(request: web.Request) -> web.Response:
        raw = await read(request)
        scopes = raw.get("scopes", sorted(LOCATION_SCOPES))
        return _ok({"token": sim.add_private_token(raw["locationId"], scopes)})

    async def add_oauth_app(request: web.Request) -> web.Response:
        raw = await read(request)
        sim.add_oauth_app(raw["clientId"], raw["clientSecret"])
        return _ok({"clientId": raw["clientId"]})

    async def issue_auth_code(request: web.Request) -> web.Response:
        raw = await read(request)
        code = sim.issue_auth_code(
            raw.get("locationId"),
            raw.get("scopes"),
            client_id=raw.get("clientId"),
            company_id=raw.get("companyId"),
        )
        return _ok({"code": code})

    async def add_provider(request: web.Request) -> web.Response:
        raw = await read(request)
        pid = sim.add_conversation_provider(raw["locationId"], raw.get("providerId"))
        return _ok({"conversationProviderId": pid})

    async def revoke(request: web.Request) -> web.Response:
        sim.revoke((await read(request))["locationId"])
        return _ok({"revoked": True})

    async def configure(request: web.Request) -> web.Response:
        raw = await read(request)
        for key, attr in (
            ("searchLag", "search_lag"),
            ("status403Window", "status_403_window"),
            ("uploadLimit", "upload_limit"),
            ("accessTokenTtl", "access_token_ttl"),
            ("exportDenied", "export_denied"),
        ):
            if key in raw:
                setattr(sim, attr, raw[key])
        if {"burstLimit", "burstWindow", "dailyLimit"} & raw.keys():
            lim = sim.limiter
            sim.set_rate_limit(
                raw.get("burstLimit", lim.limit),
                raw.get("burstWindow", lim.window),
                raw.get("dailyLimit", lim.daily_limit),
            )
        return _ok({"ok": True})

    async def add_reply(request: web.Request) -> web.Response:
        raw = await read(request)
        msg = sim.add_reply(
            raw["conversationId"],
            raw["body"],
            direction=raw.get("direction", "outbound"),
            message_type=raw.get("type", "SMS"),
            user_id=raw.get("userId"),
        )
        return _ok({"message": msg})

    async def message_status(request: web.Request) -> web.Response:
        raw = await read(request)
        return _ok({"message": sim.set_message_status(raw["messageId"], raw["status"])})

    async def contacts(request: web.Request) -> web.Response:
        return _ok({"contacts": sim.contacts(request.query.get("locationId"))})

    async def conversations(request: web.Request) -> web.Response:
        return _ok({"conversations": sim.conversations(request.query.get("locationId"))})

    async def messages(request: web.Request) -> web.Response:
        q = request.query
        return _ok({"messages": sim.messages(q.get("conversationId"), q.get("locationId"))})

    async def alt_ids(request: web.Request) -> web.Response:
        return _ok({"altIds": sim.messages_by_alt_id()})

    async def sent_outbound(request: web.Request) -> web.Response:
        return _ok({"sent": sim.sent_outbound})

    for path, handler in (
        ("locations", add_location),
        ("private-tokens", add_private_token),
        ("oauth-apps", add_oauth_app),
        ("auth-codes", issue_auth_code),
        ("providers", add_provider),
        ("revoke", revoke),
        ("config", configure),
        ("replies", add_reply),
        ("message-status", message_status),
    ):
        app.router.add_post(f"/_sim/ghl/{path}", handler)
    for path, getter in (
        ("contacts", contacts),
        ("conversations", conversations),
        ("messages", messages),
        ("alt-ids", alt_ids),
        ("sent-outbound", sent_outbound),
    ):
        app.router.add_get(f"/_sim/ghl/{path}", getter)
