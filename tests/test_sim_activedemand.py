"""The ActiveDEMAND simulator, driven over real loopback HTTP with a plain aiohttp client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from bridge.sim.activedemand import build_app
from bridge.sim.activedemand_state import EMAIL, PHONE, AdSim, iso
from bridge.sim.ad_data import SeededAccount, build_sim, seed_account
from bridge.sim.an_data import ANCHOR, HOUR
from bridge.sim.common import serve

KEY = "test-ad-key-0123456789abcdef"
OTHER = "other-ad-key-fedcba9876543210"
APP = "partner-app-key-0001"
OTHER_APP = "partner-app-key-0002"
WALL0 = ANCHOR + HOUR
CONTACTS = 120
BIG = 6 * 1024 * 1024


class FakeClock:
    """A clock the test moves by hand (used for both monotonic and wall time)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Resp:
    status: int
    raw: bytes
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return json.loads(self.raw)


class Api:
    """A thin caller that sends the key as a header and paces itself at 2 requests/s."""

    def __init__(self, session: aiohttp.ClientSession, base: str, clock: FakeClock) -> None:
        self.session = session
        self.base = base
        self.clock = clock

    async def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = KEY,
        app: str | None = APP,
        pace: bool = True,
        **kwargs: Any,
    ) -> Resp:
        if pace:
            self.clock.advance(0.5)
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["x-api-key"] = key
        if app is not None:
            headers["X-Application-Api-Key"] = app
        url = path if path.startswith("http") else self.base + path
        async with self.session.request(method, url, headers=headers, **kwargs) as resp:
            return Resp(resp.status, await resp.read(), resp.headers)

    async def get(self, path: str, **params: Any) -> Resp:
        return await self.call("GET", path, params={k: str(v) for k, v in params.items()})

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = await self.call(method, path, **kwargs)
        assert r.status == 200, r.raw
        return r.json()

    async def walk(self, path: str, per_page: int = 7, **params: Any) -> list[dict[str, Any]]:
        """Every item of a bare-array list, paging until an empty page."""
        items: list[dict[str, Any]] = []
        for page in range(1, 1_000):
            r = await self.get(path, page=page, per_page=per_page, **params)
            assert r.status == 200, r.raw
            if not r.json():
                return items
            items.extend(r.json())
        raise AssertionError("no empty page")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(float(WALL0))


@pytest.fixture
def sim(clock: FakeClock, wall: FakeClock) -> AdSim:
    return AdSim(seed=1, clock=clock, wall=wall)


@pytest.fixture
def seeded(sim: AdSim) -> SeededAccount:
    made = seed_account(sim, KEY, contacts=CONTACTS, seed=7, oversized_bytes=BIG)
    seed_account(sim, OTHER, contacts=5, seed=8)
    sim.add_application(APP, accounts=[KEY])
    sim.add_application(OTHER_APP, accounts=[OTHER])
    return made


@pytest.fixture
async def api(sim: AdSim, seeded: SeededAccount, clock: FakeClock) -> AsyncIterator[Api]:
    async with serve(build_app(sim)) as base, aiohttp.ClientSession() as session:
        yield Api(session, base, clock)


def form(**values: str) -> dict[str, str]:
    """Keyword names cannot hold dots or brackets; ``__`` stands for ``.`` here."""
    return {k.replace("__", "."): v for k, v in values.items()}


# --------------------------------------------------------------------------- auth


async def test_missing_or_bad_key_is_401(api: Api, sim: AdSim) -> None:
    """No key or an unknown key gets 401 with an error body, and counts against no account."""
    for key in (None, "not-a-real-key"):
        r = await api.call("GET", "/v1/contacts.json", key=key, app=None)
        assert r.status == 401
        assert r.json() == {"error": "Invalid API key"}
    assert sim.rate_limited(KEY) == 0
    assert [e.tenant for e in sim.journal.select(route="/v1/contacts.json")] == [None, None]


async def test_key_works_as_header_query_or_form_field_and_is_never_journaled(
    api: Api, sim: AdSim
) -> None:
    """The key is accepted as x-api-key, as the api-key query parameter and as a POST form
    field; the journal and stats never show it."""
    assert (await api.call("GET", "/v1/forms.json", key=None, app=None)).status == 401
    r = await api.call("GET", "/v1/forms.json", key=None, params={"api-key": KEY})
    assert r.status == 200
    body = {"api-key": KEY, "contact[emails.email_address]": "form.key@example.org"}
    created = await api.ok("POST", "/v1/contacts.json", key=None, data=body)
    assert created[0]["emails.email_address"] == "form.key@example.org"
    entries = sim.journal.select(route="/v1/forms.json")
    assert entries[-1].query == {"api-key": "[redacted]"}
    assert {e.tenant for e in sim.journal.select(since=1)} == {sim.account_id(KEY)}
    journal = await api.ok("GET", f"{api.base}/_sim/journal")
    stats = await api.ok("GET", f"{api.base}/_sim/stats")
    assert KEY not in json.dumps(journal) + json.dumps(stats)


async def test_application_key_when_the_sim_requires_one(api: Api, sim: AdSim) -> None:
    """With an application key required: missing or unknown is 401, one not granted to the
    account is 403, the granted one passes; unrequired, v1 works without one."""
    assert (await api.call("GET", "/v1/forms.json", app=None)).status == 200
    sim.require_application_key = True
    assert (await api.call("GET", "/v1/forms.json", app=None)).status == 401
    assert (await api.call("GET", "/v1/forms.json", app="nope")).status == 401
    r = await api.call("GET", "/v1/forms.json", app=OTHER_APP)
    assert r.status == 403
    assert "not authorised" in r.json()["error"]
    assert sim.journal.select(route="/v1/forms.json")[-1].tenant == sim.account_id(KEY)
    assert (await api.call("GET", "/v1/forms.json")).status == 200
    assert (await api.call("GET", "/v1/forms.json", key=OTHER, app=OTHER_APP)).status == 200


async def test_partner_feeds_always_need_an_application_key(api: Api) -> None:
    """Conversations, messages and histories are partner-gated even when v1 is not."""
    for path in ("/v1/conversations.json", "/v1/histories.json", "/v1/messages/70001.json"):
        r = await api.call("GET", path, app=None)
        assert r.status == 401, path
        assert r.json() == {"error": "Missing application API key"}
    assert (await api.call("GET", "/v1/conversations.json")).status == 200


# --------------------------------------------------------------------------- v1 shapes


async def test_lists_are_bare_arrays_and_the_suffix_picks_the_format(
    api: Api, seeded: SeededAccount
) -> None:
    """forms.json is a bare array of {id, name}; forms.xml is XML; no suffix is a 404."""
    forms = await api.ok("GET", "/v1/forms.json")
    assert isinstance(forms, list)
    assert [f["id"] for f in forms] == list(seeded.form_ids)
    assert set(forms[0]) == {"id", "name"}
    r = await api.call("GET", "/v1/forms.xml")
    assert r.headers["Content-Type"].startswith("application/xml")
    first = f"<form><id>{forms[0]['id']}</id><name>Newsletter Sign-up</name></form>"
    assert first in r.raw.decode()
    for path in ("/v1/contacts", "/v1/forms"):
        r = await api.call("GET", path)
        assert (r.status, r.json()) == (404, {"error": "Not Found"})


async def test_contacts_page_in_id_order_with_a_capped_page_size(api: Api) -> None:
    """page/per_page walk every contact once in id order; per_page is capped at 100 and the
    default page is 50; bad paging values are a 400."""
    everyone = await api.walk("/v1/contacts.json")
    ids = [c["id"] for c in everyone]
    assert len(ids) == len(set(ids)) == CONTACTS
    assert ids == sorted(ids)
    assert len((await api.get("/v1/contacts.json")).json()) == 50
    assert len((await api.get("/v1/contacts.json", per_page=500)).json()) == 100
    for bad in ({"page": 0}, {"per_page": -1}, {"page": "two"}):
        r = await api.get("/v1/contacts.json", **bad)
        assert r.status == 400, bad
        assert "error" in r.json()


async def test_contacts_have_no_change_filter(api: Api, sim: AdSim) -> None:
    """An updated-since style parameter is ignored: the answer is the unfiltered page."""
    sim.update_contact(KEY, sim.contacts(KEY)[3].id)
    plain = await api.ok("GET", "/v1/contacts.json")
    for name in ("updated_since", "modified_since", "since"):
        filtered = await api.get("/v1/contacts.json", **{name: iso(WALL0 - 5)})
        assert filtered.json() == plain


async def test_an_api_ignoring_paging_repeats_the_first_page(api: Api, sim: AdSim) -> None:
    """With paging ignored every page is the first one, so a client must detect the repeat."""
    sim.ignore_paging = True
    first = (await api.get("/v1/contacts.json", page=1, per_page=10)).json()
    second = (await api.get("/v1/contacts.json", page=2, per_page=10)).json()
    assert first == second
    assert len(first) == 50


async def test_contacts_use_flattened_dotted_keys_and_no_timestamps(api: Api, sim: AdSim) -> None:
    """Contacts carry id, core fields (null when empty), set custom_<n> fields, no dates."""
    contacts = await api.walk("/v1/contacts.json", per_page=100)
    core = {"id", "first_name", "last_name", EMAIL, PHONE}
    for c in contacts:
        assert core <= set(c)
        assert all(k in core or k.startswith("custom_") for k in c)
        assert not {"created_at", "updated_at", "modified_at"} & set(c)
    assert any(c[EMAIL] is None for c in contacts)  # phone-only contacts exist
    assert any(c[PHONE] is None for c in contacts)
    phones = [c[PHONE] for c in contacts if c[PHONE]]
    assert any(p.startswith("(") for p in phones)
    assert any(p.startswith("+1") for p in phones)


async def test_create_contact_upserts_by_email(api: Api, sim: AdSim) -> None:
    """POST contacts.json with contact[...] fields answers [contact]; the same e-mail in any
    case updates that contact; unknown fields, no channel or a JSON body are refused."""
    body = {
        "contact[first_name]": "Nia",
        "contact[last_name]": "Osei",
        "contact[emails.email_address]": "nia.osei@example.org",
        "contact[phones.phone_number]": "503-555-0199",
    }
    first = await api.ok("POST", "/v1/contacts.json", data=body)
    assert isinstance(first, list)
    assert first[0]["id"] > 0
    assert first[0][PHONE] == "503-555-0199"
    again = await api.ok(
        "POST",
        "/v1/contacts.json",
        data={"contact[emails.email_address]": "NIA.OSEI@example.org", "contact[first_name]": "N"},
    )
    assert again[0]["id"] == first[0]["id"]
    assert (again[0]["first_name"], again[0]["last_name"]) == ("N", "Osei")
    assert sim.counts(KEY)["contacts"] == CONTACTS + 1
    assert sim.contact(KEY, first[0]["id"]).revision == 2
    refused = [
        ({"contact[nickname]": "x", "contact[emails.email_address]": "a@b.org"}, 422),
        ({"contact[first_name]": "No Channel"}, 422),
        ({"contact[emails.email_address]": "no-at-sign"}, 422),
    ]
    for data, status in refused:
        assert (await api.call("POST", "/v1/contacts.json", data=data)).status == status, data
    r = await api.call("POST", "/v1/contacts.json", json={"contact": {"first_name": "J"}})
    assert r.status == 400
    assert sim.counts(KEY)["contacts"] == CONTACTS + 1


async def test_field_catalogue_and_one_custom_field(api: Api) -> None:
    """contacts/fields.json lists core and custom fields; field.json shows one, with a
    login_url for a password field; unknown or missing keys are refused."""
    fields = await api.ok("GET", "/v1/contacts/fields.json")
    keys = [f["key"] for f in fields]
    assert keys[:4] == ["first_name", "last_name", EMAIL, PHONE]
    dropdown = next(f for f in fields if f["type"] == "dropdown")
    assert dropdown["key"].startswith("custom_")
    assert "Volunteer" in dropdown["options"]
    password = next(f for f in fields if f["type"] == "password")
    one = await api.ok("GET", "/v1/contacts/field.json", params={"field_key": password["key"]})
    assert one["login_url"].startswith("https://")
    assert (await api.get("/v1/contacts/field.json", field_key="custom_1")).status == 404
    assert (await api.get("/v1/contacts/field.json")).status == 400


async def test_form_fields_and_embeddable_html(api: Api, seeded: SeededAccount) -> None:
    """forms/fields.json lists a form's keys with required flags; the form renders as HTML,
    without its stylesheet on exclude_css; a missing or unknown form is refused."""
    fid = seeded.form_ids[1]
    fields = await api.ok("GET", "/v1/forms/fields.json", params={"form_id": str(fid)})
    assert [f["key"] for f in fields][:4] == ["first_name", "last_name", EMAIL, PHONE]
    assert [f["key"] for f in fields if f["required"]] == [EMAIL]
    xml = await api.call("GET", "/v1/forms/fields.xml", params={"form_id": str(fid)})
    assert f"<key>{EMAIL}</key>" in xml.raw.decode()
    assert (await api.get("/v1/forms/fields.json")).status == 400
    assert (await api.get("/v1/forms/fields.json", form_id=1)).status == 404
    html = await api.call("GET", f"/v1/forms/{fid}")
    assert html.headers["Content-Type"].startswith("text/html")
    assert f'name="{EMAIL}"' in html.raw.decode()
    assert "<style>" in html.raw.decode()
    bare = await api.call("GET", f"/v1/forms/{fid}", params={"exclude_css": "1"})
    assert "<style>" not in bare.raw.decode()


async def test_form_submit_upserts_the_contact_and_leaves_a_history(
    api: Api, sim: AdSim, seeded: SeededAccount
) -> None:
    """A form-encoded submission with dotted keys answers 200 with no body, upserts the
    contact, keeps the submission (unknown keys set aside) and adds a form_submit history."""
    fid = seeded.form_ids[2]
    fields = await api.ok("GET", "/v1/forms/fields.json", params={"form_id": str(fid)})
    custom = next(f["key"] for f in fields if f["type"] == "dropdown")
    data = form(first_name="Rosa", emails__email_address="rosa.d@example.org", utm_source="ghl")
    data |= {custom: "Member", "api-key": KEY}
    r = await api.call("POST", f"/v1/forms/{fid}", key=None, data=data)
    assert (r.status, r.raw) == (200, b"")
    (sub,) = sim.submissions(KEY)
    assert sub.form_id == fid
    assert sub.ignored == {"utm_source": "ghl"}
    contact = sim.contact(KEY, sub.contact_id)
    assert contact.values[custom] == "Member"
    data = form(last_name="Delgado", emails__email_address="Rosa.D@example.org")
    r = await api.call("POST", f"/v1/forms/{fid}", data=data)
    assert r.status == 200
    assert sim.submissions(KEY)[-1].contact_id == contact.id
    assert contact.values["last_name"] == "Delgado"
    assert contact.revision == 2
    r = await api.call("POST", f"/v1/forms/{fid}", data=form(first_name="Anon"))
    assert r.status == 422
    assert len(sim.submissions(KEY)) == 2
    entries = await api.ok(
        "GET", "/v1/histories.json", params={"kind": "form_submit", "contact_id": str(contact.id)}
    )
    assert [(h["form_id"], h["kind"]) for h in entries] == [(fid, "form_submit")] * 2
    assert len(sim.histories(KEY, source="form")) == 2


async def test_updating_a_contact_bumps_its_marker_and_shows_in_the_list(
    api: Api, sim: AdSim, wall: FakeClock
) -> None:
    """update_contact changes what the list shows and moves the revision and updated time."""
    target = sim.contacts(KEY)[10]
    before = target.revision
    wall.advance(30)
    sim.update_contact(KEY, target.id, {"last_name": "Renamed"})
    assert (target.revision, target.updated) == (before + 1, WALL0 + 30)
    listed = await api.walk("/v1/contacts.json", per_page=100)
    assert next(c for c in listed if c["id"] == target.id)["last_name"] == "Renamed"
    sim.update_contact(KEY, target.id)  # the default change: one custom value
    assert target.revision == before + 2


async def test_one_contact_by_id_is_a_list_element_or_a_404(api: Api, sim: AdSim) -> None:
    """PROPOSED contacts/{id}.json answers the object contacts.json lists, leaves fields.json
    and field.json alone, is 404 for another account's or an unknown id, and needs the key."""
    listed = (await api.get("/v1/contacts.json", per_page=3)).json()
    for contact in listed:
        assert await api.ok("GET", f"/v1/contacts/{contact['id']}.json") == contact
    fields = await api.ok("GET", "/v1/contacts/fields.json")
    assert fields[0]["key"] == "first_name"
    one = await api.call("GET", "/v1/contacts/field.json", params={"field_key": "first_name"})
    assert one.json()["key"] == "first_name"
    foreign = sim.contacts(OTHER)[0].id
    for missing in (foreign, 1):
        r = await api.call("GET", f"/v1/contacts/{missing}.json")
        assert (r.status, r.json()) == (404, {"error": f"Contact {missing} not found"})
    r = await api.call("GET", f"/v1/contacts/{listed[0]['id']}.json", key=None, app=None)
    assert (r.status, r.json()) == (401, {"error": "Invalid API key"})
    entries = sim.journal.select(route="/v1/contacts/{id}.json")
    assert [e.tenant for e in entries] == [sim.account_id(KEY)] * 5 + [None]


async def test_one_contact_by_id_is_metered_and_rate_limited(api: Api, sim: AdSim) -> None:
    """Lookups by id spend the account's budget like any API call: the sixth in a second is 429."""
    path = f"/v1/contacts/{sim.contacts(KEY)[0].id}.json"
    statuses = [(await api.call("GET", path, pace=False)).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert (sim.rate_limited(KEY), sim.max_rate_seen(KEY)) == (1, 6)


# --------------------------------------------------------------------------- proposed feeds


async def test_conversations_order_by_update_and_filter_inclusively(
    api: Api, sim: AdSim, seeded: SeededAccount, wall: FakeClock
) -> None:
    """Conversations list in (updated_at, id) order; updated_since is inclusive; a new
    message moves its conversation to the end and into the filter."""
    convs = await api.walk("/v1/conversations.json")
    assert len(convs) == len(seeded.conversation_ids)
    keys = [(c["updated_at"], c["id"]) for c in convs]
    assert keys == sorted(keys)
    assert set(convs[0]) == {
        "id",
        "contact_id",
        "channel",
        "status",
        "created_at",
        "updated_at",
        "message_count",
        "last_message_id",
    }
    cut = convs[len(convs) // 2]["updated_at"]
    since = await api.walk("/v1/conversations.json", updated_since=cut)
    assert [c["id"] for c in since] == [c["id"] for c in convs if c["updated_at"] >= cut]
    oldest = convs[0]["id"]
    wall.advance(60)
    msg = sim.add_message(KEY, oldest, body="New question")
    fresh = await api.walk("/v1/conversations.json", updated_since=iso(WALL0))
    assert [c["id"] for c in fresh] == [oldest]
    assert fresh[0]["last_message_id"] == msg.id
    assert (await api.get("/v1/conversations.json", updated_since="soon")).status == 400


async def test_messages_page_oldest_first_with_an_exclusive_since_id(
    api: Api, sim: AdSim, seeded: SeededAccount
) -> None:
    """A conversation's messages come oldest first with the documented-by-us fields; since_id
    is exclusive; another account's conversation is a 404."""
    cid = seeded.conversation_ids[0]
    conv = await api.ok("GET", f"/v1/conversations/{cid}.json")
    messages = await api.walk(f"/v1/conversations/{cid}/messages.json", per_page=2)
    assert len(messages) == conv["message_count"] >= 2
    assert [m["id"] for m in messages] == sorted(m["id"] for m in messages)
    first = messages[0]
    assert first["type"] == "text"
    assert (first["direction"], first["status"]) == ("inbound", "received")
    assert first["conversation_id"] == cid
    assert first["attachments"] == []
    assert first["call"] is None
    after = await api.walk(f"/v1/conversations/{cid}/messages.json", since_id=first["id"])
    assert [m["id"] for m in after] == [m["id"] for m in messages[1:]]
    others = sim.list_conversations(OTHER)
    r = await api.call("GET", f"/v1/conversations/{others[0].id}/messages.json")
    assert r.status == 404
    assert (await api.call("GET", "/v1/conversations/1.json")).status == 404


async def test_media_attachments_download_with_their_content_types(
    api: Api, sim: AdSim, seeded: SeededAccount
) -> None:
    """Media messages link files the sim serves without a key: a PNG, a Windows executable
    and an oversized video whose Content-Length says so; a chunked file sends no length."""
    got: dict[str, tuple[str, bytes, dict[str, Any]]] = {}
    for mid in (seeded.image_message_id, seeded.disallowed_message_id, seeded.oversized_message_id):
        msg = await api.ok("GET", f"/v1/messages/{mid}.json")
        assert msg["type"] == "media"
        (att,) = msg["attachments"]
        r = await api.call("GET", att["url"], key=None, app=None)
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(r.raw) == att["size"]
        got[att["content_type"]] = (r.headers["Content-Type"], r.raw, att)
    assert got["image/png"][1].startswith(b"\x89PNG\r\n\x1a\n")
    assert got["application/x-msdownload"][0] == "application/x-msdownload"
    assert got["application/x-msdownload"][1].startswith(b"MZ")
    assert got["video/mp4"][2]["size"] == BIG > 5 * 1024 * 1024
    att = got["image/png"][2]
    wrong = att["url"].rsplit("/", 1)[0] + "/other.png"
    assert (await api.call("GET", wrong, key=None, app=None)).status == 404
    streamed = sim.add_attachment("notes.txt", "text/plain", size=200_000, send_length=False)
    url = f"{api.base}/files/{streamed.token}/notes.txt"
    r = await api.call("GET", url, key=None, app=None)
    assert "Content-Length" not in r.headers
    assert len(r.raw) == 200_000


async def test_calls_serve_recordings_and_transcriptions(
    api: Api, sim: AdSim, seeded: SeededAccount
) -> None:
    """A call links a WAV recording and a transcription (JSON and text download); a missed
    call links neither and both are 404, as they are for a text message."""
    mid = seeded.call_message_ids[0]
    msg = await api.ok("GET", f"/v1/messages/{mid}.json")
    assert msg["type"] == "call"
    assert msg["call"]["duration"] > 0
    audio = await api.call("GET", msg["call"]["recording_url"])
    assert audio.headers["Content-Type"] == "audio/wav"
    assert audio.raw[:4] == b"RIFF"
    assert audio.raw[8:12] == b"WAVE"
    sentences = await api.ok("GET", msg["call"]["transcription_url"])
    assert sentences[0]["speaker"] == "agent"
    assert sentences[1]["start_ms"] > sentences[0]["end_ms"]
    text = await api.call("GET", f"/v1/messages/{mid}/transcription/download")
    assert text.headers["Content-Type"].startswith("text/plain")
    assert text.raw.decode().splitlines()[0] == f"agent: {sentences[0]['text']}"
    missed = await api.ok("GET", f"/v1/messages/{seeded.missed_call_message_id}.json")
    assert missed["call"] == {"duration": 0, "recording_url": None, "transcription_url": None}
    texts = seeded.image_message_id
    for m in (seeded.missed_call_message_id, texts):
        assert (await api.call("GET", f"/v1/messages/{m}/recording")).status == 404
        assert (await api.call("GET", f"/v1/messages/{m}/transcription.json")).status == 404
    sim.set_transcription(KEY, seeded.missed_call_message_id, [("contact", "Call me back.")])
    late = await api.ok("GET", f"/v1/messages/{seeded.missed_call_message_id}/transcription.json")
    assert [s["text"] for s in late] == ["Call me back."]


async def test_delivery_status_changes_show_and_touch_the_conversation(
    api: Api, sim: AdSim, seeded: SeededAccount, wall: FakeClock
) -> None:
    """set_status shows in status.json and the message, and bumps the conversation."""
    cid = seeded.conversation_ids[0]
    out = sim.add_message(KEY, cid, body="Reminder: tonight at 6", direction="outbound")
    status = await api.ok("GET", f"/v1/messages/{out.id}/status.json")
    assert status == {
        "message_id": out.id,
        "status": "sent",
        "status_updated_at": iso(WALL0),
        "error": None,
    }
    wall.advance(90)
    sim.set_status(KEY, out.id, "failed", error="Carrier rejected the message")
    status = await api.ok("GET", f"/v1/messages/{out.id}/status.json")
    assert (status["status"], status["error"]) == ("failed", "Carrier rejected the message")
    assert status["status_updated_at"] == iso(WALL0 + 90)
    conv = await api.ok("GET", f"/v1/conversations/{cid}.json")
    assert conv["updated_at"] == iso(WALL0 + 90)
    assert (await api.ok("GET", f"/v1/messages/{out.id}.json"))["status"] == "failed"
    with pytest.raises(ValueError, match="unknown status"):
        sim.set_status(KEY, out.id, "lost")


async def test_conversation_status_is_listed_and_a_change_moves_updated_at(
    api: Api, sim: AdSim, seeded: SeededAccount, wall: FakeClock
) -> None:
    """Conversations start "open"; set_conversation_status shows in the list and the single
    view, moves updated_at (so updated_since picks it up) and takes any non-empty string."""
    convs = await api.walk("/v1/conversations.json")
    assert {c["status"] for c in convs} == {"open"}
    cid = seeded.conversation_ids[0]
    wall.advance(120)
    sim.set_conversation_status(KEY, cid, "closed")
    fresh = await api.walk("/v1/conversations.json", updated_since=iso(WALL0 + 120))
    assert [(c["id"], c["status"], c["updated_at"]) for c in fresh] == [
        (cid, "closed", iso(WALL0 + 120))
    ]
    assert (await api.ok("GET", f"/v1/conversations/{cid}.json"))["status"] == "closed"
    wall.advance(30)
    sim.set_conversation_status(KEY, cid, "snoozed")
    single = await api.ok("GET", f"/v1/conversations/{cid}.json")
    assert (single["status"], single["updated_at"]) == ("snoozed", iso(WALL0 + 150))
    with pytest.raises(ValueError, match="must not be empty"):
        sim.set_conversation_status(KEY, cid, "")


async def test_conversation_status_control_endpoint(
    api: Api, sim: AdSim, seeded: SeededAccount, wall: FakeClock
) -> None:
    """/_sim/ad/conversation_status sets a status by account label, like /_sim/ad/status;
    a missing field or a non-string status is a 400 and an unknown conversation a 404."""
    url = f"{api.base}/_sim/ad/conversation_status"
    label, cid = sim.account_id(KEY), seeded.conversation_ids[1]
    wall.advance(45)
    done = await api.ok(
        "POST", url, json={"accountId": label, "conversationId": cid, "status": "closed"}
    )
    assert done == {"id": cid, "status": "closed", "updated_at": iso(WALL0 + 45)}
    assert sim.conversation(KEY, cid).status == "closed"
    for body, status in (
        ({"accountId": label, "conversationId": cid}, 400),
        ({"accountId": label, "conversationId": cid, "status": 3}, 400),
        ({"accountId": label, "conversationId": cid, "status": ""}, 400),
        ({"accountId": "account-99", "conversationId": cid, "status": "open"}, 400),
        ({"accountId": label, "conversationId": 1, "status": "open"}, 404),
    ):
        r = await api.call("POST", url, json=body)
        assert r.status == status, body
        assert "error" in r.json()


async def test_histories_are_created_form_encoded_and_listed(api: Api, sim: AdSim) -> None:
    """POST histories.json with history[...] fields answers [entry]; the list filters by
    contact, kind and since_id; bad kinds, ids and unknown contacts are refused."""
    contact = sim.contacts(KEY)[0]
    before = sim.counts(KEY)["histories"]
    data = {
        "history[contact_id]": str(contact.id),
        "history[kind]": "sms",
        "history[text]": "Replied in GHL: see you at 6",
    }
    (entry,) = await api.ok("POST", "/v1/histories.json", data=data)
    assert entry["contact_id"] == contact.id
    assert (entry["kind"], entry["form_id"]) == ("sms", None)
    assert [h.id for h in sim.histories(KEY, source="api")] == [entry["id"]]
    mine = await api.walk("/v1/histories.json", contact_id=contact.id)
    assert entry["id"] in [h["id"] for h in mine]
    assert all(h["contact_id"] == contact.id for h in mine)
    assert await api.walk("/v1/histories.json", since_id=entry["id"]) == []
    sms = await api.walk("/v1/histories.json", kind="sms")
    assert [h["id"] for h in sms] == [entry["id"]]
    for bad, status in (
        ({**data, "history[kind]": "telegram"}, 422),
        ({**data, "history[contact_id]": "abc"}, 422),
        ({**data, "history[contact_id]": "1"}, 404),
        ({**data, "history[text]": " "}, 422),
    ):
        assert (await api.call("POST", "/v1/histories.json", data=bad)).status == status, bad
    assert sim.counts(KEY)["histories"] == before + 1


# --------------------------------------------------------------------------- limits, faults


async def test_rate_limit_is_5_per_second_per_account_with_retry_after(
    api: Api, sim: AdSim, clock: FakeClock
) -> None:
    """A sixth request within a second gets 429 with Retry-After; another account is not
    affected; counters record the refusals and the peak; stats name no key."""
    statuses = [(await api.call("GET", "/v1/forms.json", pace=False)).status for _ in range(7)]
    assert statuses == [200] * 5 + [429, 429]
    r = await api.call("GET", "/v1/forms.json", pace=False)
    assert (r.status, r.json()) == (429, {"error": "Too many requests"})
    assert r.headers["Retry-After"] == "1"
    other = await api.call("GET", "/v1/forms.json", key=OTHER, app=None, pace=False)
    assert other.status == 200
    assert (sim.rate_limited(KEY), sim.max_rate_seen(KEY), sim.rate_limited(OTHER)) == (3, 8, 0)
    clock.advance(1.0)
    assert (await api.call("GET", "/v1/forms.json", pace=False)).status == 200
    stats = await api.ok("GET", f"{api.base}/_sim/stats")
    assert stats["rateLimited"] == {sim.account_id(KEY): 3}
    assert stats["accounts"][sim.account_id(KEY)]["contacts"] == CONTACTS
    assert KEY not in json.dumps(stats)


async def test_the_bridges_own_pace_of_2_per_second_never_sees_429(api: Api, sim: AdSim) -> None:
    """Requests half a second apart stay well inside the limit; the peak seen is 2."""
    for _ in range(12):
        assert (await api.call("GET", "/v1/contacts.json")).status == 200
    assert sim.rate_limited(KEY) == 0
    assert sim.max_rate_seen(KEY) == 2


async def test_faults_answer_in_the_error_shape_or_reset_and_are_journaled(
    api: Api, sim: AdSim
) -> None:
    """Injected faults answer {"error": ...} or drop the connection, and still count."""
    sim.faults.fail_next("/v1/contacts.json", 1, 503)
    r = await api.get("/v1/contacts.json")
    assert (r.status, r.json()) == (503, {"error": "Injected fault"})
    assert (await api.get("/v1/contacts.json")).status == 200
    rule = {"route": "/v1/histories.json", "method": "POST", "reset": True, "times": 1}
    await api.ok("POST", f"{api.base}/_sim/faults", json={"rules": [rule]})
    contact = sim.contacts(KEY)[0]
    data = {
        "history[contact_id]": str(contact.id),
        "history[kind]": "note",
        "history[text]": "lost",
    }
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", "/v1/histories.json", data=data)
    assert sim.histories(KEY, source="api") == []
    entries = sim.journal.select(route="/v1/contacts.json")
    assert [(e.status, e.fault) for e in entries] == [(503, "status:503"), (200, None)]
    assert [e.status for e in sim.journal.select(route="/v1/histories.json")] == [0]
    assert sim.max_rate_seen(KEY) >= 1


async def test_control_endpoints_seed_change_and_read_back(api: Api, sim: AdSim) -> None:
    """/_sim/ad endpoints seed an account, touch a contact, add a message, set a status,
    change knobs and read back histories and submissions, all by account label."""
    made = await api.ok("POST", f"{api.base}/_sim/ad/accounts", json={"contacts": 3, "seed": 4})
    new_key, label = made["key"], made["accountId"]
    contacts = await api.ok("GET", "/v1/contacts.json", key=new_key, app=None)
    assert len(contacts) == 3
    touched = await api.ok(
        "POST",
        f"{api.base}/_sim/ad/touch",
        json={"accountId": label, "contactId": contacts[0]["id"], "changes": {"last_name": "X"}},
    )
    assert touched["revision"] == 2
    conv = sim.list_conversations(new_key)[0]
    added = await api.ok(
        "POST",
        f"{api.base}/_sim/ad/messages",
        json={"accountId": label, "conversationId": conv.id, "body": "hi", "direction": "outbound"},
    )
    status = await api.ok(
        "POST",
        f"{api.base}/_sim/ad/status",
        json={"accountId": label, "messageId": added["id"], "status": "delivered"},
    )
    assert status == {"id": added["id"], "status": "delivered"}
    r = await api.call(
        "POST", f"{api.base}/_sim/ad/status", json={"accountId": label, "messageId": 1}
    )
    assert r.status == 400
    config = {"rateLimit": 9, "requireApplicationKey": True, "ignorePaging": True}
    await api.ok("POST", f"{api.base}/_sim/ad/config", json=config)
    assert (sim.limiter.limit, sim.require_application_key, sim.ignore_paging) == (9, True, True)
    notes = await api.ok(
        "GET", f"{api.base}/_sim/ad/histories", params={"accountId": label, "source": "seed"}
    )
    assert notes == [h for h in notes if h["kind"] == "note"]
    subs = await api.ok("GET", f"{api.base}/_sim/ad/submissions", params={"accountId": label})
    assert subs == []


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_for_a_seed() -> None:
    """Two simulators built alike hold identical contacts, messages and files; another seed
    differs."""

    def snapshot(seed: int) -> list[Any]:
        sim, key = build_sim(contacts=40, seed=seed)
        contacts = [(c.id, c.values, c.created, c.updated) for c in sim.contacts(key)]
        messages = [
            (m.id, m.body, m.status, m.created, [(a.token, a.size) for a in m.attachments])
            for c in sim.list_conversations(key, limit=1_000)
            for m in sim.list_messages(key, c.id, limit=1_000)
        ]
        return [key, contacts, messages]

    assert snapshot(5) == snapshot(5)
    assert snapshot(5) != snapshot(6)


def test_build_sim_seeds_texts_media_and_calls() -> None:
    """build_sim gives realistic contacts, text conversations, three kinds of media and
    recorded, transcribed calls, and can require a partner application key."""
    sim, key = build_sim(contacts=200, seed=3)
    counts = sim.counts(key)
    assert (counts["contacts"], counts["conversations"], counts["media_messages"]) == (200, 20, 3)
    assert counts["calls"] >= 3
    contacts = sim.contacts(key)
    emails = [c.email for c in contacts if c.email]
    assert len(set(emails)) == len(emails) > 170
    assert all("@example." in e or "@mail.example." in e for e in emails)
    media = [
        a.content_type
        for c in sim.list_conversations(key, limit=1_000)
        for m in sim.list_messages(key, c.id, limit=1_000)
        for a in m.attachments
    ]
    assert sorted(media) == ["application/x-msdownload", "image/png", "video/mp4"]
    calls = [
        m
        for c in sim.list_conversations(key, limit=1_000)
        for m in sim.list_messages(key, c.id, limit=1_000)
        if m.call is not None and m.call.recording is not None
    ]
    assert calls
    assert all(m.call is not None and m.call.transcript for m in calls)
    gated, gated_key = build_sim(contacts=5, seed=3, application_key="app-1")
    assert gated.require_application_key
    assert gated.authenticate(gated_key, "app-1", partner=True).key == gated_key
