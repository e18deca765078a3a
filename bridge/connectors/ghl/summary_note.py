"""Keeps each person's summary note in GHL: one note, created once, then edited in place.

An ``UpdateSummary`` op first records its items, tags and e-mail in the ledger (the
store), which is idempotent, so an op sent again after an unknown outcome does no harm.
Then the digest of the whole ledger is rendered and compared with the digest last
written: equal costs no call; otherwise the known note is edited (``PUT``), or created
(``POST``) the first time or when someone deleted it in GHL (the ``PUT`` answers 404).

Two things keep the calls down. A person without source activity gets no note. And an op
followed in the outbox by another summary op of the same person, with a different
payload, leaves the write to that one: a backfill of a person with ten activities costs
one note write, not ten. (An identical next op would be skipped by the pipeline as
already applied, so then this op writes.)

Reconciliation: only the create is not idempotent. An in-doubt op whose note id is not
known yet looks for the note by its marker line; one found is adopted (with the digest
of the body it holds), so the send that follows edits it, or does nothing if it already
says the right thing, instead of making a second note.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from bridge.clock import Clock
from bridge.connectors.ghl import models
from bridge.connectors.ghl.client import GhlClient
from bridge.connectors.ghl.ops import UpdateSummary
from bridge.errors import Rejected
from bridge.models import Op, OpResult, content_hash, marker
from bridge.store import Store
from bridge.summary import has_activity, ledger_key, summary_key, summary_text

log = structlog.get_logger("bridge.ghl.summary")

ContactId = Callable[[str], Awaitable[str]]
"""The person's GHL contact id, or ``Rejected`` when their upsert has not succeeded."""


class SummaryNotes:
    """Performs and reconciles ``UpdateSummary`` ops for one GHL location."""

    def __init__(self, client: GhlClient, store: Store, *, clock: Clock) -> None:
        self._client = client
        self._store = store
        self._clock = clock

    async def send(self, op: Op, summary: UpdateSummary, contact_id: ContactId) -> OpResult:
        person = summary.person
        await self._store.record_summary(
            person,
            title=summary.title,
            items={ledger_key(item): item for item in summary.items},
            tags=summary.tags,
            email=summary.email,
            now=self._clock.time(),
        )
        later = await self._store.next_open_payload(op)
        if later is not None and later != op.payload:
            log.debug("summary_deferred")
            return OpResult()
        state = await self._store.summary(person)
        if state is None or not has_activity(state.items):
            return OpResult()  # recorded; the note comes with the first activity
        body = summary_text(state)
        digest = content_hash(body.encode())
        if state.note_id is not None and digest == state.digest:
            return OpResult()
        contact = await contact_id(person)
        note_id = state.note_id
        if note_id is not None:
            note_id = await self._edit(contact, note_id, body)
        if note_id is None:
            created = await self._client.add_note(contact, models.NewNote(body=body))
            note_id = created.id
            log.info("summary_note_created", note_id=note_id)
        await self._store.summary_written(
            person, note_id=note_id, digest=digest, now=self._clock.time()
        )
        return OpResult()

    async def _edit(self, contact: str, note_id: str, body: str) -> str | None:
        """Edit the note in place; None when it is gone (deleted in GHL) and must be made."""
        try:
            await self._client.update_note(contact, note_id, models.NoteUpdate(body=body))
        except Rejected as exc:
            if exc.status != 404:
                raise
            log.warning("summary_note_missing", note_id=note_id)
            return None
        log.info("summary_note_updated", note_id=note_id)
        return note_id

    async def reconcile(self, summary: UpdateSummary, contact_id: ContactId) -> None:
        """Adopt a note a lost reply created; the op is then sent again (it is idempotent)."""
        person = summary.person
        state = await self._store.summary(person)
        if state is None or state.note_id is not None or not has_activity(state.items):
            return  # no create can have been in doubt: only an edit, or no write at all
        tag = marker(summary_key(person))
        notes = await self._client.list_notes(await contact_id(person))
        found = next((n for n in notes if tag in (n.body or "")), None)
        if found is None:
            return
        await self._store.summary_written(
            person,
            note_id=found.id,
            digest=content_hash((found.body or "").encode()),
            now=self._clock.time(),
        )
