"""The bridge's configuration: a TOML file decoded into frozen msgspec Structs, then checked."""

from __future__ import annotations

import math
import os
import re
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec

from bridge.connectors.ad_feeds import Feeds
from bridge.errors import ConfigError
from bridge.secrets import Secret, resolve_secret

# The closed set of mapping transforms; mapping.py implements exactly these.
TRANSFORMS: Final = frozenset(
    {"trim", "lower", "upper", "e164", "join", "template", "default", "date"}
)

_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_ORDER: Final = ("d", "h", "m", "s", "ms")
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class Duration(float):
    """A span of time in seconds, written in the config as ``"30s"``, ``"5m"`` or ``"1m30s"``."""


def parse_duration(text: str) -> float:
    """Return the seconds in ``text`` (units ms, s, m, h, d, largest first, e.g. ``"1h30m"``)."""
    compact = text.strip()
    if not _DURATION.fullmatch(compact):
        raise ValueError(f'expected a duration like "30s", got "{text}"')
    total, last = 0.0, -1
    for number, unit in _DURATION_PART.findall(compact):
        rank = _UNIT_ORDER.index(unit)
        # "30s1m" or "1m1m" is almost certainly a typo, so only descending units are accepted.
        if rank <= last:
            raise ValueError(f'expected a duration like "30s", got "{text}"')
        total, last = total + float(number) * _UNIT_SECONDS[unit], rank
    return total


PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Name = Annotated[str, msgspec.Meta(min_length=1)]


# Every table below is frozen and forbids unknown keys: a misspelt key must be an error, not a
# silently ignored setting.
class StateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # One SQLite file holds cursors, outbox, id map and tokens; relative = next to the config.
    path: Name = "/var/lib/bridge/state.db"


class LoggingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Minimum level emitted.
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto" is console on a terminal and JSON lines otherwise (journald).
    format: Literal["auto", "json", "console"] = "auto"
    # Append to this file instead of stdout ("" = stdout, for journald); SIGHUP reopens it,
    # so logrotate can move it away. Relative = next to the config file.
    file: str = ""


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # "host:port" of the loopback listener for /healthz, /readyz and /metrics; "" = off.
    # Loopback only: the endpoints have no authentication.
    listen: str = ""


class PipelineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # A stream pauses above this many open ops of its own, so the backlog stays bounded and
    # one location's stalled backlog does not pause the streams of another.
    outbox_high_water: PositiveInt = 10000
    # Sender partitions; one entity always maps to one partition, which keeps its ops in order.
    senders: PositiveInt = 8
    # Bounded queue per partition; the backlog itself lives in SQLite.
    queue_size: PositiveInt = 64
    # Retryable failures before an op is dead-lettered instead of retried again.
    max_attempts: PositiveInt = 10
    # First retry delay; doubles per attempt, with jitter.
    retry_base: Duration = Duration(1.0)
    # Ceiling on the retry delay.
    retry_cap: Duration = Duration(300.0)
    # On SIGTERM: time to finish in-flight ops before cancelling them.
    drain_grace: Duration = Duration(30.0)
    # How often the dispatcher looks for retries that have come due.
    idle_poll: Duration = Duration(1.0)
    # A target or stream found down (revoked token, missing scope) is left alone this long,
    # then one op (or one poll) is let through to see whether it is back.
    target_recheck: Duration = Duration(300.0)
    # Work under way (an op being sent, a stream being read) with nothing moving for this
    # long, and no budget paused, counts as stuck: the systemd watchdog is no longer fed,
    # /healthz says 503, and systemd restarts the daemon.
    stall_timeout: Duration = Duration(600.0)


class GhlLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Requests allowed per window per app per location (GHL: 100 per 10 s).
    burst: PositiveInt = 100
    # The window the burst applies to.
    window: Duration = Duration(10.0)
    # Requests per day per app per location; None (from code only: TOML has no null) = no cap.
    daily: PositiveInt | None = 200000


class PrivateTokenAuth(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag_field="kind",
    tag="private_token",
):
    # A Private Integration Token: static, no refresh, rotated in the GHL UI.
    token: Secret


_DEFAULT_SCOPES: Final = (
    "conversations.readonly",
    "conversations.write",
    "conversations/message.readonly",
    "conversations/message.write",
    "contacts.readonly",
    "contacts.write",
)


class OAuthAuth(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag_field="kind",
    tag="oauth",
):
    # The marketplace app's client id.
    client_id: Name
    # The marketplace app's client secret.
    client_secret: Secret
    # Where the local install flow receives the code; must match the app's registered URL.
    redirect_uri: str = "http://127.0.0.1:8765/callback"
    # Scopes requested at install: what the bridge reads and writes, nothing more.
    scopes: list[str] = msgspec.field(default_factory=lambda: list(_DEFAULT_SCOPES))
    # The browser page where an admin picks the location to install on.
    authorize_url: str = "https://marketplace.gohighlevel.com/v2/oauth/chooselocation"
    # "Company" for agency installs, whose token is then exchanged per location.
    user_type: Literal["Location", "Company"] = "Location"
    # Agency installs: the company whose token is exchanged for this location's token.
    company_id: str | None = None


class ReverseSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Read this location's messages back (replies written in GHL, delivery statuses) and
    # mirror them into the sources that ask for it. Runs only when some source of the
    # location mirrors something.
    enabled: bool = True
    poll_interval: Duration = Duration(60.0)
    # The most of the location's request budget the reverse stream may use, so reading
    # never starves the forward writes.
    share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2
    # "export" (GET /conversations/messages/export), "search" (conversation search plus
    # each changed conversation's messages: sees new messages, not later status changes),
    # or "auto": export, and search when the token may not export.
    mode: Literal["auto", "export", "search"] = "auto"
    # Also read e-mails: the export leaves them out unless asked by channel.
    email: bool = True
    page_size: Annotated[int, msgspec.Meta(ge=10, le=500)] = 100
    # How far back the very first poll starts (0: only messages from the first start on).
    lookback: Duration = Duration(0.0)
    # Search mode re-reads this much before its last position: search lags writes.
    overlap: Duration = Duration(60.0)


class GhlLocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # How sources and logs refer to this location.
    name: Name
    # GHL's id for the sub-account.
    location_id: Name
    # API host; points at the simulator in tests.
    base_url: str = "https://services.leadconnectorhq.com"
    # How the bridge authenticates, chosen by `kind`.
    auth: PrivateTokenAuth | OAuthAuth
    # This location's request budget.
    limits: GhlLimits = msgspec.field(default_factory=GhlLimits)
    # Per-request timeout of every call to this location: API calls, token refreshes and
    # the start-up probes (connecting is bounded by 10 s, or by this when shorter).
    timeout: Duration = Duration(30.0)
    # The GHL web app, for conversation links written into the sources.
    app_url: str = "https://app.gohighlevel.com"
    reverse: ReverseSettings = msgspec.field(default_factory=ReverseSettings)


class GhlConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Every GHL sub-account the bridge writes to, each with its own budget.
    locations: list[GhlLocation] = []


class WriteBack(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Action Network custom field that receives the GHL contact id ("" to not write it).
    contact_id: str = "ghl_contact_id"
    # Action Network custom field that receives the GHL conversation id ("" to not write it).
    conversation_id: str = "ghl_conversation_id"


class AnMirror(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # What a GHL message to this person writes back into Action Network. Templates read
    # {id} {body} {status} {direction} {type} {date} {updated} {conversation_id}
    # {conversation_url} {contact_id} {user_id} {location}.
    # Which GHL messages count: "outbound" are replies written in GHL.
    directions: list[Literal["inbound", "outbound"]] = msgspec.field(
        default_factory=lambda: ["outbound"]
    )
    # Action Network custom field -> template, written with PUT /people/{id}; the newest
    # message wins, and a later status change of it updates the fields again.
    fields: dict[str, str] = {}
    # Tags added / removed through the person signup helper, once per person.
    add_tags: list[str] = []
    remove_tags: list[str] = []


class SummarySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Keep one GHL note per person with activity, edited in place when its digest changes:
    # counts and latest of petitions, forms, events, donations (total and last),
    # outreaches, the person's tags and the last GHL conversation activity.
    enabled: bool = False
    # The note's first line (one line). The bridge finds its note by a marker line, not
    # by this title, so it may be changed; notes follow at each person's next change.
    title: Name = "Action Network summary"


class TaskAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Task title; a template over the record, e.g. "Call {given_name} back".
    title: str
    # Task body; a template. The bridge appends a marker line it uses to find the task again.
    body: str = ""
    # Due this long after the task is created.
    due_in: Duration = Duration(86400.0)


class NotifyRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Names the rule in logs and in the keys that make each firing happen once.
    name: Name
    # Fire when a person carries this Action Network tag (once per person)...
    when_tag: str | None = None
    # ...or for each new activity of this type (signature, submission, attendance,
    # donation, outreach)...
    when_activity: str | None = None
    # ...optionally only on the action with this title or Action Network id.
    when_action: str | None = None
    # What to do; at least one is required. Templates use the record's fields.
    task: TaskAction | None = None
    note: str | None = None
    add_tags: list[str] = []
    remove_tags: list[str] = []
    # Mark the conversation unread and/or starred so the team sees it.
    unread: bool = False
    starred: bool = False


class ActionNetworkSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Unique among sources; names cursors and logs.
    name: Name
    # Name of the GHL location this source's people and messages go to.
    location: Name
    # The group's API key (OSDI-API-Token).
    api_key: Secret
    # API root; points at the simulator in tests.
    base_url: str = "https://actionnetwork.org/api/v2"
    # Which collections to poll.
    streams: list[Literal["people", "activities", "taggings"]] = msgspec.field(
        default_factory=lambda: ["people", "activities", "taggings"]
    )
    # Pause between polls of one stream.
    poll_interval: Duration = Duration(60.0)
    # How far before the cursor each poll starts, to catch late-indexed records (may be 0).
    overlap: Duration = Duration(120.0)
    # Pause between full scans of the taggings (tag changes do not touch the person).
    taggings_interval: Duration = Duration(900.0)
    # Requests per second for this key (AN documents 4).
    rate: PositiveFloat = 4.0
    # Profile in [mapping]; a missing profile means the built-in defaults.
    mapping: Name = "action_network"
    # Action Network custom fields that receive the GHL ids.
    write_back: WriteBack = msgspec.field(default_factory=WriteBack)
    # GHL replies mirrored into the person (nothing unless fields or tags are set).
    mirror: AnMirror = msgspec.field(default_factory=AnMirror)
    # The per-person summary note in GHL (off unless enabled).
    summary: SummarySettings = msgspec.field(default_factory=SummarySettings)
    # Rules that turn a tag or an activity into a GHL task, note, tags or conversation status.
    rules: list[NotifyRule] = []


class AdHistorySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # How call transcripts and routing alerts are written back into ActiveDEMAND:
    # "history" (an entry on the contact's history; PROPOSED endpoint), "form" (submit
    # form_id, the established write), or "none".
    via: Literal["history", "form", "none"] = "history"
    # History entry kind.
    kind: Name = "note"
    # For via = "form": the form to submit and its fields, form key -> template over
    # {email} {phone} {first_name} {last_name} {custom.<key>} and {kind} {text}.
    form_id: str | None = None
    fields: dict[str, str] = {}


class AdMirror(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # GHL messages to this contact written into ActiveDEMAND through [history] (history
    # entry or form), each once. Templates read the same fields as the Action Network mirror.
    directions: list[Literal["inbound", "outbound"]] = msgspec.field(
        default_factory=lambda: ["outbound"]
    )
    # The message itself ("" to not write it).
    reply: str = "Reply in GHL[ by {user_id}]: {body}[\n{conversation_url}]"
    # One entry per status the message reaches, for these statuses.
    statuses: list[str] = msgspec.field(
        default_factory=lambda: ["delivered", "read", "failed", "undelivered"]
    )
    status: str = "GHL message {id} is now {status}"


class RoutingRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Names the rule in logs and in the keys that make each action happen once.
    name: Name
    # Words or phrases, any of which matches (case-insensitive, whole words).
    keywords: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    # A regular expression (Python syntax, case-insensitive) that matches instead.
    pattern: str | None = None
    # GHL user id to assign the contact (and so its conversation) to.
    assign_to: str | None = None
    # GHL tags to add to the contact.
    add_tags: list[str] = []
    # Alert written back into ActiveDEMAND (see [history]): a template over the message
    # fields plus {rule} and {matched}.
    alert: str | None = None


class ConversationState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Mark the GHL conversation unread (true) or read (false); unset leaves it.
    unread: bool | None = None
    # Star (true) or unstar (false) the GHL conversation; unset leaves it.
    starred: bool | None = None


def _default_conversation_states() -> dict[str, ConversationState]:
    return {
        "closed": ConversationState(unread=False),
        "read": ConversationState(unread=False),
        "unread": ConversationState(unread=True),
        "starred": ConversationState(starred=True),
    }


class ActiveDemandSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Unique among sources; names cursors and logs.
    name: Name
    # Name of the GHL location this source's contacts go to.
    location: Name
    # The account API key.
    api_key: Secret
    # Partner X-Application-Api-Key, when the account requires one.
    application_key: Secret | None = None
    # Where the key goes: "header" (x-api-key) or "query" (api-key=, the older form).
    auth_mode: Literal["header", "query"] = "header"
    # The REST feeds the bridge reads; the conversation, message and history ones are a
    # PROPOSED contract (not public), adjustable here without code changes.
    feeds: Feeds = msgspec.field(default_factory=Feeds)
    # API root; points at the simulator in tests.
    base_url: str = "https://api.activedemand.com/v1"
    # Which resources to poll: "contacts" (confirmed API) and "conversations" (the
    # PROPOSED feed: conversations with their messages, calls and statuses).
    streams: list[Literal["contacts", "conversations"]] = msgspec.field(
        default_factory=lambda: ["contacts"]
    )
    # Pause between polls; AD has no change filter, so a poll may be a full scan.
    poll_interval: Duration = Duration(900.0)
    # Requests per second; conservative because AD documents no limit.
    rate: PositiveFloat = 2.0
    # Profile in [mapping]; a missing profile means the built-in defaults.
    mapping: Name = "activedemand"
    # Pause between polls of the conversations feed (contacts use poll_interval).
    conversations_interval: Duration = Duration(60.0)
    # Messages ActiveDEMAND sent to the contact: "record" them in GHL as outbound (never
    # sent again), or "skip" them.
    outbound: Literal["record", "skip"] = "record"
    # ActiveDEMAND conversation status -> what it sets on the GHL conversation.
    conversation_status: dict[str, ConversationState] = msgspec.field(
        default_factory=_default_conversation_states
    )
    # How long call recordings are kept in the state directory after they are fetched.
    recording_retention: Duration = Duration(30 * 86_400.0)
    # A recording larger than this is refused (dead-lettered), never half kept.
    max_recording_bytes: PositiveInt = 100 * 1024 * 1024
    # Where transcripts and alerts go in ActiveDEMAND.
    history: AdHistorySettings = msgspec.field(default_factory=AdHistorySettings)
    # Rules over call transcripts: assign, tag and alert when a keyword or pattern matches.
    routing: list[RoutingRule] = []
    # GHL replies and their statuses written into ActiveDEMAND (off with history.via = "none").
    mirror: AdMirror = msgspec.field(default_factory=AdMirror)


class Sources(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Action Network groups to poll.
    action_network: list[ActionNetworkSource] = []
    # ActiveDEMAND accounts to poll.
    activedemand: list[ActiveDemandSource] = []


class FieldRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Source field path(s), e.g. "given_name" or "email_addresses.0.address"; TOML key `from`.
    source: str | Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(name="from")
    # Transforms applied in order; names from TRANSFORMS.
    transforms: list[str] = []
    # Format string for the "template" transform, e.g. "{given_name} {family_name}".
    template: str | None = None
    # Value used when the source is missing or empty.
    default: str | None = None
    # strftime format for the "date" transform.
    date_format: str | None = None


class MessageRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # GHL inbound message type: "SMS", "Email", "Custom", ... (see POST
    # /conversations/messages/inbound). "Custom" needs conversation_provider_id.
    type: str = "SMS"
    # The message text: a template over the activity's fields; a [bracketed part] is left
    # out when a field inside it is empty.
    template: str
    # Subject line (e-mail types), a template.
    subject: str | None = None
    # GHL conversation provider id, for custom providers only.
    conversation_provider_id: str | None = None


class MappingProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # GHL contact field -> rule.
    contact: dict[str, FieldRule] = {}
    # GHL custom field id -> rule.
    custom_fields: dict[str, FieldRule] = {}
    # Action Network: activity type (signature, submission, attendance, donation,
    # outreach) -> message. ActiveDEMAND: channel (sms, email, web_chat, phone, or
    # "default" for any other) or "call" -> message.
    messages: dict[str, MessageRule] = {}


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Where durable state lives.
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    # Log level and format.
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    # Queue, retry and shutdown tuning.
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    # The optional health and metrics listener.
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    # Target locations.
    ghl: GhlConfig = msgspec.field(default_factory=GhlConfig)
    # Systems polled for changes.
    sources: Sources = msgspec.field(default_factory=Sources)
    # Named field-mapping profiles, referenced by sources.
    mapping: dict[str, MappingProfile] = {}

    def secret_values(self) -> list[str]:
        """Return every resolved secret in the config, once each, for log redaction."""
        values = (v.reveal() for _, _, v in _walk(self, "$") if isinstance(v, Secret))
        return list(dict.fromkeys(values))


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, decode and check the config at ``path``; any problem raises ``ConfigError``."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError("$", f"cannot read config file {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError("$", f"cannot read config file {path}: not UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("$", _toml_reason(exc)) from None
    base_dir = path.absolute().parent
    hook = _decode_hook(env, base_dir)
    try:
        config = msgspec.convert(raw, Config, dec_hook=hook)
    except msgspec.ValidationError as exc:
        raise _config_error(str(exc), raw, hook) from None
    if config.logging.file and not Path(config.logging.file).is_absolute():
        log_file = str(base_dir / config.logging.file)
        config = msgspec.structs.replace(
            config, logging=msgspec.structs.replace(config.logging, file=log_file)
        )
    state_path = Path(config.state.path)
    # ":memory:" is SQLite's in-memory database, not a file name.
    if config.state.path != ":memory:" and not state_path.is_absolute():
        state = StateConfig(path=str(base_dir / state_path))
        config = msgspec.structs.replace(config, state=state)
    _check(config)
    return config


_Hook = Callable[[type, Any], Any]


def _decode_hook(env: Mapping[str, str], base_dir: Path) -> _Hook:
    """Build msgspec's hook for Duration and Secret; secrets resolve against env and base_dir."""

    def hook(tp: type, obj: Any) -> Any:
        if tp is Duration:
            if isinstance(obj, str):
                return Duration(parse_duration(obj))
            # A bare number means seconds; bool is an int in Python but not a duration.
            if isinstance(obj, int | float) and not isinstance(obj, bool):
                if not math.isfinite(obj) or obj < 0:
                    raise ValueError(f"expected a duration of 0 or more seconds, got {obj}")
                return Duration(obj)
            raise TypeError(f'expected a duration like "30s", got {_type_word(obj)}')
        if tp is Secret:
            if not isinstance(obj, str):
                # The value is never echoed: a mistyped secret is still a secret.
                raise TypeError(f"expected a string, got {_type_word(obj)}")
            return resolve_secret(obj, env=env, base_dir=base_dir)
        raise NotImplementedError(tp)

    return hook


def _type_word(obj: object) -> str:
    return _TYPE_WORDS.get(type(obj).__name__, type(obj).__name__)


# msgspec's and Python's type names as a TOML author knows them.
_TYPE_WORDS: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
}
_TYPE_WORDS.update(
    {"object": "a table", "dict": "a table", "array": "an array", "list": "an array"}
)
_COMPARISONS: Final = {">": "greater than", ">=": "at least", "<": "less than", "<=": "at most"}
_MSGSPEC_ERROR: Final = re.compile(r"(?P<reason>.*?)(?: - at `(?P<path>\$.*)`)?", re.DOTALL)
_TOML_POSITION: Final = re.compile(r"(?P<msg>.*) \(at line (?P<line>\d+), column \d+\)")


def _toml_reason(exc: tomllib.TOMLDecodeError) -> str:
    match = _TOML_POSITION.fullmatch(str(exc))
    if match is None:
        return f"invalid TOML: {exc}"
    return f"invalid TOML: {match['msg']} (line {match['line']})"


def _config_error(message: str, raw: Any, hook: _Hook) -> ConfigError:
    """Reword one msgspec validation message for an operator, keeping its ``$.path``."""
    match = _MSGSPEC_ERROR.fullmatch(message)
    assert match is not None  # the pattern matches any string
    reason, path = match["reason"], match["path"] or "$"
    path, choices = _locate(path, raw, hook)
    if found := re.fullmatch(r"Object contains unknown field `(.*)`", reason):
        return ConfigError(path, f'unknown key "{found[1]}"')
    if found := re.fullmatch(r"Object missing required field `(.*)`", reason):
        return ConfigError(path, f'missing required key "{found[1]}"')
    if found := re.fullmatch(r"Invalid (?:enum )?value (.*)", reason):
        known = f" (known: {', '.join(map(str, choices))})" if choices else ""
        return ConfigError(path, f'unknown value "{found[1].strip(chr(39))}"{known}')
    if found := re.fullmatch(
        r"Expected `(.*?)`(?:, got `(.*)`| of length (\S+) (\S+)| (\S+) (\S+))?", reason
    ):
        expected = " or ".join(_TYPE_WORDS.get(t, t) for t in found[1].split(" | "))
        if found[2]:
            return ConfigError(
                path, f"expected {expected}, got {_TYPE_WORDS.get(found[2], found[2])}"
            )
        if found[3] == ">=" and found[4] == "1":
            return ConfigError(path, "must not be empty")
        if found[5]:
            bound = found[6].removesuffix(".0")
            return ConfigError(path, f"must be {_COMPARISONS.get(found[5], found[5])} {bound}")
        return ConfigError(path, f"expected {expected}")
    return ConfigError(path, reason)


_PATH_TOKEN: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]|(\[\.\.\.\])")


def _locate(path: str, raw: Any, hook: _Hook) -> tuple[str, tuple[object, ...]]:
    """Put real keys where msgspec wrote ``[...]`` for a dict key; find a Literal's choices.

    msgspec does not name dict keys in its paths, but a mapping profile or field name is
    what an operator needs to find the mistake, so the failing entry is found by decoding
    each one again. Best effort: on any surprise the path is returned as msgspec gave it.
    """
    out, node, tp = "$", raw, Config
    try:
        for key, index, any_key in _PATH_TOKEN.findall(path[1:]):
            arms = _arms(tp)
            if any_key:
                value_tp = next(get_args(a)[1] for a in arms if get_origin(a) is dict)
                key = next(k for k, v in node.items() if not _decodes(v, value_tp, hook))
                out, node, tp = f"{out}.{key}", node[key], value_tp
            elif index:
                item_tp = next(get_args(a)[0] for a in arms if get_origin(a) is list)
                out, node, tp = f"{out}[{index}]", node[int(index)], item_tp
            else:
                structs = [a for a in arms if isinstance(a, type) and issubclass(a, msgspec.Struct)]
                tag_field = structs[0].__struct_config__.tag_field
                if key == tag_field:
                    return f"{out}.{key}", tuple(s.__struct_config__.tag for s in structs)
                if tag_field is not None:
                    tag = node.get(tag_field)
                    structs = [s for s in structs if s.__struct_config__.tag == tag]
                field = next(f for f in msgspec.structs.fields(structs[0]) if f.encode_name == key)
                out, node, tp = f"{out}.{key}", node.get(key), field.type
    except (StopIteration, LookupError, AttributeError, TypeError, ValueError):
        return path, ()
    choices = tuple(v for a in _arms(tp) if get_origin(a) is Literal for v in get_args(a))
    return out, choices


def _arms(tp: Any) -> tuple[Any, ...]:
    """Flatten ``Annotated`` and unions into the plain types a value may take."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _arms(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return tuple(arm for member in get_args(tp) for arm in _arms(member))
    return (tp,)


def _decodes(value: object, tp: Any, hook: _Hook) -> bool:
    try:
        msgspec.convert(value, tp, dec_hook=hook)
    except msgspec.ValidationError:
        return False
    return True


def _walk(obj: object, path: str) -> Iterator[tuple[str, str, object]]:
    """Yield ``(path, field name, value)`` for every Struct field under ``obj``, depth first."""
    if isinstance(obj, msgspec.Struct):
        for field in msgspec.structs.fields(obj):
            value, sub = getattr(obj, field.name), f"{path}.{field.encode_name}"
            yield sub, field.name, value
            yield from _walk(value, sub)
    elif isinstance(obj, list):
        for index, item in enumerate(obj):
            yield from _walk(item, f"{path}[{index}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _walk(item, f"{path}.{key}")


_URL_FIELDS: Final = frozenset({"base_url", "authorize_url", "redirect_uri", "app_url"})


_TEMPLATE_FIELDS: Final = frozenset({"template", "subject", "alert", "title", "body", "fields"})
"""Config fields holding templates (``fields`` maps a key to one)."""


def _templates(path: str, value: object) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        yield from ((f"{path}.{k}", v) for k, v in value.items() if isinstance(v, str))


def template_problem(template: str) -> str | None:
    """What is wrong with a template's syntax, or None (the syntax is ``mapping.render``'s).

    ``{path}`` placeholders and ``[optional parts]`` may neither nest nor be left open:
    an unbalanced one would render literally into every record.
    """
    opened: dict[str, int] = {}
    pairs = {"}": "{", "]": "["}
    names = {"{": "placeholder", "[": "optional part"}
    for column, char in enumerate(template, 1):
        if char in names:
            if char in opened:
                return f'"{char}" at column {column} is inside another {names[char]}'
            opened[char] = column
        elif char in pairs:
            start = opened.pop(pairs[char], None)
            if start is None:
                return f'"{char}" at column {column} closes nothing'
            if char == "}" and not template[start : column - 1].strip():
                return f"empty placeholder at column {start}"
    for char, column in opened.items():
        return f'"{char}" at column {column} is never closed'
    return None


def _check(config: Config) -> None:
    """Cross-field rules msgspec cannot express; raise on the first broken one."""
    for path, name, value in _walk(config, "$"):
        # A zero interval would spin; only overlap and lookback windows may be empty.
        if isinstance(value, Duration) and value <= 0 and name not in ("overlap", "lookback"):
            raise ConfigError(path, "must be greater than 0")
        if name in _URL_FIELDS and not str(value).startswith(("http://", "https://")):
            # Quoted without its query string: a key pasted into a URL must not reach a log.
            shown = str(value).split("?")[0]
            raise ConfigError(path, f'must start with http:// or https://, got "{shown}"')
        if name in _TEMPLATE_FIELDS:
            for sub, text in _templates(path, value):
                problem = template_problem(text)
                if problem is not None:
                    raise ConfigError(sub, problem)
        if name == "transforms" and isinstance(value, list):
            for index, transform in enumerate(value):
                if transform not in TRANSFORMS:
                    known = ", ".join(sorted(TRANSFORMS))
                    reason = f'unknown transform "{transform}" (known: {known})'
                    raise ConfigError(f"{path}[{index}]", reason)
    if config.http.listen:
        _check_listen(config.http.listen)
    locations = config.ghl.locations
    _check_unique(
        [(f"$.ghl.locations[{i}].name", x.name) for i, x in enumerate(locations)], "GHL location"
    )
    sources: list[tuple[str, ActionNetworkSource | ActiveDemandSource]] = [
        (f"$.sources.action_network[{i}]", s) for i, s in enumerate(config.sources.action_network)
    ] + [(f"$.sources.activedemand[{i}]", s) for i, s in enumerate(config.sources.activedemand)]
    _check_unique([(f"{path}.name", s.name) for path, s in sources], "source")
    if sources and not locations:
        raise ConfigError(
            "$.ghl.locations", "at least one GHL location is needed to send sources to"
        )
    location_names = {location.name for location in locations}
    for path, source in sources:
        if source.location not in location_names:
            names = ", ".join(location.name for location in locations)
            raise ConfigError(
                f"{path}.location", f'no GHL location named "{source.location}" (known: {names})'
            )


_LOOPBACK = ("127.", "localhost", "[::1]")


def listen_address(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; ``"[::1]:9464"`` -> ``("::1", 9464)``."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _check_listen(listen: str) -> None:
    path = "$.http.listen"
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f'expected "host:port" such as "127.0.0.1:9464", got "{listen}"')
    if not host.startswith(_LOOPBACK):
        raise ConfigError(
            path,
            f'"{host}" is not a loopback address: the endpoints have no authentication, so'
            " listen on 127.0.0.1 or [::1] and let a local Prometheus or proxy reach them",
        )


def _check_unique(named: list[tuple[str, str]], what: str) -> None:
    seen: set[str] = set()
    for path, name in named:
        if name in seen:
            raise ConfigError(path, f'duplicate {what} name "{name}"')
        seen.add(name)
