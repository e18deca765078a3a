"""Action Network events -> ops: mapping, messages, rules, tags and write-back, without I/O."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bridge.config import ActionNetworkSource, Duration, MappingProfile, parse_duration
from bridge.connectors.an_models import ActivityData, PersonData
from bridge.connectors.an_taggings import TagsData
from bridge.connectors.an_target import AnWriteBackTarget, WriteBackIds, write_back_op
from bridge.errors import ConfigError, Rejected
from bridge.flows.action_network import ActionNetworkFlow
from bridge.models import IdMapUpdate, Op, OpResult, SourceEvent, content_hash
from bridge.secrets import Secret
from bridge.store import Store
from tests.fakes import outbox_op

KEY = "an-main:person:p1"


def source(**extra: Any) -> ActionNetworkSource:
    return msgspec.convert(
        {"name": "an-main", "location": "main", "api_key": Secret("k" * 12), **extra},
        ActionNetworkSource,
        dec_hook=_durations,
    )


def _durations(tp: type, value: Any) -> Any:
    if tp is Duration:
        return Duration(parse_duration(value))
    if isinstance(value, tp):
        return value
    raise NotImplementedError(tp)


def flow(profile: Any = None, **extra: Any) -> ActionNetworkFlow:
    compiled = None if profile is None else msgspec.convert(profile, MappingProfile)
    return ActionNetworkFlow(
        source(**extra), compiled, ghl_target="ghl:main", an_target="an:an-main"
    )


def person(**changes: Any) -> PersonData:
    fields: dict[str, Any] = {
        "id": "p1",
        "identifiers": ["action_network:p1"],
        "created_date": datetime(2024, 5, 1, tzinfo=UTC),
        "given_name": " Ada ",
        "family_name": "Lovelace",
        "email": "ADA@example.org",
        "email_status": "subscribed",
        "phone": "(503) 555-0142",
        "phone_status": None,
        "email_addresses": [],
        "phone_numbers": [],
        "postal_addresses": [],
        "languages_spoken": [],
        "custom_fields": {},
        "tags": ["donor", "volunteer"],
    }
    return msgspec.convert({**fields, **changes}, PersonData)


def activity(**changes: Any) -> ActivityData:
    fields: dict[str, Any] = {
        "id": "s1",
        "type": "signature",
        "person_key": KEY,
        "person_id": "p1",
        "action_id": "pet1",
        "action_title": "Clean Water Now",
        "created_date": "2026-03-01T10:00:00Z",
    }
    return msgspec.convert({**fields, **changes}, ActivityData)


def event(kind: str, key: str, data: msgspec.Struct) -> SourceEvent:
    raw = msgspec.json.encode(data)
    return SourceEvent(
        stream="an-main.people", key=key, kind=kind, data=raw, content_hash=content_hash(raw)
    )


def payloads(ops: Any) -> list[dict[str, Any]]:
    return [msgspec.json.decode(op.payload) for op in ops]


def test_person_becomes_contact_conversation_tags_and_write_back() -> None:
    ops = flow()(event("person", KEY, person()))
    assert [op.kind for op in ops] == [
        "ghl.upsert_contact",
        "ghl.ensure_conversation",
        "ghl.sync_tags",
        "an.write_back",
    ]
    assert {op.entity for op in ops} == {KEY}
    upsert, _, tags, write = payloads(ops)
    assert upsert["fields"] == {
        "firstName": "Ada",
        "lastName": "Lovelace",
        "email": "ada@example.org",
        "phone": "+15035550142",
        "source": "Action Network",
    }
    assert tags["tags"] == ["donor", "volunteer"]
    assert write == {
        "person": KEY,
        "person_id": "p1",
        "contact_field": "ghl_contact_id",
        "conversation_field": "ghl_conversation_id",
        "current": {},
    }
    assert ops[3].target == "an:an-main"


def test_write_back_carries_the_values_already_in_action_network() -> None:
    data = person(custom_fields={"ghl_contact_id": "c1", "Volunteer level": "2"})
    write = payloads(flow()(event("person", KEY, data)))[-1]
    assert write["current"] == {"ghl_contact_id": "c1"}


def test_write_back_can_be_turned_off() -> None:
    ops = flow(write_back={"contact_id": "", "conversation_id": ""})(event("person", KEY, person()))
    assert "an.write_back" not in [op.kind for op in ops]


def test_person_without_email_or_phone_is_rejected() -> None:
    with pytest.raises(Rejected, match="neither an email nor a phone"):
        flow()(event("person", KEY, person(email=None, phone=None)))


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({}, 'Signed petition "Clean Water Now"'),
        ({"comments": "Our kids"}, 'Signed petition "Clean Water Now": "Our kids"'),
        (
            {"type": "donation", "amount": "25.00", "currency": "USD", "recurring": True},
            'Donated 25.00 USD (recurring) on fundraising page "Clean Water Now"',
        ),
        (
            {"type": "attendance", "status": "accepted"},
            'RSVP "accepted" to event "Clean Water Now"',
        ),
        ({"type": "submission", "action_title": None}, "Submitted form"),
        (
            {
                "type": "outreach",
                "subject": "Fund the library",
                "message": "Please vote yes.",
                "targets": [{"title": "Rep.", "given_name": "Jo", "family_name": "Ng"}],
            },
            'Wrote to Rep. Jo Ng via "Clean Water Now"\nSubject: Fund the library\n\n'
            "Please vote yes.",
        ),
    ],
)
def test_activity_becomes_an_inbound_message(changes: dict[str, Any], text: str) -> None:
    key = "an-main:signature:s1"
    (op,) = flow()(event("activity", key, activity(**changes)))
    body = msgspec.json.decode(op.payload)
    assert op.kind == "ghl.inbound_message"
    assert op.entity == KEY  # ordered with the person's other ops
    assert op.source_key == key  # becomes GHL's altId
    assert body["message"] == text
    assert body["type"] == "SMS"
    assert body["date"] == "2026-03-01T10:00:00Z"


def test_message_type_subject_and_text_come_from_the_profile() -> None:
    profile = {
        "messages": {
            "signature": {
                "type": "Email",
                "template": "{action_title}: {comments}",
                "subject": "Petition {action_title}",
            }
        }
    }
    (op,) = flow(profile)(event("activity", "k", activity(comments="Yes")))
    body = msgspec.json.decode(op.payload)
    assert (body["type"], body["subject"], body["message"]) == (
        "Email",
        "Petition Clean Water Now",
        "Clean Water Now: Yes",
    )


@pytest.mark.parametrize(
    ("profile", "extra", "where"),
    [
        (
            {"messages": {"signature": {"type": "Fax", "template": "x"}}},
            {},
            "messages.signature.type",
        ),
        ({"messages": {"petition": {"template": "x"}}}, {}, "messages.petition"),
        (
            {"messages": {"signature": {"type": "Custom", "template": "x"}}},
            {},
            "conversation_provider_id",
        ),
        (None, {"rules": [{"name": "r", "note": "x"}]}, "rules[0]"),
        (
            None,
            {"rules": [{"name": "r", "when_tag": "a", "when_activity": "donation", "note": "x"}]},
            "rules[0]",
        ),
        (None, {"rules": [{"name": "r", "when_tag": "a"}]}, "rules[0]"),
        (
            None,
            {"rules": [{"name": "r", "when_activity": "petition", "note": "x"}]},
            "when_activity",
        ),
        (
            None,
            {"rules": [{"name": "r", "when_tag": "a", "when_action": "x", "note": "x"}]},
            "when_action",
        ),
    ],
)
def test_bad_messages_and_rules_are_config_errors(
    profile: dict[str, Any] | None, extra: dict[str, Any], where: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        flow(profile, **extra)
    assert where in caught.value.path


def test_tag_rule_fires_a_task_status_and_tags_keyed_by_the_rule() -> None:
    rules = [
        {
            "name": "callback",
            "when_tag": "volunteer",
            "task": {"title": "Call {given_name}", "due_in": "2d"},
            "starred": True,
            "add_tags": ["to call"],
        }
    ]
    ops = flow(rules=rules)(event("person", KEY, person()))
    fired = [op for op in ops if ":rule:" in op.source_key]
    assert [(op.kind, op.source_key) for op in fired] == [
        ("ghl.change_tags", f"{KEY}:rule:callback:tags"),
        ("ghl.update_conversation", f"{KEY}:rule:callback:status"),
        ("ghl.add_task", f"{KEY}:rule:callback:task"),
    ]
    task = msgspec.json.decode(fired[-1].payload)
    assert (task["title"], task["due_in"]) == ("Call Ada", 172800.0)
    # The person's content hash must land on an op filed under the person's own key.
    assert ops[-1].source_key != KEY


def test_activity_rule_matches_type_and_action() -> None:
    rules = [
        {"name": "water", "when_activity": "signature", "when_action": "pet1", "note": "{comments}"}
    ]
    f = flow(rules=rules)
    assert len(f(event("activity", "a1", activity(comments="hi")))) == 2
    assert len(f(event("activity", "a2", activity(action_id="other", action_title="Other")))) == 1
    assert len(f(event("activity", "a3", activity(type="donation")))) == 1


def test_tags_event_syncs_tags_under_its_own_key() -> None:
    rules = [{"name": "r", "when_tag": "host", "unread": True}]
    data = TagsData(person_key=KEY, person_id="p1", tags=["host"])
    ops = flow(rules=rules)(event("tags", "an-main:tags:p1", data))
    assert [(op.kind, op.entity, op.source_key) for op in ops] == [
        ("ghl.sync_tags", KEY, "an-main:tags:p1"),
        ("ghl.update_conversation", KEY, f"{KEY}:rule:r:status"),
    ]


# ----------------------------------------------------------------- write-back target


class RecordingClient:
    def __init__(self) -> None:
        self.puts: list[tuple[str, dict[str, str]]] = []

    async def update_person(self, person_id: str, custom_fields: Mapping[str, str]) -> None:
        self.puts.append((person_id, dict(custom_fields)))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


def as_op(write: WriteBackIds) -> Op:
    return outbox_op(write_back_op("an:an-main", write))


async def test_write_back_sends_only_what_differs(store: Store) -> None:
    client = RecordingClient()
    target = AnWriteBackTarget(client, store)  # type: ignore[arg-type]  # a recording fake
    update = IdMapUpdate(source_key=KEY, contact_id="c1", conversation_id="v1")
    await store.complete(
        as_op(WriteBackIds(person=KEY, person_id="p1")), OpResult(updates=(update,)), now=1.0
    )
    for current in (
        {},
        {"ghl_contact_id": "c1"},
        {"ghl_contact_id": "c1", "ghl_conversation_id": "v1"},
    ):
        write = WriteBackIds(
            person=KEY,
            person_id="p1",
            contact_field="ghl_contact_id",
            conversation_field="ghl_conversation_id",
            current=current,
        )
        await target.send(as_op(write))
    assert client.puts == [
        ("p1", {"ghl_contact_id": "c1", "ghl_conversation_id": "v1"}),
        ("p1", {"ghl_conversation_id": "v1"}),
    ]


async def test_write_back_without_a_contact_is_rejected(store: Store) -> None:
    target = AnWriteBackTarget(RecordingClient(), store)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="no GHL contact"):
        await target.send(as_op(WriteBackIds(person=KEY, person_id="p1", contact_field="f")))
