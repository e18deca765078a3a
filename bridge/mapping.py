"""Declarative field mapping from a source record to GHL contact fields, compiled once at start.

A rule reads one or more source paths (dotted, list indexes as numbers), then applies a
closed set of named transforms in order. Nothing is evaluated: templates only substitute
``{path}`` placeholders. Rules are checked when compiled, so a typo in a GHL field name
stops the daemon at start with its key path, and a record that cannot be mapped (an
unparseable date or phone) is ``Rejected`` with the field named, for the dead-letter table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from bridge.config import FieldRule, MappingProfile
from bridge.connectors.ghl.models import ContactUpsert, CustomFieldValue
from bridge.errors import ConfigError, Rejected

# GHL contact fields a rule may fill: the scalar fields of the upsert body.
CONTACT_FIELDS = frozenset(
    f.encode_name
    for f in msgspec.structs.fields(ContactUpsert)
    if f.encode_name not in {"customFields", "dndSettings", "inboundDndSettings", "dnd"}
)

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_SPACES = re.compile(r"[ \t]{2,}")
_MISSING = object()

Value = str | list[str] | None
Step = Callable[[Value, Mapping[str, Any]], Value]


def resolve(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``email_addresses.0.address``), or None if absent."""
    node: Any = record
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else _MISSING
        else:
            node = _MISSING
        if node is _MISSING or node is None:
            return None
    return node


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, Mapping):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def e164(number: str) -> str:
    """A phone number as +<digits>; bare 10-digit numbers are taken as North American."""
    digits = re.sub(r"\D", "", number)
    if number.strip().startswith("+") and 8 <= len(digits) <= 15:
        return f"+{digits}"
    if len(digits) == 10:
        return f"+1{digits}"
    if len(digits) == 11 and digits.startswith("1"):
        return f"+{digits}"
    raise Rejected(f"{number!r} is not a phone number that can be written as E.164")


def _each(fn: Callable[[str], str]) -> Step:
    def step(value: Value, record: Mapping[str, Any]) -> Value:
        if value is None:
            return None
        if isinstance(value, list):
            return [fn(v) for v in value]
        return fn(value)

    return step


def _join(value: Value, record: Mapping[str, Any]) -> Value:
    if isinstance(value, list):
        return " ".join(v.strip() for v in value if v.strip()) or None
    return value


class CompiledRule:
    """One field's rule with its transforms turned into functions."""

    def __init__(self, field: str, rule: FieldRule, *, path: str) -> None:
        self.field = field
        self.paths = [rule.source] if isinstance(rule.source, str) else list(rule.source)
        self.joins = "join" in rule.transforms
        self.steps: list[Step] = []
        for index, name in enumerate(rule.transforms):
            self.steps.append(self._step(name, rule, path=f"{path}.transforms[{index}]"))

    def _step(self, name: str, rule: FieldRule, *, path: str) -> Step:
        if name == "trim":
            return _each(str.strip)
        if name == "lower":
            return _each(str.lower)
        if name == "upper":
            return _each(str.upper)
        if name == "e164":
            return _each(e164)
        if name == "join":
            return _join
        if name == "template":
            if rule.template is None:
                raise ConfigError(path, 'the "template" transform needs a `template` string')
            return _template(rule.template)
        if name == "default":
            if rule.default is None:
                raise ConfigError(path, 'the "default" transform needs a `default` value')
            fallback = rule.default
            return lambda value, record: value if value else fallback
        if name == "date":
            return _each(_date(rule.date_format or "%Y-%m-%d"))
        raise ConfigError(path, f"unknown transform {name!r}")

    def apply(self, record: Mapping[str, Any]) -> str | None:
        values = [_text(resolve(record, p)) for p in self.paths]
        # Several paths without "join" means "the first one that has a value".
        value: Value = [v for v in values if v] if len(values) > 1 else values[0]
        if isinstance(value, list) and not self.joins:
            value = value[0] if value else None
        try:
            for step in self.steps:
                value = step(value, record)
        except Rejected as exc:
            raise Rejected(f"mapping {self.field}: {exc}") from None
        if isinstance(value, list):
            value = " ".join(value)
        return value or None


def render(template: str, record: Mapping[str, Any]) -> str:
    """Fill ``{path}`` placeholders from the record.

    A ``[bracketed part]`` is kept only when every placeholder in it has a value, so
    ``'Signed[ "{action_title}"][: {comments}]'`` reads well with or without a comment.
    A missing value outside brackets becomes empty, and leaves no double spaces.
    """

    def value(path: str) -> str:
        return _text(resolve(record, path.strip())) or ""

    def optional(match: re.Match[str]) -> str:
        inner = match.group(1)
        return inner if all(value(p) for p in _PLACEHOLDER.findall(inner)) else ""

    text = _PLACEHOLDER.sub(lambda m: value(m.group(1)), _OPTIONAL.sub(optional, template))
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()


def _template(template: str) -> Step:
    def step(value: Value, record: Mapping[str, Any]) -> Value:
        return render(template, record) or None

    return step


def _date(fmt: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime(fmt)
        except ValueError:
            raise Rejected(f"{value!r} is not an ISO 8601 date") from None

    return convert


class ContactMapping:
    """A compiled mapping profile: source record -> GHL contact upsert fields."""

    def __init__(self, profile: MappingProfile, *, name: str) -> None:
        base = f"$.mapping.{name}"
        for field in profile.contact:
            if field not in CONTACT_FIELDS:
                known = ", ".join(sorted(CONTACT_FIELDS))
                raise ConfigError(
                    f"{base}.contact.{field}", f"unknown GHL contact field (known: {known})"
                )
        self.contact = [
            CompiledRule(field, rule, path=f"{base}.contact.{field}")
            for field, rule in profile.contact.items()
        ]
        for field_id in profile.custom_fields:
            if "." in field_id:
                # GHL's write API takes custom fields by id (API_FACTS §3); turning a key
                # into an id needs the locations/customFields scope the bridge does not ask for.
                raise ConfigError(
                    f"{base}.custom_fields.{field_id}",
                    "use the custom field's id (Settings > Custom Fields), not its key:"
                    " GHL's contact write API requires ids",
                )
        self.custom = [
            CompiledRule(field_id, rule, path=f"{base}.custom_fields.{field_id}")
            for field_id, rule in profile.custom_fields.items()
        ]

    def fields(self, record: Mapping[str, Any]) -> dict[str, str]:
        """Mapped contact fields (GHL names); empty values are left out, so GHL keeps its own."""
        out = {}
        for rule in self.contact:
            value = rule.apply(record)
            if value is not None:
                out[rule.field] = value
        return out

    def upsert(self, record: Mapping[str, Any]) -> ContactUpsert:
        """The upsert body for a record; Rejected names the field that could not be mapped."""
        fields: dict[str, Any] = self.fields(record)
        custom = [
            CustomFieldValue(id=rule.field, field_value=value)
            for rule in self.custom
            if (value := rule.apply(record)) is not None
        ]
        if custom:
            fields["customFields"] = custom
        if not fields.get("email") and not fields.get("phone"):
            raise Rejected("record has neither an email nor a phone: GHL cannot match the contact")
        return msgspec.convert(fields, ContactUpsert, from_attributes=True)


def compile_profiles(profiles: Mapping[str, MappingProfile]) -> dict[str, ContactMapping]:
    """Every profile in the config, compiled; raises ConfigError naming the bad key."""
    return {name: ContactMapping(profile, name=name) for name, profile in profiles.items()}


def preview(mapping: ContactMapping, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What would be sent for each record, or the reason it would be dead-lettered."""
    rows: list[dict[str, Any]] = []
    for record in records:
        try:
            rows.append(
                {"upsert": msgspec.json.decode(msgspec.json.encode(mapping.upsert(record)))}
            )
        except Rejected as exc:
            rows.append({"rejected": str(exc)})
    return rows
