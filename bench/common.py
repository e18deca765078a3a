"""What the benchmarks share: config text, simulators in or out of process, /proc readings, tables.

Each benchmark runs the real daemon (``open_app``/``App.run`` in process, or ``python -m
bridge`` as a child) against the ``bridge.sim`` simulators on loopback. Simulators that
run in another process are started through ``bench/simserver.py`` and driven over their
``/_sim/`` control routes, so the bridge's CPU and memory are measured alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bridge.app import open_app
from bridge.config import Config, load_config
from bridge.observability.logs import configure_output
from bridge.pipeline import RunSummary

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HISTORY = "2000-01-01"
LIFTED = 1_000_000  # a budget or simulator limit that never binds
ACTIVITY_KINDS = ("submissions", "signatures", "attendances", "donations", "outreaches")

# --------------------------------------------------------------------------- config text

HEAD = """\
[state]
path = "{state}"

[logging]
level = "{log_level}"
format = "json"
file = "{log_file}"

[pipeline]
retry_base = "200ms"
retry_cap = "5s"
idle_poll = "{idle_poll}"
drain_grace = "2s"
"""

LOCATION = """
[[ghl.locations]]
name = "{name}"
location_id = "{location_id}"
base_url = "{url}"
auth = {{ kind = "private_token", token = "{token}" }}
limits = {{ burst = {burst}, window = "{window}" }}
"""

AN_SOURCE = """
[[sources.action_network]]
name = "{name}"
location = "{location}"
api_key = "{key}"
base_url = "{url}/api/v2"
streams = ["people", "activities"]
poll_interval = "{poll_interval}"
overlap = "{overlap}"
rate = {rate}
"""


@dataclass
class Ghl:
    """One GHL location as the config names it."""

    name: str
    location_id: str
    url: str
    token: str
    burst: int = 100
    window: str = "10s"

    def toml(self) -> str:
        return LOCATION.format(**self.__dict__)


@dataclass
class An:
    """One Action Network group (API key) feeding a GHL location."""

    name: str
    location: str
    key: str
    url: str
    rate: float = 4.0
    poll_interval: str = "60s"
    overlap: str = "120s"

    def toml(self) -> str:
        return AN_SOURCE.format(**self.__dict__)


def write_config(
    directory: Path,
    ghl: Sequence[Ghl],
    an: Sequence[An],
    *,
    log_level: str = "info",
    idle_poll: str = "200ms",
) -> Path:
    """Write ``bridge.toml`` (state and log file beside it) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    text = HEAD.format(
        state=directory / "state.db",
        log_level=log_level,
        log_file=directory / "bridge.log",
        idle_poll=idle_poll,
    )
    text += "".join(g.toml() for g in ghl) + "".join(a.toml() for a in an)
    path = directory / "bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (made if missing, left behind), or a temporary directory removed after."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def location_id(n: int) -> str:
    """A 20-character GHL location id for location ``n``."""
    return f"benchLocation{n:07d}"


# --------------------------------------------------------------------------- the bridge


@dataclass
class Run:
    """One in-process ``bridge once``/``backfill``: what it did, and its wall and CPU time."""

    summary: RunSummary
    wall: float
    cpu: float


async def run_bridge(config_path: Path, *, backfill: str | None = None) -> Run:
    """``bridge once`` (or ``bridge backfill SOURCE --since 2000-01-01``) in this process."""
    config = load_logged(config_path)
    since = datetime.fromisoformat(HISTORY).replace(tzinfo=UTC)
    async with open_app(config, backfill=(backfill, since) if backfill else None) as app:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = await app.run(once=True)
        return Run(summary, time.perf_counter() - wall, time.process_time() - cpu)


def load_logged(config_path: Path) -> Config:
    """Load the config and send logs where it says, as the CLI does before a run."""
    config = load_config(config_path)
    configure_output(
        level=config.logging.level, fmt=config.logging.format, file=config.logging.file
    )
    return config


def bridge_command(config_path: Path, *args: str) -> list[str]:
    """The command line of ``bridge --config CONFIG ARGS`` as a child process."""
    return [sys.executable, "-m", "bridge", "--config", str(config_path), *args]


# --------------------------------------------------------------------------- simulators


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Start ``bench/simserver.py ARGS``; yield the process and what it printed (URLs, keys)."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "simserver.py"), *args],
        stdout=subprocess.PIPE,
        stderr=None,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simserver {' '.join(args)} exited with {proc.wait()}")
        yield proc, json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def sim_get(session: aiohttp.ClientSession, url: str) -> Any:
    """GET a simulator control route and return its JSON."""
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def sim_post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    """POST a simulator control route and return its JSON."""
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        return await resp.json()


# --------------------------------------------------------------------------- /proc readings


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB (from /proc/<pid>/status)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- output


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    # Text left, figures right; the first column is always a label.
    left = [i == 0 or not all(_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cols = zip(row, widths, left, strict=True)
        parts = [c.ljust(w) if lf else c.rjust(w) for c, w, lf in cols]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [line(cells[0]), rule, *(line(r) for r in cells[1:])]
    return f"{title}\n" + "\n".join(body)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    bare = text.replace(",", "").replace(".", "").replace("%", "").lstrip("-")
    return bare.isdigit() or text in ("-", "")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session for control routes (no connection limit, short timeouts)."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def load_average() -> str:
    """The machine's 1-minute load average and CPU count: other work skews every figure."""
    with open("/proc/loadavg", encoding="ascii") as loadavg:
        one = loadavg.read().split()[0]
    return f"load average {one} on {os.cpu_count()} CPUs"


def run_async(main: Any) -> None:
    """Run a benchmark's coroutine and exit with its status, noting the machine's load."""
    before = load_average()
    status = asyncio.run(main)
    print(f"\n(machine: {before} at the start, {load_average()} at the end)")
    sys.exit(status)
