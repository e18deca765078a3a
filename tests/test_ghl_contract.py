"""Every request the GHL client makes is checked against the official OpenAPI operation."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from bridge.connectors.ghl.client import CONVERSATIONS_VERSION, GhlClient
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
from tests.conftest import GhlServer, MakeGhlClient

OPENAPI = Path(__file__).parents[2] / "shared" / "reference" / "ghl" / "openapi"
SPEC_FILES = ("conversations.json", "contacts.json")

# Where the official files are wrong about the live API (API_FACTS §9 and §11), keyed by
# operation and the problem the checker reports. Each entry must be hit by the run, so a
# fixed spec or a changed client makes the table fail rather than silently rot.
SPEC_DEFECTS: dict[tuple[str, str], str] = {
    # §11: the filter is a comma-separated list of the enum values; the spec allows one.
    ("GET /conversations/{conversationId}/messages", "comma-list:?type"): "type is a list",
    # §2.3, §11: conversationProviderId is required only for custom providers; default
    # SMS/Email providers must omit it.
    ("POST /conversations/messages/inbound", "required:$.conversationProviderId"): "custom only",
    # §9.4: direction is typed "object" (default outbound); real values are strings.
    ("POST /conversations/messages/inbound", "type:$.direction"): "direction is a string",
    # §9.3: the 2026 spec made subType and status required; real callers send neither.
    ("POST /conversations/messages", "required:$.subType"): "subType is optional",
    ("POST /conversations/messages", "required:$.status"): "status is optional",
    # §9.1: the spec forgets to declare the {id} path parameter.
    ("GET /conversations/messages/{id}", "path-param:id"): "id is a path parameter",
    # §9.5: the file part is named only in the operation's description.
    ("POST /conversations/messages/upload", "undeclared:$.fileAttachment"): "file part",
    # attachmentUrls is the alternative to file parts, and multipart cannot carry an empty
    # array, so a files-only upload leaves it out (the sim and live accept that).
    ("POST /conversations/messages/upload", "required:$.attachmentUrls"): "files instead",
    # §1, §9.8: the two email ops declare no Version (we send 2021-04-15) and the GET
    # declares no path parameter.
    ("GET /conversations/messages/email/{id}", "version-undeclared"): "send 2021-04-15",
    ("GET /conversations/messages/email/{id}", "path-param:id"): "id is a path parameter",
    (
        "DELETE /conversations/messages/email/{emailMessageId}/schedule",
        "version-undeclared",
    ): "send 2021-04-15",
}

EXPECTED_OPERATIONS = {
    "GET /conversations/search",
    "GET /conversations/{conversationId}",
    "POST /conversations/",
    "PUT /conversations/{conversationId}",
    "DELETE /conversations/{conversationId}",
    "GET /conversations/{conversationId}/messages",
    "GET /conversations/messages/{id}",
    "GET /conversations/messages/email/{id}",
    "GET /conversations/messages/export",
    "POST /conversations/messages",
    "POST /conversations/messages/inbound",
    "POST /conversations/messages/outbound",
    "POST /conversations/messages/upload",
    "PUT /conversations/messages/{messageId}/status",
    "DELETE /conversations/messages/{messageId}/schedule",
    "DELETE /conversations/messages/email/{emailMessageId}/schedule",
    "GET /conversations/messages/{messageId}/locations/{locationId}/recording",
    "GET /conversations/locations/{locationId}/messages/{messageId}/transcription",
    "GET /conversations/locations/{locationId}/messages/{messageId}/transcription/download",
    "POST /contacts/upsert",
    "GET /contacts/{contactId}",
    "GET /contacts/search/duplicate",
    "PUT /contacts/{contactId}",
    "POST /contacts/{contactId}/tags",
    "DELETE /contacts/{contactId}/tags",
    "POST /contacts/{contactId}/notes",
    "PUT /contacts/{contactId}/notes/{id}",
    "GET /contacts/{contactId}/notes",
    "POST /contacts/{contactId}/tasks",
    "GET /contacts/{contactId}/tasks",
}


# --------------------------------------------------------------------------- the spec


@cache
def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def resolve(node: Any, base: Path) -> tuple[Any, Path]:
    """Follow ``$ref`` chains, local or into another file, returning the node and its file."""
    while isinstance(node, dict) and "$ref" in node:
        file_part, _, pointer = node["$ref"].partition("#")
        if file_part:
            base = (base.parent / file_part).resolve()
        node = load(base)
        for token in pointer.strip("/").split("/") if pointer.strip("/") else []:
            node = node[token.replace("~1", "/").replace("~0", "~")]
    return node, base


@dataclass(frozen=True)
class Operation:
    name: str  # "GET /conversations/{conversationId}"
    template: str
    pattern: re.Pattern[str]
    op: dict[str, Any]
    base: Path

    def params(self, where: str) -> dict[str, dict[str, Any]]:
        out = {}
        for raw in self.op.get("parameters", []):
            param, _ = resolve(raw, self.base)
            if param.get("in") == where:
                out[param["name"]] = param
        return out


def operations() -> list[Operation]:
    ops = []
    for name in SPEC_FILES:
        base = (OPENAPI / name).resolve()
        for template, methods in load(base)["paths"].items():
            regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            for method, op in methods.items():
                label = f"{method.upper()} {template}"
                ops.append(Operation(label, template, re.compile(regex), op, base))
    return ops


def find_operation(ops: list[Operation], method: str, path: str) -> Operation | None:
    matches = [o for o in ops if o.name.split()[0] == method and o.pattern.fullmatch(path)]
    # A literal segment beats a template that would also match (/messages/export vs {id}).
    return min(matches, key=lambda o: o.template.count("{"), default=None)


def type_ok(kind: Any, value: Any) -> bool:
    checks: dict[str, Any] = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    check = checks.get(kind) if isinstance(kind, str) else None
    return True if check is None else bool(check(value))


def check_value(value: Any, schema: Any, base: Path, where: str) -> list[str]:
    """Problems of a JSON value: missing required, undeclared properties, types, enums."""
    schema, base = resolve(schema, base)
    problems: list[str] = []
    for part in schema.get("allOf", []):
        problems += check_value(value, part, base, where)
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives and all(check_value(value, alt, base, where) for alt in alternatives):
        problems.append(f"no-alternative:{where}")
    if not type_ok(schema.get("type"), value):
        return [*problems, f"type:{where}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"enum:{where}")
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        problems += [f"required:{where}.{r}" for r in schema.get("required", []) if r not in value]
        for key, item in value.items():
            if key in props:
                problems += check_value(item, props[key], base, f"{where}.{key}")
            elif props:  # an object with no declared properties is free-form (feedback)
                problems.append(f"undeclared:{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for item in value:
            problems += check_value(item, schema["items"], base, f"{where}[]")
    return problems


def check_query(op: Operation, query: dict[str, str]) -> list[str]:
    declared = op.params("query")
    problems = [f"undeclared-query:{name}" for name in query if name not in declared]
    for name, param in declared.items():
        if name not in query:
            problems += [f"required-query:{name}"] if param.get("required") else []
            continue
        schema = param.get("schema", {})
        enum, value = schema.get("enum"), query[name]
        if enum is not None and value not in enum:
            parts = value.split(",")
            listed = len(parts) > 1 and all(p in enum for p in parts)
            problems.append(f"comma-list:?{name}" if listed else f"enum:?{name}")
        if schema.get("type") == "number" and not re.fullmatch(r"-?\d+(\.\d+)?", value):
            problems.append(f"type:?{name}")
    return problems


def check_headers(op: Operation, headers: CIMultiDict[str]) -> list[str]:
    version = op.params("header").get("Version")
    sent = headers.get("Version")
    if version is None:
        return ["version-undeclared" if sent == CONVERSATIONS_VERSION else "version-mismatch"]
    return [] if sent in version["schema"]["enum"] else ["version-mismatch"]


def check_body(op: Operation, body: bytes) -> list[str]:
    content = op.op.get("requestBody", {}).get("content", {})
    if not content:
        return ["unexpected-body"] if body else []
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        return check_value(json.loads(body), schema, op.base, "$")
    schema, _ = resolve(content["multipart/form-data"]["schema"], op.base)
    names = set(re.findall(rb'Content-Disposition: form-data; name="([^"]+)"', body))
    fields = {n.decode() for n in names}
    props = schema.get("properties", {})
    problems = [f"required:$.{r}" for r in schema.get("required", []) if r not in fields]
    return problems + [f"undeclared:$.{n}" for n in sorted(fields) if n not in props]


def check_request(op: Operation, sent: Sent) -> list[str]:
    path_params = op.params("path")
    problems = [
        f"path-param:{name}"
        for name in re.findall(r"\{([^}]+)\}", op.template)
        if name not in path_params
    ]
    problems += check_headers(op, sent.headers)
    problems += check_query(op, dict(sent.url.query))
    return problems + check_body(op, bytes(sent.body))


# --------------------------------------------------------------------------- capture


@dataclass
class Sent:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytearray = field(default_factory=bytearray)


def recorder(sent: list[Sent]) -> aiohttp.TraceConfig:
    """A trace config that keeps every request's method, URL, headers and body bytes."""

    async def on_start(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        ctx.sent = Sent(params.method, params.url, CIMultiDict(params.headers))
        sent.append(ctx.sent)

    async def on_chunk(
        _: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        ctx.sent.body.extend(params.chunk)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_chunk_sent.append(on_chunk)
    return trace


async def exercise(client: GhlClient, server: GhlServer, tmp_path: Path) -> None:
    """Call every client method once, as the bridge would, against the simulator."""
    field_id = server.sim.add_custom_field(server.location_id, "member_since")
    provider = server.sim.add_conversation_provider(server.location_id)
    upserted = await client.upsert_contact(ContactUpsert(email="ada@example.org", first_name="A"))
    cid = upserted.contact.id
    await client.get_contact(cid)
    await client.find_duplicate_contact(email="ada@example.org", phone="+15035550100")
    fields = (CustomFieldValue(id=field_id, key="member_since", field_value="2020"),)
    await client.update_contact(cid, ContactUpdate(last_name="L", custom_fields=fields))
    await client.add_tags(cid, ["member", "donor"])
    await client.remove_tags(cid, ["donor"])
    note = await client.add_note(cid, NewNote(body="signed", title="AN", pinned=False))
    await client.update_note(cid, note.id, NoteUpdate(body="signed twice"))
    await client.list_notes(cid)
    due = datetime(2026, 2, 1, tzinfo=UTC)
    await client.add_task(cid, NewTask(title="Call", due_date=due, completed=False))
    await client.list_tasks(cid)

    conv = await client.create_conversation(cid)
    await client.create_conversation(cid)  # the AlreadyExists path: a search by contactId
    await client.get_conversation(conv.id)
    await client.update_conversation(conv.id, unread_count=0, starred=True, feedback={"x": 1})
    await client.search_conversations(ConversationSearch(status="all", sort="desc", limit=5))

    sms = InboundMessage(
        type="SMS", conversation_id=conv.id, contact_id=cid, alt_id="an:1", message="hi"
    )
    inbound = await client.add_inbound_message(sms)
    email = InboundMessage(
        type="Email",
        conversation_id=conv.id,
        contact_id=cid,
        alt_id="ad:1",
        subject="s",
        html="<p>x</p>",
        email_from="ada@example.org",
        email_to="team@example.org",
    )
    emailed = await client.add_inbound_message(email)
    call = CallData(to="+15035550101", from_="+15035550100", status="completed")
    logged = await client.log_outbound_call(
        OutboundCall(conversation_id=conv.id, conversation_provider_id=provider, call=call)
    )
    await client.list_messages(conv.id, limit=10, types=["TYPE_SMS", "TYPE_CALL"])
    await client.find_message_by_alt_id(conv.id, "an:1")
    await client.get_message(inbound.message_id)
    assert emailed.email_message_id is not None
    await client.get_email_message(emailed.email_message_id)
    await client.export_messages(MessageExport(limit=10, channel="SMS"))
    await client.update_message_status(inbound.message_id, "read")

    later = 1_800_000_000
    scheduled = await client.send_message(
        SendMessage(type="SMS", contact_id=cid, message="hi", scheduled_timestamp=later)
    )
    scheduled_email = await client.send_message(
        SendMessage(type="Email", contact_id=cid, subject="s", html="x", scheduled_timestamp=later)
    )
    assert scheduled.message_id is not None
    assert scheduled_email.email_message_id is not None
    await client.cancel_scheduled_message(scheduled.message_id)
    await client.cancel_scheduled_email(scheduled_email.email_message_id)

    flyer = tmp_path / "flyer.pdf"
    flyer.write_bytes(b"%PDF-1.4 tiny")
    await client.upload_attachments(conv.id, cid, [flyer, ("card.vcf", io.BytesIO(b"VCARD"))])
    await client.download_recording(logged.message_id, tmp_path / "call.wav")
    await client.get_transcription(logged.message_id)
    await client.download_transcription(logged.message_id)
    await client.delete_conversation(conv.id)


# --------------------------------------------------------------------------- tests


@pytest.fixture
def openapi_dir() -> Path:
    if not OPENAPI.is_dir():
        pytest.skip(
            "../shared/reference/ghl/openapi not found: the contract test needs the official "
            "OpenAPI files beside the checkout"
        )
    return OPENAPI


def walk_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node
        for value in node.values():
            yield from walk_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_refs(value)


def test_every_ref_in_the_specs_resolves(openapi_dir: Path) -> None:
    """Every $ref in the OpenAPI files, the cross-file common schemas included, resolves."""
    refs = 0
    for path in sorted(openapi_dir.glob("*.json")):
        base = path.resolve()
        for ref in walk_refs(load(base)):
            target, _ = resolve(ref, base)
            assert isinstance(target, dict), ref
            refs += 1
    assert refs > 100


async def test_every_request_matches_its_openapi_operation(
    openapi_dir: Path, make_ghl_client: MakeGhlClient, ghl_server: GhlServer, tmp_path: Path
) -> None:
    """Each request's path, method, query, Version header and body fit the official spec."""
    sent: list[Sent] = []
    async with aiohttp.ClientSession(trace_configs=[recorder(sent)]) as session:
        await exercise(make_ghl_client(session=session), ghl_server, tmp_path)
    ops = operations()
    problems: list[str] = []
    used: set[tuple[str, str]] = set()
    covered: set[str] = set()
    for request in sent:
        op = find_operation(ops, request.method, request.url.path)
        if op is None:
            problems.append(f"{request.method} {request.url.path}: no such operation")
            continue
        covered.add(op.name)
        for problem in check_request(op, request):
            if (op.name, problem) in SPEC_DEFECTS:
                used.add((op.name, problem))
            else:
                problems.append(f"{op.name}: {problem}")
    assert problems == []
    assert covered == EXPECTED_OPERATIONS
    assert set(SPEC_DEFECTS) - used == set(), "allowed defects no request needed"
    assert all(r.headers["Authorization"].startswith("Bearer pit-") for r in sent)
