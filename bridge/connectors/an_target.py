"""The pipeline's target for one Action Network group: writing GHL ids back to the person.

After a person's contact and conversation exist in GHL, their ids go into two Action
Network custom fields (``PUT /people/{id}``), so organisers can see the link from Action
Network. Three things keep this from looping: the stream leaves those fields out of the
person's content hash (the bridge's own write is not a change), the op carries the values
the fields held when read and writes only what differs, and an op identical to the last
one applied for the person completes without a call.

The same target mirrors GHL replies into the person (``an.mirror_fields``: custom fields
through ``PUT /people/{id}``; ``an.mirror_tags``: tags through the signup helper). Those
fields and tags are the bridge's own too, and the people stream leaves them out the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import structlog

from bridge.connectors.actionnetwork import AnClient
from bridge.errors import Rejected
from bridge.models import NewOp, Op, OpResult
from bridge.store import Store

log = structlog.get_logger("bridge.connectors.an_target")

WRITE_BACK_KIND = "an.write_back"
MIRROR_FIELDS_KIND = "an.mirror_fields"
MIRROR_TAGS_KIND = "an.mirror_tags"


class WriteBackIds(msgspec.Struct, frozen=True, kw_only=True):
    """Put the person's GHL ids into these custom fields (an empty name is not written)."""

    person: str  # the person's source key: where the id map holds the GHL ids
    person_id: str  # Action Network's uuid of the person
    contact_field: str = ""
    conversation_field: str = ""
    current: dict[str, str] = {}  # those fields' values when the person was read


class MirrorFields(msgspec.Struct, frozen=True, kw_only=True):
    """Custom fields rendered from a GHL message; only the person's newest one is written."""

    person: str
    person_id: str
    message_id: str  # the GHL message
    at: str  # its dateAdded: what "newest" compares (ISO, so text order is time order)
    fields: dict[str, str]


class MirrorTags(msgspec.Struct, frozen=True, kw_only=True):
    """Tags added and removed once a person has a GHL reply (the same payload every time,
    so after the first the pipeline completes it without a call)."""

    person: str
    person_id: str
    add: list[str] = []
    remove: list[str] = []


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(WriteBackIds)
_fields_decoder = msgspec.json.Decoder(MirrorFields)
_tags_decoder = msgspec.json.Decoder(MirrorTags)


def _person_op(
    target: str, kind: str, source_key: str, op: WriteBackIds | MirrorFields | MirrorTags
) -> NewOp:
    """An outbox row filed under the person, so it runs in order with their other ops."""
    return NewOp(
        target=target,
        entity=op.person,
        kind=kind,
        source_key=source_key,
        payload=_encoder.encode(op),
    )


def write_back_op(target: str, op: WriteBackIds) -> NewOp:
    """An outbox row for the write-back, ordered after the person's GHL ops."""
    return _person_op(target, WRITE_BACK_KIND, op.person, op)


def mirror_fields_op(target: str, op: MirrorFields) -> NewOp:
    """Mirrored fields, under one source key per person (the newest payload applied)."""
    return _person_op(target, MIRROR_FIELDS_KIND, f"{op.person}:ghl-reply", op)


def mirror_tags_op(target: str, op: MirrorTags) -> NewOp:
    return _person_op(target, MIRROR_TAGS_KIND, f"{op.person}:ghl-tags", op)


def newest_mark(person: str) -> str:
    """The store mark naming the newest GHL message mirrored into ``person``."""
    return f"{person}:ghl-reply"


class AnWriteBackTarget:
    """Performs write-backs for one Action Network group."""

    def __init__(self, client: AnClient, store: Store) -> None:
        self._client = client
        self._store = store
        self._tag_names: set[str] | None = None  # the group's tags, read when first needed

    async def send(self, op: Op) -> OpResult:
        try:
            if op.kind == MIRROR_FIELDS_KIND:
                return await self._mirror_fields(_fields_decoder.decode(op.payload))
            if op.kind == MIRROR_TAGS_KIND:
                return await self._mirror_tags(_tags_decoder.decode(op.payload))
            write = _decoder.decode(op.payload)
        except msgspec.DecodeError as exc:
            raise Rejected(f"unreadable {op.kind} payload: {exc}") from None
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

    async def _mirror_fields(self, mirror: MirrorFields) -> OpResult:
        # Ops of one person run in order, but an older message can come back later with a
        # new status; it must not overwrite the newer reply already shown.
        stamp = f"{mirror.at}|{mirror.message_id}"
        newest = await self._store.mark(newest_mark(mirror.person))
        if newest is not None and stamp < newest:
            return OpResult()
        if mirror.fields:
            await self._client.update_person(mirror.person_id, mirror.fields)
        return OpResult(marks=((newest_mark(mirror.person), stamp),))

    async def _mirror_tags(self, mirror: MirrorTags) -> OpResult:
        person = await self._client.person(mirror.person_id)
        email = next((e.address for e in person.email_addresses if e.address), None)
        if email is None:
            # Matching by phone alone is only inferred from the help pages (API_FACTS §8.1):
            # refuse rather than risk creating a second person.
            raise Rejected(
                f"{mirror.person} has no e-mail address, and the signup helper that changes"
                " tags finds people by e-mail"
            )
        await self._ensure_tags(mirror.add)
        await self._client.change_tags(email, mirror.add, mirror.remove)
        return OpResult()

    async def _ensure_tags(self, names: Sequence[str]) -> None:
        """Create the tags to add that the group lacks: the signup helper silently skips a
        name that is not a tag yet. The group's tags are read once per run."""
        if self._tag_names is None or not set(names) <= self._tag_names:
            self._tag_names = set((await self._client.tag_names()).values())
        for name in names:
            if name not in self._tag_names:
                await self._client.create_tag(name)
                self._tag_names.add(name)
                log.info("an_tag_created", tag=name)

    async def reconcile(self, op: Op) -> OpResult | None:
        # A PUT of the same fields is idempotent, and so is adding or removing the same
        # tags: an op in doubt is simply sent again.
        return None
