"""HTTP face of the ActiveDEMAND simulator: v1 routes, key auth, the per-account limit, and
the PROPOSED partner feeds (conversations, messages, calls, histories)."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import MultiDict

from bridge.sim.activedemand_state import (
    DEFAULT_PER_PAGE,
    MAX_PER_PAGE,
    Account,
    AdError,
    AdSim,
    Attachment,
    Contact,
    Conversation,
    FieldDef,
    History,
    Message,
    Sentence,
    iso,
    parse_time,
)
from bridge.sim.ad_data import seed_account
from bridge.sim.common import TENANT, add_control_routes, json_response, sim_middleware

__all__ = ["API", "FILES", "AdSim", "build_app"]

API = "/v1"
# Attachment downloads live outside the API, like files on a storage host: no key is sent
# there, so a client must not attach the account key to URLs it did not build itself.
FILES = "/files"
# Choice: the whole proposed conversation/message/history surface is partner-gated.
PARTNER_PREFIXES = (f"{API}/conversations", f"{API}/messages", f"{API}/histories")
APP_KEY_HEADER = "X-Application-Api-Key"
FORM_ENCODED = "application/x-www-form-urlencoded"
REDACTED = "[redacted]"

ACCOUNT: web.RequestKey[Account] = web.RequestKey("ad_account", Account)
API_KEY: web.RequestKey[str] = web.RequestKey("ad_api_key", str)

Op = Callable[[AdSim, web.Request, Account], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------- responses


def error_response(status: int, message: str) -> web.Response:
    """Choice: the error body format is not found (API_FACTS §2); a flat ``{"error": ...}``."""
    return web.json_response({"error": message}, status=status)


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def contact_json(c: Contact, fields: Mapping[str, FieldDef]) -> dict[str, Any]:
    """A contact with flattened dotted keys (API_FACTS §1.3).

    Choice: core keys always appear (null when empty), custom keys only when set, in
    catalogue order; no timestamps, since none was found.
    """
    body: dict[str, Any] = {"id": c.id}
    for key in fields:
        value = c.values.get(key)
        if value is not None or not key.startswith("custom_"):
            body[key] = value
    return body


def field_json(f: FieldDef, *, detail: bool = False) -> dict[str, Any]:
    """A catalogue entry; the single-field view adds ``login_url`` for password fields."""
    body: dict[str, Any] = {"key": f.key, "label": f.label, "type": f.type}
    if f.options:
        body["options"] = list(f.options)
    if detail and f.login_url is not None:
        body["login_url"] = f.login_url
    return body


def attachment_json(base: str, a: Attachment) -> dict[str, Any]:
    """An attachment with the URL the sim serves it at."""
    return {
        "id": a.id,
        "file_name": a.file_name,
        "content_type": a.content_type,
        "size": a.size,
        "url": f"{base}{FILES}/{a.token}/{quote(a.file_name)}",
    }


def message_json(base: str, m: Message) -> dict[str, Any]:
    """A message of the proposed feed (field names are this project's choice)."""
    call: dict[str, Any] | None = None
    if m.call is not None:
        url = f"{base}{API}/messages/{m.id}"
        call = {
            "duration": m.call.duration,
            "recording_url": f"{url}/recording" if m.call.recording is not None else None,
            "transcription_url": (
                f"{url}/transcription.json" if m.call.transcript is not None else None
            ),
        }
    return {
        "id": m.id,
        "conversation_id": m.conversation_id,
        "contact_id": m.contact_id,
        "channel": m.channel,
        "direction": m.direction,
        "type": m.type,
        "subject": m.subject,
        "body": m.body,
        "status": m.status,
        "status_updated_at": iso(m.status_updated),
        "error": m.error,
        "created_at": iso(m.created),
        "attachments": [attachment_json(base, a) for a in m.attachments],
        "call": call,
    }


def conversation_json(c: Conversation) -> dict[str, Any]:
    """A conversation of the proposed feed; ``status`` is "open", "closed" or what a test set."""
    return {
        "id": c.id,
        "contact_id": c.contact_id,
        "channel": c.channel,
        "status": c.status,
        "created_at": iso(c.created),
        "updated_at": iso(c.updated),
        "message_count": len(c.message_ids),
        "last_message_id": c.message_ids[-1] if c.message_ids else None,
    }


def history_json(h: History) -> dict[str, Any]:
    """A history entry of the proposed feed; ``form_id`` is set for form submissions."""
    return {
        "id": h.id,
        "contact_id": h.contact_id,
        "kind": h.kind,
        "text": h.text,
        "created_at": iso(h.created),
        "form_id": h.form_id,
    }


def sentence_json(s: Sentence) -> dict[str, Any]:
    """One transcription line."""
    return {
        "speaker": s.speaker,
        "text": s.text,
        "start_ms": s.start_ms,
        "end_ms": s.end_ms,
        "confidence": s.confidence,
    }


def _xml(root: str, item: str, rows: list[dict[str, Any]]) -> web.Response:
    """The ``.xml`` twin of a list (``<forms><form><id/><name/></form></forms>``)."""

    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else escape(str(value), quote=False)

    inner = "".join(
        f"<{item}>"
        + "".join(f"<{k}>{text(v)}</{k}>" for k, v in row.items() if not isinstance(v, list))
        + f"</{item}>"
        for row in rows
    )
    body = f'<?xml version="1.0" encoding="UTF-8"?><{root}>{inner}</{root}>'
    return web.Response(text=body, content_type="application/xml")


# --------------------------------------------------------------------------- request parsing


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name, "")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise AdError(400, f"{name} must be an integer") from None


def _paging(sim: AdSim, request: web.Request) -> tuple[int, int]:
    """(offset, limit) from ``page``/``per_page`` (both choices; see the state module)."""
    if sim.ignore_paging:
        return 0, DEFAULT_PER_PAGE
    page = _int_param(request, "page")
    per_page = _int_param(request, "per_page")
    page = 1 if page is None else page
    per_page = DEFAULT_PER_PAGE if per_page is None else per_page
    if page < 1 or per_page < 1:
        raise AdError(400, "page and per_page must be positive integers")
    per_page = min(per_page, MAX_PER_PAGE)
    return (page - 1) * per_page, per_page


async def _form(request: web.Request) -> dict[str, str]:
    """A form-encoded body without the ``api-key`` field; last value wins for repeated keys."""
    if request.content_type != FORM_ENCODED:
        # Choice: live behaviour for JSON bodies is not found; every client seen sends forms.
        raise AdError(400, "Expected an application/x-www-form-urlencoded body")
    posted = await request.post()
    return {k: v for k, v in posted.items() if isinstance(v, str) and k != "api-key"}


_BRACKETED = re.compile(r"(\w+)\[([^\[\]]+)\]")


def _nested(form: Mapping[str, str], prefix: str) -> dict[str, str]:
    """``contact[first_name]=Rosa`` style fields under ``prefix``; other keys are ignored."""
    found: dict[str, str] = {}
    for key, value in form.items():
        m = _BRACKETED.fullmatch(key)
        if m is not None and m.group(1) == prefix:
            found[m.group(2)] = value
    return found


# --------------------------------------------------------------------------- v1 handlers


def list_forms(fmt: str) -> Op:
    async def handler(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
        rows = [{"id": f.id, "name": f.name} for f in sim.forms(a.key)]
        return _xml("forms", "form", rows) if fmt == "xml" else web.json_response(rows)

    return handler


def form_fields(fmt: str) -> Op:
    async def handler(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
        form_id = _int_param(request, "form_id")
        if form_id is None:
            raise AdError(400, "form_id is required")  # Choice: status not found.
        rows = [
            {**field_json(f), "required": required}
            for f, required in sim.form_fields(a.key, form_id)
        ]
        return _xml("fields", "field", rows) if fmt == "xml" else web.json_response(rows)

    return handler


async def form_html(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """The form rendered for embedding; ``exclude_css`` drops the stylesheet."""
    form_id = int(request.match_info["id"])
    form = sim.form(a.key, form_id)
    style = (
        "" if request.query.get("exclude_css") else "<style>.ad-form{font:1em sans-serif}</style>"
    )
    inputs = "".join(
        f'<label>{escape(f.label)}<input name="{escape(f.key)}"'
        f"{' required' if required else ''}></label>"
        for f, required in sim.form_fields(a.key, form_id)
    )
    action = f"{_base(request)}{API}/forms/{form.id}"
    html = (
        f'{style}<form class="ad-form" method="post" action="{action}">'
        f'{inputs}<button type="submit">Submit</button></form>'
    )
    return web.Response(text=html, content_type="text/html")


async def submit_form(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """Choice: callers never read the response (API_FACTS §1.3); a 200 with an empty body,
    so a client cannot come to depend on one."""
    sim.submit_form(a.key, int(request.match_info["id"]), await _form(request))
    return web.Response(status=200)


async def list_contacts(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """A bare array page. Unknown parameters (an ``updated_since``...) are ignored, as an
    API without a change filter would, so a client believing it filters gets everyone."""
    offset, limit = _paging(sim, request)
    return json_response(
        [
            sim.raw.served("contacts", c.id, contact_json(c, a.fields))
            for c in sim.list_contacts(a.key, offset, limit)
        ]
    )


async def create_contact(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """``contact[...]`` fields; the answer is an array whose first element has ``id``.

    Choice: a key inside ``contact[...]`` that is not in the catalogue is a 422 (live may
    drop it silently); both create and update answer 200, the only success the WP plugin
    accepts.
    """
    values = _nested(await _form(request), "contact")
    contact, _ = sim.upsert_contact(a.key, values)
    return web.json_response([contact_json(contact, a.fields)])


async def get_contact(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """PROPOSED ``GET contacts/{id}.json`` (API_FACTS §2: get-by-id path not found).

    Choice: one object exactly like an element of ``contacts.json``; an id the account
    does not have is a 404 in the usual error body. Gated like the v1 routes, not as a
    partner feed, since Make's "Get a Contact" suggests the plain key reaches it.
    """
    contact = sim.contact(a.key, int(request.match_info["id"]))
    return json_response(sim.raw.served("contacts", contact.id, contact_json(contact, a.fields)))


async def contact_fields(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    return web.json_response([field_json(f) for f in sim.fields(a.key)])


async def contact_field(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    key = request.query.get("field_key")
    if not key:
        raise AdError(400, "field_key is required")
    return web.json_response(field_json(sim.field(a.key, key), detail=True))


# --------------------------------------------------------------------------- proposed feeds


async def list_conversations(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    offset, limit = _paging(sim, request)
    raw = request.query.get("updated_since")
    since = parse_time(raw) if raw else None
    found = sim.list_conversations(a.key, updated_since=since, offset=offset, limit=limit)
    shown = [sim.raw.served("conversations", c.id, conversation_json(c)) for c in found]
    return json_response(shown)


async def get_conversation(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    conv = sim.conversation(a.key, int(request.match_info["id"]))
    return web.json_response(conversation_json(conv))


async def list_messages(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    offset, limit = _paging(sim, request)
    found = sim.list_messages(
        a.key,
        int(request.match_info["id"]),
        since_id=_int_param(request, "since_id"),
        offset=offset,
        limit=limit,
    )
    base = _base(request)
    return json_response([sim.raw.served("messages", m.id, message_json(base, m)) for m in found])


async def get_message(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    msg = sim.message(a.key, int(request.match_info["id"]))
    return web.json_response(message_json(_base(request), msg))


async def message_status(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    msg = sim.message(a.key, int(request.match_info["id"]))
    return web.json_response(
        {
            "message_id": msg.id,
            "status": msg.status,
            "status_updated_at": iso(msg.status_updated),
            "error": msg.error,
        }
    )


async def recording(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    mid = int(request.match_info["id"])
    audio, content_type = sim.recording(a.key, mid)
    return web.Response(
        body=audio,
        content_type=content_type,
        headers={"Content-Disposition": f'attachment; filename="recording-{mid}.wav"'},
    )


async def transcription(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    sentences = sim.transcription(a.key, int(request.match_info["id"]))
    return web.json_response([sentence_json(s) for s in sentences])


async def transcription_download(
    sim: AdSim, request: web.Request, a: Account
) -> web.StreamResponse:
    mid = int(request.match_info["id"])
    text = "".join(f"{s.speaker}: {s.text}\n" for s in sim.transcription(a.key, mid))
    return web.Response(
        text=text,
        content_type="text/plain",
        headers={"Content-Disposition": f'attachment; filename="transcription-{mid}.txt"'},
    )


async def list_histories(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    offset, limit = _paging(sim, request)
    found = sim.list_histories(
        a.key,
        contact_id=_int_param(request, "contact_id"),
        kind=request.query.get("kind") or None,
        since_id=_int_param(request, "since_id"),
        offset=offset,
        limit=limit,
    )
    return web.json_response([history_json(h) for h in found])


async def create_history(sim: AdSim, request: web.Request, a: Account) -> web.StreamResponse:
    """``history[contact_id]``, ``history[kind]``, ``history[text]`` in the ``contact[...]``
    style; answered like contacts.json, as a one-element array."""
    values = _nested(await _form(request), "history")
    raw_id = values.get("contact_id", "")
    if not raw_id.isdigit():
        raise AdError(422, "history[contact_id] must be a contact id")
    entry = sim.add_history(a.key, int(raw_id), values.get("kind", ""), values.get("text", ""))
    return web.json_response([history_json(entry)])


async def download(sim: AdSim, request: web.Request) -> web.StreamResponse:
    """Stream an attachment with its content type; Content-Length unless it is chunked."""
    try:
        att = sim.attachment(request.match_info["token"])
    except AdError as exc:
        return error_response(exc.status, exc.message)
    if request.match_info["name"] != att.file_name:
        return error_response(404, "File not found")
    response = web.StreamResponse(
        headers={
            "Content-Type": att.content_type,
            "Content-Disposition": f'attachment; filename="{att.file_name}"',
        }
    )
    if att.send_length:
        response.content_length = att.size
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for chunk in att.chunks():
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        pass  # the client stopped reading, e.g. at its own size limit
    return response


# --------------------------------------------------------------------------- routing

_ID = r"{id:\d+}"

# Order matters: fixed paths come before the templates that would swallow them.
ROUTES: tuple[tuple[str, str, Op], ...] = (
    ("GET", "/forms.json", list_forms("json")),
    ("GET", "/forms.xml", list_forms("xml")),
    ("GET", "/forms/fields.json", form_fields("json")),
    ("GET", "/forms/fields.xml", form_fields("xml")),
    ("GET", f"/forms/{_ID}", form_html),
    ("POST", f"/forms/{_ID}", submit_form),
    ("GET", "/contacts.json", list_contacts),
    ("POST", "/contacts.json", create_contact),
    ("GET", "/contacts/fields.json", contact_fields),
    ("GET", "/contacts/field.json", contact_field),
    ("GET", f"/contacts/{_ID}.json", get_contact),
    ("GET", "/conversations.json", list_conversations),
    ("GET", f"/conversations/{_ID}.json", get_conversation),
    ("GET", f"/conversations/{_ID}/messages.json", list_messages),
    ("GET", f"/messages/{_ID}.json", get_message),
    ("GET", f"/messages/{_ID}/status.json", message_status),
    ("GET", f"/messages/{_ID}/recording", recording),
    ("GET", f"/messages/{_ID}/transcription.json", transcription),
    ("GET", f"/messages/{_ID}/transcription/download", transcription_download),
    ("GET", "/histories.json", list_histories),
    ("POST", "/histories.json", create_history),
)


def _credentials(sim: AdSim) -> Middleware:
    """Find the account key (header, query or form field), meter it, and hide it.

    The key is taken once here so the gate and the meter agree. A key sent in the query
    is replaced in the request the journal sees, so ``/_sim/journal`` never shows it.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(f"{API}/"):
            return await handler(request)
        # Choice: when several are sent, the header wins, then the query, then the form.
        key = request.headers.get("x-api-key")
        if key is None and "api-key" in request.query:
            key = request.query["api-key"]
            query = MultiDict(request.query)
            query["api-key"] = REDACTED
            request = request.clone(rel_url=request.rel_url.with_query(query))
        if key is None and request.method == "POST" and request.content_type == FORM_ENCODED:
            posted = (await request.post()).get("api-key")
            key = posted if isinstance(posted, str) else None
        if key:
            request[API_KEY] = key
            account = sim.find_account(key)
            if account is not None:
                sim.meter.hit(account.id)
        return await handler(request)

    return middleware


def _make_gate(sim: AdSim) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    async def gate(request: web.Request) -> web.StreamResponse | None:
        if not request.path.startswith(f"{API}/"):
            return None
        key = request.get(API_KEY)
        known = sim.find_account(key)
        if known is not None:
            request[TENANT] = known.id  # so the journal attributes a 403 too
        try:
            account = sim.authenticate(
                key,
                request.headers.get(APP_KEY_HEADER),
                partner=request.path.startswith(PARTNER_PREFIXES),
            )
        except AdError as exc:
            return error_response(exc.status, exc.message)
        request[ACCOUNT] = account
        decision = sim.limiter.hit(account.id)
        if not decision.allowed:
            # Choice: throttling is not found (API_FACTS §2); a plain 429 with Retry-After.
            retry = max(1, math.ceil(decision.retry_after))
            response = error_response(429, "Too many requests")
            response.headers["Retry-After"] = str(retry)
            return response
        return None

    return gate


def _bind(sim: AdSim, op: Op) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await op(sim, request, request[ACCOUNT])
        except AdError as exc:
            return error_response(exc.status, exc.message)

    return handler


def build_app(sim: AdSim) -> web.Application:
    """The simulator as an aiohttp app: ActiveDEMAND's routes, file downloads, ``/_sim/``."""
    app = web.Application(
        middlewares=[
            _credentials(sim),
            sim_middleware(
                sim.journal, sim.faults, gate=_make_gate(sim), error_body=error_response
            ),
        ]
    )
    for method, path, op in ROUTES:
        app.router.add_route(method, API + path, _bind(sim, op))

    async def files(request: web.Request) -> web.StreamResponse:
        return await download(sim, request)

    app.router.add_get(FILES + "/{token}/{name}", files)
    add_control_routes(app, sim.journal, sim.faults, stats=sim.stats)
    _add_control(app, sim)
    return app


# --------------------------------------------------------------------------- /_sim/ad


def _add_control(app: web.Application, sim: AdSim) -> None:
    """JSON mirrors of the Python helpers, for the demo and benchmarks run out of process.

    They name accounts by label (``account-1``), never by key.
    """

    async def read(request: web.Request) -> dict[str, Any]:
        raw = await request.json() if request.can_read_body else {}
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        return raw

    def control(
        fn: Callable[[web.Request], Awaitable[Any]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return web.json_response(await fn(request))
            except AdError as exc:
                return error_response(exc.status, exc.message)
            except (KeyError, ValueError, TypeError) as exc:
                return error_response(400, str(exc))

        return handler

    async def accounts(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        key = sim.add_account(raw.get("key"))
        if "contacts" in raw:
            seed_account(sim, key, contacts=int(raw["contacts"]), seed=int(raw.get("seed", 0)))
        return {"key": key, "accountId": sim.account_id(key)}

    async def touch(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        key = sim.key_for(raw["accountId"])
        contact = sim.update_contact(key, int(raw["contactId"]), raw.get("changes"))
        return {"id": contact.id, "revision": contact.revision}

    async def messages(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        key = sim.key_for(raw["accountId"])
        msg = sim.add_message(
            key,
            int(raw["conversationId"]),
            body=str(raw.get("body", "")),
            direction=str(raw.get("direction", "inbound")),
        )
        return {"id": msg.id}

    async def status(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        key = sim.key_for(raw["accountId"])
        msg = sim.set_status(key, int(raw["messageId"]), raw["status"], error=raw.get("error"))
        return {"id": msg.id, "status": msg.status}

    async def conversation_status(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        key = sim.key_for(raw["accountId"])
        status = raw["status"]
        if not isinstance(status, str):
            raise TypeError("status must be a string")
        conv = sim.set_conversation_status(key, int(raw["conversationId"]), status)
        return {"id": conv.id, "status": conv.status, "updated_at": iso(conv.updated)}

    async def config(request: web.Request) -> dict[str, Any]:
        raw = await read(request)
        if "rateLimit" in raw or "rateWindow" in raw:
            limiter = sim.limiter
            sim.set_rate_limit(
                int(raw.get("rateLimit", limiter.limit)),
                float(raw.get("rateWindow", limiter.window)),
            )
        if "requireApplicationKey" in raw:
            sim.require_application_key = bool(raw["requireApplicationKey"])
        if "ignorePaging" in raw:
            sim.ignore_paging = bool(raw["ignorePaging"])
        return {"ok": True}

    async def histories(request: web.Request) -> list[dict[str, Any]]:
        key = sim.key_for(request.query["accountId"])
        found = sim.histories(key, source=request.query.get("source"))
        return [history_json(h) for h in found]

    async def submissions(request: web.Request) -> list[dict[str, Any]]:
        key = sim.key_for(request.query["accountId"])
        return [
            {
                "id": s.id,
                "form_id": s.form_id,
                "contact_id": s.contact_id,
                "values": s.values,
                "ignored": s.ignored,
            }
            for s in sim.submissions(key)
        ]

    app.router.add_post("/_sim/ad/accounts", control(accounts))
    app.router.add_post("/_sim/ad/touch", control(touch))
    app.router.add_post("/_sim/ad/messages", control(messages))
    app.router.add_post("/_sim/ad/status", control(status))
    app.router.add_post("/_sim/ad/conversation_status", control(conversation_status))
    app.router.add_post("/_sim/ad/config", control(config))
    app.router.add_get("/_sim/ad/histories", control(histories))
    app.router.add_get("/_sim/ad/submissions", control(submissions))
