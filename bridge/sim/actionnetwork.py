"""HTTP face of the Action Network simulator: HAL+JSON routes, key auth and the per-key limit."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from bridge.sim.actionnetwork_state import (
    ACTION_FILTERS,
    DATE_FIELDS,
    EVENT_FILTERS,
    KINDS,
    MAX_PER_PAGE,
    PEOPLE_FILTERS,
    RECORD_FILTERS,
    Action,
    Activity,
    AnError,
    AnSim,
    Group,
    Person,
    Tag,
    Tagging,
    iso,
    parse_filter,
)
from bridge.sim.an_data import seed_group
from bridge.sim.common import TENANT, add_control_routes, json_response, sim_middleware

__all__ = ["API", "AnSim", "build_app"]

API = "/api/v2"
HAL = "application/hal+json"
DOCS = "https://actionnetwork.org/docs/v2/{rel}"
CURIES = [
    {"name": "osdi", "href": DOCS, "templated": True},
    {"name": "action_network", "href": DOCS, "templated": True},
]
PERSON_LINKS = (
    ("osdi:attendances", "attendances"),
    ("osdi:signatures", "signatures"),
    ("osdi:submissions", "submissions"),
    ("osdi:donations", "donations"),
    ("osdi:outreaches", "outreaches"),
    ("osdi:taggings", "taggings"),
    ("action_network:responses", "responses"),
)
GROUP: web.RequestKey[Group] = web.RequestKey("an_group", Group)

Op = Callable[[AnSim, web.Request, Group], Awaitable[web.StreamResponse]]
T = TypeVar("T")


# --------------------------------------------------------------------------- responses


def error_response(status: int, message: str) -> web.Response:
    """Action Network's flat error body (not the OSDI error object)."""
    return web.json_response({"error": message}, status=status)


def _hal(body: Any, status: int = 200) -> web.Response:
    # Live answers application/hal+json; a client that insists on application/json fails here.
    # Anything but a mapping is a test's raw replacement (AnSim.raw), served as it is.
    shown = dict(body) if isinstance(body, Mapping) else body
    return json_response(shown, status=status, content_type=HAL)


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}{API}"


def _href(url: str) -> dict[str, str]:
    return {"href": url}


def person_json(base: str, p: Person) -> dict[str, Any]:
    """A person resource as the API shows it."""
    url = f"{base}/people/{p.id}"
    body: dict[str, Any] = {
        "identifiers": [f"action_network:{p.id}", *p.identifiers],
        "created_date": iso(p.created),
        "modified_date": iso(p.modified),
    }
    if p.given_name is not None:
        body["given_name"] = p.given_name
    if p.family_name is not None:
        body["family_name"] = p.family_name
    body |= {
        "email_addresses": p.emails,
        "phone_numbers": p.phones,
        "postal_addresses": p.addresses,
        "languages_spoken": p.languages,
        "custom_fields": p.custom_fields,
        "_links": {
            "self": _href(url),
            **{rel: _href(f"{url}/{sub}") for rel, sub in PERSON_LINKS},
            "curies": CURIES,
        },
    }
    return body


def action_json(base: str, a: Action, total: int) -> dict[str, Any]:
    """A petition/form/event/fundraising page/advocacy campaign resource."""
    url = f"{base}/{a.kind.actions}/{a.id}"
    fields = {k: iso(v) if k in DATE_FIELDS else v for k, v in a.fields.items()}
    return {
        "identifiers": [f"action_network:{a.id}"],
        "origin_system": "Action Network",
        "created_date": iso(a.created),
        "modified_date": iso(a.modified),
        "title": a.title,
        **fields,
        a.kind.total_field: total,
        "action_network:hidden": False,
        "_links": {
            "self": _href(url),
            f"osdi:{a.kind.records}": _href(f"{url}/{a.kind.records}"),
            a.kind.helper_rel: _href(f"{url}/{a.kind.records}"),
            "action_network:embed": _href(f"{url}/embed"),
            "curies": CURIES,
        },
    }


def record_json(base: str, r: Activity) -> dict[str, Any]:
    """A signature/submission/attendance/donation/outreach, linking its person and action."""
    action_url = f"{base}/{r.kind.actions}/{r.action_id}"
    # The docs' submission example spells the person id ``action:person_id``; mirrored so a
    # client takes the person from ``_links`` as API_FACTS advises, not from this field.
    person_field = (
        "action:person_id" if r.kind.records == "submissions" else "action_network:person_id"
    )
    return {
        "identifiers": [f"action_network:{r.id}"],
        "created_date": iso(r.created),
        "modified_date": iso(r.modified),
        **r.fields,
        person_field: r.person_id,
        r.kind.id_field: r.action_id,
        "_links": {
            "self": _href(f"{action_url}/{r.kind.records}/{r.id}"),
            r.kind.action_rel: _href(action_url),
            "osdi:person": _href(f"{base}/people/{r.person_id}"),
            "curies": CURIES,
        },
    }


def tag_json(base: str, t: Tag) -> dict[str, Any]:
    """A tag resource."""
    url = f"{base}/tags/{t.id}"
    return {
        "identifiers": [f"action_network:{t.id}"],
        "created_date": iso(t.created),
        "modified_date": iso(t.modified),
        "name": t.name,
        "_links": {"self": _href(url), "osdi:taggings": _href(f"{url}/taggings"), "curies": CURIES},
    }


def tagging_json(base: str, t: Tagging) -> dict[str, Any]:
    """A tagging resource, linking its tag and person."""
    tag_url = f"{base}/tags/{t.tag_id}"
    return {
        "identifiers": [f"action_network:{t.id}"],
        "created_date": iso(t.created),
        "modified_date": iso(t.modified),
        "item_type": "osdi:person",
        "_links": {
            "self": _href(f"{tag_url}/taggings/{t.id}"),
            "osdi:tag": _href(tag_url),
            "osdi:person": _href(f"{base}/people/{t.person_id}"),
            "curies": CURIES,
        },
    }


def _paging(request: web.Request) -> tuple[int, int]:
    """(page, per_page): 1-based page; per_page above 25 is capped silently, as Parsons expects."""
    values = []
    for name, default in (("page", 1), ("per_page", MAX_PER_PAGE)):
        raw = request.query.get(name, "")
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise AnError(400, f"{name} must be a positive integer") from None
        # Zero or negative values are refused (live behaviour not documented).
        if value < 1:
            raise AnError(400, f"{name} must be a positive integer")
        values.append(value)
    return values[0], min(values[1], MAX_PER_PAGE)


def _collection(
    request: web.Request,
    name: str,
    items: list[dict[str, Any]],
    page: int,
    per_page: int,
    total: int | None,
    shown: list[Any] | None = None,
) -> web.Response:
    """A HAL page: ``next`` on every non-empty page (even the last), none on an empty one.

    ``shown`` is what ``_embedded`` holds when a test replaced items (``AnSim.raw``); the
    links still name the simulator's own items.
    """
    here = f"{request.scheme}://{request.host}{request.path}"

    def link(n: int) -> dict[str, str]:
        query = {**request.query, "page": str(n)}
        return _href(f"{here}?{urlencode(query, quote_via=quote)}")

    links: dict[str, Any] = {"self": link(page)}
    if items:
        links["next"] = link(page + 1)
    if page > 1:
        links["previous"] = link(page - 1)
    links[name] = [_href(item["_links"]["self"]["href"]) for item in items]
    links["curies"] = CURIES
    body: dict[str, Any] = {}
    if total is not None:  # absent on /people since 2016 (API_FACTS §4)
        body |= {"total_pages": math.ceil(total / per_page), "total_records": total}
    embedded = items if shown is None else shown
    body |= {"page": page, "per_page": per_page, "_links": links, "_embedded": {name: embedded}}
    return _hal(body)


async def _json(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    text = await request.text()
    if not text.strip():
        return {}
    if request.content_type != "application/json":
        raise AnError(400, "Requests with a body must be sent as application/json")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AnError(400, "The request body is not valid JSON") from exc


async def _write(
    sim: AnSim,
    request: web.Request,
    apply: Callable[[Any], T],
    render: Callable[[T], Mapping[str, Any]],
) -> web.Response:
    """Run a write now, or with ``background_request=true`` answer ``{}`` and run it later."""
    if request.query.get("background_request") != "true":
        return _hal(render(apply(await _json(request))))
    try:
        body: Any = await _json(request)
    except AnError:
        body = None  # reported nowhere, like every background failure
    sim.background["accepted"] += 1

    def run() -> None:
        try:
            apply(body)
        except (AnError, KeyError, ValueError, TypeError):
            sim.background["failed"] += 1
        else:
            sim.background["applied"] += 1

    asyncio.get_running_loop().call_later(sim.background_delay, run)
    return _hal({})


# --------------------------------------------------------------------------- handlers


async def entry_point(sim: AnSim, request: web.Request) -> web.StreamResponse:
    """The AEP answers 200 with any key; only a valid key gets the collection links."""
    base = _base(request)
    links: dict[str, Any] = {
        "self": _href(f"{base}/"),
        "docs": _href("https://actionnetwork.org/docs"),
    }
    if request.get(GROUP) is not None:
        for name in ("people", "tags", *KINDS, "donations"):
            links[f"osdi:{name}"] = _href(f"{base}/{name}")
        links["action_network:metadata"] = _href(f"{base}/metadata")
    links["curies"] = CURIES
    return _hal(
        {
            "motd": "Welcome to the Action Network OSDI API v2 Entry Point!",
            "vendor_name": "Action Network",
            "product_name": "Action Network",
            "osdi_version": "1.1.1",
            "max_pagesize": MAX_PER_PAGE,
            "namespace": "action_network",
            "_links": links,
        }
    )


async def list_people(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    page, per_page = _paging(request)
    clauses = parse_filter(request.query.get("filter"), PEOPLE_FILTERS)
    people = sim.list_people(g.key, clauses, (page - 1) * per_page, per_page)
    base = _base(request)
    items = [person_json(base, p) for p in people]
    shown = [sim.raw.served("people", p.id, item) for p, item in zip(people, items, strict=True)]
    return _collection(request, "osdi:people", items, page, per_page, None, shown)


async def get_person(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    person = sim.get_person(g.key, request.match_info["id"])
    return _hal(sim.raw.served("people", person.id, person_json(_base(request), person)))


async def put_person(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    pid, base = request.match_info["id"], _base(request)
    return await _write(
        sim, request, lambda b: sim.update_person(g.key, pid, b), lambda p: person_json(base, p)
    )


async def signup(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    base = _base(request)
    return await _write(
        sim, request, lambda b: sim.signup(g.key, b), lambda p: person_json(base, p)
    )


def person_records(records: str) -> Op:
    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        page, per_page = _paging(request)
        clauses = parse_filter(request.query.get("filter"), RECORD_FILTERS)
        found, total = sim.list_records(
            g.key,
            records,
            person_id=request.match_info["id"],
            clauses=clauses,
            offset=(page - 1) * per_page,
            limit=per_page,
        )
        base = _base(request)
        items = [record_json(base, r) for r in found]
        shown = [sim.raw.served(records, r.id, i) for r, i in zip(found, items, strict=True)]
        return _collection(request, f"osdi:{records}", items, page, per_page, total, shown)

    return handler


def person_record(records: str) -> Op:
    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        m = request.match_info
        record = sim.get_record(g.key, records, m["rid"], person_id=m["id"])
        return _hal(record_json(_base(request), record))

    return handler


async def person_taggings(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    page, per_page = _paging(request)
    _no_filter(request)
    found, total = sim.list_taggings(
        g.key,
        person_id=request.match_info["id"],
        offset=(page - 1) * per_page,
        limit=per_page,
    )
    base = _base(request)
    items = [tagging_json(base, t) for t in found]
    return _collection(request, "osdi:taggings", items, page, per_page, total)


async def person_tagging(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    m = request.match_info
    return _hal(tagging_json(_base(request), sim.get_tagging(g.key, m["rid"], person_id=m["id"])))


async def person_responses(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    # Surveys are not simulated: every person's responses collection is empty.
    page, per_page = _paging(request)
    sim.get_person(g.key, request.match_info["id"])
    return _collection(request, "action_network:responses", [], page, per_page, 0)


def list_actions(kind: str) -> Op:
    allowed = EVENT_FILTERS if kind == "events" else ACTION_FILTERS

    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        page, per_page = _paging(request)
        clauses = parse_filter(request.query.get("filter"), allowed)
        found, total = sim.list_actions(g.key, kind, clauses, (page - 1) * per_page, per_page)
        base = _base(request)
        items = [action_json(base, a, sim.action_total(g.key, a.id)) for a in found]
        return _collection(request, f"osdi:{kind}", items, page, per_page, total)

    return handler


def get_action(kind: str) -> Op:
    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        action = sim.get_action(g.key, kind, request.match_info["id"])
        return _hal(action_json(_base(request), action, sim.action_total(g.key, action.id)))

    return handler


def action_records(kind: str) -> Op:
    records = KINDS[kind].records

    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        page, per_page = _paging(request)
        clauses = parse_filter(request.query.get("filter"), RECORD_FILTERS)
        found, total = sim.list_records(
            g.key,
            records,
            action_id=request.match_info.get("id"),
            clauses=clauses,
            offset=(page - 1) * per_page,
            limit=per_page,
        )
        base = _base(request)
        items = [record_json(base, r) for r in found]
        return _collection(request, f"osdi:{records}", items, page, per_page, total)

    return handler


def action_record(kind: str) -> Op:
    records = KINDS[kind].records

    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        m = request.match_info
        record = sim.get_record(g.key, records, m["rid"], action_id=m["id"])
        return _hal(record_json(_base(request), record))

    return handler


def record_helper(kind: str) -> Op:
    async def handler(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
        aid, base = request.match_info["id"], _base(request)
        return await _write(
            sim,
            request,
            lambda b: sim.record_helper(g.key, kind, aid, b),
            lambda r: record_json(base, r),
        )

    return handler


def _no_filter(request: web.Request) -> None:
    # Tags and taggings are not in the docs' filter table; a filter there is refused
    # rather than ignored, so a client cannot believe it was applied.
    if request.query.get("filter"):
        raise AnError(400, "This collection cannot be filtered")


async def list_tags(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    page, per_page = _paging(request)
    _no_filter(request)
    found, total = sim.list_tags(g.key, (page - 1) * per_page, per_page)
    base = _base(request)
    items = [tag_json(base, t) for t in found]
    return _collection(request, "osdi:tags", items, page, per_page, total)


async def post_tag(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    body = await _json(request)
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise AnError(400, "A tag needs a name")
    return _hal(tag_json(_base(request), sim.get_tag(g.key, sim.add_tag(g.key, name))))


async def get_tag(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    return _hal(tag_json(_base(request), sim.get_tag(g.key, request.match_info["id"])))


async def tag_taggings(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    page, per_page = _paging(request)
    _no_filter(request)
    found, total = sim.list_taggings(
        g.key, tag_id=request.match_info["id"], offset=(page - 1) * per_page, limit=per_page
    )
    base = _base(request)
    items = [tagging_json(base, t) for t in found]
    return _collection(request, "osdi:taggings", items, page, per_page, total)


async def post_tagging(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    tag_id, base = request.match_info["id"], _base(request)

    def apply(body: Any) -> Tagging:
        link = body.get("_links", {}).get("osdi:person", {}) if isinstance(body, dict) else {}
        href = link.get("href") if isinstance(link, dict) else None
        if not isinstance(href, str):
            raise AnError(400, "You must specify a valid person id")
        return sim.add_tagging(g.key, tag_id, href.rstrip("/").rsplit("/", 1)[-1])

    return await _write(sim, request, apply, lambda t: tagging_json(base, t))


async def get_tagging(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    m = request.match_info
    return _hal(tagging_json(_base(request), sim.get_tagging(g.key, m["rid"], tag_id=m["id"])))


async def delete_tagging(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    m = request.match_info
    return await _write(
        sim,
        request,
        lambda _: sim.remove_tagging(g.key, m["id"], m["rid"]),
        lambda _: {"notice": "This tagging was successfully deleted."},
    )


async def custom_fields(sim: AnSim, request: web.Request, g: Group) -> web.StreamResponse:
    names = sim.custom_field_names(g.key)
    return _hal(
        {
            "origin_system": "Action Network",
            "name": "Custom Fields",
            "description": "The collection of custom fields available at this endpoint.",
            "action_network:custom_fields": [
                {"name": name, "created_date": iso(ts), "modified_date": iso(ts)}
                for name, ts in sorted(names.items())
            ],
            "_links": {"self": _href(f"{_base(request)}/metadata/custom_fields")},
        }
    )


# --------------------------------------------------------------------------- routing


def _routes() -> list[tuple[str, str, Op]]:
    routes: list[tuple[str, str, Op]] = [
        ("GET", "/people", list_people),
        ("POST", "/people", signup),
        ("GET", "/people/{id}", get_person),
        ("PUT", "/people/{id}", put_person),
        ("GET", "/people/{id}/taggings", person_taggings),
        ("GET", "/people/{id}/taggings/{rid}", person_tagging),
        ("GET", "/people/{id}/responses", person_responses),
        ("GET", "/tags", list_tags),
        ("POST", "/tags", post_tag),
        ("GET", "/tags/{id}", get_tag),
        ("GET", "/tags/{id}/taggings", tag_taggings),
        ("POST", "/tags/{id}/taggings", post_tagging),
        ("GET", "/tags/{id}/taggings/{rid}", get_tagging),
        ("DELETE", "/tags/{id}/taggings/{rid}", delete_tagging),
        ("GET", "/donations", action_records("fundraising_pages")),
        ("GET", "/metadata/custom_fields", custom_fields),
    ]
    for kind in KINDS.values():
        routes += [
            ("GET", f"/people/{{id}}/{kind.records}", person_records(kind.records)),
            ("GET", f"/people/{{id}}/{kind.records}/{{rid}}", person_record(kind.records)),
            ("GET", f"/{kind.actions}", list_actions(kind.actions)),
            ("GET", f"/{kind.actions}/{{id}}", get_action(kind.actions)),
            ("GET", f"/{kind.actions}/{{id}}/{kind.records}", action_records(kind.actions)),
            ("POST", f"/{kind.actions}/{{id}}/{kind.records}", record_helper(kind.actions)),
            ("GET", f"/{kind.actions}/{{id}}/{kind.records}/{{rid}}", action_record(kind.actions)),
        ]
    return routes


def _make_gate(sim: AnSim) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    async def gate(request: web.Request) -> web.StreamResponse | None:
        if not request.path.startswith(API):
            return None
        key = request.headers.get("OSDI-API-Token")
        group = sim.authenticate(key)
        if group is None:
            if request.path in (API, f"{API}/"):
                return None
            # Live echoes the key in this body (API_FACTS §2): a client must never log it.
            return error_response(403, f"API Key invalid or not present: {key or ''}")
        request[GROUP] = group
        request[TENANT] = group.id
        if not sim.limiter.hit(group.id).allowed:
            # No Retry-After and no rate-limit headers: none are documented (API_FACTS §3).
            return error_response(429, "Too many requests")
        return None

    return gate


def _meter(sim: AnSim) -> Middleware:
    """Count each request of a known key before faults or limits can answer it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(API):
            group = sim.authenticate(request.headers.get("OSDI-API-Token"))
            if group is not None:
                sim.meter.hit(group.id)
        return await handler(request)

    return middleware


def _bind(sim: AnSim, op: Op) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await op(sim, request, request[GROUP])
        except AnError as exc:
            return error_response(exc.status, exc.message)

    return handler


def build_app(sim: AnSim) -> web.Application:
    """The simulator as an aiohttp app: Action Network's routes plus ``/_sim/`` controls."""
    app = web.Application(
        middlewares=[
            _meter(sim),
            sim_middleware(
                sim.journal, sim.faults, gate=_make_gate(sim), error_body=error_response
            ),
        ]
    )

    async def aep(request: web.Request) -> web.StreamResponse:
        return await entry_point(sim, request)

    app.router.add_get(API, aep)
    app.router.add_get(f"{API}/", aep)
    for method, path, op in _routes():
        app.router.add_route(method, API + path, _bind(sim, op))
    add_control_routes(app, sim.journal, sim.faults, stats=sim.stats)
    _add_control(app, sim)
    return app


# --------------------------------------------------------------------------- /_sim/an


def _add_control(app: web.Application, sim: AnSim) -> None:
    """JSON mirrors of the Python helpers, for the demo and benchmarks run out of process."""

    async def read(request: web.Request) -> dict[str, Any]:
        raw = await request.json() if request.can_read_body else {}
        if not isinstance(raw, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return raw

    async def groups(request: web.Request) -> web.Response:
        raw = await read(request)
        key = sim.add_group(raw.get("key"))
        if "people" in raw:
            seed_group(
                sim,
                key,
                people=int(raw["people"]),
                activities_per_person=int(raw.get("activitiesPerPerson", 3)),
                seed=int(raw.get("seed", 0)),
            )
        return web.json_response({"key": key, "groupId": sim.group_id(key)})

    async def touch(request: web.Request) -> web.Response:
        raw = await read(request)
        try:
            person = sim.touch_person(raw["personId"], raw.get("changes"))
        except AnError as exc:
            return error_response(exc.status, exc.message)
        return web.json_response({"id": person.id, "modified_date": iso(person.modified)})

    async def config(request: web.Request) -> web.Response:
        raw = await read(request)
        if "indexLag" in raw:
            sim.index_lag = float(raw["indexLag"])
        if "backgroundDelay" in raw:
            sim.background_delay = float(raw["backgroundDelay"])
        if "rateLimit" in raw or "rateWindow" in raw:
            limiter = sim.limiter
            sim.set_rate_limit(
                int(raw.get("rateLimit", limiter.limit)),
                float(raw.get("rateWindow", limiter.window)),
            )
        return web.json_response({"ok": True})

    app.router.add_post("/_sim/an/groups", groups)
    app.router.add_post("/_sim/an/touch", touch)
    app.router.add_post("/_sim/an/config", config)
