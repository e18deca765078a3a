"""Deterministic ActiveDEMAND data: contacts, forms, conversations with texts, media and calls."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from bridge.sim.activedemand_state import (
    EMAIL,
    FIRST_NAME,
    LAST_NAME,
    PHONE,
    AdSim,
    default_recording,
)
from bridge.sim.an_data import ANCHOR, DAY, DOMAINS, FAMILY, GIVEN, HOUR, PLACES, YEAR, mix

# Over the bridge's 5 MiB GHL upload default, so the "too big to forward" path is exercised.
OVERSIZED_BYTES = 12 * 1024 * 1024
MINUTE = 60

MEMBER_TYPES = ("Friend", "Member", "Volunteer", "Donor")
LANGUAGES = ("English", "Spanish", "Vietnamese", "Tagalog")
INBOUND = (
    "Hi, is the meeting still on for Thursday?",
    "Can you send me the address again?",
    "Thanks! Count me in.",
    "I can't make it this week, sorry.",
    "What time should I arrive?",
    "STOP",
    "Do you need volunteers for the phone bank?",
)
OUTBOUND = (
    "Yes, 6pm at the community hall. See you there!",
    "It's 1200 Alberta St, side entrance.",
    "Great, we've added you to the list.",
    "No problem, we'll let you know about the next one.",
    "Doors open at 5:30.",
)
CALL_SCRIPT = (
    ("agent", "Hi, this is Sam calling from the campaign office."),
    ("contact", "Oh hi, yes I got your text."),
    ("agent", "Great. Can we count on you for Saturday's canvass?"),
    ("contact", "Yes, I'll be there around ten."),
    ("agent", "Wonderful, thank you so much."),
)
NOTES = (
    "Met at the spring open house.",
    "Prefers text over email.",
    "Interested in hosting a house meeting.",
)


def tiny_png() -> bytes:
    """A valid 1x1 red PNG, the allowed image attachment."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# Just the DOS header magic and padding: enough to look like a Windows executable.
FAKE_EXE = b"MZ\x90\x00" + b"\x00" * 60 + b"This program cannot be run in DOS mode.\r\n"


@dataclass(frozen=True, slots=True)
class SeededAccount:
    """Ids of what ``seed_account`` made, so tests can go straight to the interesting bits."""

    key: str
    contact_ids: tuple[int, ...]
    form_ids: tuple[int, ...]
    conversation_ids: tuple[int, ...]
    image_message_id: int
    disallowed_message_id: int
    oversized_message_id: int
    call_message_ids: tuple[int, ...]
    missed_call_message_id: int


def _phone(i: int, h: int, area: str) -> str:
    """A phone number written the way people type them: three styles, to force normalising."""
    line = f"{i % 10_000:04d}"
    style = (h >> 20) % 3
    if style == 0:
        return f"({area}) 555-{line}"
    if style == 1:
        return f"{area}-555-{line}"
    return f"+1{area}555{line}"


def _seed_contacts(
    sim: AdSim, key: str, count: int, seed: int, until: int, span: int, custom: tuple[str, str]
) -> list[int]:
    member_field, language_field = custom
    made: list[int] = []
    for i in range(count):
        h, r = mix(seed, i, 1), mix(seed, i, 2)
        given, family = GIVEN[h % len(GIVEN)], FAMILY[(h >> 8) % len(FAMILY)]
        area = PLACES[(r >> 12) % len(PLACES)][5]
        values = {FIRST_NAME: given, LAST_NAME: family}
        has_email = r % 15 != 0  # one in fifteen is phone-only
        if has_email:
            values[EMAIL] = (
                f"{given.lower()}.{family.lower()}{i}@{DOMAINS[(r >> 5) % len(DOMAINS)]}"
            )
        if not has_email or (r >> 9) % 4:
            values[PHONE] = _phone(i, h, area)
        if (h >> 40) % 10 < 6:
            values[member_field] = MEMBER_TYPES[(h >> 44) % len(MEMBER_TYPES)]
        if (r >> 40) % 10 < 3:
            values[language_field] = LANGUAGES[(r >> 44) % len(LANGUAGES)]
        created = until - span + (i * (span - 60 * DAY)) // max(count, 1)
        contact = sim.add_contact(key, values, created=created)
        # Some contacts were edited after they were made; the marker shows it.
        contact.updated = created + mix(seed, i, 3) % (30 * DAY)
        made.append(contact.id)
        if r % 5 == 0:
            note = NOTES[(r >> 16) % len(NOTES)]
            sim.seed_history(key, contact.id, "note", note, created=created + HOUR)
    return made


def _seed_texts(sim: AdSim, key: str, conv_id: int, seed: int, start: int) -> None:
    """Two to six texts alternating in and out; one outbound in ten failed."""
    for j in range(2 + mix(seed, conv_id, 5) % 5):
        ts = start + j * 7 * MINUTE
        k = mix(seed, conv_id, j)
        if j % 2 == 0:
            sim.add_message(key, conv_id, body=INBOUND[k % len(INBOUND)], created=ts)
            continue
        msg = sim.add_message(
            key, conv_id, body=OUTBOUND[k % len(OUTBOUND)], direction="outbound", created=ts
        )
        # Set directly: ``set_status`` stamps the wall clock, and seeded data must not.
        msg.status = "failed" if k % 10 == 0 else "delivered"
        msg.error = "Carrier rejected the message" if k % 10 == 0 else None


def seed_account(
    sim: AdSim,
    key: str,
    *,
    contacts: int = 200,
    seed: int = 0,
    conversations: int | None = None,
    oversized_bytes: int = OVERSIZED_BYTES,
    until: int = ANCHOR,
    span: int = 2 * YEAR,
) -> SeededAccount:
    """Give ``key``'s account a catalogue, three forms, contacts, conversations and calls.

    Conversations (default: one per ten contacts, at least four) hold two to six texts;
    the first three also get an allowed PNG, a disallowed ``.exe`` and an oversized video;
    every eighth (with fewer than eight, the last) is a phone conversation with recorded,
    transcribed calls, and the first of those starts with a missed call that has neither
    recording nor transcription. Contacts repeat across conversations when there are more
    conversations than contacts.
    """
    count = conversations if conversations is not None else max(4, contacts // 10)
    if contacts < 1 or count < 2:
        raise ValueError("an account needs a contact and two conversations (texts and calls)")
    key = sim.add_account(key)
    member = sim.add_custom_field(key, "Member Type", type="dropdown", options=MEMBER_TYPES)
    language = sim.add_custom_field(key, "Preferred Language")
    sim.add_custom_field(key, "Portal Password", type="password")
    core = (FIRST_NAME, LAST_NAME, EMAIL)
    forms = (
        sim.add_form(key, "Newsletter Sign-up", core),
        sim.add_form(key, "Volunteer Interest", (*core, PHONE, member)),
        sim.add_form(key, "Bridge Sync", (*core, PHONE, member, language)),
    )
    contact_ids = _seed_contacts(sim, key, contacts, seed, until, span, (member, language))
    conv_ids: list[int] = []
    calls: list[int] = []
    missed: int | None = None
    for n in range(count):
        contact_id = contact_ids[(n * 7) % len(contact_ids)]
        start = sim.contact(key, contact_id).created + DAY + mix(seed, n, 6) % (20 * DAY)
        if n % 8 == 7 or (count < 8 and n == count - 1):
            conv = sim.add_conversation(key, contact_id, channel="phone", created=start)
            if missed is None:
                missed = sim.add_call(key, conv.id, duration=0, created=start).id
            for j in range(1 + n % 2):
                call = sim.add_call(
                    key,
                    conv.id,
                    duration=45 + mix(seed, n, j) % 300,
                    direction="outbound" if j % 2 else "inbound",
                    status="delivered" if j % 2 else "received",
                    recording=default_recording(0.25),
                    transcript=CALL_SCRIPT,
                    created=start + (j + 1) * HOUR,
                )
                calls.append(call.id)
        else:
            channel = ("sms", "sms", "email", "web_chat", "sms")[n % 5]
            conv = sim.add_conversation(key, contact_id, channel=channel, created=start)
            _seed_texts(sim, key, conv.id, seed, start)
        conv_ids.append(conv.id)
    texts = [c for c in conv_ids if sim.conversation(key, c).channel != "phone"]
    image, exe, big = (texts[i % len(texts)] for i in range(3))
    later = until - DAY
    image_msg = sim.add_message(
        key,
        image,
        body="Here's the flyer",
        attachments=[sim.add_attachment("flyer.png", "image/png", data=tiny_png())],
        created=later,
    )
    exe_msg = sim.add_message(
        key,
        exe,
        body="Please open the invoice",
        attachments=[sim.add_attachment("invoice.exe", "application/x-msdownload", data=FAKE_EXE)],
        created=later + MINUTE,
    )
    big_msg = sim.add_message(
        key,
        big,
        body="Video from the rally",
        attachments=[sim.add_attachment("rally.mp4", "video/mp4", size=oversized_bytes)],
        created=later + 2 * MINUTE,
    )
    assert missed is not None
    return SeededAccount(
        key,
        tuple(contact_ids),
        tuple(f.id for f in forms),
        tuple(conv_ids),
        image_msg.id,
        exe_msg.id,
        big_msg.id,
        tuple(calls),
        missed,
    )


def build_sim(
    *,
    contacts: int = 1_000,
    seed: int = 0,
    key: str | None = None,
    application_key: str | None = None,
    rate_limit: int = 5,
) -> tuple[AdSim, str]:
    """A seeded simulator for ``bridge sim activedemand``: returns it and its API key.

    The key is derived from ``seed`` unless given, so a restarted sim accepts the same key.
    With ``application_key`` the sim requires that partner key on every request.
    """
    sim = AdSim(seed=seed, rate_limit=rate_limit, require_application_key=bool(application_key))
    key = key or f"sim-ad-{mix(seed, 78):016x}"
    seed_account(sim, key, contacts=contacts, seed=seed)
    if application_key:
        sim.add_application(application_key, accounts=[key])
    return sim, key
