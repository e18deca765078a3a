"""Tests that the shipped systemd unit says what production needs, checked by systemd too."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.config import PipelineConfig
from bridge.errors import EX_CONFIG

UNIT_PATH = Path(__file__).parent.parent / "systemd" / "bridge.service"

# Keys systemd treats as lists, so repeating them adds rather than overrides.
LIST_KEYS = {"LoadCredential", "Environment", "After", "Wants"}

_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")
_SPAN_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "ms": 1e-3,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
}
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass
class Unit:
    """A unit file as systemd reads it: per section, every assignment in order."""

    sections: dict[str, list[tuple[str, str]]]

    def all(self, section: str, key: str) -> list[str]:
        """Every value assigned to ``key``, repeats included."""
        return [v for k, v in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str:
        """The one value of ``key``; assigning a scalar twice would hide the first."""
        values = self.all(section, key)
        assert len(values) == 1, f"[{section}] {key} is set {len(values)} times"
        return values[0]


def parse_unit(text: str) -> Unit:
    """Parse unit syntax: sections, repeated keys, empty values, comments, continuations."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "").strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, eq, value = line.partition("=")
        if not eq or current is None:
            raise ValueError(f"not an assignment inside a section: {raw!r}")
        current.append((key.strip(), value.strip()))
    return Unit(sections)


def seconds(span: str) -> float:
    """A systemd time span ("90", "5s", "1min 30s") in seconds."""
    parts = _SPAN.findall(span)
    if not parts or "".join(n + u for n, u in parts) != span.replace(" ", ""):
        raise ValueError(f"not a time span: {span!r}")
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def size_bytes(size: str) -> int:
    """A systemd size ("512M", "1G") in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)", size)
    if match is None:
        raise ValueError(f"not a size: {size!r}")
    return int(match[1]) * _SIZE_UNITS[match[2]]


@pytest.fixture(scope="module")
def unit() -> Unit:
    """The unit file shipped in the repository."""
    return parse_unit(UNIT_PATH.read_text(encoding="utf-8"))


REQUIRED = [
    ("Unit", "After", "network-online.target"),
    ("Unit", "Wants", "network-online.target"),
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    ("Service", "WatchdogSec", "60"),
    ("Service", "Restart", "on-failure"),
    ("Service", "RestartSec", "5s"),
    ("Service", "TimeoutStartSec", "120"),
    ("Service", "TimeoutStopSec", "90"),
    ("Service", "DynamicUser", "yes"),
    ("Service", "StateDirectory", "bridge"),
    ("Service", "StateDirectoryMode", "0700"),
    ("Service", "ExecStart", "/opt/bridge/.venv/bin/bridge run"),
    ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ProtectHome", "yes"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "PrivateDevices", "yes"),
    ("Service", "RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("Service", "SystemCallFilter", "@system-service"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Service", "CapabilityBoundingSet", ""),
    ("Service", "AmbientCapabilities", ""),
    ("Service", "LockPersonality", "yes"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "RestrictRealtime", "yes"),
    ("Service", "RestrictSUIDSGID", "yes"),
    ("Service", "MemoryDenyWriteExecute", "yes"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectKernelLogs", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "ProtectClock", "yes"),
    ("Service", "ProtectHostname", "yes"),
    ("Service", "ProtectProc", "invisible"),
    ("Service", "ProcSubset", "pid"),
    ("Service", "UMask", "0077"),
    ("Service", "StandardOutput", "journal"),
    ("Service", "SyslogIdentifier", "bridge"),
    ("Install", "WantedBy", "multi-user.target"),
]


@pytest.mark.parametrize(("section", "key", "value"), REQUIRED)
def test_required_setting(unit: Unit, section: str, key: str, value: str) -> None:
    """Each setting production relies on is present once with exactly this value."""
    if key in LIST_KEYS:
        assert value in unit.all(section, key)
    else:
        assert unit.get(section, key) == value


def test_config_error_exit_is_not_restarted(unit: Unit) -> None:
    """The exit status that stops restarts is the one the CLI uses for a config error."""
    assert unit.get("Service", "RestartPreventExitStatus") == str(EX_CONFIG) == "78"


def test_config_path_in_environment(unit: Unit) -> None:
    """BRIDGE_CONFIG points the daemon at the config under /etc/bridge."""
    assert "BRIDGE_CONFIG=/etc/bridge/config.toml" in unit.all("Service", "Environment")


def test_load_credentials(unit: Unit) -> None:
    """Each secret is loaded from a root-only file of the same name under /etc/bridge."""
    credentials = dict(v.split(":", 1) for v in unit.all("Service", "LoadCredential"))
    assert len(credentials) == len(unit.all("Service", "LoadCredential"))
    assert {"ghl-main-token", "an-api-key", "ad-api-key"} <= credentials.keys()
    for name, source in credentials.items():
        assert source == f"/etc/bridge/credentials/{name}"


def test_stop_timeout_exceeds_drain_grace(unit: Unit) -> None:
    """systemd waits longer than the default drain grace before it kills the daemon."""
    drain_grace = float(PipelineConfig().drain_grace)
    assert seconds(unit.get("Service", "TimeoutStopSec")) > drain_grace


def test_memory_is_capped(unit: Unit) -> None:
    """MemoryMax is set to something a small daemon fits in and a leak does not."""
    assert 256 << 20 <= size_bytes(unit.get("Service", "MemoryMax")) <= 2 << 30


def test_only_list_keys_repeat(unit: Unit) -> None:
    """A repeated scalar key would silently override the first, so only list keys repeat."""
    for section, assignments in unit.sections.items():
        keys = [k for k, _ in assignments]
        repeated = {k for k in keys if keys.count(k) > 1} - LIST_KEYS
        assert not repeated, f"[{section}] repeats {sorted(repeated)}"


def test_parser_and_spans() -> None:
    """The parser keeps repeats, empty values and continuations; spans parse like systemd's."""
    parsed = parse_unit(
        "# comment\n[Service]\n; also a comment\nA=1\nA=2\nEmpty=\nLong=one \\\n  two\n"
    )
    assert parsed.all("Service", "A") == ["1", "2"]
    assert parsed.get("Service", "Empty") == ""
    assert parsed.get("Service", "Long") == "one  two"
    with pytest.raises(ValueError, match="not an assignment"):
        parse_unit("A=1\n")
    assert [seconds(s) for s in ("90", "5s", "1min 30s", "2m")] == [90, 5, 90, 120]
    with pytest.raises(ValueError, match="not a time span"):
        seconds("soon")


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not on PATH")
    # No man-page lookups and no generators: neither is about this unit, and generators
    # need privileges a build container may lack.
    return subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself loads the unit (with a real ExecStart) without a complaint."""
    # First a trivial unit: if that fails, systemd-analyze cannot work here at all.
    probe = tmp_path / "probe.service"
    probe.write_text(f"[Service]\nExecStart={sys.executable} -c pass\n", encoding="utf-8")
    probed = _verify(probe)
    if probed.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {probed.stderr.strip()}")

    text = UNIT_PATH.read_text(encoding="utf-8")
    # verify checks that ExecStart exists; /opt/bridge is only there on a real install.
    text, count = re.subn(
        r"^ExecStart=.*$", f"ExecStart={sys.executable} -m bridge run", text, flags=re.M
    )
    assert count == 1
    copy = tmp_path / "bridge.service"
    copy.write_text(text, encoding="utf-8")
    result = _verify(copy)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings ("..., ignoring") with exit status 0.
    assert "bridge.service" not in output, output
