"""ActiveDEMAND events -> ops: messages, files, calls, statuses, routing, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import structlog

from bridge.config import ActiveDemandSource, MappingProfile
from bridge.connectors.ad_models import (
    AttachmentData,
    CallData,
    ContactData,
    ConversationData,
    MessageData,
)
from bridge.connectors.ad_target import AddHistory, FetchRecording, SubmitForm, decode_ad_op
from bridge.connectors.ghl.ops import (
    AddNote,
    AssignContact,
    ChangeTags,
    InboundMessage,
    UpdateConversation,
    UpdateMessageStatus,
    UploadAttachment,
    UpsertContact,
    decode_op,
)
from bridge.errors import ConfigError, Rejected
from bridge.flows.activedemand import ActiveDemandFlow
from bridge.models import NewOp
from bridge.secrets import Secret
from tests.test_an_flows import _durations

PERSON = "ad-main:contact:7"
KEY = "ad-main:message:70"


def source(**extra: Any) -> ActiveDemandSource:
    return msgspec.convert(
        {"name": "ad-main", "location": "main", "api_key": Secret("k" * 12), **extra},
        ActiveDemandSource,
        dec_hook=_durations,
    )


def flow(profile: Any = None, **extra: Any) -> ActiveDemandFlow:
    compiled = None if profile is None else msgspec.convert(profile, MappingProfile)
    return ActiveDemandFlow(source(**extra), compiled, ghl_target="ghl:main", ad_target="ad:main")


def message(**changes: Any) -> MessageData:
    fields: dict[str, Any] = {
        "id": "70",
        "conversation_id": "5",
        "conversation_key": "ad-main:conversation:5",
        "contact_id": "7",
        "contact_key": PERSON,
        "channel": "sms",
        "direction": "inbound",
        "type": "text",
        "subject": None,
        "body": "Can I help on Saturday?",
        "created": datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        "sender": None,
        "status": "received",
        "status_updated": None,
        "error": None,
        "attachments": [],
        "call": None,
    }
    return MessageData(**(fields | changes))


def payloads(ops: list[NewOp]) -> list[Any]:
    return [
        decode_ad_op(o.payload) if o.target.startswith("ad:") else decode_op(o.payload) for o in ops
    ]


def test_contact_becomes_an_upsert_and_its_conversation() -> None:
    contact = ContactData(
        id="7",
        first_name=" Rosa ",
        last_name="Delgado",
        email="ROSA@example.org",
        phone="(503) 555-0142",
        custom={},
        other={},
    )
    ops = flow().contact_ops(contact)
    upsert = decode_op(ops[0].payload)
    assert isinstance(upsert, UpsertContact)
    assert upsert.person == PERSON
    assert (upsert.fields.first_name, upsert.fields.email) == ("Rosa", "rosa@example.org")
    assert upsert.fields.phone == "+15035550142"
    assert upsert.fields.source == "ActiveDEMAND"
    assert [o.kind for o in ops] == ["ghl.upsert_contact", "ghl.ensure_conversation"]


def test_text_message_keeps_its_metadata() -> None:
    ops = flow().message_ops(KEY, message(sender="Sam (front desk)"))
    (inbound,) = payloads(ops)
    assert isinstance(inbound, InboundMessage)
    assert ops[0].source_key == KEY  # becomes the altId
    assert ops[0].entity == PERSON
    assert inbound.type == "SMS"
    assert inbound.direction == "inbound"
    assert inbound.date == "2026-03-01T12:00:00Z"
    assert inbound.message == "Can I help on Saturday?\n— Sam (front desk)"


def test_channels_choose_the_ghl_type_and_outbound_is_recorded_or_skipped() -> None:
    email = payloads(flow().message_ops(KEY, message(channel="email", subject="Hi")))[0]
    assert (email.type, email.subject) == ("Email", "Hi")
    chat = payloads(flow().message_ops(KEY, message(channel="web_chat")))[0]
    assert chat.type == "WebChat"
    other = payloads(flow().message_ops(KEY, message(channel="carrier-pigeon")))[0]
    assert other.type == "SMS"
    sent = payloads(flow().message_ops(KEY, message(direction="outbound", status="sent")))
    assert sent[0].direction == "outbound"
    assert flow(outbound="skip").message_ops(KEY, message(direction="outbound")) == []


@pytest.mark.parametrize(
    ("status", "ghl"),
    [
        ("queued", "pending"),
        ("delivered", "delivered"),
        ("undelivered", "failed"),
        ("read", "read"),
    ],
)
def test_delivery_status_becomes_a_status_op_after_the_message(status: str, ghl: str) -> None:
    ops = flow().message_ops(KEY, message(direction="outbound", status=status, error="x"))
    _inbound, update = payloads(ops)
    assert isinstance(update, UpdateMessageStatus)
    assert (update.status, update.message_key, update.error) == (ghl, KEY, "x")
    assert ops[1].source_key == f"{KEY}:status"


def test_received_has_no_ghl_status() -> None:
    assert len(flow().message_ops(KEY, message(status="received"))) == 1


def test_files_upload_first_and_the_message_references_them() -> None:
    files = [
        AttachmentData(
            url="https://files.example/a/flyer.png", content_type=None, size=10, file_name=None
        ),
        AttachmentData(
            url="https://files.example/b", content_type=None, size=None, file_name="x.pdf"
        ),
    ]
    ops = flow().message_ops(KEY, message(type="media", body="", attachments=files))
    first, second, inbound = payloads(ops)
    assert isinstance(first, UploadAttachment)
    assert first.file_name == "flyer.png"
    assert isinstance(second, UploadAttachment)
    assert second.file_name == "x.pdf"
    assert inbound.attachment_keys == [f"{KEY}:file:0", f"{KEY}:file:1"]
    assert inbound.message == ""  # a files-only message is fine


def test_a_message_with_nothing_in_it_is_rejected() -> None:
    with pytest.raises(Rejected, match="no text and no files"):
        flow().message_ops(KEY, message(body=""))


def test_a_message_without_contact_is_rejected() -> None:
    with pytest.raises(Rejected, match="names no contact"):
        flow().message_ops(KEY, message(contact_key=None, contact_id=None))


CALL = CallData(duration=125, recording=True, transcription=True)
TRANSCRIPT = "agent: Can we count on you?\ncontact: Yes, I will canvass on Saturday."


def test_recorded_call_fetches_uploads_and_notes_the_transcript() -> None:
    ops = flow().message_ops(
        KEY, message(type="call", channel="phone", body="", call=CALL, transcript=TRANSCRIPT)
    )
    kinds = [o.kind for o in ops]
    assert kinds == [
        "ad.fetch_recording",
        "ghl.upload_attachment",
        "ghl.inbound_message",
        "ghl.add_note",
        "ad.add_history",
    ]
    fetch, upload, inbound, note, history = payloads(ops)
    assert isinstance(fetch, FetchRecording)
    assert fetch.file == "recordings/ad-main/70.wav"
    assert upload.local == fetch.file
    assert inbound.type == "Call"
    assert inbound.call_status == "completed"
    assert inbound.message == "Inbound call, 2m 05s"
    assert inbound.attachment_keys == [f"{KEY}:recording"]
    assert isinstance(note, AddNote)
    assert TRANSCRIPT in note.body
    assert note.links == {"Recording": f"{KEY}:recording"}
    assert isinstance(history, AddHistory)
    assert history.contact_id == "7"
    assert history.kind == "note"
    assert TRANSCRIPT in history.text
    assert {o.entity for o in ops} == {PERSON}  # one ordered queue across both targets


def test_missed_call_has_no_recording_and_says_so() -> None:
    missed = CallData(duration=0, recording=False, transcription=False)
    (inbound,) = payloads(flow().message_ops(KEY, message(type="call", body="", call=missed)))
    assert (inbound.message, inbound.call_status) == ("Missed call", "no-answer")


def test_routing_rules_assign_tag_and_alert_and_log_the_match() -> None:
    rules = [
        {
            "name": "volunteer",
            "keywords": ["canvass", "phone bank"],
            "assign_to": "user-1",
            "add_tags": ["volunteer lead"],
            "alert": "{rule}: heard {matched}",
        },
        {"name": "refund", "pattern": r"refund(ed)?", "add_tags": ["billing"]},
        {"name": "partial-word", "keywords": ["canv"], "add_tags": ["never"]},
    ]
    with structlog.testing.capture_logs() as logs:
        ops = flow(routing=rules).message_ops(
            KEY, message(type="call", body="", call=CALL, transcript=TRANSCRIPT)
        )
    fired = [(o.kind, o.source_key) for o in ops if ":rule:" in o.source_key]
    assert fired == [
        ("ghl.change_tags", f"{KEY}:rule:volunteer:tags"),
        ("ghl.assign_contact", f"{KEY}:rule:volunteer:assign"),
        ("ad.add_history", f"{KEY}:rule:volunteer:alert"),
    ]
    by_key = dict(zip((o.source_key for o in ops), payloads(ops), strict=True))
    tags = by_key[f"{KEY}:rule:volunteer:tags"]
    assert isinstance(tags, ChangeTags)
    assert tags.add == ["volunteer lead"]
    assign = by_key[f"{KEY}:rule:volunteer:assign"]
    assert isinstance(assign, AssignContact)
    assert assign.user_id == "user-1"
    alert = by_key[f"{KEY}:rule:volunteer:alert"]
    assert isinstance(alert, AddHistory)
    assert alert.text == "volunteer: heard canvass"
    matched = [e for e in logs if e["event"] == "routing_rule_matched"]
    assert [(e["rule"], e["matched"]) for e in matched] == [("volunteer", "canvass")]


def test_history_by_form_carries_templates_for_send_time() -> None:
    settings = {
        "via": "form",
        "form_id": "3",
        "fields": {"emails.email_address": "{email}", "custom_9": "{text}"},
    }
    ops = flow(history=settings).message_ops(
        KEY, message(type="call", body="", call=CALL, transcript=TRANSCRIPT)
    )
    form = payloads(ops)[-1]
    assert isinstance(form, SubmitForm)
    assert form.form_id == "3"
    assert form.fields == settings["fields"]
    assert TRANSCRIPT in form.record["text"]


def test_conversation_status_maps_to_unread_and_starred() -> None:
    conv = ConversationData(
        id="5", contact_id="7", contact_key=PERSON, channel="sms", status="closed", created=None
    )
    ops = flow().conversation_ops("ad-main:conversation:5", conv)
    assert [o.source_key for o in ops] == [
        "ad-main:conversation:5",
        "ad-main:conversation:5:status",
    ]
    update = payloads(ops)[1]
    assert isinstance(update, UpdateConversation)
    assert update.unread_count == 0
    opened = msgspec.structs.replace(conv, status="open")
    assert len(flow().conversation_ops("k", opened)) == 1
    starred = flow(conversation_status={"vip": {"starred": True}}).conversation_ops(
        "k", msgspec.structs.replace(conv, status="vip")
    )
    assert payloads(starred)[1].starred is True


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"routing": [{"name": "r", "add_tags": ["t"]}]}, "routing[0]"),
        (
            {"routing": [{"name": "r", "keywords": ["a"], "pattern": "b", "add_tags": ["t"]}]},
            "routing[0]",
        ),
        ({"routing": [{"name": "r", "pattern": "(", "add_tags": ["t"]}]}, "routing[0].pattern"),
        ({"routing": [{"name": "r", "keywords": ["a"]}]}, "routing[0]"),
        ({"history": {"via": "form"}}, "history.form_id"),
        ({"history": {"via": "form", "form_id": "1"}}, "history.fields"),
        (
            {
                "history": {"via": "none"},
                "routing": [{"name": "r", "keywords": ["a"], "alert": "x"}],
            },
            "history.via",
        ),
    ],
)
def test_config_mistakes_name_their_key(extra: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        flow(**extra)
    assert caught.value.path.endswith(path)


def test_bad_message_type_in_profile_names_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        flow({"messages": {"sms": {"type": "Fax", "template": "{body}"}}})
    assert caught.value.path == "$.mapping.activedemand.messages.sms.type"
