"""The Action Network simulator, driven over real loopback HTTP with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from bridge.sim.actionnetwork import API, build_app, person_json, record_json
from bridge.sim.actionnetwork_state import AnSim, Population, iso
from bridge.sim.an_data import ANCHOR, TITLES, build_sim, seed_group
from bridge.sim.common import serve

KEY = "test-key-0123456789abcdef0123"
OTHER = "other-key-fedcba9876543210fedc"
WALL0 = ANCHOR + 3_600
PEOPLE = 60


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
    body: Any
    headers: CIMultiDictProxy[str]


class Api:
    """A thin caller that sends the key and, by default, paces itself at under 4 requests/s."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, clock: FakeClock, sim: AnSim
    ) -> None:
        self.session = session
        self.base = base
        self.clock = clock
        self.sim = sim

    async def call(
        self, method: str, path: str, *, key: str | None = KEY, pace: bool = True, **kwargs: Any
    ) -> Resp:
        if pace:
            self.clock.advance(0.26)
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["OSDI-API-Token"] = key
        url = path if path.startswith("http") else self.base + API + path
        async with self.session.request(method, url, headers=headers, **kwargs) as resp:
            text = await resp.text()
            return Resp(resp.status, json.loads(text) if text else None, resp.headers)

    async def get(self, path: str, **params: Any) -> Resp:
        return await self.call("GET", path, params={k: str(v) for k, v in params.items()})

    async def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        r = await self.call(method, path, **kwargs)
        assert r.status == 200, r.body
        return dict(r.body)

    async def walk(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a collection, paging until an empty page."""
        items: list[dict[str, Any]] = []
        for page in range(1, 10_000):
            r = await self.get(path, page=page, **params)
            assert r.status == 200, r.body
            (embedded,) = r.body["_embedded"].values()
            if not embedded:
                return items
            items.extend(embedded)
        raise AssertionError("no empty page")


def ids(items: list[dict[str, Any]]) -> set[str]:
    return {i["identifiers"][0].removeprefix("action_network:") for i in items}


def q(ts: int) -> str:
    return iso(ts)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(float(WALL0))


@pytest.fixture
def sim(clock: FakeClock, wall: FakeClock) -> AnSim:
    an = AnSim(seed=1, clock=clock, wall=wall)
    seed_group(an, KEY, people=PEOPLE, activities_per_person=3, seed=7)
    seed_group(an, OTHER, people=5, activities_per_person=1, seed=8)
    return an


@pytest.fixture
def pop(sim: AnSim) -> Population:
    found = sim.population(KEY)
    assert found is not None
    return found


@pytest.fixture
async def api(sim: AnSim, clock: FakeClock) -> AsyncIterator[Api]:
    async with serve(build_app(sim)) as base, aiohttp.ClientSession() as session:
        yield Api(session, base, clock, sim)


# --------------------------------------------------------------------------- auth


async def test_bad_or_missing_key_is_403_echoing_the_key(api: Api) -> None:
    """A wrong or missing OSDI-API-Token gets 403 whose error text echoes the key back."""
    bad = "not-a-real-key-5551234"
    r = await api.call("GET", "/people", key=bad)
    assert r.status == 403
    assert r.body["error"].startswith("API Key invalid or not present")
    assert bad in r.body["error"]
    r = await api.call("GET", "/people", key=None)
    assert r.status == 403
    assert api.sim.rate_limited(KEY) == 0


async def test_entry_point_is_200_even_with_a_bad_key(api: Api) -> None:
    """The API entry point answers 200 with any key but lists collections only for a good one."""
    for path in ("", "/"):
        bad = await api.call("GET", path, key="nope")
        assert bad.status == 200
        assert "osdi:tags" not in bad.body["_links"]
        good = await api.call("GET", path)
        assert good.status == 200
        assert good.body["_links"]["osdi:tags"]["href"].endswith("/api/v2/tags")
        assert good.body["_links"]["osdi:people"]["href"].endswith("/api/v2/people")


async def test_each_key_sees_only_its_own_group(api: Api, sim: AnSim) -> None:
    """Several keys are several groups: people of one are 404 through the other."""
    mine = await api.walk("/people")
    r = await api.call("GET", "/people", key=OTHER)
    theirs = r.body["_embedded"]["osdi:people"]
    assert len(mine) == PEOPLE
    assert len(theirs) == 5
    assert not ids(mine) & ids(theirs)
    other_id = next(iter(ids(theirs)))
    assert (await api.call("GET", f"/people/{other_id}")).status == 404
    assert (await api.call("GET", f"/people/{other_id}", key=OTHER)).status == 200


# --------------------------------------------------------------------------- HAL and paging


async def test_collections_are_hal_with_curies_totals_and_one_embedded_key(api: Api) -> None:
    """A collection is HAL+JSON with curies, per-item links, totals and one embedded array."""
    r = await api.get("/petitions")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/hal+json")
    body = r.body
    assert {c["name"] for c in body["_links"]["curies"]} == {"osdi", "action_network"}
    assert all(c["templated"] for c in body["_links"]["curies"])
    assert list(body["_embedded"]) == ["osdi:petitions"]
    petitions = body["_embedded"]["osdi:petitions"]
    assert body["total_records"] == len(petitions) == 2
    assert body["total_pages"] == 1
    assert (body["page"], body["per_page"]) == (1, 25)
    hrefs = [link["href"] for link in body["_links"]["osdi:petitions"]]
    assert hrefs == [p["_links"]["self"]["href"] for p in petitions]
    petition = petitions[0]
    assert petition["title"] in TITLES["petitions"]
    assert petition["_links"]["osdi:signatures"]["href"].endswith("/signatures")
    assert "osdi:record_signature_helper" in petition["_links"]


async def test_people_pages_carry_no_totals(api: Api) -> None:
    """The people collection omits total_pages and total_records, as live has since 2016."""
    body = (await api.get("/people")).body
    assert "total_pages" not in body
    assert "total_records" not in body
    assert list(body["_embedded"]) == ["osdi:people"]
    person = body["_embedded"]["osdi:people"][0]
    assert person["identifiers"][0].startswith("action_network:")
    assert {"osdi:signatures", "osdi:taggings", "action_network:responses"} <= set(person["_links"])


async def test_per_page_is_capped_at_25_and_bad_values_refused(api: Api) -> None:
    """per_page above 25 is silently capped; zero or non-numeric paging is a 400."""
    r = await api.get("/people", per_page=100)
    assert r.body["per_page"] == 25
    assert len(r.body["_embedded"]["osdi:people"]) == 25
    r = await api.get("/people", per_page=7)
    assert len(r.body["_embedded"]["osdi:people"]) == 7
    for bad in ({"per_page": 0}, {"page": 0}, {"page": "two"}):
        assert (await api.get("/people", **bad)).status == 400


async def test_next_is_present_on_the_last_page_and_absent_past_the_end(api: Api) -> None:
    """The last non-empty page still links next; the page after it is empty with no next."""
    last = (await api.get("/people", page=3)).body
    assert len(last["_embedded"]["osdi:people"]) == PEOPLE - 50
    assert "page=4" in last["_links"]["next"]["href"]
    assert "page=2" in last["_links"]["previous"]["href"]
    past = (await api.get("/people", page=4)).body
    assert past["_embedded"]["osdi:people"] == []
    assert "next" not in past["_links"]
    tags = (await api.get("/tags")).body
    assert tags["total_pages"] == 1
    assert "next" in tags["_links"]


async def test_people_are_unsorted_but_stably_ordered(api: Api) -> None:
    """People come in no date order, yet the same order on every walk, each exactly once."""
    first = await api.walk("/people")
    second = await api.walk("/people")
    assert [p["identifiers"] for p in first] == [p["identifiers"] for p in second]
    assert len(ids(first)) == PEOPLE
    for key in ("modified_date", "created_date"):
        dates = [p[key] for p in first]
        assert dates != sorted(dates)
        assert dates != sorted(dates, reverse=True)


# --------------------------------------------------------------------------- filters


async def test_filters_eq_gt_lt_on_dates_and_email(api: Api, pop: Population) -> None:
    """eq, gt and lt on modified_date/created_date and eq on email select exactly the matches."""
    modified = {pop.person_id(i): pop.modified_at(i) for i in range(PEOPLE)}
    created = {pop.person_id(i): pop.created_at(i) for i in range(PEOPLE)}
    cut = sorted(modified.values())[PEOPLE // 2]
    got = await api.walk("/people", filter=f"modified_date gt '{q(cut)}'")
    assert ids(got) == {p for p, m in modified.items() if m > cut}
    got = await api.walk("/people", filter=f"modified_date lt '{q(cut)}'")
    assert ids(got) == {p for p, m in modified.items() if m < cut}
    low, high = sorted(created.values())[10], sorted(created.values())[20]
    both = f"created_date gt '{q(low)}' and created_date lt '{q(high)}'"
    assert ids(await api.walk("/people", filter=both)) == {
        p for p, c in created.items() if low < c < high
    }
    person = pop.person(11)
    assert person.email is not None
    exact = await api.walk("/people", filter=f"email_address eq '{person.email.upper()}'")
    assert ids(exact) == {person.id}
    got = await api.walk("/people", filter=f"modified_date eq '{q(modified[person.id])}'")
    assert person.id in ids(got)
    day = iso(ANCHOR)[:10]  # a bare date means midnight UTC
    assert len(await api.walk("/people", filter=f"created_date lt '{day}'")) == PEOPLE


async def test_gt_is_strict_at_one_second_resolution(
    api: Api, sim: AnSim, pop: Population, wall: FakeClock
) -> None:
    """Writes within one second share a modified_date, and gt that second excludes all of them."""
    a, b, c = pop.person_id(1), pop.person_id(2), pop.person_id(3)
    wall.now = WALL0 + 0.1
    sim.touch_person(a)
    wall.now = WALL0 + 0.9
    sim.touch_person(b)
    wall.now = WALL0 + 1.2
    sim.touch_person(c)
    assert iso(sim.person(a).modified) == iso(sim.person(b).modified) == iso(WALL0)
    assert ids(await api.walk("/people", filter=f"modified_date gt '{q(WALL0 - 1)}'")) == {a, b, c}
    assert ids(await api.walk("/people", filter=f"modified_date gt '{q(WALL0)}'")) == {c}
    assert ids(await api.walk("/people", filter=f"modified_date eq '{q(WALL0)}'")) == {a, b}
    # A fractional bound compares at its whole second: gt 00.5 is gt 00.
    half = f"modified_date gt '{q(WALL0)[:-1]}.5Z'"
    assert ids(await api.walk("/people", filter=half)) == {c}


@pytest.mark.parametrize(
    ("path", "expr"),
    [
        ("/people", "modified_date ge '2025-01-01'"),
        ("/people", "modified_date gt 2025-01-01T00:00:00Z"),
        ("/people", "given_name eq 'Ada' or given_name eq 'Rosa'"),
        ("/people", "favourite_colour eq 'red'"),
        ("/people", "given_name gt 'M'"),
        ("/people", "modified_date gt 'yesterday'"),
        ("/tags", "name eq 'volunteer'"),
        ("/petitions", "email_address eq 'a@b.c'"),
    ],
)
async def test_undocumented_filters_are_refused(api: Api, path: str, expr: str) -> None:
    """Operators, fields and syntax outside the documented subset get a 400, not a silent no-op."""
    r = await api.get(path, filter=expr)
    assert r.status == 400
    assert "error" in r.body


async def test_index_lag_hides_fresh_writes_from_filters_only(
    api: Api, sim: AnSim, pop: Population, clock: FakeClock
) -> None:
    """With index lag on, a write shows in GET at once but in filters only after the lag."""
    sim.index_lag = 5.0
    pid = pop.person_id(4)
    since = f"modified_date gt '{q(WALL0 - 1)}'"
    sim.touch_person(pid)
    assert ids(await api.walk("/people", filter=since)) == set()
    assert (await api.ok("GET", f"/people/{pid}"))["modified_date"] == iso(WALL0)
    new = await api.ok(
        "POST", "/people", json={"person": {"email_addresses": [{"address": "new@example.org"}]}}
    )
    by_email = "email_address eq 'new@example.org'"
    assert await api.walk("/people", filter=by_email) == []
    clock.advance(5.0)
    assert ids(await api.walk("/people", filter=since)) == {pid, ids([new]).pop()}
    assert len(await api.walk("/people", filter=by_email)) == 1


# --------------------------------------------------------------------------- people writes


async def test_put_merges_custom_fields_and_bumps_modified_date(
    api: Api, pop: Population, wall: FakeClock
) -> None:
    """PUT changes only sent fields, merges custom fields key by key, and bumps modified_date."""
    pid = pop.person_id(5)
    before = await api.ok("GET", f"/people/{pid}")
    wall.now = WALL0 + 30
    body = {
        "custom_fields": {"ActiveDEMAND id": "48213", "Volunteer level": None},
        "family_name": "Renamed",
    }
    after = await api.ok("PUT", f"/people/{pid}", json=body)
    assert after["modified_date"] == iso(WALL0 + 30) != before["modified_date"]
    assert after["created_date"] == before["created_date"]
    expected = {k: v for k, v in before["custom_fields"].items() if k != "Volunteer level"}
    assert after["custom_fields"] == {**expected, "ActiveDEMAND id": "48213"}
    assert after["family_name"] == "Renamed"
    assert after["given_name"] == before["given_name"]
    assert after["email_addresses"] == before["email_addresses"]
    assert (await api.ok("GET", f"/people/{pid}")) == after
    wall.now = WALL0 + 60
    again = await api.ok(
        "PUT", f"/people/{pid}", json={"custom_fields": {"ActiveDEMAND id": "48213"}}
    )
    assert again["modified_date"] == iso(WALL0 + 60)  # even an identical write bumps it


async def test_put_refuses_bad_bodies_and_unknown_people(api: Api, pop: Population) -> None:
    """Unknown fields, non-string custom values and unknown ids are refused; nothing changes."""
    pid = pop.person_id(6)
    before = await api.ok("GET", f"/people/{pid}")
    for body in (
        {"nickname": "x"},
        {"custom_fields": {"Volunteer level": 3}},
        {"email_addresses": [{"address": "no-at-sign"}]},
        {"email_addresses": [{"status": "maybe"}]},
    ):
        r = await api.call("PUT", f"/people/{pid}", json=body)
        assert r.status == 400, body
    assert (await api.ok("GET", f"/people/{pid}")) == before
    missing = "00000000-0000-4000-8000-000000000000"
    r = await api.call("PUT", f"/people/{missing}", json={"given_name": "X"})
    assert r.status == 404
    assert missing in r.body["error"]


async def test_unsubscribe_by_status_only(api: Api, pop: Population) -> None:
    """A PUT carrying only an e-mail status changes the status of the primary address."""
    person = next(pop.person(i) for i in range(PEOPLE) if pop.person(i).email)
    after = await api.ok(
        "PUT", f"/people/{person.id}", json={"email_addresses": [{"status": "unsubscribed"}]}
    )
    assert after["email_addresses"][0]["status"] == "unsubscribed"
    assert after["email_addresses"][0]["address"] == person.email


async def test_signup_helper_upserts_by_email_and_retags(
    api: Api, sim: AnSim, pop: Population, wall: FakeClock
) -> None:
    """POST /people matches by e-mail, keeps unspecified status, and applies add/remove_tags."""
    target = next(pop.person(i) for i in range(PEOPLE) if pop.person(i).email)
    assert target.email is not None
    wall.now = WALL0 + 10
    body = {
        "person": {
            "email_addresses": [{"address": target.email.upper()}],
            "custom_fields": {"Volunteer level": "5"},
        },
        "add_tags": ["volunteer", "donor", "no such tag"],
    }
    person = await api.ok("POST", "/people", json=body)
    assert ids([person]) == {target.id}
    assert person["custom_fields"]["Volunteer level"] == "5"
    assert person["email_addresses"] == target.emails  # same address, case and status
    assert person["modified_date"] == iso(WALL0 + 10) != person["created_date"]
    assert sim.ignored_tag_names == ["no such tag"]

    async def tag_names() -> set[str]:
        taggings = await api.walk(f"/people/{target.id}/taggings")
        names = set()
        for t in taggings:
            tag = await api.ok("GET", t["_links"]["osdi:tag"]["href"])
            names.add(tag["name"])
        return names

    assert {"volunteer", "donor"} <= await tag_names()
    body = {"person": {"email_addresses": [{"address": target.email}]}, "remove_tags": ["donor"]}
    await api.ok("POST", "/people", json=body)
    assert "donor" not in await tag_names()
    assert sim.counts(KEY)["people"] == PEOPLE


async def test_signup_helper_creates_new_people(api: Api, sim: AnSim) -> None:
    """An unknown e-mail creates a subscribed person whose created and modified dates match."""
    body = {"person": {"given_name": "Nia", "email_addresses": [{"address": "nia@example.org"}]}}
    person = await api.ok("POST", "/people", json=body)
    assert person["created_date"] == person["modified_date"]
    assert person["email_addresses"] == [
        {"address": "nia@example.org", "status": "subscribed", "primary": True}
    ]
    mobile = {"person": {"phone_numbers": [{"number": "+1 (503) 555-0199"}]}}
    first = await api.ok("POST", "/people", json=mobile)
    again = await api.ok("POST", "/people", json=mobile)
    assert ids([first]) == ids([again])
    assert sim.counts(KEY)["people"] == PEOPLE + 2
    r = await api.call("POST", "/people", json={"person": {"given_name": "Nobody"}})
    assert r.status == 400
    r = await api.call("POST", "/people", data="not json", headers={"Content-Type": "text/plain"})
    assert r.status == 400


# --------------------------------------------------------------------------- activities


async def test_person_activity_collections_link_person_and_titled_action(
    api: Api, pop: Population
) -> None:
    """A person's records, across the five sub-collections, link back to them and to an action
    whose title a client can fetch."""
    pid = pop.person_id(7)
    records: list[dict[str, Any]] = []
    for sub in ("submissions", "signatures", "attendances", "donations", "outreaches"):
        r = await api.get(f"/people/{pid}/{sub}")
        assert list(r.body["_embedded"]) == [f"osdi:{sub}"]
        assert r.body["total_records"] == len(r.body["_embedded"][f"osdi:{sub}"])
        records.extend(r.body["_embedded"][f"osdi:{sub}"])
    assert len(records) == 3
    for record in records:
        assert record["_links"]["osdi:person"]["href"].endswith(f"/people/{pid}")
        (action_rel,) = [k for k in record["_links"] if k not in ("self", "osdi:person", "curies")]
        action = await api.ok("GET", record["_links"][action_rel]["href"])
        assert action["title"]
        same = await api.ok("GET", record["_links"]["self"]["href"])
        assert same == record


async def test_record_fields_are_realistic(api: Api, pop: Population) -> None:
    """Generated records carry kind-specific fields: comments, RSVP status, amount, subject."""
    seen: dict[str, dict[str, Any]] = {}
    for f in range(PEOPLE * 3):
        act = pop.activity(f)
        seen.setdefault(act.kind.records, act.fields)
        if act.kind.records == "signatures" and "comments" in act.fields:
            seen["commented"] = act.fields
    assert seen["attendances"]["status"] in {
        "accepted",
        "tentative",
        "declined",
        "cancelled",
        "needs action",
    }
    assert isinstance(seen["donations"]["amount"], str)
    assert float(seen["donations"]["amount"]) > 0
    assert seen["outreaches"]["subject"].startswith("Please support")
    assert seen["commented"]["comments"]
    submission = next(
        pop.activity(f) for f in range(PEOPLE * 3) if pop.activity(f).kind.records == "submissions"
    )
    body = record_json("http://x/api/v2", submission)
    assert body["action:person_id"] == submission.person_id  # the docs' spelling


async def test_action_records_and_date_filters(
    api: Api, sim: AnSim, pop: Population, wall: FakeClock
) -> None:
    """An action's records list every signer with a matching total, and filter by date."""
    petition = (await api.get("/petitions")).body["_embedded"]["osdi:petitions"][0]
    aid = ids([petition]).pop()
    signatures = await api.walk(f"/petitions/{aid}/signatures")
    assert len(signatures) == petition["total_signatures"] == sim.action_total(KEY, aid)
    expected = {
        pop.activity(f).id: pop.activity_dates(f)[0]
        for f in range(PEOPLE * 3)
        if pop.activity_action(f) == aid
    }
    assert ids(signatures) == set(expected)
    cut = sorted(expected.values())[len(expected) // 2]
    later = await api.walk(f"/petitions/{aid}/signatures", filter=f"created_date gt '{q(cut)}'")
    assert ids(later) == {s for s, c in expected.items() if c > cut}
    pid = pop.person_id(9)
    wall.now = WALL0 + 100
    new_id = sim.add_activity(KEY, aid, pid, comments="Count me in")
    assert iso(sim.person(pid).modified) == iso(WALL0 + 100)
    fresh = f"modified_date gt '{q(WALL0)}'"
    assert ids(await api.walk(f"/petitions/{aid}/signatures", filter=fresh)) == {new_id}
    assert ids(await api.walk(f"/people/{pid}/signatures", filter=fresh)) == {new_id}
    assert ids(await api.walk("/people", filter=fresh)) == {pid}
    one = await api.walk(
        f"/petitions/{aid}/signatures", filter=f"identifier eq 'action_network:{new_id}'"
    )
    assert one[0]["comments"] == "Count me in"


async def test_record_helper_upserts_the_person_and_records(
    api: Api, sim: AnSim, pop: Population
) -> None:
    """POST to an action's records accepts an inline person or a person link, else 400."""
    form = (await api.get("/forms")).body["_embedded"]["osdi:forms"][0]
    fid = ids([form]).pop()
    body = {
        "person": {"email_addresses": [{"address": "helper@example.org"}]},
        "add_tags": ["member"],
    }
    sub = await api.ok("POST", f"/forms/{fid}/submissions", json=body)
    assert sub["_links"]["osdi:form"]["href"].endswith(fid)
    linked = {"_links": {"osdi:person": {"href": f"{api.base}{API}/people/{pop.person_id(0)}"}}}
    sub2 = await api.ok("POST", f"/forms/{fid}/submissions", json=linked)
    assert sub2["action:person_id"] == pop.person_id(0)
    r = await api.call("POST", f"/forms/{fid}/submissions", json={"comments": "who?"})
    assert (r.status, r.body) == (400, {"error": "You must specify a valid person id"})
    assert (await api.ok("GET", f"/forms/{fid}"))["total_submissions"] == form[
        "total_submissions"
    ] + 2


async def test_donations_collection_spans_fundraising_pages(api: Api, sim: AnSim) -> None:
    """The top-level donations collection holds every fundraising page's donations."""
    body = (await api.get("/donations")).body
    assert body["total_records"] == sim.counts(KEY)["donations"] > 0
    donation = body["_embedded"]["osdi:donations"][0]
    assert donation["_links"]["osdi:fundraising_page"]["href"]
    assert donation["currency"] == "USD"


# --------------------------------------------------------------------------- tags


async def test_taggings_add_list_and_delete(api: Api, sim: AnSim, pop: Population) -> None:
    """Taggings can be added by person link, listed per tag and per person, and deleted."""
    tag = await api.ok("POST", "/tags", json={"name": "bridge-synced"})
    again = await api.ok("POST", "/tags", json={"name": "bridge-synced"})
    assert again == tag
    tid = ids([tag]).pop()
    pid = pop.person_id(12)
    link = {"_links": {"osdi:person": {"href": f"{api.base}{API}/people/{pid}"}}}
    tagging = await api.ok("POST", f"/tags/{tid}/taggings", json=link)
    assert tagging["item_type"] == "osdi:person"
    assert tagging["_links"]["osdi:tag"]["href"].endswith(tid)
    assert ids(await api.walk(f"/tags/{tid}/taggings")) == ids([tagging])
    mine = await api.walk(f"/people/{pid}/taggings")
    assert ids([tagging]) <= ids(mine)
    gid = ids([tagging]).pop()
    deleted = await api.ok("DELETE", f"/tags/{tid}/taggings/{gid}")
    assert "notice" in deleted
    assert await api.walk(f"/tags/{tid}/taggings") == []
    assert (await api.call("GET", f"/tags/{tid}/taggings/{gid}")).status == 404


async def test_generated_taggings_page_and_can_be_removed(api: Api, sim: AnSim) -> None:
    """Seeded tags list their generated taggings with totals, and removing one updates both."""
    tags = await api.walk("/tags")
    assert {t["name"] for t in tags} >= {"volunteer", "member", "donor"}
    volunteer = next(t for t in tags if t["name"] == "volunteer")
    tid = ids([volunteer]).pop()
    first = (await api.get(f"/tags/{tid}/taggings")).body
    members = await api.walk(f"/tags/{tid}/taggings")
    assert first["total_records"] == len(members) > 0
    victim = members[0]
    await api.ok("DELETE", victim["_links"]["self"]["href"])
    after = (await api.get(f"/tags/{tid}/taggings")).body
    assert after["total_records"] == len(members) - 1
    person_path = victim["_links"]["osdi:person"]["href"].split(API)[1]
    assert ids([victim]).isdisjoint(ids(await api.walk(f"{person_path}/taggings")))
    totals = [(await api.get(f"/tags/{ids([t]).pop()}/taggings")).body for t in tags]
    assert sim.counts(KEY)["taggings"] == sum(b["total_records"] for b in totals)


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_is_4_per_second_per_key_with_counters(
    api: Api, sim: AnSim, clock: FakeClock
) -> None:
    """A fifth request within one second gets 429; counters record it and the peak rate."""
    statuses = [(await api.call("GET", "/tags", pace=False)).status for _ in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    r = await api.call("GET", "/tags", pace=False)
    assert r.body == {"error": "Too many requests"}
    assert "Retry-After" not in r.headers
    assert (await api.call("GET", "/tags", key=OTHER, pace=False)).status == 200
    assert sim.rate_limited(KEY) == 3
    assert sim.max_rate_seen(KEY) == 7
    assert sim.rate_limited(OTHER) == 0
    clock.advance(1.0)
    assert (await api.call("GET", "/tags", pace=False)).status == 200
    stats = await api.ok("GET", f"{api.base}/_sim/stats")
    assert stats["rateLimited"] == {sim.group_id(KEY): 3}
    assert KEY not in json.dumps(stats)


async def test_a_client_pacing_at_4_per_second_never_sees_429(api: Api, sim: AnSim) -> None:
    """Requests spaced a quarter second apart stay within the limit; the peak is 4."""
    for _ in range(12):
        assert (await api.call("GET", "/people", pace=False)).status == 200
        api.clock.advance(0.25)
    assert sim.rate_limited(KEY) == 0
    assert sim.max_rate_seen(KEY) == 4


# --------------------------------------------------------------------------- background, faults


async def test_background_request_answers_empty_and_applies_later(
    api: Api, sim: AnSim, pop: Population
) -> None:
    """background_request=true answers {} at once and applies the write afterwards."""
    pid = pop.person_id(13)
    sim.background_delay = 0.05
    r = await api.call(
        "PUT",
        f"/people/{pid}",
        params={"background_request": "true"},
        json={"custom_fields": {"Queued": "yes"}},
    )
    assert (r.status, r.body) == (200, {})
    assert "Queued" not in sim.person(pid).custom_fields
    await asyncio.sleep(0.1)
    assert sim.person(pid).custom_fields["Queued"] == "yes"
    r = await api.call(
        "PUT", f"/people/{pid}", params={"background_request": "true"}, json={"bogus": 1}
    )
    assert (r.status, r.body) == (200, {})
    await asyncio.sleep(0.1)
    assert sim.background == {"accepted": 2, "applied": 1, "failed": 1}


async def test_faults_inject_statuses_and_resets_and_are_journaled(api: Api, sim: AnSim) -> None:
    """Injected faults answer in Action Network's error shape or drop the connection."""
    sim.faults.fail_next("/api/v2/people", 1, 503)
    r = await api.get("/people")
    assert (r.status, r.body) == (503, {"error": "Injected fault"})
    assert (await api.get("/people")).status == 200
    # A POST, because aiohttp silently retries an idempotent request on a dropped connection.
    rule = {"route": "/api/v2/tags", "method": "POST", "reset": True, "times": 1}
    await api.ok("POST", f"{api.base}/_sim/faults", json={"rules": [rule]})
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", "/tags", json={"name": "lost"})
    assert "lost" not in {t["name"] for t in await api.walk("/tags")}
    entries = sim.journal.select(route="/api/v2/people")
    assert [e.status for e in entries] == [503, 200]
    assert entries[0].fault == "status:503"
    assert entries[1].tenant == sim.group_id(KEY)
    assert [e.status for e in sim.journal.select(method="POST", route="/api/v2/tags")] == [0]


async def test_max_rate_seen_counts_requests_answered_by_faults(api: Api, sim: AnSim) -> None:
    """Requests a fault answers still count towards the rate a key was seen sending."""
    sim.faults.fail_next("/api/v2/tags", 3, 503)
    statuses = [(await api.call("GET", "/tags", pace=False)).status for _ in range(5)]
    assert statuses == [503, 503, 503, 200, 200]
    assert sim.max_rate_seen(KEY) == 5
    assert sim.rate_limited(KEY) == 0


async def test_custom_field_catalogue_grows_with_writes(api: Api, pop: Population) -> None:
    """metadata/custom_fields lists names written through the API."""
    await api.ok("PUT", f"/people/{pop.person_id(1)}", json={"custom_fields": {"Shift": "am"}})
    body = await api.ok("GET", "/metadata/custom_fields")
    assert "Shift" in [f["name"] for f in body["action_network:custom_fields"]]


async def test_control_endpoints_seed_touch_and_configure(api: Api, sim: AnSim) -> None:
    """/_sim/an endpoints seed a new group, touch a person and change knobs out of process."""
    made = await api.ok("POST", f"{api.base}/_sim/an/groups", json={"people": 3, "seed": 4})
    key = made["key"]
    people = (await api.call("GET", "/people", key=key)).body["_embedded"]["osdi:people"]
    assert len(people) == 3
    pid = ids(people[:1]).pop()
    touched = await api.ok("POST", f"{api.base}/_sim/an/touch", json={"personId": pid})
    assert touched["modified_date"] == iso(WALL0)
    await api.ok("POST", f"{api.base}/_sim/an/config", json={"indexLag": 2, "rateLimit": 9})
    assert (sim.index_lag, sim.limiter.limit) == (2.0, 9)


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_for_a_seed() -> None:
    """Two simulators seeded alike serve identical people and records; another seed differs."""

    def snapshot(seed: int) -> list[Any]:
        sim = AnSim(seed=3)
        pop = seed_group(sim, KEY, people=40, activities_per_person=2, seed=seed)
        people = sim.list_people(KEY, (), 0, 40)
        return [person_json("b", p) for p in people] + [
            record_json("b", pop.activity(f)) for f in range(80)
        ]

    assert snapshot(5) == snapshot(5)
    assert snapshot(5) != snapshot(6)


def test_generator_seeds_2000_people_with_activities_quickly() -> None:
    """Seeding 2,000 people and reading every person and record takes well under 2 seconds."""
    start = time.perf_counter()
    sim = AnSim()
    pop = seed_group(sim, KEY, people=2_000, activities_per_person=3, seed=1)
    people = sim.list_people(KEY, (), 0, 2_000)
    records = [pop.activity(f) for f in range(6_000)]
    elapsed = time.perf_counter() - start
    assert len({p.id for p in people}) == 2_000
    assert len({r.id for r in records}) == 6_000
    assert sum(1 for p in people if p.email) > 1_800
    assert sum(1 for p in people if p.addresses) > 1_600
    assert elapsed < 2.0


async def test_a_million_virtual_people_page_and_filter_lazily(clock: FakeClock) -> None:
    """A 1,000,000-person group pages, finds people by id and e-mail, and filters recent changes
    without generating everyone."""
    sim = AnSim(clock=clock, wall=FakeClock(float(WALL0)))
    start = time.perf_counter()
    pop = seed_group(sim, KEY, people=1_000_000, activities_per_person=2, seed=9)
    touched = {pop.person_id(123), pop.person_id(987_654)}
    for pid in touched:
        sim.touch_person(pid)
    async with serve(build_app(sim)) as base, aiohttp.ClientSession() as session:
        api = Api(session, base, clock, sim)
        seen: set[str] = set()
        for page in (1, 2, 3):
            body = (await api.get("/people", page=page)).body
            seen |= ids(body["_embedded"]["osdi:people"])
            sim.touch_person(pop.person_id(page * 1000))  # edits between pages shift nothing
        assert len(seen) == 75
        touched |= {pop.person_id(n * 1000) for n in (1, 2, 3)}
        recent = await api.walk("/people", filter=f"modified_date gt '{q(WALL0 - 1)}'")
        assert ids(recent) == touched
        last = await api.ok("GET", f"/people/{pop.person_id(999_999)}")
        person = pop.person(500_000)
        if person.email:
            found = await api.walk("/people", filter=f"email_address eq '{person.email}'")
            assert ids(found) == {person.id}
        assert last["identifiers"] == [f"action_network:{pop.person_id(999_999)}"]
        aid = pop.activity_action(0)  # the first action is a petition
        r = await api.get(f"/petitions/{aid}/signatures", page=1000)
        assert r.body["total_records"] == 200_000
        assert len(r.body["_embedded"]["osdi:signatures"]) == 25
    assert sim.counts(KEY)["people"] == 1_000_000
    assert time.perf_counter() - start < 5.0


async def test_unfiltered_paging_survives_concurrent_edits(api: Api, sim: AnSim) -> None:
    """Edits between page requests neither drop nor repeat anyone; an insert may repeat one
    person (page drift) but never drops anyone."""

    async def walk(insert_at: int | None) -> list[str]:
        seen: list[str] = []
        for page in range(1, 20):
            batch = (await api.get("/people", page=page, per_page=7)).body["_embedded"]
            if not batch["osdi:people"]:
                return seen
            seen.extend(ids([p]).pop() for p in batch["osdi:people"])
            sim.touch_person(seen[0])
            if page == insert_at:
                sim.add_person(KEY, email_addresses=[{"address": f"late{page}@example.org"}])
        raise AssertionError("no empty page")

    everyone = await walk(None)
    assert len(everyone) == len(set(everyone)) == PEOPLE
    assert set(everyone) <= set(await walk(insert_at=4))


def test_build_sim_gives_keys_that_open_seeded_groups() -> None:
    """build_sim (for the CLI) returns a seeded simulator and the keys that open it."""
    sim, keys = build_sim(people=10, groups=2, seed=3)
    again, same = build_sim(people=10, groups=2, seed=3)
    assert keys == same
    assert len(set(keys)) == 2
    assert all(sim.counts(k)["people"] == 10 for k in keys)
    assert again.list_people(keys[0])[0].id == sim.list_people(keys[0])[0].id
