"""The pipeline's target for one Action Network group: writing GHL ids back to the person.

After a person's contact and conversation exist in GHL, their ids go into two Action
Network custom fields (``PUT /people/{id}``), so organisers can see the link from Action
Network. Three things keep this from looping: the stream leaves those fields out of the
person's content hash (the bridge's own write is not a change), the op carries the values
the fields held when read and writes only what differs, and an op identical to the last
one applied for the person completes without a call.
"""

from __future__ import annotations

import msgspec

from bridge.connectors.actionnetwork import AnClient
from bridge.errors import Rejected
from bridge.models import NewOp, Op, OpResult
from bridge.store import Store

WRITE_BACK_KIND = "an.write_back"


class WriteBackIds(msgspec.Struct, frozen=True, kw_only=True):
    """Put the person's GHL ids into these custom fields (an empty name is not written)."""

    person: str  # the person's source key: where the id map holds the GHL ids
    person_id: str  # Action Network's uuid of the person
    contact_field: str = ""
    conversation_field: str = ""
    current: dict[str, str] = {}  # those fields' values when the person was read


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(WriteBackIds)


def write_back_op(target: str, op: WriteBackIds) -> NewOp:
    """An outbox row for the write-back, ordered after the person's GHL ops."""
    return NewOp(
        target=target,
        entity=op.person,
        kind=WRITE_BACK_KIND,
        source_key=op.person,
        payload=_encoder.encode(op),
    )


class AnWriteBackTarget:
    """Performs write-backs for one Action Network group."""

    def __init__(self, client: AnClient, store: Store) -> None:
        self._client = client
        self._store = store

    async def send(self, op: Op) -> OpResult:
        try:
            write = _decoder.decode(op.payload)
        except msgspec.DecodeError as exc:
            raise Rejected(f"unreadable write-back payload: {exc}") from None
        known = await self._store.id_map(write.person)
        if known is None or known.contact_id is None:
            raise Rejected(
                f"no GHL contact for {write.person} yet: its upsert has not succeeded"
                " (see its dead letter)"
            )
        wanted = {
            write.contact_field: known.contact_id,
            write.conversation_field: known.conversation_id,
        }
        changes = {
            field: value
            for field, value in wanted.items()
            if field and value is not None and write.current.get(field) != value
        }
        if changes:
            await self._client.update_person(write.person_id, changes)
        return OpResult()

    async def reconcile(self, op: Op) -> OpResult | None:
        return None  # a PUT of the same fields is idempotent: send it again
