"""Tests for loading, validating and resolving the bridge's TOML configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from bridge.config import Config, Duration, load_config, parse_duration
from bridge.errors import ConfigError
from bridge.secrets import Secret

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
EXAMPLE_ENV = {
    "GHL_MAIN_TOKEN": "pit-4f1c9e0b-main-token",
    "AN_MAIN_KEY": "an-key-7d2e5a90c3",
    "AD_MAIN_KEY": "ad-key-b81f44e6",
}
CLIENT_SECRET = "oauth-client-secret-3c9a1f"

# One GHL location and one source: the smallest config that exercises cross-references.
LOCATION = """
[[ghl.locations]]
name = "main"
location_id = "loc-1"
auth = { kind = "private_token", token = "${TOKEN}" }
"""
SOURCE = """
[[sources.action_network]]
name = "an"
location = "main"
api_key = "inline-an-key"
"""
BASE = LOCATION + SOURCE
BASE_ENV = {"TOKEN": "tok-secret-value"}


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    """Write ``text`` as a config file in ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    """Load ``text`` as a config file with ``env`` (default: the base environment)."""
    return load_config(write(tmp_path, text), env=BASE_ENV if env is None else env)


def load_example(tmp_path: Path) -> Config:
    """Load the shipped example with its environment and credential file in place."""
    shutil.copy(EXAMPLE, tmp_path / "config.toml")
    (tmp_path / "ghl_client_secret").write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    return load_config(tmp_path / "config.toml", env=EXAMPLE_ENV)


def test_example_loads_and_lists_its_secrets(tmp_path: Path) -> None:
    """The shipped example loads and every secret it references is resolved and listed."""
    config = load_example(tmp_path)
    assert [location.name for location in config.ghl.locations] == ["main", "second"]
    assert config.sources.action_network[0].location == "main"
    assert config.sources.activedemand[0].poll_interval == 900.0
    assert config.mapping["action_network"].contact["firstName"].transforms == ["trim"]
    assert sorted(config.secret_values()) == sorted([*EXAMPLE_ENV.values(), CLIENT_SECRET])


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config equal to the defaults of every section."""
    config = load_text(tmp_path, "", env={})
    assert config == Config()
    assert config.state.path == "/var/lib/bridge/state.db"
    assert config.pipeline.retry_cap == 300.0
    assert config.secret_values() == []


def test_minimal_config_fills_in_defaults(tmp_path: Path) -> None:
    """A location and a source with only required keys get the documented defaults."""
    config = load_text(tmp_path, BASE)
    location, source = config.ghl.locations[0], config.sources.action_network[0]
    assert location.base_url == "https://services.leadconnectorhq.com"
    assert (location.limits.burst, location.limits.window, location.limits.daily) == (
        100,
        10.0,
        200000,
    )
    assert location.timeout == 30.0
    assert isinstance(location.auth, msgspec.Struct)
    assert source.streams == ["people", "activities", "taggings"]
    assert (source.poll_interval, source.overlap, source.rate) == (60.0, 120.0, 4.0)
    assert source.mapping == "action_network"
    assert isinstance(source.poll_interval, Duration)
    assert config.pipeline.senders == 8
    assert config.logging.level == "info"


def test_oauth_defaults(tmp_path: Path) -> None:
    """An OAuth location gets the bridge's scopes, the v2 authorize URL and Location type."""
    text = """
[[ghl.locations]]
name = "o"
location_id = "loc-o"
auth = { kind = "oauth", client_id = "cid", client_secret = "${S}" }
"""
    auth = load_text(tmp_path, text, env={"S": "s"}).ghl.locations[0].auth
    assert auth.__struct_config__.tag == "oauth"
    assert "conversations/message.write" in getattr(auth, "scopes", [])
    assert getattr(auth, "user_type", None) == "Location"
    assert getattr(auth, "company_id", "unset") is None


def test_relative_state_path_is_next_to_the_config(tmp_path: Path) -> None:
    """A relative state path resolves against the config file's directory, not the cwd."""
    config = load_text(tmp_path, '[state]\npath = "data/state.db"\n', env={})
    assert config.state.path == str(tmp_path / "data" / "state.db")


def test_bare_number_duration_is_seconds(tmp_path: Path) -> None:
    """A TOML number where a duration is expected means that many seconds."""
    config = load_text(tmp_path, "[pipeline]\ndrain_grace = 45\nidle_poll = 0.25\n", env={})
    assert config.pipeline.drain_grace == 45.0
    assert config.pipeline.idle_poll == 0.25


def test_overlap_may_be_zero(tmp_path: Path) -> None:
    """The overlap window is the one duration that may be zero."""
    config = load_text(tmp_path, BASE + 'overlap = "0s"\n')
    assert config.sources.action_network[0].overlap == 0.0


def test_config_is_frozen(tmp_path: Path) -> None:
    """Config tables cannot be changed after loading."""
    config = load_text(tmp_path, BASE)
    with pytest.raises(AttributeError):
        config.pipeline.senders = 1  # type: ignore[misc]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist names the file and the OS reason."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, env={})
    assert str(caught.value) == f"$: cannot read config file {missing}: No such file or directory"


def test_env_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``env=``, ``${VAR}`` secrets come from the process environment."""
    monkeypatch.setenv("TOKEN", "from-process-env")
    config = load_config(write(tmp_path, BASE))
    assert "from-process-env" in config.secret_values()


# (id, config text, env, expected $.path, expected reason)
BAD_CONFIGS: list[tuple[str, str, dict[str, str], str, str]] = [
    (
        "bad duration",
        BASE + 'poll_interval = "soon"\n',
        BASE_ENV,
        "$.sources.action_network[0].poll_interval",
        'expected a duration like "30s", got "soon"',
    ),
    (
        "negative bare duration",
        "[pipeline]\nretry_base = -1\n",
        {},
        "$.pipeline.retry_base",
        "expected a duration of 0 or more seconds, got -1",
    ),
    (
        "infinite duration",
        "[pipeline]\nretry_cap = inf\n",
        {},
        "$.pipeline.retry_cap",
        "expected a duration of 0 or more seconds, got inf",
    ),
    (
        "zero duration",
        '[pipeline]\ndrain_grace = "0s"\n',
        {},
        "$.pipeline.drain_grace",
        "must be greater than 0",
    ),
    ("unknown top-level key", "foo = 1\n", {}, "$", 'unknown key "foo"'),
    ("unknown nested key", "[pipeline]\nfoo = 1\n", {}, "$.pipeline", 'unknown key "foo"'),
    (
        "unknown key in a mapping rule",
        '[mapping.good.contact]\nemail = { from = "e" }\n'
        '[mapping.p.contact]\nemail = { from = "e", transform = ["trim"] }\n',
        {},
        "$.mapping.p.contact.email",
        'unknown key "transform"',
    ),
    (
        "wrong type",
        '[pipeline]\nsenders = "eight"\n',
        {},
        "$.pipeline.senders",
        "expected an integer, got a string",
    ),
    (
        "wrong type for a table",
        "[mapping]\np = 3\n",
        {},
        "$.mapping.p",
        "expected a table, got an integer",
    ),
    (
        "unknown auth kind",
        BASE.replace('kind = "private_token"', 'kind = "password"'),
        BASE_ENV,
        "$.ghl.locations[0].auth.kind",
        'unknown value "password" (known: private_token, oauth)',
    ),
    (
        "unknown log level",
        '[logging]\nlevel = "loud"\n',
        {},
        "$.logging.level",
        'unknown value "loud" (known: debug, info, warning, error)',
    ),
    (
        "unknown stream",
        BASE + 'streams = ["people", "events"]\n',
        BASE_ENV,
        "$.sources.action_network[0].streams[1]",
        'unknown value "events" (known: people, activities, taggings)',
    ),
    (
        "missing required key",
        BASE.replace('location_id = "loc-1"\n', ""),
        BASE_ENV,
        "$.ghl.locations[0]",
        'missing required key "location_id"',
    ),
    (
        "missing auth kind",
        BASE.replace('kind = "private_token", ', ""),
        BASE_ENV,
        "$.ghl.locations[0].auth",
        'missing required key "kind"',
    ),
    (
        "empty name",
        BASE.replace('name = "an"', 'name = ""'),
        BASE_ENV,
        "$.sources.action_network[0].name",
        "must not be empty",
    ),
    (
        "unknown location reference",
        BASE.replace('location = "main"', 'location = "nowhere"'),
        BASE_ENV,
        "$.sources.action_network[0].location",
        'no GHL location named "nowhere" (known: main)',
    ),
    (
        "duplicate location names",
        BASE + LOCATION,
        BASE_ENV,
        "$.ghl.locations[1].name",
        'duplicate GHL location name "main"',
    ),
    (
        "duplicate source names across kinds",
        BASE + '[[sources.activedemand]]\nname = "an"\nlocation = "main"\napi_key = "k"\n',
        BASE_ENV,
        "$.sources.activedemand[0].name",
        'duplicate source name "an"',
    ),
    (
        "unknown transform",
        "[mapping.action_network.contact]\n"
        'email = { from = "e", transforms = ["trim", "shout"] }\n',
        {},
        "$.mapping.action_network.contact.email.transforms[1]",
        'unknown transform "shout" '
        "(known: date, default, e164, join, lower, template, trim, upper)",
    ),
    ("zero count", "[pipeline]\nsenders = 0\n", {}, "$.pipeline.senders", "must be at least 1"),
    (
        "zero daily budget",
        BASE.replace('location_id = "loc-1"', 'location_id = "loc-1"\nlimits = { daily = 0 }'),
        BASE_ENV,
        "$.ghl.locations[0].limits.daily",
        "must be at least 1",
    ),
    (
        "zero rate",
        BASE + "rate = 0\n",
        BASE_ENV,
        "$.sources.action_network[0].rate",
        "must be greater than 0",
    ),
    (
        "bad base_url",
        BASE + 'base_url = "ftp://actionnetwork.org"\n',
        BASE_ENV,
        "$.sources.action_network[0].base_url",
        'must start with http:// or https://, got "ftp://actionnetwork.org"',
    ),
    (
        "unset env var",
        BASE,
        {},
        "$.ghl.locations[0].auth.token",
        "environment variable TOKEN is not set",
    ),
    (
        "empty env var",
        BASE,
        {"TOKEN": ""},
        "$.ghl.locations[0].auth.token",
        "environment variable TOKEN is not set",
    ),
    (
        "malformed env reference",
        BASE.replace("${TOKEN}", "${TOKEN"),
        BASE_ENV,
        "$.ghl.locations[0].auth.token",
        'malformed environment reference "${TOKEN" (expected "${NAME}")',
    ),
    (
        "unreadable secret file",
        BASE.replace("${TOKEN}", "file:/nonexistent/bridge/token"),
        {},
        "$.ghl.locations[0].auth.token",
        "cannot read secret file /nonexistent/bridge/token: No such file or directory",
    ),
    (
        "secret of the wrong type",
        BASE.replace('"${TOKEN}"', "12345"),
        {},
        "$.ghl.locations[0].auth.token",
        "expected a string, got an integer",
    ),
    (
        "TOML syntax error",
        "[pipeline]\nsenders = = 3\n",
        {},
        "$",
        "invalid TOML: Invalid value (line 2)",
    ),
    (
        "sources without any GHL location",
        SOURCE,
        {},
        "$.ghl.locations",
        "at least one GHL location is needed to send sources to",
    ),
]


@pytest.mark.parametrize(
    ("text", "env", "path", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CONFIGS],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], path: str, reason: str
) -> None:
    """Each kind of bad config raises ConfigError whose text is "<$.path>: <reason>"."""
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, env=env)
    assert (caught.value.path, caught.value.reason) == (path, reason)
    assert str(caught.value) == f"{path}: {reason}"


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    """Neither repr nor str of a loaded config shows any secret value."""
    config = load_example(tmp_path)
    rendered = repr(config) + str(config) + repr(config.ghl.locations[1].auth)
    assert "Secret('***')" in rendered
    for value in config.secret_values():
        assert value not in rendered


@pytest.mark.parametrize(
    ("edit", "env"),
    [
        pytest.param(('location = "main"', 'location = "elsewhere"'), BASE_ENV, id="bad reference"),
        pytest.param(('name = "an"', 'name = "an"\nrate = -1'), BASE_ENV, id="bad rate"),
        pytest.param(('"${TOKEN}"', "42424242"), {}, id="secret of wrong type"),
        pytest.param(('"${TOKEN}"', '"${TOKEN"'), {"TOKEN": "tok-secret-value"}, id="malformed"),
    ],
)
def test_secrets_never_appear_in_errors(
    tmp_path: Path, edit: tuple[str, str], env: dict[str, str]
) -> None:
    """A ConfigError raised after or while resolving secrets carries none of their values."""
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, BASE.replace(*edit), env=env)
    message = str(caught.value)
    for value in ("tok-secret-value", "inline-an-key", "42424242"):
        assert value not in message


def test_secret_file_error_does_not_show_content(tmp_path: Path) -> None:
    """A secret file that is not UTF-8 is reported by path without echoing its bytes."""
    (tmp_path / "token").write_bytes(b"\xffsecret-bytes")
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, BASE.replace("${TOKEN}", "file:token"), env={})
    assert str(caught.value) == (
        f"$.ghl.locations[0].auth.token: secret file {tmp_path / 'token'} is not valid UTF-8"
    )


def test_credentials_directory_is_honoured(tmp_path: Path) -> None:
    """A relative ``file:`` secret is read from $CREDENTIALS_DIRECTORY when it is set."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("from-credentials-dir\n", encoding="utf-8")
    (tmp_path / "token").write_text("from-config-dir\n", encoding="utf-8")
    text = BASE.replace("${TOKEN}", "file:token")
    with_creds = load_text(tmp_path, text, env={"CREDENTIALS_DIRECTORY": str(creds)})
    without = load_text(tmp_path, text, env={})
    assert with_creds.secret_values()[0] == "from-credentials-dir"
    assert without.secret_values()[0] == "from-config-dir"


def test_absolute_secret_file_and_single_newline_strip(tmp_path: Path) -> None:
    """An absolute ``file:`` path is used as given and only one trailing newline is dropped."""
    secret = tmp_path / "elsewhere" / "token"
    secret.parent.mkdir()
    secret.write_text("two-newlines\n\n", encoding="utf-8")
    text = BASE.replace("${TOKEN}", f"file:{secret}")
    config = load_text(tmp_path, text, env={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert config.secret_values()[0] == "two-newlines\n"


def test_secret_type_hides_and_compares_by_value() -> None:
    """A Secret masks itself in repr and str, reveals on request, and compares by value."""
    secret = Secret("hunter2")
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2")
    assert secret != Secret("hunter3")
    assert hash(secret) == hash(Secret("hunter2"))
    assert len({secret, Secret("hunter2")}) == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("0s", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    """Well-formed durations convert to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["soon", "", "30", "-5s", "5 m", "30s1m", "1m1m", "5x", "s", "1.s", "1e3s", "30S"]
)
def test_parse_duration_rejects(text: str) -> None:
    """Malformed durations raise ValueError quoting the input."""
    with pytest.raises(ValueError, match="expected a duration like") as caught:
        parse_duration(text)
    assert str(caught.value) == f'expected a duration like "30s", got "{text}"'
