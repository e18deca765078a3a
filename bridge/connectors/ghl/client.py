"""Typed client for the HighLevel conversations and contacts API, one method per operation."""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from bridge import downloads, rest
from bridge.clock import Clock
from bridge.connectors.ghl import media, models
from bridge.errors import AlreadyExists, Fatal, Retryable, TokenExpired
from bridge.ratelimit import TokenBucket

__all__ = ["CONTACTS_VERSION", "CONVERSATIONS_VERSION", "GhlClient", "TokenSource"]

CONVERSATIONS_VERSION = "2021-04-15"  # every /conversations/* op, the two email ops included
CONTACTS_VERSION = "2021-07-28"

_READ_TRIES = 3
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
# Search is eventually consistent (API_FACTS §10.3): give a just-created conversation a
# few seconds to become visible before the op is tried again.
_SEARCH_LAG_RETRY = 5.0
_SEARCH_DEFAULT_LIMIT = 20  # the documented default page size of /conversations/search

T = TypeVar("T")
_Form = Callable[[], AbstractAsyncContextManager[aiohttp.FormData]]
_ENCODER = msgspec.json.Encoder()


class TokenSource(Protocol):
    """Where access tokens come from (a private token, or OAuth with refresh)."""

    async def token(self) -> str:
        """A currently valid access token."""
        ...

    async def refresh(self, rejected: str) -> str:
        """A fresh token after ``rejected`` got a 401; single-flight is the implementer's job."""
        ...


class GhlClient:
    """One location's view of GHL; every call spends a token from ``bucket``.

    Writes are never retried here: the pipeline owns write retries and in-doubt
    reconciliation. Reads get a few quick retries on transient errors. A 401 for an
    expired or invalid token triggers exactly one refresh and one resend.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        location_id: str,
        bucket: TokenBucket | None,
        auth: TokenSource,
        clock: Clock,
        max_upload_bytes: int = media.DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self.location_id = location_id
        self.max_upload_bytes = max_upload_bytes
        self._session = session
        self._base = base_url.rstrip("/")
        self._bucket = bucket
        self._auth = auth
        self._clock = clock
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not cryptography

    # ----------------------------------------------------------------- conversations

    async def get_conversation(self, conversation_id: str) -> models.Conversation:
        return await self._get(models.Conversation, f"/conversations/{_q(conversation_id)}")

    async def search_conversations(
        self, params: models.ConversationSearch | None = None
    ) -> models.ConversationPage:
        """One page of ``GET /conversations/search``."""
        query = [("locationId", self.location_id), *_query(params or models.ConversationSearch())]
        return await self._get(models.ConversationPage, "/conversations/search", params=query)

    async def iter_conversation_pages(
        self, params: models.ConversationSearch | None = None
    ) -> AsyncIterator[models.ConversationPage]:
        """Every page, each starting after the previous page's last ``lastMessageDate``."""
        params = params or models.ConversationSearch()
        if params.sort_by not in (None, "last_message_date"):
            raise ValueError("paging needs sort_by=last_message_date: the cursor is that value")
        limit = params.limit or _SEARCH_DEFAULT_LIMIT
        seen: set[int] = set()
        while True:
            page = await self.search_conversations(params)
            if page.conversations:
                yield page
            if len(page.conversations) < limit:
                return
            cursor = page.conversations[-1].last_message_date
            _check_cursor("GET /conversations/search", cursor, seen)
            params = msgspec.structs.replace(params, start_after_date=cursor)

    async def find_conversation(self, contact_id: str) -> models.ConversationSummary | None:
        """The contact's conversation as search sees it (it may lag a create)."""
        page = await self.search_conversations(models.ConversationSearch(contact_id=contact_id))
        return next((c for c in page.conversations if c.contact_id == contact_id), None)

    async def create_conversation(self, contact_id: str) -> models.EnsuredConversation:
        """Create the contact's conversation, or find the one GHL already has.

        GHL allows one conversation per contact and answers a second create with 400
        "already exists" without the id, so the existing one is looked up by contactId;
        if search does not show it yet, ``Retryable`` asks for a later try.
        """
        body = models.CreateConversationBody(location_id=self.location_id, contact_id=contact_id)
        try:
            created = await self._write(models.CreatedEnvelope, "POST", "/conversations/", body)
        except AlreadyExists:
            found = await self.find_conversation(contact_id)
            if found is None:
                raise Retryable(
                    f"conversation of contact {contact_id} exists but search does not show it yet",
                    _SEARCH_LAG_RETRY,
                ) from None
            return models.EnsuredConversation(id=found.id, contact_id=contact_id, existed=True)
        return models.EnsuredConversation(
            id=created.conversation.id, contact_id=contact_id, existed=False
        )

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        unread_count: int | None = None,
        starred: bool | None = None,
        feedback: Mapping[str, Any] | None = None,
    ) -> models.Conversation:
        body = models.UpdateConversationBody(
            location_id=self.location_id,
            unread_count=unread_count,
            starred=starred,
            feedback=dict(feedback) if feedback is not None else None,
        )
        path = f"/conversations/{_q(conversation_id)}"
        return (await self._write(models.ConversationEnvelope, "PUT", path, body)).conversation

    async def delete_conversation(self, conversation_id: str) -> None:
        await self._write(models.Success, "DELETE", f"/conversations/{_q(conversation_id)}")

    # ----------------------------------------------------------------- reading messages

    async def list_messages(
        self,
        conversation_id: str,
        *,
        last_message_id: str | None = None,
        limit: int | None = None,
        types: Sequence[str] | None = None,
    ) -> models.MessagePage:
        """One page of a conversation's messages, newest first, after ``last_message_id``."""
        query: list[tuple[str, str | int | float]] = []
        if last_message_id is not None:
            query.append(("lastMessageId", last_message_id))
        if limit is not None:
            query.append(("limit", limit))
        if types:
            query.append(("type", ",".join(types)))
        path = f"/conversations/{_q(conversation_id)}/messages"
        return (await self._get(models.MessageListEnvelope, path, params=query)).messages

    async def iter_message_pages(
        self, conversation_id: str, *, limit: int | None = None, types: Sequence[str] | None = None
    ) -> AsyncIterator[models.MessagePage]:
        """Every page of a conversation's messages until ``nextPage`` is false."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page = await self.list_messages(
                conversation_id, last_message_id=cursor, limit=limit, types=types
            )
            if page.messages:
                yield page
            if not page.next_page or not page.messages:
                return
            cursor = page.last_message_id or page.messages[-1].id
            _check_cursor(f"GET /conversations/{conversation_id}/messages", cursor, seen)

    async def find_message_by_alt_id(
        self, conversation_id: str, alt_id: str, *, scan_limit: int = 100
    ) -> models.Message | None:
        """The newest message carrying ``alt_id`` among the last ``scan_limit`` (reconciliation)."""
        scanned = 0
        async for page in self.iter_message_pages(conversation_id, limit=min(scan_limit, 100)):
            for message in page.messages:
                if message.alt_id == alt_id:
                    return message
                scanned += 1
                if scanned >= scan_limit:
                    return None
        return None

    async def get_message(self, message_id: str) -> models.Message:
        path = f"/conversations/messages/{_q(message_id)}"
        return (await self._get(models.MessageEnvelope, path)).message

    async def get_email_message(self, email_message_id: str) -> models.EmailMessage:
        """An email with its body, which message lists leave out."""
        path = f"/conversations/messages/email/{_q(email_message_id)}"
        return await self._get(models.EmailMessage, path)

    async def export_messages(
        self, params: models.MessageExport | None = None, *, cursor: str | None = None
    ) -> models.ExportPage:
        """One page of the location's messages (``GET /conversations/messages/export``)."""
        query = [("locationId", self.location_id), *_query(params or models.MessageExport())]
        if cursor is not None:
            query.append(("cursor", cursor))
        return await self._get(models.ExportPage, "/conversations/messages/export", params=query)

    async def iter_export_pages(
        self, params: models.MessageExport | None = None, *, cursor: str | None = None
    ) -> AsyncIterator[models.ExportPage]:
        """Every export page from ``cursor`` (the start when None) until ``nextCursor`` is null."""
        seen: set[str] = set()
        while True:
            page = await self.export_messages(params, cursor=cursor)
            if page.messages:
                yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor
            _check_cursor("GET /conversations/messages/export", cursor, seen)

    # ----------------------------------------------------------------- writing messages

    async def send_message(self, message: models.SendMessage) -> models.SendResult:
        """Have GHL deliver a message itself (``POST /conversations/messages``)."""
        return await self._write(models.SendResult, "POST", "/conversations/messages", message)

    async def add_inbound_message(
        self,
        message: models.InboundMessage,
        *,
        direction: Literal["inbound", "outbound"] = "inbound",
    ) -> models.ProcessedMessage:
        """Record a message of the bridge's channel; nothing is sent, whatever the direction.

        "outbound" records a message the source sent to the contact.
        """
        # The API defaults direction to outbound (API_FACTS §2.3), so it is always explicit.
        body = models.InboundBody(**msgspec.structs.asdict(message), direction=direction)
        return await self._write(
            models.ProcessedMessage, "POST", "/conversations/messages/inbound", body
        )

    async def log_outbound_call(self, call: models.OutboundCall) -> models.ProcessedMessage:
        body = models.OutboundCallBody(**msgspec.structs.asdict(call), type="Call")
        return await self._write(
            models.ProcessedMessage, "POST", "/conversations/messages/outbound", body
        )

    async def upload_attachments(
        self,
        conversation_id: str,
        contact_id: str,
        files: Sequence[media.Upload],
        *,
        attachment_urls: Sequence[str] = (),
    ) -> models.UploadResult:
        """Upload files (streamed from disk) for a conversation; returns name -> URL.

        Type and size are checked before anything is sent, so a bad file is ``Rejected``
        without spending a request.
        """
        checked = await media.check_uploads(files, self.max_upload_bytes)
        fields = [
            ("conversationId", conversation_id),
            ("contactId", contact_id),
            ("locationId", self.location_id),
            *(("attachmentUrls", url) for url in attachment_urls),
        ]
        path = "/conversations/messages/upload"
        response = await self._send(
            "POST", path, write=True, form=lambda: media.upload_form(checked, fields)
        )
        return rest.decode_body(models.UploadResult, response, write=True, where=f"POST {path}")

    async def fetch_to_file(self, url: str, dest: Path) -> int:
        """Download a source file to ``dest`` without GHL credentials, up to the upload limit."""
        where = f"GET {urlsplit(url).path or '/'}"
        async with downloads.open_body(
            self._session, url, headers=None, bucket=None, clock=self._clock, where=where
        ) as response:
            return await downloads.save_body(
                response, dest, max_bytes=self.max_upload_bytes, where=where
            )

    async def update_message_status(
        self,
        message_id: str,
        status: models.ProviderStatus,
        *,
        error: models.MessageError | None = None,
        email_message_id: str | None = None,
        recipients: Sequence[str] | None = None,
    ) -> models.SendResult:
        body = models.MessageStatusBody(
            status=status,
            error=error,
            email_message_id=email_message_id,
            recipients=tuple(recipients) if recipients is not None else None,
        )
        path = f"/conversations/messages/{_q(message_id)}/status"
        return await self._write(models.SendResult, "PUT", path, body)

    async def cancel_scheduled_message(self, message_id: str) -> models.CancelResult:
        """Cancel a scheduled message; check ``.ok``, since a refusal still answers 200."""
        path = f"/conversations/messages/{_q(message_id)}/schedule"
        return await self._write(models.CancelResult, "DELETE", path)

    async def cancel_scheduled_email(self, email_message_id: str) -> models.CancelResult:
        """Cancel a scheduled email by its email message id; check ``.ok``."""
        path = f"/conversations/messages/email/{_q(email_message_id)}/schedule"
        return await self._write(models.CancelResult, "DELETE", path)

    # ----------------------------------------------------------------- call media

    async def download_recording(
        self, message_id: str, dest: Path, *, max_bytes: int = media.DEFAULT_MAX_RECORDING_BYTES
    ) -> int:
        """Stream a call's WAV recording into ``dest``; returns its size in bytes."""
        loc = _q(self.location_id)
        path = f"/conversations/messages/{_q(message_id)}/locations/{loc}/recording"
        where = f"GET {path}"

        async def attempt(token: str) -> int:
            headers = self._headers(token, path, "*/*")
            async with downloads.open_body(
                self._session,
                self._base + path,
                headers=headers,
                bucket=self._bucket,
                clock=self._clock,
                where=where,
            ) as response:
                return await downloads.save_body(response, dest, max_bytes=max_bytes, where=where)

        return await self._attempts(False, attempt)

    async def get_transcription(self, message_id: str) -> list[models.TranscriptSentence]:
        path = self._transcription_path(message_id)
        response = await self._send("GET", path, write=False)
        return media.decode_transcription(response.body, f"GET {path}")

    async def download_transcription(self, message_id: str) -> str:
        """The transcription as plain text."""
        path = self._transcription_path(message_id) + "/download"
        response = await self._send("GET", path, write=False, accept="text/plain")
        return response.body.decode("utf-8", "replace")

    def _transcription_path(self, message_id: str) -> str:
        loc, mid = _q(self.location_id), _q(message_id)
        return f"/conversations/locations/{loc}/messages/{mid}/transcription"

    # ----------------------------------------------------------------- contacts

    async def upsert_contact(self, contact: models.ContactUpsert) -> models.UpsertResult:
        """Create or update by natural key (email, then phone); ``new`` says which happened."""
        body = models.UpsertBody(**msgspec.structs.asdict(contact), location_id=self.location_id)
        return await self._write(models.UpsertResult, "POST", "/contacts/upsert", body)

    async def get_contact(self, contact_id: str) -> models.Contact:
        return (await self._get(models.ContactEnvelope, f"/contacts/{_q(contact_id)}")).contact

    async def find_duplicate_contact(
        self, *, email: str | None = None, phone: str | None = None
    ) -> models.Contact | None:
        """The contact an upsert with this email/phone would match, if any."""
        if email is None and phone is None:
            raise ValueError("find_duplicate_contact needs an email or a phone")
        query = [("locationId", self.location_id)]
        query += [("email", email)] if email is not None else []
        query += [("number", phone)] if phone is not None else []
        found = await self._get(
            models.DuplicateEnvelope, "/contacts/search/duplicate", params=query
        )
        return found.contact

    async def update_contact(self, contact_id: str, fields: models.ContactUpdate) -> models.Contact:
        path = f"/contacts/{_q(contact_id)}"
        return (await self._write(models.ContactEnvelope, "PUT", path, fields)).contact

    async def add_tags(self, contact_id: str, tags: Sequence[str]) -> list[str]:
        """Add tags, leaving the contact's other tags alone; returns the tags now set."""
        body = models.TagsBody(tags=tuple(tags))
        path = f"/contacts/{_q(contact_id)}/tags"
        return (await self._write(models.TagsEnvelope, "POST", path, body)).tags

    async def remove_tags(self, contact_id: str, tags: Sequence[str]) -> list[str]:
        body = models.TagsBody(tags=tuple(tags))
        path = f"/contacts/{_q(contact_id)}/tags"
        return (await self._write(models.TagsEnvelope, "DELETE", path, body)).tags

    async def add_note(self, contact_id: str, note: models.NewNote) -> models.Note:
        path = f"/contacts/{_q(contact_id)}/notes"
        return (await self._write(models.NoteEnvelope, "POST", path, note)).note

    async def update_note(
        self, contact_id: str, note_id: str, note: models.NoteUpdate
    ) -> models.Note:
        path = f"/contacts/{_q(contact_id)}/notes/{_q(note_id)}"
        return (await self._write(models.NoteEnvelope, "PUT", path, note)).note

    async def list_notes(self, contact_id: str) -> list[models.Note]:
        return (await self._get(models.NotesEnvelope, f"/contacts/{_q(contact_id)}/notes")).notes

    async def add_task(self, contact_id: str, task: models.NewTask) -> models.Task:
        path = f"/contacts/{_q(contact_id)}/tasks"
        return (await self._write(models.TaskEnvelope, "POST", path, task)).task

    async def list_tasks(self, contact_id: str) -> list[models.Task]:
        return (await self._get(models.TasksEnvelope, f"/contacts/{_q(contact_id)}/tasks")).tasks

    # ----------------------------------------------------------------- transport

    async def _get(
        self, tp: type[T], path: str, *, params: Sequence[tuple[str, str | int | float]] = ()
    ) -> T:
        response = await self._send("GET", path, write=False, params=params)
        return rest.decode_body(tp, response, write=False, where=f"GET {path}")

    async def _write(
        self, tp: type[T], method: str, path: str, body: msgspec.Struct | None = None
    ) -> T:
        response = await self._send(method, path, write=True, body=body)
        return rest.decode_body(tp, response, write=True, where=f"{method} {path}")

    async def _send(
        self,
        method: str,
        path: str,
        *,
        write: bool,
        params: Sequence[tuple[str, str | int | float]] = (),
        body: msgspec.Struct | None = None,
        form: _Form | None = None,
        accept: str = "application/json",
    ) -> rest.Response:
        url = self._base + path
        data = _ENCODER.encode(body) if body is not None else None

        async def attempt(token: str) -> rest.Response:
            headers = self._headers(token, path, accept)
            if data is not None:
                headers["Content-Type"] = "application/json"
            send = functools.partial(
                rest.request,
                self._session,
                method,
                url,
                bucket=self._bucket,
                write=write,
                clock=self._clock,
                headers=headers,
                params=list(params) or None,
            )
            if form is None:
                return await send(data=data)
            async with form() as multipart:
                return await send(data=multipart)

        return await self._attempts(write, attempt)

    def _headers(self, token: str, path: str, accept: str) -> dict[str, str]:
        version = CONTACTS_VERSION if path.startswith("/contacts") else CONVERSATIONS_VERSION
        return {"Authorization": f"Bearer {token}", "Version": version, "Accept": accept}

    async def _attempts(self, write: bool, attempt: Callable[[str], Awaitable[T]]) -> T:
        """Run ``attempt`` with a token: one refresh on an expired token, read retries."""
        token = await self._auth.token()
        refreshed = False
        tries = 1
        while True:
            try:
                return await attempt(token)
            except TokenExpired:
                if refreshed:
                    raise
                refreshed = True
                # A 401 means the server did nothing, so even a write may be sent again.
                token = await self._auth.refresh(token)
            except Retryable as exc:
                if write or tries >= _READ_TRIES:
                    raise
                delay = rest.backoff_delay(
                    tries - 1,
                    base=_BACKOFF_BASE,
                    cap=_BACKOFF_CAP,
                    retry_after=exc.retry_after,
                    rng=self._rng,
                )
                tries += 1
                await self._clock.sleep(delay)


def _q(segment: str) -> str:
    """An id as one path segment, so a stray slash cannot reach another endpoint."""
    return quote(segment, safe="")


def _query(params: msgspec.Struct) -> list[tuple[str, str | int | float]]:
    """Query pairs from a params Struct: None dropped, lists comma-joined (GHL's list form)."""
    out: list[tuple[str, str | int | float]] = []
    for name, value in msgspec.to_builtins(params).items():
        if value is not None:
            out.append((name, ",".join(value) if isinstance(value, list) else value))
    return out


def _check_cursor(where: str, cursor: T | None, seen: set[T]) -> None:
    """Fail loudly instead of paging forever when the server hands back a cursor again."""
    if cursor is None:
        raise Fatal(f"{where}: a full page came without a cursor; cannot page further")
    if cursor in seen:
        raise Fatal(f"{where}: cursor {cursor!r} came back twice; paging would loop")
    seen.add(cursor)
