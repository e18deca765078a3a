"""The HighLevel simulator, driven over real loopback HTTP with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from bridge.sim.common import FaultRule, Faults, RollingLimiter, serve, validate
from bridge.sim.ghl import INBOUND, GhlSim, build_app

LOC = "ve9EPM428h8vShlRW1KT"
OTHER = "Zq1xKp0aTn7cWb3eRd5Y"
V1, V2 = "2021-04-15", "2021-07-28"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Resp:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class Api:
    """A thin caller that sends the token and the per-endpoint Version header."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        *,
        version: str | None = V1,
        token: str | None = None,
        **kwargs: Any,
    ) -> Resp:
        headers: dict[str, str] = dict(kwargs.pop("headers", {}))
        if version is not None:
            headers["Version"] = version
        # None sends the fixture's token; "" sends no Authorization header at all.
        bearer = self.token if token is None else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        async with self.session.request(
            method, self.base + path, headers=headers, **kwargs
        ) as resp:
            if resp.content_type == "application/json":
                body: Any = await resp.json()
            else:
                body = await resp.read()
            return Resp(resp.status, body, resp.headers)

    async def contact(self, email: str | None = "ada@example.org", phone: str | None = None) -> str:
        body: dict[str, Any] = {"locationId": LOC, "firstName": "Ada"}
        if email:
            body["email"] = email
        if phone:
            body["phone"] = phone
        r = await self.call("POST", "/contacts/upsert", version=V2, json=body)
        assert r.status == 200, r.body
        return str(r.body["contact"]["id"])

    async def conversation(self, contact_id: str) -> str:
        r = await self.call(
            "POST", "/conversations/", json={"locationId": LOC, "contactId": contact_id}
        )
        assert r.status == 201, r.body
        return str(r.body["conversation"]["id"])

    async def inbound(self, conversation_id: str, text: str, **extra: Any) -> dict[str, Any]:
        body = {"type": "SMS", "conversationId": conversation_id, "message": text, **extra}
        body.setdefault("direction", "inbound")
        r = await self.call("POST", "/conversations/messages/inbound", json=body)
        assert r.status == 200, r.body
        return dict(r.body)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> GhlSim:
    ghl = GhlSim(seed=1, clock=clock)
    ghl.add_location(LOC)
    ghl.add_location(OTHER)
    return ghl


@pytest.fixture
async def api(sim: GhlSim) -> AsyncIterator[Api]:
    async with serve(build_app(sim)) as base, aiohttp.ClientSession() as session:
        yield Api(session, base, sim.add_private_token(LOC))


# --------------------------------------------------------------------------- auth and version


async def test_missing_or_garbled_token_is_invalid_jwt(api: Api) -> None:
    """A request without a bearer token, or with an unknown one, gets 401 "Invalid JWT"."""
    for token in ("", "garbage", "pit-00000000-0000-4000-8000-000000000000"):
        r = await api.call("GET", f"/contacts/search/duplicate?locationId={LOC}", token=token)
        assert r.status == 401
        assert r.body["message"] == "Invalid JWT"


async def test_expired_access_token_is_rejected(api: Api, sim: GhlSim, clock: FakeClock) -> None:
    """An OAuth access token past its lifetime gets 401 "Invalid token: access token is invalid"."""
    sim.add_oauth_app("app1", "secret1")
    sim.access_token_ttl = 60
    code = sim.issue_auth_code(LOC, client_id="app1")
    form = {"client_id": "app1", "client_secret": "secret1", "grant_type": "authorization_code"}
    r = await api.call("POST", "/oauth/token", version=None, token="", data=form | {"code": code})
    assert r.status == 200
    assert r.body["expires_in"] == 60
    access = r.body["access_token"]
    ok = await api.call(
        "GET", f"/contacts/search/duplicate?locationId={LOC}&email=x@y.zz", version=V2, token=access
    )
    assert ok.status == 200
    clock.advance(61)
    r = await api.call(
        "GET", f"/contacts/search/duplicate?locationId={LOC}&email=x@y.zz", version=V2, token=access
    )
    assert r.status == 401
    assert r.body["message"] == "Invalid token: access token is invalid"


async def test_missing_scope_is_401_not_authorized_for_scope(api: Api, sim: GhlSim) -> None:
    """A token without the route's scope gets 401 with the scope message, not 403."""
    token = sim.add_private_token(LOC, scopes={"contacts.readonly"})
    r = await api.call(
        "POST", "/contacts/upsert", version=V2, token=token, json={"locationId": LOC}
    )
    assert r.status == 401
    assert r.body["message"] == "The token is not authorized for this scope."


async def test_wrong_location_is_403(api: Api, sim: GhlSim) -> None:
    """A locationId or object from another location than the token's gets 403."""
    r = await api.call("GET", f"/conversations/search?locationId={OTHER}")
    assert r.status == 403
    assert r.body["message"] == "The token does not have access to this location."
    contact_id = await api.contact()
    other = sim.add_private_token(OTHER)
    r = await api.call("GET", f"/contacts/{contact_id}", version=V2, token=other)
    assert r.status == 403


async def test_version_header_is_enforced(api: Api) -> None:
    """Missing or wrong Version answers 400 (strict on purpose; live behaviour is unknown)."""
    r = await api.call("GET", f"/conversations/search?locationId={LOC}", version=None)
    assert r.status == 400
    r = await api.call("GET", f"/conversations/search?locationId={LOC}", version=V2)
    assert r.status == 400
    r = await api.call("POST", "/contacts/upsert", version=V1, json={"locationId": LOC})
    assert r.status == 400


# --------------------------------------------------------------------------- contacts


async def test_upsert_matches_by_email_then_phone(api: Api, sim: GhlSim) -> None:
    """Upsert updates the contact with the same email, else the same phone, else creates one."""
    first = await api.call(
        "POST",
        "/contacts/upsert",
        version=V2,
        json={"locationId": LOC, "email": "Ada@Example.org", "phone": "(555) 010-2030"},
    )
    assert first.status == 200
    assert first.body["new"] is True
    assert "traceId" in first.body
    cid = first.body["contact"]["id"]
    assert len(cid) == 20
    assert cid.isalnum()
    assert first.body["contact"]["phone"] == "+15550102030"
    by_email = await api.call(
        "POST",
        "/contacts/upsert",
        version=V2,
        json={"locationId": LOC, "email": "ada@example.org", "lastName": "L"},
    )
    assert (by_email.body["new"], by_email.body["contact"]["id"]) == (False, cid)
    assert by_email.body["contact"]["lastName"] == "L"
    by_phone = await api.call(
        "POST", "/contacts/upsert", version=V2, json={"locationId": LOC, "phone": "+1 555 010 2030"}
    )
    assert (by_phone.body["new"], by_phone.body["contact"]["id"]) == (False, cid)
    fresh = await api.call(
        "POST", "/contacts/upsert", version=V2, json={"locationId": LOC, "email": "bob@example.org"}
    )
    assert fresh.body["new"] is True
    assert len(sim.contacts(LOC)) == 2


async def test_undeclared_or_missing_fields_are_422(api: Api) -> None:
    """Unknown body properties and missing required ones get 422 with a message list."""
    r = await api.call(
        "POST", "/contacts/upsert", version=V2, json={"locationId": LOC, "nickname": "x"}
    )
    assert r.status == 422
    assert r.body["message"] == ["property nickname should not exist"]
    assert r.body["error"] == "Unprocessable Entity"
    r = await api.call("POST", "/contacts/upsert", version=V2, json={"email": "a@b.cd"})
    assert r.status == 422
    assert "locationId should not be empty" in r.body["message"]
    r = await api.call(
        "POST", "/contacts/upsert", version=V2, json={"locationId": LOC, "email": "nope"}
    )
    assert r.status == 422


async def test_custom_fields_write_field_value_read_value(api: Api) -> None:
    """Custom fields are written as {id, field_value} and read back as {id, value}."""
    r = await api.call(
        "POST",
        "/contacts/upsert",
        version=V2,
        json={
            "locationId": LOC,
            "email": "cf@example.org",
            "customFields": [{"id": "fieldAAAAAAAAAAAAAAA", "field_value": "blue"}],
        },
    )
    cid = r.body["contact"]["id"]
    got = await api.call("GET", f"/contacts/{cid}", version=V2)
    assert got.body["contact"]["customFields"] == [{"id": "fieldAAAAAAAAAAAAAAA", "value": "blue"}]


async def test_tag_endpoints_add_and_remove_without_replacing(api: Api) -> None:
    """POST/DELETE tags only add/remove, while tags on upsert and PUT replace them all."""
    cid = await api.contact()
    r = await api.call("POST", f"/contacts/{cid}/tags", version=V2, json={"tags": ["a", "b"]})
    assert (r.status, r.body["tags"]) == (201, ["a", "b"])
    r = await api.call("POST", f"/contacts/{cid}/tags", version=V2, json={"tags": ["c", "a"]})
    assert r.body["tags"] == ["a", "b", "c"]
    r = await api.call("DELETE", f"/contacts/{cid}/tags", version=V2, json={"tags": ["b"]})
    assert (r.status, r.body["tags"]) == (200, ["a", "c"])
    r = await api.call("PUT", f"/contacts/{cid}", version=V2, json={"tags": ["z"]})
    assert r.body["succeded"] is True
    assert r.body["contact"]["tags"] == ["z"]


async def test_duplicate_search_returns_contact_or_null(api: Api) -> None:
    """Duplicate search finds by email or number and answers {"contact": null} otherwise."""
    cid = await api.contact(email="dup@example.org", phone="+15551112222")
    r = await api.call(
        "GET",
        "/contacts/search/duplicate",
        version=V2,
        params={"locationId": LOC, "number": "+15551112222"},
    )
    assert r.body["contact"]["id"] == cid
    r = await api.call(
        "GET",
        "/contacts/search/duplicate",
        version=V2,
        params={"locationId": LOC, "email": "DUP@example.org"},
    )
    assert r.body["contact"]["id"] == cid
    r = await api.call(
        "GET",
        "/contacts/search/duplicate",
        version=V2,
        params={"locationId": LOC, "email": "x@example.org"},
    )
    assert r.body == {"contact": None}


async def test_notes_update_in_place_and_tasks(api: Api) -> None:
    """Notes can be created, updated in place and listed; tasks can be created."""
    cid = await api.contact()
    r = await api.call("POST", f"/contacts/{cid}/notes", version=V2, json={"body": "v1"})
    assert r.status == 201
    note_id = r.body["note"]["id"]
    r = await api.call("PUT", f"/contacts/{cid}/notes/{note_id}", version=V2, json={"body": "v2"})
    assert (r.status, r.body["note"]["body"]) == (200, "v2")
    r = await api.call("GET", f"/contacts/{cid}/notes", version=V2)
    assert [n["body"] for n in r.body["notes"]] == ["v2"]
    r = await api.call(
        "POST",
        f"/contacts/{cid}/tasks",
        version=V2,
        json={"title": "Call", "dueDate": "2030-01-01T00:00:00Z", "completed": False},
    )
    assert (r.status, r.body["task"]["title"]) == (201, "Call")


# --------------------------------------------------------------------------- conversations


async def test_second_conversation_for_contact_is_400_already_exists(api: Api) -> None:
    """A second conversation for a contact answers 400 "... already exists!" without an id."""
    cid = await api.contact()
    conv = await api.conversation(cid)
    r = await api.call("POST", "/conversations/", json={"locationId": LOC, "contactId": cid})
    assert r.status == 400
    assert r.body["message"] == f"Conversation with the contact id:{cid} already exists!"
    assert conv not in str(r.body)


async def test_search_by_contact_and_eventual_consistency(
    api: Api, sim: GhlSim, clock: FakeClock
) -> None:
    """With search_lag set, a new conversation is invisible to search until the lag passes."""
    sim.search_lag = 5.0
    cid = await api.contact()
    conv = await api.conversation(cid)
    params = {"locationId": LOC, "contactId": cid}
    r = await api.call("GET", "/conversations/search", params=params)
    assert (r.body["conversations"], r.body["total"]) == ([], 0)
    got = await api.call("GET", f"/conversations/{conv}")
    assert (got.status, got.body["id"], got.body["contactId"]) == (200, conv, cid)
    clock.advance(5.0)
    r = await api.call("GET", "/conversations/search", params=params)
    assert r.body["total"] == 1
    item = r.body["conversations"][0]
    assert item["id"] == conv
    assert isinstance(item["lastMessageDate"], int)


async def test_search_pages_with_start_after_date(api: Api, sim: GhlSim) -> None:
    """Search pages by passing the last item's lastMessageDate as startAfterDate."""
    convs = []
    for i in range(5):
        conv = await api.conversation(await api.contact(email=f"p{i}@example.org"))
        sim.add_reply(conv, f"hi {i}", date_ms=sim.now_ms() + 60_000 + i * 1000)
        convs.append(conv)
    seen: list[str] = []
    params: dict[str, Any] = {"locationId": LOC, "limit": 2}
    while True:
        r = await api.call("GET", "/conversations/search", params=params)
        assert r.body["total"] == 5
        page = r.body["conversations"]
        if not page:
            break
        seen += [c["id"] for c in page]
        params["startAfterDate"] = page[-1]["lastMessageDate"]
    assert seen == list(reversed(convs))


async def test_update_and_delete_conversation(api: Api) -> None:
    """PUT sets unreadCount/starred and DELETE removes the conversation."""
    conv = await api.conversation(await api.contact())
    r = await api.call(
        "PUT", f"/conversations/{conv}", json={"locationId": LOC, "unreadCount": 0, "starred": True}
    )
    assert (r.body["success"], r.body["conversation"]["starred"]) == (True, True)
    r = await api.call("DELETE", f"/conversations/{conv}")
    assert r.body == {"success": True}
    r = await api.call("GET", f"/conversations/{conv}")
    assert r.status == 404


# --------------------------------------------------------------------------- messages


async def test_message_list_is_double_nested_and_pages_by_last_message_id(api: Api) -> None:
    """The list is {"messages": {"lastMessageId", "nextPage", "messages"}}, newest first."""
    conv = await api.conversation(await api.contact())
    sent = [
        (await api.inbound(conv, f"m{i}", date=f"2024-01-01T00:00:0{i}Z"))["messageId"]
        for i in range(5)
    ]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        r = await api.call("GET", f"/conversations/{conv}/messages", params=params)
        page = r.body["messages"]
        assert set(page) == {"lastMessageId", "nextPage", "messages"}
        seen += [m["id"] for m in page["messages"]]
        if not page["nextPage"]:
            break
        params["lastMessageId"] = page["lastMessageId"]
    assert seen == list(reversed(sent))
    r = await api.call("GET", f"/conversations/{conv}/messages", params={"type": "TYPE_CALL"})
    assert r.body["messages"]["messages"] == []


async def test_get_message_is_wrapped(api: Api) -> None:
    """GET /conversations/messages/{id} answers {"message": {...}, "traceId"}."""
    conv = await api.conversation(await api.contact())
    mid = (await api.inbound(conv, "hello"))["messageId"]
    r = await api.call("GET", f"/conversations/messages/{mid}")
    assert r.status == 200
    assert set(r.body) == {"message", "traceId"}
    msg = r.body["message"]
    assert (msg["id"], msg["body"], msg["type"], msg["messageType"]) == (
        mid,
        "hello",
        2,
        "TYPE_SMS",
    )


async def test_inbound_direction_defaults_to_outbound_and_alt_id_is_kept(
    api: Api, sim: GhlSim
) -> None:
    """Inbound without direction is stored as outbound (as live); altId is stored and listed."""
    conv = await api.conversation(await api.contact())
    r = await api.call(
        "POST",
        "/conversations/messages/inbound",
        json={"type": "SMS", "conversationId": conv, "message": "x", "altId": "an:1"},
    )
    assert r.status == 200
    assert set(r.body) >= {
        "success",
        "conversationId",
        "messageId",
        "message",
        "contactId",
        "dateAdded",
    }
    listed = await api.call("GET", f"/conversations/{conv}/messages")
    item = listed.body["messages"]["messages"][0]
    assert (item["direction"], item["altId"]) == ("outbound", "an:1")
    await api.inbound(conv, "again", altId="an:1")
    assert sim.messages_by_alt_id() == {"an:1": 2}


async def test_inbound_by_contact_only_finds_or_creates_the_conversation(api: Api) -> None:
    """Inbound with only contactId lands in the contact's one conversation."""
    cid = await api.contact()
    body = {"type": "SMS", "contactId": cid, "message": "a", "direction": "inbound"}
    first = await api.call("POST", "/conversations/messages/inbound", json=body)
    second = await api.call("POST", "/conversations/messages/inbound", json=body)
    assert first.body["conversationId"] == second.body["conversationId"]


async def test_custom_inbound_without_provider_is_silently_dropped(api: Api, sim: GhlSim) -> None:
    """A Custom-type inbound without conversationProviderId gets an empty 201 and is not stored."""
    conv = await api.conversation(await api.contact())
    r = await api.call(
        "POST", "/conversations/messages/inbound", json={"type": "Custom", "conversationId": conv}
    )
    assert (r.status, r.body) == (201, b"")
    assert sim.messages(conv) == []
    assert sim.dropped_inbound == 1


async def test_export_pages_with_cursor(api: Api) -> None:
    """Export pages by nextCursor until it is null, and refuses a limit outside 10..500."""
    conv = await api.conversation(await api.contact())
    ids = {(await api.inbound(conv, f"e{i}"))["messageId"] for i in range(25)}
    seen: list[str] = []
    params: dict[str, Any] = {"locationId": LOC, "limit": 10}
    while True:
        r = await api.call("GET", "/conversations/messages/export", params=params)
        assert r.body["total"] == 25
        seen += [m["id"] for m in r.body["messages"]]
        if r.body["nextCursor"] is None:
            break
        params["cursor"] = r.body["nextCursor"]
    assert len(seen) == 25
    assert set(seen) == ids
    r = await api.call(
        "GET", "/conversations/messages/export", params={"locationId": LOC, "limit": 5}
    )
    assert r.status == 422


async def test_send_is_recorded_and_status_is_403_right_after(
    api: Api, sim: GhlSim, clock: FakeClock
) -> None:
    """A sent message is recorded in sent_outbound and its status update is 403 for the window."""
    cid = await api.contact()
    r = await api.call(
        "POST", "/conversations/messages", json={"type": "SMS", "contactId": cid, "message": "hi"}
    )
    assert r.status == 200
    mid = r.body["messageId"]
    assert [s["messageId"] for s in sim.sent_outbound] == [mid]
    r = await api.call("PUT", f"/conversations/messages/{mid}/status", json={"status": "delivered"})
    assert r.status == 403
    assert r.body["message"] == "No conversation provider found for this message"
    clock.advance(sim.status_403_window)
    r = await api.call("PUT", f"/conversations/messages/{mid}/status", json={"status": "delivered"})
    assert (r.status, r.body["status"]) == (200, "delivered")


async def test_cancel_schedule_reports_outcome_in_body(api: Api) -> None:
    """Cancelling a scheduled message answers 200 with a numeric status in the body."""
    cid = await api.contact()
    body = {
        "type": "SMS",
        "contactId": cid,
        "message": "later",
        "scheduledTimestamp": 2_000_000_000,
    }
    mid = (await api.call("POST", "/conversations/messages", json=body)).body["messageId"]
    r = await api.call("DELETE", f"/conversations/messages/{mid}/schedule")
    assert (r.status, r.body["status"]) == (200, 200)
    r = await api.call("DELETE", f"/conversations/messages/{mid}/schedule")
    assert (r.status, r.body["status"]) == (200, 400)


async def test_upload_checks_type_and_size(api: Api, sim: GhlSim) -> None:
    """Upload refuses unknown extensions with 415 and big files with 413, else returns URLs."""
    cid = await api.contact()
    conv = await api.conversation(cid)
    sim.upload_limit = 1000

    def form(name: str, size: int) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for key, value in (("conversationId", conv), ("contactId", cid), ("locationId", LOC)):
            data.add_field(key, value)
        data.add_field(
            "fileAttachment", b"x" * size, filename=name, content_type="application/octet-stream"
        )
        return data

    r = await api.call("POST", "/conversations/messages/upload", data=form("a.exe", 10))
    assert (r.status, r.body["status"]) == (415, 415)
    r = await api.call("POST", "/conversations/messages/upload", data=form("a.pdf", 2000))
    assert (r.status, r.body["status"]) == (413, 413)
    r = await api.call("POST", "/conversations/messages/upload", data=form("a.pdf", 500))
    assert r.status == 200
    assert list(r.body["uploadedFiles"]) == ["a.pdf"]
    assert r.body["twilioMediaSids"] == []


async def test_call_recording_and_transcription(api: Api, sim: GhlSim) -> None:
    """A call message has a WAV recording and a transcription; other messages 404."""
    conv = await api.conversation(await api.contact())
    call = await api.inbound(
        conv, "", type="Call", call={"from": "+1555", "to": "+1666", "status": "completed"}
    )
    sms = await api.inbound(conv, "text")
    r = await api.call(
        "GET", f"/conversations/messages/{call['messageId']}/locations/{LOC}/recording"
    )
    assert r.status == 200
    assert r.headers["Content-Type"] == "audio/x-wav"
    assert r.headers["Content-Disposition"] == "attachment; filename=audio.wav"
    with wave.open(io.BytesIO(r.body)) as wav:
        assert wav.getnframes() > 0
    r = await api.call(
        "GET", f"/conversations/messages/{sms['messageId']}/locations/{LOC}/recording"
    )
    assert r.status == 404
    sim.set_recording(call["messageId"], b"RIFF" + b"\0" * 100_000)
    r = await api.call(
        "GET", f"/conversations/messages/{call['messageId']}/locations/{LOC}/recording"
    )
    assert len(r.body) == 100_004
    sim.set_transcription(call["messageId"], ["one", "two"])
    base = f"/conversations/locations/{LOC}/messages/{call['messageId']}/transcription"
    r = await api.call("GET", base)
    assert [s["transcript"] for s in r.body] == ["one", "two"]
    assert set(r.body[0]) == {
        "mediaChannel",
        "sentenceIndex",
        "startTime",
        "endTime",
        "transcript",
        "confidence",
    }
    r = await api.call("GET", base + "/download")
    assert r.body == b"one\ntwo\n"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "transcription.txt" in r.headers["Content-Disposition"]


async def test_outbound_call_log_needs_a_known_provider(api: Api, sim: GhlSim) -> None:
    """Logging an outbound call requires a registered conversationProviderId."""
    conv = await api.conversation(await api.contact())
    body = {"type": "Call", "conversationId": conv, "call": {"to": "+1555", "status": "answered"}}
    r = await api.call("POST", "/conversations/messages/outbound", json=body)
    assert r.status == 422
    r = await api.call(
        "POST",
        "/conversations/messages/outbound",
        json=body | {"conversationProviderId": "61d6d1f9cdac7612faf80753"},
    )
    assert (r.status, r.body["message"]) == (400, "Invalid conversationProviderId")
    provider = sim.add_conversation_provider(LOC)
    r = await api.call(
        "POST", "/conversations/messages/outbound", json=body | {"conversationProviderId": provider}
    )
    assert r.status == 200
    msg = sim.messages(conv)[0]
    assert (msg["messageType"], msg["direction"], msg["meta"]["callStatus"]) == (
        "TYPE_CALL",
        "outbound",
        "answered",
    )


async def test_email_body_is_absent_from_list_but_readable_by_email_id(api: Api) -> None:
    """Email bodies are left out of the message list and read via the email endpoint, as live."""
    conv = await api.conversation(await api.contact())
    rec = await api.inbound(
        conv, "plain", type="Email", subject="Hi", html="<p>Hi</p>", emailTo="ada@example.org"
    )
    listed = await api.call("GET", f"/conversations/{conv}/messages")
    item = listed.body["messages"]["messages"][0]
    assert "body" not in item
    assert item["meta"]["email"]["messageIds"] == [rec["emailMessageId"]]
    r = await api.call("GET", f"/conversations/messages/email/{rec['emailMessageId']}")
    assert (r.body["subject"], r.body["body"], r.body["to"]) == (
        "Hi",
        "<p>Hi</p>",
        ["ada@example.org"],
    )


async def test_search_filters_by_query_and_direction(api: Api) -> None:
    """Search narrows by free-text query (email/phone/name) and lastMessageDirection."""
    a = await api.conversation(await api.contact(email="alice@example.org"))
    b = await api.conversation(await api.contact(email="bob@example.org"))
    await api.inbound(a, "hello")
    await api.inbound(b, "hello", direction="outbound")
    r = await api.call("GET", "/conversations/search", params={"locationId": LOC, "query": "alice"})
    assert [c["id"] for c in r.body["conversations"]] == [a]
    params = {"locationId": LOC, "lastMessageDirection": "outbound"}
    r = await api.call("GET", "/conversations/search", params=params)
    assert [c["id"] for c in r.body["conversations"]] == [b]
    r = await api.call("GET", "/conversations/search", params={"locationId": LOC, "sort": "up"})
    assert r.status == 422


# --------------------------------------------------------------------------- oauth


async def test_refresh_rotates_and_reuse_is_rejected(api: Api, sim: GhlSim) -> None:
    """Each refresh returns a new refresh token; replaying a used one gets invalid_grant."""
    sim.add_oauth_app("app1", "secret1")
    code = sim.issue_auth_code(LOC, client_id="app1")
    base = {"client_id": "app1", "client_secret": "secret1"}
    r = await api.call(
        "POST",
        "/oauth/token",
        version=None,
        token="",
        data=base | {"grant_type": "authorization_code", "code": code},
    )
    assert (r.body["token_type"], r.body["userType"], r.body["locationId"]) == (
        "Bearer",
        "Location",
        LOC,
    )
    first = r.body["refresh_token"]
    r = await api.call(
        "POST",
        "/oauth/token",
        version=None,
        token="",
        data=base | {"grant_type": "refresh_token", "refresh_token": first},
    )
    assert r.status == 200
    second = r.body["refresh_token"]
    assert second != first
    r = await api.call(
        "POST",
        "/oauth/token",
        version=None,
        token="",
        data=base | {"grant_type": "refresh_token", "refresh_token": first},
    )
    assert (r.status, r.body["error"]) == (400, "invalid_grant")
    r = await api.call(
        "POST",
        "/oauth/token",
        version=None,
        token="",
        data=base | {"grant_type": "authorization_code", "code": code},
    )
    assert r.status == 400
    assert sim.stats()["refreshes"] == {LOC: 1}


async def test_location_token_from_agency_token(api: Api, sim: GhlSim) -> None:
    """An agency token with oauth.write obtains a location token that carries a refresh token."""
    sim.add_oauth_app("app1", "secret1")
    code = sim.issue_auth_code(None, client_id="app1")
    form = {
        "client_id": "app1",
        "client_secret": "secret1",
        "grant_type": "authorization_code",
        "code": code,
    }
    agency = (await api.call("POST", "/oauth/token", version=None, token="", data=form)).body
    assert agency["userType"] == "Company"
    data = {"companyId": agency["companyId"], "locationId": LOC}
    r = await api.call(
        "POST", "/oauth/locationToken", version=V2, token=agency["access_token"], data=data
    )
    assert r.status == 200
    assert (r.body["locationId"], bool(r.body["refresh_token"])) == (LOC, True)
    ok = await api.call(
        "GET", f"/conversations/search?locationId={LOC}", token=r.body["access_token"]
    )
    assert ok.status == 200
    r = await api.call("POST", "/oauth/locationToken", version=V2, data=data)
    assert r.status == 401


async def test_revoke_invalidates_tokens(api: Api, sim: GhlSim) -> None:
    """After revoke(location) its tokens get 401 and its refresh tokens invalid_grant."""
    sim.add_oauth_app("app1", "secret1")
    code = sim.issue_auth_code(LOC, client_id="app1")
    base = {"client_id": "app1", "client_secret": "secret1"}
    tokens = (
        await api.call(
            "POST",
            "/oauth/token",
            version=None,
            token="",
            data=base | {"grant_type": "authorization_code", "code": code},
        )
    ).body
    sim.revoke(LOC)
    r = await api.call(
        "GET", f"/conversations/search?locationId={LOC}", token=tokens["access_token"]
    )
    assert r.status == 401
    r = await api.call(
        "POST",
        "/oauth/token",
        version=None,
        token="",
        data=base | {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert (r.status, r.body["error"]) == (400, "invalid_grant")


# --------------------------------------------------------------------------- rate limits


async def test_rate_limit_enforced_past_100_in_10s_with_headers(
    api: Api, sim: GhlSim, clock: FakeClock
) -> None:
    """The 101st request in 10 s gets 429 without Retry-After; headers count down; time heals it."""
    path = f"/conversations/search?locationId={LOC}"
    for i in range(100):
        r = await api.call("GET", path)
        assert r.status == 200
        assert r.headers["X-RateLimit-Remaining"] == str(99 - i)
    assert r.headers["X-RateLimit-Max"] == "100"
    assert r.headers["X-RateLimit-Interval-Milliseconds"] == "10000"
    assert r.headers["X-RateLimit-Limit-Daily"] == "200000"
    assert r.headers["X-RateLimit-Daily-Remaining"] == "199900"
    r = await api.call("GET", path)
    assert (r.status, r.body) == (429, {"statusCode": 429, "message": "Too many requests"})
    assert "Retry-After" not in r.headers
    assert r.headers["X-RateLimit-Remaining"] == "0"
    clock.advance(10.0)
    assert (await api.call("GET", path)).status == 200
    stats = (await api.call("GET", "/_sim/stats")).body
    assert stats["rateLimited"] == 1
    assert stats["statuses"]["429"] == 1
    assert list(stats["maxInWindow"].values()) == [100]
    assert list(stats["maxAttemptedInWindow"].values()) == [101]


def test_rolling_limiter_counts_any_window_and_daily_cap() -> None:
    """The limiter admits N per rolling window, recovers as requests age out, and caps a day."""
    clock = FakeClock()
    limiter = RollingLimiter(3, 10.0, daily_limit=5, clock=clock)
    assert [limiter.hit("k").allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(9.9)
    assert limiter.hit("k").retry_after == pytest.approx(0.1)
    clock.advance(0.2)
    assert [limiter.hit("k").allowed for _ in range(3)] == [True, True, False]
    assert limiter.peek("k").daily_remaining == 0
    assert limiter.max_in_window() == {"k": 3}


# --------------------------------------------------------------------------- faults, journal


async def test_fault_share_is_seeded_and_reproducible(api: Api, sim: GhlSim) -> None:
    """A 50% status fault hits a share of requests, identically for the same seed."""
    cid = await api.contact()
    sim.faults.set(
        [FaultRule(route="/contacts/{contactId}", method="GET", share=0.5, status=503)], seed=7
    )
    statuses = [(await api.call("GET", f"/contacts/{cid}", version=V2)).status for _ in range(30)]
    assert set(statuses) == {200, 503}
    again = Faults()
    again.set([FaultRule(route="/contacts/*", share=0.5, status=503)], seed=7)
    replay = [
        503 if again.pick("GET", "/contacts/{contactId}", "/contacts/x") else 200 for _ in range(30)
    ]
    assert replay == statuses


async def test_fault_reset_drops_connection(api: Api, sim: GhlSim) -> None:
    """A reset fault closes the connection with no response, and the request is not processed."""
    conv = await api.conversation(await api.contact())
    sim.faults.reset_next("/conversations/messages/inbound")
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call(
            "POST", "/conversations/messages/inbound", json={"type": "SMS", "conversationId": conv}
        )
    assert sim.messages(conv) == []
    assert sim.journal.entries[-1].status == 0


async def test_fault_after_lets_the_write_land(api: Api, sim: GhlSim) -> None:
    """An "after" reset or status loses the response but keeps the write: the in-doubt case."""
    conv = await api.conversation(await api.contact())
    sim.faults.reset_next("/conversations/messages/inbound", after=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.inbound(conv, "landed", altId="x1")
    sim.faults.add(
        FaultRule(route="/conversations/messages/inbound", status=502, after=True, times=1)
    )
    body = {"type": "SMS", "conversationId": conv, "altId": "x2", "direction": "inbound"}
    r = await api.call("POST", "/conversations/messages/inbound", json=body)
    assert r.status == 502
    assert sim.messages_by_alt_id() == {"x1": 1, "x2": 1}
    assert [e.fault for e in sim.journal.entries[-2:]] == ["reset", "status:502"]


async def test_fault_delay_outlasts_client_timeout(api: Api, sim: GhlSim) -> None:
    """A delay fault holds the response past a client timeout."""
    sim.faults.add(FaultRule(route="/conversations/search", delay=0.3))
    with pytest.raises(asyncio.TimeoutError):
        await api.call(
            "GET",
            f"/conversations/search?locationId={LOC}",
            timeout=aiohttp.ClientTimeout(total=0.05),
        )


async def test_fail_next_and_control_endpoints(api: Api, sim: GhlSim) -> None:
    """Faults set over /_sim/faults fire N times, then /_sim/reset-faults clears them."""
    r = await api.call(
        "POST",
        "/_sim/faults",
        json={"rules": [{"route": "/contacts/upsert", "status": 502, "times": 1}]},
    )
    assert r.body["rules"][0]["status"] == 502
    body = {"locationId": LOC, "email": "f@example.org"}
    assert (await api.call("POST", "/contacts/upsert", version=V2, json=body)).status == 502
    assert (await api.call("POST", "/contacts/upsert", version=V2, json=body)).status == 200
    sim.faults.fail_next("/contacts/upsert", 2, status=500)
    assert (await api.call("POST", "/_sim/reset-faults")).body == {"rules": []}
    assert (await api.call("POST", "/contacts/upsert", version=V2, json=body)).status == 200
    bad = await api.call("POST", "/_sim/faults", json={"rules": [{"route": "x", "bogus": 1}]})
    assert bad.status == 400


async def test_journal_and_stats_count_routes_not_control_calls(api: Api) -> None:
    """The journal records API calls with route template and tenant, but not /_sim/ calls."""
    cid = await api.contact()
    await api.call("GET", f"/contacts/{cid}", version=V2)
    await api.call("GET", f"/contacts/{cid}", version=V2)
    journal = (await api.call("GET", "/_sim/journal")).body
    assert [e["route"] for e in journal["entries"]] == [
        "/contacts/upsert",
        "/contacts/{contactId}",
        "/contacts/{contactId}",
    ]
    assert {e["tenant"] for e in journal["entries"]} == {LOC}
    filtered = (
        await api.call("GET", "/_sim/journal", params={"route": "/contacts/{contactId}"})
    ).body
    assert len(filtered["entries"]) == 2
    stats = (await api.call("GET", "/_sim/stats")).body
    assert stats["requests"] == {"GET /contacts/{contactId}": 2, "POST /contacts/upsert": 1}
    assert stats["total"] == 3


async def test_inspection_routes_seed_and_read_state(api: Api, sim: GhlSim) -> None:
    """The /_sim/ghl/ endpoints issue tokens, add replies and list state over HTTP."""
    r = await api.call("POST", "/_sim/ghl/private-tokens", json={"locationId": OTHER})
    other_token = r.body["token"]
    assert other_token.startswith("pit-")
    assert (
        await api.call("GET", f"/conversations/search?locationId={OTHER}", token=other_token)
    ).status == 200
    conv = await api.conversation(await api.contact())
    r = await api.call(
        "POST", "/_sim/ghl/replies", json={"conversationId": conv, "body": "from the app"}
    )
    assert r.body["message"]["source"] == "app"
    listed = await api.call("GET", f"/conversations/{conv}/messages")
    assert listed.body["messages"]["messages"][0]["body"] == "from the app"
    r = await api.call("GET", "/_sim/ghl/messages", params={"conversationId": conv})
    assert len(r.body["messages"]) == 1


def test_validate_reports_nested_and_type_errors() -> None:
    """The body validator names nested paths, wrong types and bad enum values."""
    body = {"type": "Fax", "call": {"status": "x", "extra": 1}, "attachments": "a"}
    errors = validate(body, INBOUND)
    assert any(e.startswith("type must be one of the following values: SMS, RCS") for e in errors)
    assert any(e.startswith("call.status must be one of") for e in errors)
    assert "property call.extra should not exist" in errors
    assert "attachments must be an array" in errors


async def test_run_forever_prints_url_and_stops_on_sigterm() -> None:
    """run_forever serves on the given port, prints the base URL, and exits cleanly on SIGTERM."""
    code = (
        "from bridge.sim.common import run_forever\n"
        "from bridge.sim.ghl import GhlSim, build_app\n"
        "run_forever(build_app(GhlSim()), 0)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        base = line.decode().strip()
        assert base.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(base + "/_sim/stats") as resp:
            assert (await resp.json())["total"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
