"""Deterministic Action Network data: people, activities and taggings computed from an index."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from bridge.sim.actionnetwork_state import KINDS, Action, Activity, AnSim, Person, Tagging, digits

# Generated dates end here whatever the wall clock says, so a seed always yields the same data.
ANCHOR = 1_767_225_600  # 2026-01-01T00:00:00Z
HOUR = 3_600
DAY = 86_400
YEAR = 365 * DAY

_M64 = (1 << 64) - 1
_M48 = (1 << 48) - 1
_C1, _C2 = 0x9E3779B97F4B, 0xD1B54A32D193
_C1_INV, _C2_INV = pow(_C1, -1, 1 << 48), pow(_C2, -1, 1 << 48)


def mix(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 rounds): stable across runs, unlike ``hash``."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = ((h ^ (part & _M64)) * 0xBF58476D1CE4E5B9) & _M64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _M64
        h ^= h >> 29
    return h


def _scramble(n: int) -> int:
    # Invertible on 48 bits (odd multipliers, xorshift by half the width), so consecutive
    # indices do not give consecutive-looking ids.
    n = (n * _C1) & _M48
    n ^= n >> 24
    return (n * _C2) & _M48


def _unscramble(x: int) -> int:
    x = (x * _C2_INV) & _M48
    x ^= x >> 24
    return (x * _C1_INV) & _M48


class IdSpace:
    """Version-4-shaped UUIDs that encode an index: a per-(seed, salt) prefix, a scrambled tail."""

    def __init__(self, seed: int, salt: int) -> None:
        high = ((mix(seed, salt) << 16) | (mix(seed, salt, 1) & 0xFFFF)) << 48
        high = (high & ~(0xF << 76)) | (4 << 76)
        high = (high & ~(0x3 << 62)) | (0x2 << 62)
        self._high = high >> 48
        self._tail = mix(seed, salt, 2) & _M48  # so member n's ids differ across spaces

    def make(self, n: int) -> str:
        """The id of member ``n``."""
        return str(uuid.UUID(int=(self._high << 48) | (_scramble(n) ^ self._tail)))

    def index(self, text: str) -> int | None:
        """The member a canonical lowercase id names, or None if it is not from this space."""
        try:
            value = uuid.UUID(text)
        except ValueError:
            return None
        if str(value) != text or value.int >> 48 != self._high:
            return None
        return _unscramble((value.int & _M48) ^ self._tail)


# --------------------------------------------------------------------------- vocabulary

GIVEN = (
    "Rosa", "Ada", "Marcus", "Priya", "Jamal", "Elena", "Tomas", "Keiko", "Samuel", "Fatima",
    "Grace", "Luis", "Nadia", "Owen", "Imani", "Diego", "Hannah", "Wei", "Carmen", "Malik",
    "Sofia", "Ethan", "Aisha", "Noah", "Lucia", "Andre", "Mei", "Jonah", "Zainab", "Leo",
    "Maya", "Darius", "Ingrid", "Rafael", "Yara", "Caleb", "Esther", "Kwame", "Julia", "Hugo",
)  # fmt: skip
FAMILY = (
    "Delgado", "Okafor", "Nguyen", "Patel", "Johnson", "Kowalski", "Haddad", "Tanaka",
    "Rivera", "Lindqvist", "Mensah", "Garcia", "Schmidt", "Baptiste", "Chen", "Abara",
    "Morales", "Petrov", "Walker", "Santos", "Ibrahim", "Kim", "Murphy", "Alvarez", "Osei",
    "Fischer", "Reyes", "Novak", "Brooks", "Moreau", "Singh", "Larsen", "Hughes", "Duarte",
)  # fmt: skip
DOMAINS = ("example.org", "example.net", "example.com", "mail.example.org")
PLACES = (
    ("Portland", "OR", "97214", 45.5122, -122.6587, "503"),
    ("Seattle", "WA", "98122", 47.6101, -122.3018, "206"),
    ("Oakland", "CA", "94612", 37.8044, -122.2712, "510"),
    ("Denver", "CO", "80205", 39.7589, -104.9650, "303"),
    ("Austin", "TX", "78702", 30.2637, -97.7140, "512"),
    ("Chicago", "IL", "60647", 41.9214, -87.7017, "773"),
    ("Minneapolis", "MN", "55407", 44.9367, -93.2530, "612"),
    ("Detroit", "MI", "48207", 42.3496, -83.0263, "313"),
    ("Atlanta", "GA", "30312", 33.7395, -84.3790, "404"),
    ("Durham", "NC", "27701", 35.9966, -78.9018, "919"),
    ("Philadelphia", "PA", "19104", 39.9597, -75.1968, "215"),
    ("Brooklyn", "NY", "11216", 40.6806, -73.9493, "718"),
    ("Boston", "MA", "02119", 42.3243, -71.0847, "617"),
    ("Milwaukee", "WI", "53212", 43.0706, -87.9081, "414"),
    ("Albuquerque", "NM", "87102", 35.0819, -106.6456, "505"),
    ("New Orleans", "LA", "70117", 29.9669, -90.0372, "504"),
)
STREETS = ("Oak St", "Maple Ave", "Main St", "Cedar Ln", "Alberta St", "Division St", "Grand Ave")
EMPLOYERS = ("City Schools", "County Hospital", "Transit Authority", "Riverside Foods")
TITLES: dict[str, tuple[str, ...]] = {
    "petitions": ("Clean Water Now", "Protect Public Libraries", "Fair Wages for Care Workers"),
    "forms": ("Volunteer Sign-up", "Join the Phone Bank", "Host a House Meeting"),
    "events": ("Town Hall on Housing", "Community Cleanup Day", "Rally for Transit"),
    "fundraising_pages": ("Spring Fund Drive", "Legal Defense Fund", "Match Our Members"),
    "advocacy_campaigns": ("Tell Congress: Fund Clean Water", "Letter to the Mayor on Transit"),
}
TAG_NAMES = ("volunteer", "member", "donor", "newsletter", "event host", "phone bank")
COMMENTS = (
    "Our kids deserve safe water.",
    "I signed because this affects my whole street.",
    "Please act before the next budget vote!",
    "Libraries saved my life as a teenager.",
)
SOURCES = ("email", "facebook", "twitter", "website", "newsletter-jan")
RSVP = ("accepted",) * 6 + ("tentative", "declined", "cancelled", "needs action")
EMAIL_STATUS = ("subscribed",) * 17 + ("unsubscribed", "bouncing", "previous bounce")
AMOUNTS = (5, 10, 15, 20, 25, 35, 50, 100, 250)
_EMAIL_RE = re.compile(r"[a-z]+\.[a-z]+(\d+)@[a-z.]+")


# --------------------------------------------------------------------------- the generator


class GeneratedGroup:
    """A group's generated population: every value is a pure function of (seed, index).

    Person ``i`` joins at ``created_at(i)``, which rises with ``i`` across the ``span``
    seconds before ``until``; their activities follow within hours and their last change within
    a day, so every date of person ``i`` lies in ``[created_at(i), created_at(i) + slack]``.
    Activity ``f`` is slot ``f % per_person`` of person ``f // per_person`` on action
    ``f % len(actions)``; person ``i`` carries tag ``i % (tags + 1)`` (the last value: none).
    Nothing is stored per person, so a million people cost nothing until touched.
    """

    def __init__(
        self,
        *,
        seed: int,
        count: int,
        per_person: int,
        actions: Sequence[Action],
        tag_ids: Sequence[str],
        until: int = ANCHOR,
        span: int = 3 * YEAR,
    ) -> None:
        self.seed = seed
        self.count = count
        self.per_person = per_person if actions else 0
        self.person_slack = (self.per_person + 2) * HOUR + DAY
        self.activity_slack = (self.per_person + 2) * HOUR
        if count < 0 or per_person < 0 or span <= self.person_slack:
            raise ValueError("count and per_person must not be negative; span must exceed a day")
        self.salt = mix(seed, 99)
        # Joining dates stop one slack before ``until`` so every generated date is before it.
        self._start, self._span = until - span, span - self.person_slack
        self._actions = tuple(actions)
        self._action_pos = {a.id: n for n, a in enumerate(self._actions)}
        self._tags = tuple(tag_ids)
        self._tag_pos = {t: n for n, t in enumerate(self._tags)}
        self._person_ids = IdSpace(seed, 1)
        self._activity_ids = IdSpace(seed, 2)
        self._tagging_ids = IdSpace(seed, 3)

    # ----------------------------------------------------------------- people

    def person_id(self, i: int) -> str:
        """The uuid of person ``i``."""
        return self._person_ids.make(i)

    def person_index(self, person_id: str) -> int | None:
        """The index a generated person's uuid encodes, or None."""
        i = self._person_ids.index(person_id)
        return i if i is not None and i < self.count else None

    def created_at(self, i: int) -> int:
        """When person ``i`` joined the list (non-decreasing in ``i``)."""
        return self._start + (i * self._span) // self.count

    def modified_at(self, i: int) -> int:
        """Person ``i``'s modified_date: after all their generated activities."""
        return self.created_at(i) + (self.per_person + 1) * HOUR + mix(self.seed, i, 7) % DAY

    def index_range(self, lower: int | None, upper: int | None, slack: int) -> tuple[int, int]:
        """Indices whose dates in ``[created_at(i), created_at(i) + slack]`` can fall strictly
        between ``lower`` and ``upper``."""
        lo, hi = 0, self.count
        if lower is not None:
            x = lower - slack - self._start
            lo = 0 if x < 0 else -(-(x + 1) * self.count // self._span)
        if upper is not None:
            y = upper - self._start
            hi = 0 if y <= 0 else -(-y * self.count // self._span)
        return min(lo, self.count), min(hi, self.count)

    def person(self, i: int) -> Person:
        """Person ``i`` as a fresh record."""
        h, r = mix(self.seed, i, 1), mix(self.seed, i, 2)
        given, family = GIVEN[h % len(GIVEN)], FAMILY[(h >> 8) % len(FAMILY)]
        city, region, postal, lat, lon, area = PLACES[(r >> 12) % len(PLACES)]
        emails: list[dict[str, Any]] = []
        if r % 20:  # one in twenty is mobile-only
            address = f"{given.lower()}.{family.lower()}{i}@{DOMAINS[(r >> 5) % len(DOMAINS)]}"
            status = EMAIL_STATUS[(h >> 20) % len(EMAIL_STATUS)]
            emails.append({"primary": True, "address": address, "status": status})
        phones: list[dict[str, Any]] = []
        if not emails or (r >> 9) % 4:
            number = f"1{area}{i % 10_000_000:07d}"
            status = "unsubscribed" if (h >> 28) % 10 < 3 else "subscribed"
            phones.append(
                {"primary": True, "number": number, "number_type": "Mobile", "status": status}
            )
        addresses: list[dict[str, Any]] = []
        if (r >> 24) % 10:
            jitter = ((h >> 32) % 2000 - 1000) / 100_000
            addresses.append(
                {
                    "primary": True,
                    "address_lines": [f"{100 + r % 9000} {STREETS[(h >> 36) % len(STREETS)]}"],
                    "locality": city,
                    "region": region,
                    "postal_code": postal,
                    "country": "US",
                    "language": "en",
                    "location": {
                        "latitude": round(lat + jitter, 4),
                        "longitude": round(lon - jitter, 4),
                        "accuracy": "Rooftop",
                    },
                }
            )
        custom: dict[str, str] = {}
        if (h >> 40) % 5 < 3:
            custom["Volunteer level"] = str(1 + (h >> 44) % 5)
        if (h >> 48) % 10 < 3:
            custom["Union local"] = f"Local {(h >> 52) % 90 + 10}"
        if (r >> 40) % 4 == 0:
            custom["Employer"] = EMPLOYERS[(r >> 44) % len(EMPLOYERS)]
        return Person(
            self.person_id(i),
            self.created_at(i),
            self.modified_at(i),
            given_name=given,
            family_name=family,
            emails=emails,
            phones=phones,
            addresses=addresses,
            languages=["es"] if r % 10 == 3 else ["en"],
            custom_fields=custom,
            index=i,
        )

    def index_of_email(self, address: str) -> int | None:
        """The generated person whose primary e-mail this is (addresses carry the index)."""
        m = _EMAIL_RE.fullmatch(address.lower())
        if m is None or int(m.group(1)) >= self.count:
            return None
        i = int(m.group(1))
        email = self.person(i).email
        return i if email is not None and email.lower() == address.lower() else None

    def index_of_phone(self, number: str) -> int | None:
        """The generated person whose primary phone this is (numbers carry the index)."""
        d = digits(number)
        if len(d) != 11 or int(d[4:]) >= self.count:
            return None
        i = int(d[4:])
        phone = self.person(i).phone
        return i if phone is not None and digits(phone) == d else None

    # ----------------------------------------------------------------- activities

    def activity_id(self, f: int) -> str:
        """The uuid of activity ``f``."""
        return self._activity_ids.make(f)

    def activity_index(self, activity_id: str) -> int | None:
        """The activity a generated uuid encodes, or None."""
        f = self._activity_ids.index(activity_id)
        return f if f is not None and f < self.count * self.per_person else None

    def activity_dates(self, f: int) -> tuple[int, int]:
        """Created and modified dates of activity ``f`` (cheap: no record is built)."""
        i, j = divmod(f, self.per_person)
        created = self.created_at(i) + (j + 1) * HOUR + mix(self.seed, f, 11) % HOUR
        return created, created

    def activity_action(self, f: int) -> str:
        """The id of the action activity ``f`` was taken on."""
        return self._actions[f % len(self._actions)].id

    def action_family(self, action_id: str) -> tuple[int, int, int] | None:
        """Activities of an action as (first, step, count) over activity indices."""
        a = self._action_pos.get(action_id)
        if a is None:
            return None
        total, step = self.count * self.per_person, len(self._actions)
        return a, step, max(0, -(-(total - a) // step))

    def activity(self, f: int) -> Activity:
        """Activity ``f`` as a fresh record."""
        i = f // self.per_person
        action = self._actions[f % len(self._actions)]
        created, modified = self.activity_dates(f)
        h = mix(self.seed, f, 12)
        fields: dict[str, Any] = {
            "action_network:referrer_data": {
                "source": SOURCES[h % len(SOURCES)],
                "website": "actionnetwork.org",
            }
        }
        kind = action.kind.records
        if kind == "signatures" and (h >> 8) % 5 < 2:
            fields["comments"] = COMMENTS[(h >> 12) % len(COMMENTS)]
        elif kind == "attendances":
            fields["status"] = RSVP[(h >> 8) % len(RSVP)]
        elif kind == "donations":
            amount = f"{AMOUNTS[(h >> 8) % len(AMOUNTS)]}.{(h >> 16) % 2 * 50:02d}"
            recurring = (h >> 20) % 4 == 0
            fields |= {
                "currency": "USD",
                "amount": amount,
                "recipients": [{"display_name": "Sim Organizing Fund", "amount": amount}],
                "payment": {
                    "method": "Credit Card",
                    "reference_number": f"{h >> 24:012x}"[:12],
                    "authorization_stored": recurring,
                },
                "action_network:recurrence": {
                    "recurring": recurring,
                    "period": "Monthly" if recurring else "None",
                },
            }
        elif kind == "outreaches":
            fields |= {
                "type": "email",
                "subject": f"Please support: {action.title}",
                "message": f"As your constituent I ask you to act on {action.title}. Thank you.",
                "targets": [
                    {
                        "title": "Senator",
                        "given_name": GIVEN[(h >> 8) % len(GIVEN)],
                        "family_name": FAMILY[(h >> 16) % len(FAMILY)],
                        "ocdid": "ocd-division/country:us/state:or",
                    }
                ],
            }
        return Activity(
            self.activity_id(f),
            action.kind,
            action.id,
            self.person_id(i),
            created,
            modified,
            fields,
            index=f,
        )

    # ----------------------------------------------------------------- taggings

    def tagging(self, i: int) -> Tagging | None:
        """Person ``i``'s generated tagging, if they have one."""
        t = i % (len(self._tags) + 1)
        if t == len(self._tags):
            return None
        created = self.created_at(i) + 60
        return Tagging(
            self._tagging_ids.make(i), self._tags[t], self.person_id(i), created, created, index=i
        )

    def tagging_index(self, tagging_id: str) -> int | None:
        """The person index a generated tagging's uuid encodes, or None."""
        i = self._tagging_ids.index(tagging_id)
        return i if i is not None and i < self.count and self.tagging(i) is not None else None

    def tag_family(self, tag_id: str) -> tuple[int, int, int] | None:
        """People carrying a tag as (first, step, count) over person indices."""
        t = self._tag_pos.get(tag_id)
        if t is None:
            return None
        step = len(self._tags) + 1
        return t, step, max(0, -(-(self.count - t) // step))


# --------------------------------------------------------------------------- seeding


def _action_fields(kind: str, title: str, n: int, until: int, span: int) -> dict[str, Any]:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    fields: dict[str, Any] = {
        "description": f"<p>{title}: join us.</p>",
        "browser_url": f"https://actionnetwork.org/{kind}/{slug}",
    }
    if kind == "petitions":
        fields |= {"petition_text": f"We call for: {title}.", "target": [{"name": "City Council"}]}
    elif kind == "forms":
        fields["call_to_action"] = "Sign up"
    elif kind == "events":
        start = until - span // 2 + n * 7 * DAY
        fields |= {
            "start_date": start,
            "end_date": start + 2 * HOUR,
            "status": "confirmed",
            "location": {"venue": "Community Hall", "locality": "Portland", "region": "OR"},
        }
    elif kind == "fundraising_pages":
        fields["currency"] = "USD"
    else:
        fields |= {"type": "email", "targets": [{"title": "Senator"}]}
    return fields


def seed_group(
    sim: AnSim,
    key: str,
    *,
    people: int = 200,
    activities_per_person: int = 3,
    seed: int = 0,
    actions: int = 10,
    tags: int = 6,
    until: int = ANCHOR,
    span: int = 3 * YEAR,
) -> GeneratedGroup:
    """Give ``key``'s group ``people`` generated people with their activities and taggings.

    Actions cycle through the five kinds (so ten actions give two of each); tags are
    real stored tags. Cost is O(actions + tags): people exist only as a function of their
    index until something changes them, so ``people=1_000_000`` is as quick as 2,000.
    """
    key = sim.add_group(key)
    kinds = list(KINDS)
    action_ids, tag_ids = IdSpace(seed, 4), IdSpace(seed, 5)
    made: list[Action] = []
    for n in range(actions):
        kind = kinds[n % len(kinds)]
        titles = TITLES[kind]
        title = titles[(n // len(kinds)) % len(titles)]
        if n >= len(kinds) * len(titles):
            title = f"{title} {n // (len(kinds) * len(titles)) + 1}"
        created = until - span - (actions - n) * DAY
        fields = _action_fields(kind, title, n, until, span)
        aid = sim.add_action(
            key, kind, title, action_id=action_ids.make(n), created=created, **fields
        )
        made.append(sim.get_action(key, kind, aid))
    names = [
        TAG_NAMES[n % len(TAG_NAMES)]
        + (f" {n // len(TAG_NAMES) + 1}" if n >= len(TAG_NAMES) else "")
        for n in range(tags)
    ]
    made_tags = [
        sim.add_tag(key, name, tag_id=tag_ids.make(n), created=until - span - DAY)
        for n, name in enumerate(names)
    ]
    pop = GeneratedGroup(
        seed=seed,
        count=people,
        per_person=activities_per_person,
        actions=made,
        tag_ids=made_tags,
        until=until,
        span=span,
    )
    sim.set_population(key, pop)
    return pop


def build_sim(
    *,
    people: int = 2_000,
    activities_per_person: int = 3,
    groups: int = 1,
    seed: int = 0,
    keys: Sequence[str] | None = None,
) -> tuple[AnSim, list[str]]:
    """A seeded simulator for ``bridge sim actionnetwork``: returns it and its API keys.

    Keys are derived from ``seed`` unless given, so a restarted sim accepts the same keys.
    """
    sim = AnSim(seed=seed)
    made: list[str] = []
    for n in range(groups):
        key = keys[n] if keys is not None else f"sim-an-{mix(seed, n, 77):016x}"
        seed_group(
            sim,
            key,
            people=people,
            activities_per_person=activities_per_person,
            seed=seed + n,
        )
        made.append(key)
    return sim, made
