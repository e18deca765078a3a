"""The declarative field mapping: paths, transforms, compile-time checks, bad records."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest

from bridge.app import compile_flows
from bridge.config import FieldRule, MappingProfile, load_config
from bridge.errors import ConfigError, Rejected
from bridge.mapping import ContactMapping, compile_profiles, e164, preview, resolve

PERSON = {
    "given_name": " Ada ",
    "family_name": "Lovelace",
    "email": "ADA@Example.org",
    "phone": "(503) 555-0142",
    "email_addresses": [{"address": "ADA@Example.org", "primary": True}],
    "phone_numbers": [{"number": "(503) 555-0142"}],
    "postal_addresses": [{"locality": "Portland", "region": "or", "postal_code": "97201"}],
    "custom_fields": {"employer": "Analytical Engines"},
    "created_date": "2024-02-03T04:05:06Z",
}


def rule(source: str | list[str], *transforms: str, **extra: str) -> FieldRule:
    return msgspec.convert({"from": source, "transforms": list(transforms), **extra}, FieldRule)


def mapping(
    contact: dict[str, FieldRule], custom: dict[str, FieldRule] | None = None
) -> ContactMapping:
    return ContactMapping(MappingProfile(contact=contact, custom_fields=custom or {}), name="p")


def test_example_profiles_compile_and_map(tmp_path: Path) -> None:
    """The example config's Action Network profile maps a person to a clean upsert body."""
    example = Path(__file__).parents[1] / "config.example.toml"
    shutil.copy(example, tmp_path / "config.toml")
    (tmp_path / "ghl_client_secret").write_text("secret-value\n")
    env = {"GHL_MAIN_TOKEN": "tok-123456", "AN_MAIN_KEY": "key-123456", "AD_MAIN_KEY": "key-654321"}
    config = load_config(tmp_path / "config.toml", env={**os.environ, **env})
    compile_flows(config)  # its rules and message templates compile too
    compiled = compile_profiles(config.mapping)
    body = msgspec.json.decode(msgspec.json.encode(compiled["action_network"].upsert(PERSON)))
    assert body == {
        "firstName": "Ada",
        "lastName": "Lovelace",
        "email": "ada@example.org",
        "phone": "+15035550142",
        "city": "Portland",
        "state": "OR",
        "postalCode": "97201",
        "source": "Action Network",
        "customFields": [{"id": "Hs8dK2fG4jL6zX9cV1bN", "field_value": "2024-02-03"}],
    }


def test_paths_resolve_through_dicts_and_lists() -> None:
    """Dotted paths follow dict keys and list indexes; anything absent is None."""
    assert resolve(PERSON, "email_addresses.0.address") == "ADA@Example.org"
    assert resolve(PERSON, "custom_fields.employer") == "Analytical Engines"
    assert resolve(PERSON, "email_addresses.3.address") is None
    assert resolve(PERSON, "nope.deeper") is None


@pytest.mark.parametrize(
    ("field_rule", "expected"),
    [
        (rule("given_name", "trim", "upper"), "ADA"),
        (rule(["given_name", "family_name"], "join", "trim"), "Ada Lovelace"),
        (rule(["missing", "family_name"]), "Lovelace"),
        (rule("given_name", "template", template="{family_name}, {given_name}"), "Lovelace, Ada"),
        (rule("missing", "default", default="n/a"), "n/a"),
        (rule("created_date", "date", date_format="%d/%m/%Y"), "03/02/2024"),
        (rule("phone_numbers.0.number", "e164"), "+15035550142"),
    ],
)
def test_transforms(field_rule: FieldRule, expected: str) -> None:
    """Each named transform does what the config documents."""
    assert mapping({"name": field_rule}).fields(PERSON) == {"name": expected}


def test_empty_values_are_left_out() -> None:
    """A field with no value is not sent, so GHL keeps what it has."""
    assert mapping({"website": rule("missing", "trim")}).fields(PERSON) == {}


@pytest.mark.parametrize(
    ("contact", "path"),
    [
        ({"frstName": rule("given_name")}, "$.mapping.p.contact.frstName"),
        ({"name": rule("given_name", "template")}, "$.mapping.p.contact.name.transforms[0]"),
        ({"name": rule("given_name", "trim", "default")}, "$.mapping.p.contact.name.transforms[1]"),
    ],
)
def test_bad_rules_fail_at_compile_time(contact: dict[str, FieldRule], path: str) -> None:
    """An unknown GHL field or a transform missing its parameter is a config error with its path."""
    with pytest.raises(ConfigError) as caught:
        mapping(contact)
    assert caught.value.path == path


def test_custom_field_keys_are_refused_with_the_fix() -> None:
    """A custom field named by key, not id, stops the config with how to find the id."""
    with pytest.raises(ConfigError, match="use the custom field's id") as caught:
        mapping({}, {"contact.joined": rule("created_date")})
    assert caught.value.path == "$.mapping.p.custom_fields.contact.joined"


def test_unmappable_records_are_rejected_with_the_field() -> None:
    """A bad phone or date, or no email and no phone, rejects the record with a clear reason."""
    bad_phone = mapping({"email": rule("email_addresses.0.address"), "phone": rule("x", "e164")})
    with pytest.raises(Rejected, match=r"mapping phone: '12' is not a phone number"):
        bad_phone.upsert({**PERSON, "x": "12"})
    bad_date = mapping(
        {"email": rule("email_addresses.0.address"), "dateOfBirth": rule("d", "date")}
    )
    with pytest.raises(Rejected, match=r"mapping dateOfBirth: 'soon' is not an ISO 8601 date"):
        bad_date.upsert({**PERSON, "d": "soon"})
    with pytest.raises(Rejected, match="neither an email nor a phone"):
        mapping({"firstName": rule("given_name")}).upsert(PERSON)


def test_custom_fields_by_id_and_preview() -> None:
    """Custom fields are written by id; preview shows bodies and rejections side by side."""
    m = mapping(
        {"email": rule("email_addresses.0.address", "lower")},
        {"Zk3fA9ldq2": rule("custom_fields.employer")},
    )
    rows = preview(m, [PERSON, {"given_name": "No contact"}])
    assert rows[0] == {
        "upsert": {
            "email": "ada@example.org",
            "customFields": [{"id": "Zk3fA9ldq2", "field_value": "Analytical Engines"}],
        }
    }
    assert rows[1] == {
        "rejected": "record has neither an email nor a phone: GHL cannot match the contact"
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+44 20 7946 0958", "+442079460958"),
        ("503.555.0142", "+15035550142"),
        ("1-503-555-0142", "+15035550142"),
    ],
)
def test_e164(raw: str, expected: str) -> None:
    """Phone numbers are normalised to E.164; bare 10-digit numbers are North American."""
    assert e164(raw) == expected
