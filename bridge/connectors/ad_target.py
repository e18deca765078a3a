"""The pipeline's target for one ActiveDEMAND account: what the bridge writes back into it.

Three ops: a contact history entry (PROPOSED ``POST histories.json``), a form submission
(the established ``POST forms/{id}``), and fetching a call recording into the state
directory so the GHL target can upload it.

Made once: a history entry carries the marker line ``[bridge:<source key>]`` so an op in
doubt is looked up among the contact's history before it is sent again; its id goes to
the id map. A form submission cannot be looked up (no listing of submissions was found,
API_FACTS §2), so one in doubt is sent again: a repeat only upserts the same contact
values and adds a history line, which is safer than losing it. A recording fetch is
idempotent: a file already there is kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import msgspec
import structlog

from bridge.connectors.ad_client import AdClient
from bridge.connectors.ad_models import ContactData
from bridge.errors import Rejected
from bridge.mapping import render
from bridge.models import IdMapUpdate, NewOp, Op, OpResult, marker
from bridge.store import Store

log = structlog.get_logger("bridge.connectors.ad_target")

RECORDINGS_DIR = "recordings"
"""Under the state directory, one folder per source: where call recordings are kept."""

PRUNE_EVERY = 3600.0
"""Seconds between sweeps of recordings past their retention."""


class AddHistory(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ad.add_history"):
    """An entry on the contact's ActiveDEMAND history, made once per source key."""

    person: str  # the contact's source key (orders the op with the contact's other ops)
    contact_id: str
    kind: str
    text: str


class SubmitForm(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ad.submit_form"):
    """Submit a form for the contact; ``fields`` are templates (form key -> template).

    The templates read ``record`` and the contact's own fields (``email``, ``phone``,
    ``first_name``, ``last_name``, ``custom.<key>``), fetched when the op is sent, so the
    submission carries the contact's current e-mail, which is how a form finds its contact.
    """

    person: str
    contact_id: str
    form_id: str
    fields: dict[str, str]
    record: dict[str, str] = {}


class FetchRecording(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="ad.fetch_recording"
):
    """Stream a call's recording to ``file`` (relative to the state directory)."""

    person: str
    message_id: str
    file: str


AdOp = AddHistory | SubmitForm | FetchRecording

_encoder = msgspec.json.Encoder(order="deterministic")
_decoder: msgspec.json.Decoder[AdOp] = msgspec.json.Decoder(AdOp)


def new_ad_op(target: str, op: AdOp, *, source_key: str) -> NewOp:
    """An outbox row for ``op``, ordered with every other op of the contact."""
    return NewOp(
        target=target,
        entity=op.person,
        kind=str(op.__struct_config__.tag),
        source_key=source_key,
        payload=_encoder.encode(op),
    )


def recording_file(source: str, message_id: str) -> str:
    """Where a call's recording is kept, relative to the state directory."""
    return f"{RECORDINGS_DIR}/{source}/{message_id}.wav"


def contact_record(contact: ContactData | None) -> dict[str, object]:
    """What form templates read of the contact."""
    if contact is None:
        return {}
    return {
        "email": contact.email,
        "phone": contact.phone,
        "first_name": contact.first_name,
        "last_name": contact.last_name,
        "custom": dict(contact.custom),
    }


class AdTarget:
    """Performs ActiveDEMAND ops for one account."""

    def __init__(
        self,
        client: AdClient,
        store: Store,
        *,
        max_recording_bytes: int,
        retention: float,
    ) -> None:
        self._client = client
        self._store = store
        self._max_recording_bytes = max_recording_bytes
        self._retention = retention
        self._pruned_at: float | None = None

    async def send(self, op: Op) -> OpResult:
        match _decode(op):
            case AddHistory() as history:
                if await self._store.made_before(op.source_key):
                    return OpResult()
                text = f"{history.text}\n\n{marker(op.source_key)}"
                made = await self._client.add_history(history.contact_id, history.kind, text)
                return _made(op, made)
            case SubmitForm() as form:
                if await self._store.made_before(op.source_key):
                    return OpResult()
                found = await self._client.find_contacts([form.contact_id])
                contact = found.get(form.contact_id)
                record = {**contact_record(contact), **form.record}
                values = {key: render(t, record) for key, t in form.fields.items()}
                await self._client.submit_form(form.form_id, values)
                return _made(op, f"form:{form.form_id}")
            case FetchRecording() as fetch:
                return await self._fetch(fetch)
        raise Rejected(f"op kind {op.kind!r} is not an ActiveDEMAND op")  # pragma: no cover

    async def reconcile(self, op: Op) -> OpResult | None:
        match _decode(op):
            case AddHistory(contact_id=contact_id):
                tag = marker(op.source_key)
                async for page in self._client.history_pages(contact_id=contact_id):
                    for entry in page:
                        if tag in (entry.value.text or ""):
                            return _made(op, entry.id)
                return None
            case _:
                return None  # a form is sent again (see the module note); a fetch is idempotent

    async def _fetch(self, fetch: FetchRecording) -> OpResult:
        state_dir = self._store.path.parent
        dest = state_dir / fetch.file
        await self._prune(state_dir / RECORDINGS_DIR)
        if await anyio.Path(dest).is_file():
            return OpResult()
        await anyio.Path(dest.parent).mkdir(mode=0o700, parents=True, exist_ok=True)
        size = await self._client.download_recording(
            fetch.message_id, dest, max_bytes=self._max_recording_bytes
        )
        log.info("ad_recording_saved", message_id=fetch.message_id, bytes=size)
        return OpResult()

    async def _prune(self, root: Path) -> None:
        """Remove recordings older than the retention, at most once per PRUNE_EVERY."""
        now = time.time()  # file times are wall-clock times
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        removed = await anyio.to_thread.run_sync(_remove_older, root, now - self._retention)
        if removed:
            log.info("ad_recordings_pruned", removed=removed)


def _remove_older(root: Path, before: float) -> int:
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.glob("*/*"):
        if path.is_file() and path.stat().st_mtime < before:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def decode_ad_op(payload: bytes) -> AdOp:
    return _decoder.decode(payload)


def _decode(op: Op) -> AdOp:
    try:
        return decode_ad_op(op.payload)
    except msgspec.DecodeError as exc:
        raise Rejected(f"unreadable ActiveDEMAND op payload: {exc}") from None


def _made(op: Op, made_id: str) -> OpResult:
    return OpResult(updates=(IdMapUpdate(source_key=op.source_key, message_id=made_id),))
