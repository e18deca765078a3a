"""The pipeline's target for one GHL location: performs ops and reconciles in-doubt ones.

Ids come from the id map at send time (the person's contact and conversation), so ops
queued before their contact existed still work: ops of one person run in order.

Reconciliation, for an op whose outcome is unknown (crash or timeout after sending):
contacts are upserted again (idempotent by email/phone); a conversation is searched by
contactId; an inbound message is looked up by its ``altId`` among the conversation's
recent messages; a note or task by the marker the bridge writes into its body, and so
is a summary note (see ``summary_note``). Tag changes and conversation updates are
idempotent and simply sent again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar
from weakref import WeakValueDictionary

import anyio
import msgspec
import structlog

from bridge.clock import Clock
from bridge.connectors.ghl import models
from bridge.connectors.ghl.client import GhlClient
from bridge.connectors.ghl.media import check_file
from bridge.connectors.ghl.ops import (
    AddNote,
    AddTask,
    AssignContact,
    ChangeTags,
    EnsureConversation,
    GhlOp,
    InboundMessage,
    SyncTags,
    UpdateConversation,
    UpdateMessageStatus,
    UpdateSummary,
    UploadAttachment,
    UpsertContact,
    decode_op,
)
from bridge.connectors.ghl.summary_note import SummaryNotes
from bridge.errors import InDoubt, Rejected, Retryable
from bridge.models import IdMapRow, IdMapUpdate, Op, OpResult, marker
from bridge.store import Store

log = structlog.get_logger("bridge.ghl.target")

_K = TypeVar("_K")
_V = TypeVar("_V")

REJECT_5XX_AFTER = 3
"""GHL answers some bad input with a 500 (unknown conversation on upload, wrong provider
id, API_FACTS §6): after this many server errors on one op while other calls succeed,
the op is dead-lettered instead of retried until max_attempts."""

RECENT_MESSAGES = 10_000
"""How many recently sent message keys (and per-op server-error counts) are remembered."""

HEALTHY_WINDOW = 60.0
"""A 5xx counts against the op only if the location answered a call well this recently;
during an outage every op would fail alike, and none of them is bad input."""


class GhlTarget:
    """Performs GHL ops for one location."""

    def __init__(self, client: GhlClient, store: Store, *, clock: Clock) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        self._last_success: float | None = None
        self._summaries = SummaryNotes(client, store, clock=clock)
        # Per message key while an op holds or waits for it: weak, so the entry goes when
        # the last of them is done.
        self._message_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        # Message keys sent by this process lately, bounded: what the id map may not show
        # yet while another op of the same key waits for the lock.
        self._messages_sent: OrderedDict[str, None] = OrderedDict()
        # Server errors per op (not resets or timeouts), for _maybe_bad_input; bounded.
        self._server_errors: OrderedDict[int, int] = OrderedDict()

    async def send(self, op: Op) -> OpResult:
        payload = _decode(op)
        try:
            result = await self._perform(op, payload)
        except (Retryable, InDoubt) as exc:
            raise self._maybe_bad_input(op, exc) from None
        self._last_success = self._clock.monotonic()
        self._server_errors.pop(op.id, None)
        return result

    async def reconcile(self, op: Op) -> OpResult | None:
        payload = _decode(op)
        match payload:
            case EnsureConversation(person=person):
                found = await self._client.find_conversation(await self._contact_id(person))
                if found is None:
                    return None
                return _ids(person, conversation_id=found.id)
            case InboundMessage(person=person):
                known = await self._store.id_map(person)
                conversation_id = known.conversation_id if known is not None else None
                if conversation_id is None:
                    # The send may have made the conversation itself (its own op was
                    # dead-lettered, or a replay), so look it up rather than assume none.
                    if known is None or known.contact_id is None:
                        return None  # no contact, so no conversation and no message
                    found = await self._client.find_conversation(known.contact_id)
                    if found is None:
                        return None
                    conversation_id = found.id
                message = await self._client.find_message_by_alt_id(conversation_id, op.source_key)
                if message is None:
                    return None
                return _message_ids(op.source_key, person, message.id, conversation_id)
            case AddNote(person=person):
                contact_id = await self._contact_id(person)
                notes = await self._client.list_notes(contact_id)
                tag = marker(op.source_key)
                note = next((n for n in notes if tag in (n.body or "")), None)
                return None if note is None else _ids(op.source_key, message_id=note.id)
            case AddTask(person=person):
                contact_id = await self._contact_id(person)
                tasks = await self._client.list_tasks(contact_id)
                tag = marker(op.source_key)
                task = next((t for t in tasks if tag in (t.body or "")), None)
                return None if task is None else _ids(op.source_key, message_id=task.id)
            case UpdateSummary():
                await self._summaries.reconcile(payload, self._contact_id)
                return None
            case _:
                # Upserts, tag changes and conversation updates are idempotent.
                return None

    async def _perform(self, op: Op, payload: GhlOp) -> OpResult:
        client = self._client
        match payload:
            case UpsertContact(person=person, fields=fields):
                return await self._upsert(person, fields)
            case EnsureConversation(person=person):
                known = await self._store.id_map(person)
                if known is not None and known.conversation_id is not None:
                    return OpResult()
                ensured = await client.create_conversation(await self._contact_id(person))
                return _ids(person, conversation_id=ensured.id)
            case InboundMessage():
                return await self._inbound(op, payload)
            case ChangeTags(person=person, add=add, remove=remove):
                contact_id = await self._contact_id(person)
                if add:
                    await client.add_tags(contact_id, add)
                if remove:
                    await client.remove_tags(contact_id, remove)
                return OpResult()
            case SyncTags():
                return await self._sync_tags(payload)
            case AddNote(person=person, body=body, links=links):
                if await self._store.made_before(op.source_key):
                    return OpResult()
                contact_id = await self._contact_id(person)
                lines = [body]
                if links:
                    lines.append("\n".join([await self._link(k, v) for k, v in links.items()]))
                text = "\n\n".join([*lines, marker(op.source_key)])
                note = await client.add_note(contact_id, models.NewNote(body=text))
                return _ids(op.source_key, message_id=note.id)
            case AddTask(person=person, title=title, body=body, due=due, due_in=due_in):
                if await self._store.made_before(op.source_key):
                    return OpResult()
                contact_id = await self._contact_id(person)
                if due is not None:
                    due_date = _iso(due)
                else:
                    due_date = datetime.fromtimestamp(self._clock.time(), UTC) + timedelta(
                        seconds=due_in or 0.0
                    )
                task = models.NewTask(
                    title=title,
                    body=f"{body}\n\n{marker(op.source_key)}".strip(),
                    due_date=due_date,
                    completed=False,
                )
                created = await client.add_task(contact_id, task)
                return _ids(op.source_key, message_id=created.id)
            case UploadAttachment():
                return await self._upload(op, payload)
            case UpdateSummary():
                return await self._summaries.send(op, payload, self._contact_id)
            case UpdateMessageStatus(message_key=key, status=status, error=error):
                sent = await self._store.id_map(key)
                if sent is None or sent.message_id is None:
                    raise Rejected(f"no GHL message for {key}: it was not delivered")
                problem = None
                if error:
                    problem = models.MessageError(code="source", type="delivery", message=error)
                await client.update_message_status(sent.message_id, status, error=problem)
                return OpResult()
            case AssignContact(person=person, user_id=user_id):
                contact_id = await self._contact_id(person)
                await client.update_contact(contact_id, models.ContactUpdate(assigned_to=user_id))
                return OpResult()
            case UpdateConversation(person=person, unread_count=unread, starred=starred):
                conversation_id = await self._conversation_id(person)
                await client.update_conversation(
                    conversation_id, unread_count=unread, starred=starred
                )
                return OpResult()
        raise Rejected(f"op kind {op.kind!r} is not a GHL op")  # pragma: no cover

    async def _upsert(self, person: str, fields: models.ContactUpsert) -> OpResult:
        """Create the person's contact, or update the one already mapped to it.

        Upsert matches on e-mail, then phone: once a person's e-mail changes it would
        match nobody and make a second contact, while the stored conversation stays the
        first one's. So a mapped contact is updated by its id, and upsert is used to
        create, to set what only upsert takes (gender, company name: the e-mail now
        matches), and when the mapped contact was deleted in GHL.
        """
        known = await self._store.id_map(person)
        if known is not None and known.contact_id is not None:
            update = models.ContactUpdate(
                **{
                    f.name: getattr(fields, f.name)
                    for f in msgspec.structs.fields(models.ContactUpdate)
                }
            )
            try:
                await self._client.update_contact(known.contact_id, update)
            except Rejected as exc:
                if exc.status != 404:
                    raise
                log.warning("ghl_contact_gone", contact_id=known.contact_id)
            else:
                if fields.gender is None and fields.company_name is None:
                    return OpResult()
        upserted = await self._client.upsert_contact(fields)
        return _ids(person, contact_id=upserted.contact.id)

    async def _sync_tags(self, sync: SyncTags) -> OpResult:
        known = await self._store.id_map(sync.person)
        before = set(known.tags or ()) if known is not None else set()
        wanted = set(sync.tags)
        add, remove = sorted(wanted - before), sorted(before - wanted)
        if add or remove:
            contact_id = await self._contact_id(sync.person)
            if add:
                await self._client.add_tags(contact_id, add)
            if remove:
                await self._client.remove_tags(contact_id, remove)
        return OpResult(updates=(IdMapUpdate(source_key=sync.person, tags=tuple(sorted(wanted))),))

    async def _upload(self, op: Op, upload: UploadAttachment) -> OpResult:
        if await self._uploaded_url(op.source_key) is not None:
            return OpResult()
        client = self._client
        # Checked before the download when the source declares a size, and while
        # downloading otherwise: a refused file never costs a GHL call.
        check_file(upload.file_name, upload.size, client.max_upload_bytes)
        contact_id = await self._contact_id(upload.person)
        conversation_id = await self._conversation_id(upload.person)
        state_dir = self._store.path.parent
        if upload.local is not None:
            kept = (state_dir / upload.local).resolve()
            if not kept.is_relative_to(state_dir.resolve()) or not kept.is_file():
                raise Rejected(
                    f"{upload.file_name!r} is not in the state directory (its fetch failed,"
                    " or retention removed it): see the dead letter of its fetch"
                )
            result = await client.upload_attachments(conversation_id, contact_id, [kept])
        else:
            media_dir = state_dir / "media"
            await anyio.Path(media_dir).mkdir(mode=0o700, exist_ok=True)
            # The op id keeps concurrent uploads of same-named files apart.
            local = media_dir / f"{op.id}-{Path(upload.file_name).name}"
            try:
                await client.fetch_to_file(upload.url, local)
                result = await client.upload_attachments(conversation_id, contact_id, [local])
            finally:
                await anyio.Path(local).unlink(missing_ok=True)
        url = next(iter(result.uploaded_files.values()), None)
        if url is None:
            raise InDoubt(f"upload of {upload.file_name!r} answered without a URL")
        return OpResult(updates=(IdMapUpdate(source_key=op.source_key, url=url),))

    async def _inbound(self, op: Op, message: InboundMessage) -> OpResult:
        # One message key at a time: the same source record listed under two people is
        # two ops of two entities, which the pipeline may send at once.
        key = op.source_key
        lock = self._message_locks.get(key)
        if lock is None:
            lock = self._message_locks[key] = asyncio.Lock()
        async with lock:
            if key in self._messages_sent:
                return OpResult()  # sent moments ago by another op of this key
            result = await self._send_inbound(op, message)
            _remember(self._messages_sent, key, None)
            return result

    async def _send_inbound(self, op: Op, message: InboundMessage) -> OpResult:
        if await self._store.made_before(op.source_key):
            return OpResult()  # delivered before (a replay or a re-queued record)
        known = await self._store.id_map(message.person)
        contact_id = _contact_of(message.person, known)
        conversation_id, made_conversation = await self._conversation(message.person, known)
        attachments = list(message.attachments)
        for key in message.attachment_keys:
            url = await self._uploaded_url(key)
            if url is not None:
                attachments.append(url)
        call = None
        if message.call_status is not None:
            call = models.CallData(status=message.call_status)
        processed = await self._client.add_inbound_message(
            models.InboundMessage(
                type=message.type,
                contact_id=contact_id,
                conversation_id=conversation_id,
                alt_id=op.source_key,
                message=message.message,
                subject=message.subject,
                html=message.html,
                attachments=tuple(attachments) or None,
                date=_iso(message.date) if message.date else None,
                conversation_provider_id=message.conversation_provider_id,
                call=call,
            ),
            direction=message.direction,
        )
        if made_conversation:
            return _message_ids(
                op.source_key, message.person, processed.message_id, conversation_id
            )
        return _ids(op.source_key, message_id=processed.message_id)

    async def _link(self, label: str, key: str) -> str:
        url = await self._uploaded_url(key)
        return f"{label}: {url or _NOT_UPLOADED}"

    async def _uploaded_url(self, key: str) -> str | None:
        """Where an UploadAttachment op put its file in GHL; None if it never succeeded."""
        uploaded = await self._store.id_map(key)
        return uploaded.url if uploaded is not None else None

    async def _contact_id(self, person: str) -> str:
        return _contact_of(person, await self._store.id_map(person))

    async def _conversation_id(self, person: str) -> str:
        conversation_id, _ = await self._conversation(person, await self._store.id_map(person))
        return conversation_id

    async def _conversation(self, person: str, known: IdMapRow | None) -> tuple[str, bool]:
        """The person's conversation, and whether this call had to create it.

        Flows queue an EnsureConversation first; this covers a replayed message whose
        conversation op is gone. Create is safe: "already exists" is looked up.
        """
        if known is not None and known.conversation_id is not None:
            return known.conversation_id, False
        ensured = await self._client.create_conversation(_contact_of(person, known))
        return ensured.id, True

    def _maybe_bad_input(self, op: Op, exc: Retryable | InDoubt) -> Exception:
        """A 5xx that keeps coming for one op while the location is healthy is bad input.

        Only server errors count: ``op.attempts`` also counts resets and timeouts, which
        say nothing about the record. The count lives in memory, so a restart starts it
        again (more retries, never a good record dead-lettered early).
        """
        if exc.status is None or exc.status < 500:
            return exc
        errors = self._server_errors.pop(op.id, 0) + 1
        _remember(self._server_errors, op.id, errors)
        healthy = (
            self._last_success is not None
            and self._clock.monotonic() - self._last_success < HEALTHY_WINDOW
        )
        if errors >= REJECT_5XX_AFTER and healthy:
            del self._server_errors[op.id]
            return Rejected(
                f"{exc} ({errors} server errors on this record while other calls"
                " succeed: treating it as bad input)"
            )
        return exc


_NOT_UPLOADED = "not uploaded (see the bridge's dead letters)"


def _decode(op: Op) -> GhlOp:
    try:
        return decode_op(op.payload)
    except msgspec.DecodeError as exc:
        raise Rejected(f"unreadable GHL op payload: {exc}") from None


def _contact_of(person: str, known: IdMapRow | None) -> str:
    if known is None or known.contact_id is None:
        raise Rejected(
            f"no GHL contact for {person}: its upsert has not succeeded (see its dead letter)"
        )
    return known.contact_id


def _remember(recent: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    """Put ``key`` last in ``recent``, dropping the oldest beyond ``RECENT_MESSAGES``."""
    recent[key] = value
    recent.move_to_end(key)
    while len(recent) > RECENT_MESSAGES:
        recent.popitem(last=False)


def _message_ids(key: str, person: str, message_id: str, conversation_id: str) -> OpResult:
    """A message's id, and its person's conversation: the next op need not look it up."""
    return OpResult(
        updates=(
            IdMapUpdate(source_key=key, message_id=message_id),
            IdMapUpdate(source_key=person, conversation_id=conversation_id),
        )
    )


def _ids(
    key: str,
    *,
    contact_id: str | None = None,
    conversation_id: str | None = None,
    message_id: str | None = None,
) -> OpResult:
    return OpResult(
        updates=(
            IdMapUpdate(
                source_key=key,
                contact_id=contact_id,
                conversation_id=conversation_id,
                message_id=message_id,
            ),
        )
    )


def _iso(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(f"not an ISO 8601 date: {value!r}") from None
