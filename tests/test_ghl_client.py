"""The GHL client against the HighLevel simulator over real loopback HTTP."""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web

from bridge.app import open_app
from bridge.config import load_config
from bridge.connectors.ghl import media
from bridge.connectors.ghl.client import GhlClient
from bridge.connectors.ghl.models import (
    CallData,
    ContactUpdate,
    ContactUpsert,
    ConversationSearch,
    CustomFieldValue,
    InboundMessage,
    MessageExport,
    NewNote,
    NewTask,
    NoteUpdate,
    OutboundCall,
    SendMessage,
)
from bridge.errors import AuthError, Fatal, InDoubt, Rejected, Retryable, TokenExpired
from bridge.sim.common import FaultRule, serve
from bridge.sim.ghl_state import Token
from tests.conftest import GhlClientParts, GhlServer, InstantClock, MakeGhlClient, StaticTokens


def sim_token(server: GhlServer) -> Token:
    return server.sim.authenticate(f"Bearer {server.token}")


def seed_conversations(server: GhlServer, n: int) -> list[str]:
    """``n`` conversations straight into the sim, each with its own lastMessageDate."""
    token, ids = sim_token(server), []
    # Later than every create stamp, so each reply becomes its conversation's last message.
    start = server.sim.now_ms() + 60_000
    for i in range(n):
        _, contact = server.sim.upsert_contact(
            token, {"locationId": server.location_id, "email": f"p{i}@example.org"}
        )
        conv = server.sim.create_conversation(token, server.location_id, contact.id)
        server.sim.add_reply(conv.id, f"hello {i}", date_ms=start + i * 1000)
        ids.append(conv.id)
    return ids


async def contact_and_conversation(client: GhlClient, email: str) -> tuple[str, str]:
    contact = (await client.upsert_contact(ContactUpsert(email=email, first_name="Ada"))).contact
    conversation = await client.create_conversation(contact.id)
    return contact.id, conversation.id


async def inbound(client: GhlClient, conv_id: str, contact_id: str, alt_id: str) -> str:
    msg = InboundMessage(
        type="SMS", conversation_id=conv_id, contact_id=contact_id, alt_id=alt_id, message=alt_id
    )
    return (await client.add_inbound_message(msg)).message_id


Stub = Callable[[bytes], Awaitable[str]]


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    """Start servers that answer every request with one fixed 200 JSON body."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(body: bytes) -> str:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=body, content_type="application/json")

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            return await stack.enter_async_context(serve(app))

        yield start


async def drain(pages: AsyncIterator[object], into: list[object]) -> None:
    async for page in pages:
        into.append(page)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def stub_client(session: aiohttp.ClientSession, base_url: str) -> GhlClient:
    return GhlClient(
        session,
        base_url=base_url,
        location_id="loc",
        bucket=None,
        auth=StaticTokens("t"),
        clock=InstantClock(),
    )


# --------------------------------------------------------------------------- contacts


async def test_upsert_creates_then_matches_by_email(ghl_client: GhlClient) -> None:
    """A second upsert with the same email updates the same contact and reports new=False."""
    first = await ghl_client.upsert_contact(ContactUpsert(email="ada@example.org"))
    second = await ghl_client.upsert_contact(
        ContactUpsert(email="ada@example.org", first_name="Ada", company_name="AN")
    )
    assert first.new is True
    assert second.new is False
    assert second.contact.id == first.contact.id
    assert second.contact.first_name == "Ada"


async def test_get_and_update_contact_with_custom_fields(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """An update sets plain and custom fields, and custom fields read back as {id, value}."""
    field_id = ghl_server.sim.add_custom_field(ghl_server.location_id, "member_since")
    created = (await ghl_client.upsert_contact(ContactUpsert(phone="+15035550100"))).contact
    fields = ContactUpdate(
        last_name="Lovelace",
        custom_fields=(CustomFieldValue(id=field_id, field_value="2020"),),
    )
    updated = await ghl_client.update_contact(created.id, fields)
    fetched = await ghl_client.get_contact(created.id)
    assert updated.last_name == fetched.last_name == "Lovelace"
    assert [(f.id, f.value) for f in fetched.custom_fields] == [(field_id, "2020")]


async def test_find_duplicate_contact_by_email_or_phone(ghl_client: GhlClient) -> None:
    """Duplicate search finds a contact by email or phone and returns None when none matches."""
    contact = (
        await ghl_client.upsert_contact(ContactUpsert(email="b@example.org", phone="+15035550101"))
    ).contact
    by_email = await ghl_client.find_duplicate_contact(email="b@example.org")
    by_phone = await ghl_client.find_duplicate_contact(phone="+15035550101")
    assert by_email is not None
    assert by_email.id == contact.id
    assert by_phone is not None
    assert by_phone.id == contact.id
    assert await ghl_client.find_duplicate_contact(email="nobody@example.org") is None


async def test_tags_are_added_and_removed_without_touching_others(ghl_client: GhlClient) -> None:
    """Adding and removing tags changes only the named tags."""
    cid = (await ghl_client.upsert_contact(ContactUpsert(email="t@example.org"))).contact.id
    await ghl_client.add_tags(cid, ["member", "donor"])
    assert await ghl_client.add_tags(cid, ["volunteer"]) == ["member", "donor", "volunteer"]
    assert await ghl_client.remove_tags(cid, ["donor"]) == ["member", "volunteer"]
    assert (await ghl_client.get_contact(cid)).tags == ["member", "volunteer"]


async def test_notes_are_added_updated_and_listed(ghl_client: GhlClient) -> None:
    """A note can be added, edited in place and listed."""
    cid = (await ghl_client.upsert_contact(ContactUpsert(email="n@example.org"))).contact.id
    note = await ghl_client.add_note(cid, NewNote(body="signed petition", title="AN"))
    edited = await ghl_client.update_note(cid, note.id, NoteUpdate(body="signed two petitions"))
    notes = await ghl_client.list_notes(cid)
    assert edited.id == note.id
    assert [(n.id, n.body, n.title) for n in notes] == [(note.id, "signed two petitions", "AN")]


async def test_add_and_list_tasks(ghl_client: GhlClient) -> None:
    """A task is created with its due date and completion flag and then listed."""
    cid = (await ghl_client.upsert_contact(ContactUpsert(email="k@example.org"))).contact.id
    due = datetime(2026, 2, 1, 9, 30, tzinfo=UTC)
    task = await ghl_client.add_task(cid, NewTask(title="Call back", due_date=due, completed=False))
    assert (task.title, task.completed, task.contact_id) == ("Call back", False, cid)
    assert task.due_date is not None
    assert task.due_date.startswith("2026-02-01T09:30:00")
    assert [t.id for t in await ghl_client.list_tasks(cid)] == [task.id]


async def test_validation_422_is_rejected_with_details(ghl_client: GhlClient) -> None:
    """A 422 is Rejected and carries the server's list of messages as details."""
    with pytest.raises(Rejected) as caught:
        await ghl_client.upsert_contact(ContactUpsert(email="not-an-email"))
    assert caught.value.details == ("email must be an email",)


# --------------------------------------------------------------------------- conversations


async def test_conversation_create_get_update_delete(ghl_client: GhlClient) -> None:
    """A conversation is created, read, updated and deleted."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "c@example.org")
    got = await ghl_client.get_conversation(conv_id)
    updated = await ghl_client.update_conversation(
        conv_id, unread_count=0, starred=True, feedback={"rating": 5}
    )
    assert (got.id, got.contact_id) == (conv_id, contact_id)
    assert updated.starred is True
    await ghl_client.delete_conversation(conv_id)
    with pytest.raises(Rejected, match="HTTP 404"):
        await ghl_client.get_conversation(conv_id)


async def test_create_conversation_twice_returns_the_existing_one(ghl_client: GhlClient) -> None:
    """A second create finds the existing conversation by contactId and flags that it existed."""
    contact = (await ghl_client.upsert_contact(ContactUpsert(email="d@example.org"))).contact
    first = await ghl_client.create_conversation(contact.id)
    second = await ghl_client.create_conversation(contact.id)
    assert first.existed is False
    assert second.existed is True
    assert second.id == first.id


async def test_create_conversation_while_search_lags_is_retryable(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """When the existing conversation is not searchable yet, the create is Retryable."""
    ghl_server.sim.search_lag = 3600.0
    contact = (await ghl_client.upsert_contact(ContactUpsert(email="e@example.org"))).contact
    await ghl_client.create_conversation(contact.id)
    with pytest.raises(Retryable, match="search does not show it yet") as caught:
        await ghl_client.create_conversation(contact.id)
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0


async def test_search_conversations_filters_by_contact(ghl_client: GhlClient) -> None:
    """Search with a contactId returns that contact's conversation only."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "f@example.org")
    await contact_and_conversation(ghl_client, "g@example.org")
    page = await ghl_client.search_conversations(ConversationSearch(contact_id=contact_id))
    assert [c.id for c in page.conversations] == [conv_id]
    found = await ghl_client.find_conversation(contact_id)
    assert found is not None
    assert found.id == conv_id


async def test_conversation_pages_are_exhausted(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Paging with startAfterDate visits every conversation once and stops on the short page."""
    ids = seed_conversations(ghl_server, 45)
    pages = [p async for p in ghl_client.iter_conversation_pages(ConversationSearch(limit=20))]
    assert [len(p.conversations) for p in pages] == [20, 20, 5]
    seen = [c.id for p in pages for c in p.conversations]
    assert seen == list(reversed(ids))


async def test_search_limit_above_the_server_maximum_is_refused() -> None:
    """A search limit the server would clamp is refused, since it would end paging early."""
    with pytest.raises(ValueError, match=r"1\.\.100"):
        ConversationSearch(limit=500)


# --------------------------------------------------------------------------- reading messages


async def test_message_pages_are_exhausted(ghl_client: GhlClient, ghl_server: GhlServer) -> None:
    """Paging by lastMessageId returns every message, newest first, until nextPage is false."""
    (conv_id,) = seed_conversations(ghl_server, 1)
    for i in range(1, 45):
        ghl_server.sim.add_reply(conv_id, f"m{i}", date_ms=ghl_server.sim.now_ms() + 120_000 + i)
    pages = [p async for p in ghl_client.iter_message_pages(conv_id, limit=20)]
    assert [len(p.messages) for p in pages] == [20, 20, 5]
    bodies = [m.body for p in pages for m in p.messages]
    assert bodies == [f"m{i}" for i in range(44, 0, -1)] + ["hello 0"]


async def test_list_messages_filters_by_types(ghl_client: GhlClient) -> None:
    """The type filter is sent as a comma list and narrows the page to those types."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "h@example.org")
    await inbound(ghl_client, conv_id, contact_id, "sms-1")
    call = InboundMessage(
        type="Call", conversation_id=conv_id, contact_id=contact_id, alt_id="call-1"
    )
    await ghl_client.add_inbound_message(call)
    calls = await ghl_client.list_messages(conv_id, types=["TYPE_CALL"])
    both = await ghl_client.list_messages(conv_id, types=["TYPE_CALL", "TYPE_SMS"])
    assert [m.alt_id for m in calls.messages] == ["call-1"]
    assert {m.alt_id for m in both.messages} == {"call-1", "sms-1"}


async def test_get_message_unwraps_the_envelope(ghl_client: GhlClient) -> None:
    """Getting one message reads the live {"message": ...} wrapper."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "i@example.org")
    message_id = await inbound(ghl_client, conv_id, contact_id, "src-1")
    message = await ghl_client.get_message(message_id)
    assert (message.id, message.conversation_id, message.alt_id) == (message_id, conv_id, "src-1")


async def test_get_email_message_has_the_body(ghl_client: GhlClient) -> None:
    """An inbound email can be read back with its subject and HTML body."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "j@example.org")
    msg = InboundMessage(
        type="Email",
        conversation_id=conv_id,
        contact_id=contact_id,
        alt_id="ad-mail-1",
        subject="Hi",
        html="<p>Hi</p>",
        email_from="j@example.org",
        email_to="team@example.org",
    )
    result = await ghl_client.add_inbound_message(msg)
    assert result.email_message_id is not None
    email = await ghl_client.get_email_message(result.email_message_id)
    assert (email.subject, email.body, email.conversation_id) == ("Hi", "<p>Hi</p>", conv_id)


async def test_export_pages_are_exhausted(ghl_client: GhlClient, ghl_server: GhlServer) -> None:
    """Export pages follow nextCursor until it is null and return every message once."""
    ids = seed_conversations(ghl_server, 25)
    pages = [p async for p in ghl_client.iter_export_pages(MessageExport(limit=10))]
    assert [len(p.messages) for p in pages] == [10, 10, 5]
    conversations = {m.conversation_id for p in pages for m in p.messages}
    assert conversations == set(ids)
    assert ghl_server.sim.journal.entries[-1].query["sortBy"] == "updatedAt"


@pytest.mark.parametrize(
    ("body", "pages"),
    [
        pytest.param(
            b'{"conversations": [{"id": "c1", "contactId": "p1", "locationId": "loc",'
            b' "lastMessageDate": 5}], "total": 9}',
            lambda c: c.iter_conversation_pages(ConversationSearch(limit=1)),
            id="search",
        ),
        pytest.param(
            b'{"messages": {"lastMessageId": "m1", "nextPage": true, "messages": [{"id": "m1",'
            b' "conversationId": "c1", "contactId": "p1", "locationId": "loc",'
            b' "dateAdded": "2026-01-01T00:00:00.000Z"}]}}',
            lambda c: c.iter_message_pages("c1"),
            id="messages",
        ),
        pytest.param(
            b'{"messages": [{"id": "m1", "conversationId": "c1", "contactId": "p1",'
            b' "locationId": "loc", "dateAdded": "2026-01-01T00:00:00.000Z"}],'
            b' "nextCursor": "abc", "total": 9}',
            lambda c: c.iter_export_pages(),
            id="export",
        ),
    ],
)
async def test_a_repeated_cursor_fails_loudly(
    stub: Stub,
    http_session: aiohttp.ClientSession,
    body: bytes,
    pages: Callable[[GhlClient], AsyncIterator[object]],
) -> None:
    """A server that hands back the same cursor twice stops paging with a Fatal error."""
    client = stub_client(http_session, await stub(body))
    seen: list[object] = []
    with pytest.raises(Fatal, match="came back twice"):
        await drain(pages(client), seen)
    assert len(seen) == 2


async def test_a_malformed_2xx_body_is_retryable_for_reads_and_in_doubt_for_writes(
    stub: Stub, http_session: aiohttp.ClientSession
) -> None:
    """A 2xx body that does not fit is Retryable for a read but InDoubt for a write."""
    client = stub_client(http_session, await stub(b'{"unexpected": true}'))
    with pytest.raises(Retryable, match="unexpected body"):
        await client.get_contact("c1")
    with pytest.raises(InDoubt, match="unexpected body"):
        await client.upsert_contact(ContactUpsert(email="x@example.org"))


# --------------------------------------------------------------------------- writing messages


async def test_inbound_always_sends_direction_inbound(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """The stored message is inbound with our altId and no provider id, as the client sent."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "k@example.org")
    date = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    msg = InboundMessage(
        type="SMS",
        conversation_id=conv_id,
        contact_id=contact_id,
        alt_id="an:msg:1",
        message="hi",
        date=date,
    )
    result = await ghl_client.add_inbound_message(msg)
    (stored,) = ghl_server.sim.messages(conv_id)
    assert stored["id"] == result.message_id
    assert stored["direction"] == "inbound"
    assert stored["altId"] == "an:msg:1"
    assert stored["dateAdded"] == "2026-01-02T03:04:05.000Z"
    assert "conversationProviderId" not in stored


async def test_inbound_through_a_custom_provider_sends_its_id(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A custom-provider message carries the provider id it was given."""
    provider = ghl_server.sim.add_conversation_provider(ghl_server.location_id)
    contact_id, conv_id = await contact_and_conversation(ghl_client, "l@example.org")
    msg = InboundMessage(
        type="Custom",
        conversation_id=conv_id,
        contact_id=contact_id,
        alt_id="ad:1",
        message="hi",
        conversation_provider_id=provider,
    )
    await ghl_client.add_inbound_message(msg)
    (stored,) = ghl_server.sim.messages(conv_id)
    assert (stored["direction"], stored["conversationProviderId"]) == ("inbound", provider)


async def test_inbound_answered_with_an_empty_body_is_in_doubt(ghl_client: GhlClient) -> None:
    """GHL's empty 201 for a custom message without its provider is InDoubt, not success."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "m@example.org")
    msg = InboundMessage(type="Custom", conversation_id=conv_id, contact_id=contact_id, alt_id="x")
    with pytest.raises(InDoubt, match="unexpected body"):
        await ghl_client.add_inbound_message(msg)


async def test_find_message_by_alt_id(ghl_client: GhlClient) -> None:
    """Reconciliation finds a message by altId among recent ones, within the scan limit."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "n@example.org")
    ids = [await inbound(ghl_client, conv_id, contact_id, f"src-{i}") for i in range(5)]
    found = await ghl_client.find_message_by_alt_id(conv_id, "src-3")
    assert found is not None
    assert found.id == ids[3]
    assert await ghl_client.find_message_by_alt_id(conv_id, "src-9") is None
    # Newest first: with a scan limit of 2 only src-4 and src-3 are looked at.
    assert await ghl_client.find_message_by_alt_id(conv_id, "src-1", scan_limit=2) is None


async def test_send_and_cancel_scheduled_message_and_email(ghl_client: GhlClient) -> None:
    """Scheduled SMS and email sends can be cancelled, and a second cancel reports not ok."""
    contact_id, _ = await contact_and_conversation(ghl_client, "o@example.org")
    later = 1_800_000_000
    sms = await ghl_client.send_message(
        SendMessage(type="SMS", contact_id=contact_id, message="hi", scheduled_timestamp=later)
    )
    email = await ghl_client.send_message(
        SendMessage(
            type="Email",
            contact_id=contact_id,
            subject="s",
            html="<p>x</p>",
            scheduled_timestamp=later,
        )
    )
    assert sms.message_id is not None
    assert email.email_message_id is not None
    assert (await ghl_client.cancel_scheduled_message(sms.message_id)).ok
    assert not (await ghl_client.cancel_scheduled_message(sms.message_id)).ok
    assert (await ghl_client.cancel_scheduled_email(email.email_message_id)).ok


async def test_log_outbound_call(ghl_client: GhlClient, ghl_server: GhlServer) -> None:
    """An external outbound call is logged as an outbound TYPE_CALL with our altId."""
    provider = ghl_server.sim.add_conversation_provider(ghl_server.location_id)
    _, conv_id = await contact_and_conversation(ghl_client, "p@example.org")
    call = OutboundCall(
        conversation_id=conv_id,
        conversation_provider_id=provider,
        alt_id="call-9",
        call=CallData(to="+15035550102", from_="+15035550103", status="completed"),
    )
    result = await ghl_client.log_outbound_call(call)
    (stored,) = ghl_server.sim.messages(conv_id)
    assert stored["id"] == result.message_id
    assert (stored["messageType"], stored["direction"], stored["altId"]) == (
        "TYPE_CALL",
        "outbound",
        "call-9",
    )


async def test_update_message_status(ghl_client: GhlClient) -> None:
    """A status update on a recorded message answers with the new status."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "q@example.org")
    message_id = await inbound(ghl_client, conv_id, contact_id, "s-1")
    result = await ghl_client.update_message_status(message_id, "read")
    assert (result.message_id, result.status) == (message_id, "read")


async def test_status_update_right_after_a_send_is_retryable_and_not_resent(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """The provider-race 403 is Retryable, and the client does not resend the write itself."""
    contact_id, _ = await contact_and_conversation(ghl_client, "r@example.org")
    sent = await ghl_client.send_message(SendMessage(type="SMS", contact_id=contact_id))
    assert sent.message_id is not None
    with pytest.raises(Retryable, match="no conversation provider"):
        await ghl_client.update_message_status(sent.message_id, "delivered")
    route = "/conversations/messages/{messageId}/status"
    assert ghl_server.sim.journal.count("PUT", route) == 1


# --------------------------------------------------------------------------- uploads


async def test_upload_streams_files_from_paths_and_file_objects(
    ghl_client: GhlClient, ghl_server: GhlServer, tmp_path: Path
) -> None:
    """Files given as paths and as file objects are uploaded whole under fileAttachment."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "s@example.org")
    pdf = tmp_path / "flyer.pdf"
    pdf.write_bytes(os.urandom(200_000))
    card = io.BytesIO(b"skip-me:BEGIN:VCARD\nEND:VCARD\n")
    card.seek(len(b"skip-me:"))
    result = await ghl_client.upload_attachments(
        conv_id, contact_id, [pdf, ("card.vcf", card)], attachment_urls=["https://x.test/a.png"]
    )
    assert set(result.uploaded_files) == {"flyer.pdf", "card.vcf", "a.png"}
    sizes = {u["name"]: u["size"] for u in ghl_server.sim.uploads}
    assert sizes == {"flyer.pdf": 200_000, "card.vcf": len(b"BEGIN:VCARD\nEND:VCARD\n")}


async def test_upload_after_a_token_refresh_sends_the_whole_file_again(
    make_ghl_client: MakeGhlClient, ghl_server: GhlServer, tmp_path: Path
) -> None:
    """The resend after a 401 builds a fresh form and rewinds file objects to their start."""
    client = make_ghl_client()
    contact_id, conv_id = await contact_and_conversation(client, "refresh@example.org")
    retrying = make_ghl_client(auth=StaticTokens("pit-expired", fresh=ghl_server.token))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(os.urandom(70_000))
    memo = io.BytesIO(b"memo text")
    await retrying.upload_attachments(conv_id, contact_id, [photo, ("memo.txt", memo)])
    sizes = {u["name"]: u["size"] for u in ghl_server.sim.uploads}
    assert sizes == {"photo.jpg": 70_000, "memo.txt": 9}
    assert ghl_server.sim.journal.count("POST", "/conversations/messages/upload") == 2


@pytest.mark.parametrize(
    ("name", "size", "match"),
    [
        pytest.param("setup.exe", 10, r"'setup.exe' has type \.exe", id="type"),
        pytest.param("notes", 10, r"'notes' has type no extension", id="no-extension"),
        pytest.param("big.pdf", 2_001, r"'big.pdf' is 2001 bytes, over .* 2000 bytes", id="size"),
    ],
)
async def test_upload_refuses_bad_files_before_any_request(
    make_ghl_client: MakeGhlClient,
    ghl_server: GhlServer,
    tmp_path: Path,
    name: str,
    size: int,
    match: str,
) -> None:
    """A disallowed type or an oversized file is Rejected without sending anything."""
    client = make_ghl_client(max_upload_bytes=2_000)
    path = tmp_path / name
    path.write_bytes(b"x" * size)
    with pytest.raises(Rejected, match=match):
        await client.upload_attachments("conv", "contact", [path])
    assert len(ghl_server.sim.journal) == 0


# --------------------------------------------------------------------------- call media


async def call_message(client: GhlClient, email: str) -> str:
    contact_id, conv_id = await contact_and_conversation(client, email)
    msg = InboundMessage(type="Call", conversation_id=conv_id, contact_id=contact_id, alt_id=email)
    return (await client.add_inbound_message(msg)).message_id


async def test_recording_is_streamed_to_a_file(
    ghl_client: GhlClient, ghl_server: GhlServer, tmp_path: Path
) -> None:
    """A 3 MB recording lands byte for byte in the destination file, with no part file left."""
    message_id = await call_message(ghl_client, "t@example.org")
    audio = os.urandom(3 * 1024 * 1024)
    ghl_server.sim.set_recording(message_id, audio)
    dest = tmp_path / "call.wav"
    assert await ghl_client.download_recording(message_id, dest) == len(audio)
    assert files_in(tmp_path) == ["call.wav"]
    assert dest.read_bytes() == audio


async def test_recording_over_the_cap_leaves_no_file(
    ghl_client: GhlClient, ghl_server: GhlServer, tmp_path: Path
) -> None:
    """A recording larger than max_bytes is Rejected and nothing is left on disk."""
    message_id = await call_message(ghl_client, "u@example.org")
    ghl_server.sim.set_recording(message_id, os.urandom(300_000))
    with pytest.raises(Rejected, match="cap of 100000 bytes"):
        await ghl_client.download_recording(message_id, tmp_path / "a.wav", max_bytes=100_000)
    assert files_in(tmp_path) == []


async def test_a_chunked_recording_over_the_cap_is_cut_off(
    http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A body with no Content-Length is counted while streaming and cut off at the cap."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/x-wav"})
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"\0" * 16_384)
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", endless)
    async with serve(app) as base_url:
        client = stub_client(http_session, base_url)
        with pytest.raises(Rejected, match="exceeds the cap of 100000 bytes"):
            await client.download_recording("m1", tmp_path / "a.wav", max_bytes=100_000)
    assert files_in(tmp_path) == []


async def test_recording_errors_use_the_status_table(ghl_client: GhlClient, tmp_path: Path) -> None:
    """A recording request for a non-call message gets the ordinary 404 reading."""
    contact_id, conv_id = await contact_and_conversation(ghl_client, "v@example.org")
    message_id = await inbound(ghl_client, conv_id, contact_id, "sms")
    with pytest.raises(Rejected, match="HTTP 404"):
        await ghl_client.download_recording(message_id, tmp_path / "a.wav")
    assert files_in(tmp_path) == []


async def test_transcription_as_sentences_and_as_text(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A transcription reads as timed sentences and downloads as plain text."""
    message_id = await call_message(ghl_client, "w@example.org")
    ghl_server.sim.set_transcription(message_id, ["Hello.", "Bye."])
    sentences = await ghl_client.get_transcription(message_id)
    text = await ghl_client.download_transcription(message_id)
    assert [(s.sentence_index, s.transcript) for s in sentences] == [(0, "Hello."), (1, "Bye.")]
    assert text == "Hello.\nBye.\n"


def test_a_single_transcription_object_reads_as_one_sentence() -> None:
    """The spec's single-object transcription shape decodes as a one-sentence list."""
    one = {"sentenceIndex": 0, "transcript": "Hi", "startTime": 0, "endTime": 900}
    (sentence,) = media.decode_transcription(msgspec.json.encode(one), "GET x")
    assert (sentence.transcript, sentence.end_time) == ("Hi", 900.0)


# --------------------------------------------------------------------------- auth and retries


async def test_missing_scope_is_an_auth_error_without_a_refresh(
    make_ghl_client: MakeGhlClient, ghl_server: GhlServer
) -> None:
    """A 401 for a missing scope is AuthError (not TokenExpired) and triggers no refresh."""
    tokens = StaticTokens(
        ghl_server.sim.add_private_token(ghl_server.location_id, ["contacts.readonly"])
    )
    client = make_ghl_client(auth=tokens)
    with pytest.raises(AuthError, match="lacks a required scope") as caught:
        await client.search_conversations()
    assert not isinstance(caught.value, TokenExpired)
    assert tokens.refreshed == []


async def test_an_expired_token_is_refreshed_once_then_the_call_succeeds(
    make_ghl_client: MakeGhlClient, ghl_server: GhlServer
) -> None:
    """A 401 for an invalid token makes exactly one refresh, and the resent call succeeds."""
    tokens = StaticTokens("pit-expired", fresh=ghl_server.token)
    client = make_ghl_client(auth=tokens)
    result = await client.upsert_contact(ContactUpsert(email="x@example.org"))
    assert result.new is True
    assert tokens.refreshed == ["pit-expired"]
    assert ghl_server.sim.journal.status_counts() == {401: 1, 200: 1}


async def test_a_refresh_that_does_not_help_is_not_repeated(
    make_ghl_client: MakeGhlClient, ghl_server: GhlServer
) -> None:
    """When the refreshed token is refused too, TokenExpired is raised after one refresh."""
    tokens = StaticTokens("pit-old", fresh="pit-also-bad")
    client = make_ghl_client(auth=tokens)
    with pytest.raises(TokenExpired):
        await client.get_contact("c1")
    assert tokens.refreshed == ["pit-old"]
    assert len(ghl_server.sim.journal) == 2


async def test_another_location_is_an_auth_error(
    make_ghl_client: MakeGhlClient, ghl_server: GhlServer
) -> None:
    """A token used for a location it does not belong to gets AuthError from the 403."""
    ghl_server.sim.add_location("Zq1xKp0aTn7cWb3eRd5Y")
    client = make_ghl_client(location_id="Zq1xKp0aTn7cWb3eRd5Y")
    with pytest.raises(AuthError, match="does not have access to this location"):
        await client.search_conversations()


async def test_a_read_is_retried_after_a_503(
    ghl_client: GhlClient, ghl_server: GhlServer, ghl_parts: GhlClientParts
) -> None:
    """A read that gets one 503 is retried after a backoff sleep and succeeds."""
    _, conv_id = await contact_and_conversation(ghl_client, "y@example.org")
    ghl_server.sim.faults.fail_next("/conversations/{conversationId}", 1, 503, method="GET")
    assert (await ghl_client.get_conversation(conv_id)).id == conv_id
    assert ghl_server.sim.journal.count("GET", "/conversations/{conversationId}") == 2
    assert len(ghl_parts.clock.sleeps) == 1


async def test_reads_give_up_after_three_tries(
    ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A read that keeps failing is tried three times, then Retryable reaches the caller."""
    ghl_server.sim.faults.fail_next("/contacts/{contactId}", 5, 503, method="GET")
    with pytest.raises(Retryable, match="HTTP 503"):
        await ghl_client.get_contact("c1")
    assert ghl_server.sim.journal.count("GET", "/contacts/{contactId}") == 3


async def test_a_write_is_never_retried(ghl_client: GhlClient, ghl_server: GhlServer) -> None:
    """A write that gets a 503 raises at once, leaving retries to the pipeline."""
    ghl_server.sim.faults.fail_next("/contacts/upsert", 1, 503)
    with pytest.raises(Retryable):
        await ghl_client.upsert_contact(ContactUpsert(email="z@example.org"))
    assert ghl_server.sim.journal.count("POST", "/contacts/upsert") == 1


async def test_every_request_spends_a_bucket_token(
    ghl_client: GhlClient, ghl_server: GhlServer, ghl_parts: GhlClientParts, tmp_path: Path
) -> None:
    """Each request, retries and the streamed recording included, takes one token."""
    message_id = await call_message(ghl_client, "aa@example.org")
    ghl_server.sim.faults.fail_next("/contacts/{contactId}", 1, 503, method="GET")
    with pytest.raises(Rejected):
        await ghl_client.get_contact("missing")
    await ghl_client.download_recording(message_id, tmp_path / "r.wav")
    assert ghl_parts.bucket.state().used_today == len(ghl_server.sim.journal) == 6


@pytest.mark.usefixtures("restore_logging")
async def test_each_location_uses_its_configured_timeout(
    ghl_server: GhlServer, tmp_path: Path
) -> None:
    """``ghl.locations[].timeout`` bounds every call of the location: its client's writes and
    reads, and its start-up probes, not the session default of 30 s."""
    config_path = tmp_path / "bridge.toml"
    config_path.write_text(
        f"""
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "{ghl_server.location_id}"
base_url = "{ghl_server.base_url}"
auth = {{ kind = "private_token", token = "{ghl_server.token}" }}
timeout = "1s"
""",
        encoding="utf-8",
    )
    ghl_server.sim.faults.add(FaultRule(route="*", delay=4.0))
    async with open_app(load_config(config_path)) as app:
        (parts,) = app.locations
        started = time.monotonic()
        with pytest.raises(InDoubt, match="timed out"):
            await parts.client.upsert_contact(ContactUpsert(email="slow@example.org"))
        assert time.monotonic() - started < 3.0
        started = time.monotonic()
        with pytest.raises(Retryable, match="timed out"):
            await app.check_locations_of([parts])
        assert time.monotonic() - started < 3.0
