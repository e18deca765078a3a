"""Tests for ``bridge tail``: filters, rendering, following a file, and bad input."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.observability.logs import bound, configure_logging, get_logger
from bridge.observability.tail import (
    HINT,
    POLL_INTERVAL,
    Filters,
    add_tail_parser,
    matches,
    parse_line,
    render,
    run_tail,
)

TRACEBACK = "Traceback (most recent call last):"
# What `journalctl -u bridge -o short` prints: a prefix, then the daemon's JSON.
JOURNAL = (
    'Nov 21 10:00:00 host bridge[123]: {"ts":"2021-06-01T12:00:00.250000Z","level":"info",'
    '"event":"op_sent","location":"main","stream":"an.people","entity":"person:old"}'
)
ALL = [
    "page_fetched",
    "op_sent",
    "op_retry_scheduled",
    "op_dead_lettered",
    "op_crashed",
    "stream_failed",
    "op_sent",
]
RENDERED = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}|--:--:--\.---) ")


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


# Logging is configured per test; put it (and the secret registry) back afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def log_text() -> str:
    """A real captured daemon log, then a stray traceback line and a journalctl line."""
    buf = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=buf)
    log = get_logger("bridge.pipeline")
    with bound(location="main", stream="an.people"):
        log.debug("page_fetched", count=25)
        log.info("op_sent", entity="person:abc", source_key="Ada.Lovelace@Example.org")
    with bound(location="branch", stream="ad.conversations", target="ghl"):
        log.warning("op_retry_scheduled", entity="person:xyz", attempt=2, error="HTTP 503")
        log.error("op_dead_lettered", reason="422 bad phone", source_key="bob@example.org")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("op_crashed")
    log.critical("stream_failed", error="x" * 400)
    return buf.getvalue() + TRACEBACK + "\n" + JOURNAL + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge")
    add_tail_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["tail", *argv])


def _tail(text: str, *argv: str, stdout: io.StringIO | None = None) -> tuple[int, list[str]]:
    out = io.StringIO() if stdout is None else stdout
    code = run_tail(_args(*argv), io.StringIO(text), out)
    return code, out.getvalue().splitlines()


def _events(lines: list[str]) -> list[str]:
    return [line.split()[2] for line in lines if RENDERED.match(line)]


def test_plain_output_shows_every_event_and_passes_other_text_through(log_text: str) -> None:
    """Without filters every record is rendered and non-JSON lines are printed unchanged."""
    code, lines = _tail(log_text)

    assert code == 0
    assert _events(lines) == ALL
    assert TRACEBACK in lines
    assert "    RuntimeError: boom" in lines  # the logged exception, whole, below its line
    assert not any("\x1b" in line for line in lines)  # auto: a StringIO is not a terminal
    assert lines[-1].startswith("12:00:00.250 INFO  op_sent  [main] stream=an.people")


def test_render_matches_the_documented_layout() -> None:
    """A record renders as time, level, event, [location target], then key=value pairs."""
    record: dict[str, object] = {
        "ts": "2026-11-21T10:00:00.123456Z",
        "level": "warning",
        "event": "op_retry_scheduled",
        "logger_name": "bridge.pipeline",
        "attempt": 2,
        "retry_in": 3.1,
        "error": "HTTP 503",
        "stream": "an.people",
        "entity": "person:abc",
        "location": "main",
        "target": "ghl",
    }

    assert render(record, color=False) == (
        "10:00:00.123 WARN  op_retry_scheduled  [main ghl] stream=an.people entity=person:abc"
        ' attempt=2 retry_in=3.1 error="HTTP 503" logger_name=bridge.pipeline'
    )


def test_render_cuts_long_values_and_escapes_control_characters() -> None:
    """Long values end in an ellipsis and escape codes in values cannot reach the terminal."""
    line = render({"event": "e", "blob": "y" * 1000, "evil": "a\x1b[2Jb"}, color=False)

    assert f"blob={'y' * 300}… " in line
    assert 'evil="a\\x1b[2Jb"' in line
    assert "\x1b" not in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--level", "warning"], ALL[2:6]),
        (["--level", "ERROR"], ALL[3:6]),
        (["--level", "debug"], ALL),
        (["--stream", "ad.conversations"], ALL[2:5]),
        (["--location", "branch"], ALL[2:5]),
        (["--location", "main", "--level", "info"], ["op_sent", "op_sent"]),
        (["--event", "op_*"], [*ALL[1:5], "op_sent"]),
        (["--event", "page_*", "--event", "*_failed"], ["page_fetched", "stream_failed"]),
        (["--contact", "ADA.lovelace"], ["op_sent"]),
        (["--contact", "person:XYZ"], ["op_retry_scheduled"]),
        (["--contact", "person:"], ["op_sent", "op_retry_scheduled", "op_sent"]),
        (["--contact", "@example.ORG"], ["op_sent", "op_dead_lettered"]),
        (["--since", "10m"], ALL[:6]),
        (["--since", "90s"], ALL[:6]),
        (["--since", "2021-06-01T11:00:00"], ALL),
        (["--since", "2021-06-01T13:30:00+02:00"], ALL),
        (["--since", "2021-06-01T12:00:00.250Z"], ALL),
        (["--since", "2021-06-01T12:00:01Z"], ALL[:6]),
        (["--since", "2021-06-02"], ALL[:6]),
    ],
)
def test_filters_keep_only_matching_records(
    log_text: str, argv: list[str], expected: list[str]
) -> None:
    """Each filter keeps the records it names, and a filter drops the non-JSON lines."""
    code, lines = _tail(log_text, *argv)

    assert code == 0
    assert _events(lines) == expected
    assert TRACEBACK not in lines


def test_json_prints_matching_lines_as_they_came(log_text: str) -> None:
    """--json prints the matching JSON unchanged, without journal prefix or other text."""
    code, lines = _tail(log_text, "--json", "--level", "info")

    assert code == 0
    originals = log_text.splitlines()
    assert lines[:5] == originals[1:6]
    assert lines[5] == JOURNAL[JOURNAL.index("{") :]
    assert [json.loads(line)["event"] for line in lines] == ALL[1:]


def test_color_always_marks_level_event_and_other_text(log_text: str) -> None:
    """With colour the level is coloured by severity, the event bold and other text dim."""
    _, lines = _tail(log_text, "--color", "always")

    assert "\x1b[33mWARN \x1b[0m \x1b[1mop_retry_scheduled\x1b[0m" in lines[2]
    assert "\x1b[31mERROR\x1b[0m" in lines[3]
    assert "\x1b[2mDEBUG\x1b[0m" in lines[0]
    assert f"\x1b[2m{TRACEBACK}\x1b[0m" in lines


@pytest.mark.parametrize(
    ("argv", "no_color", "coloured"),
    [
        (["--color", "never"], None, False),
        ([], None, True),
        ([], "1", False),
        (["--color", "always"], "1", True),
    ],
)
def test_color_follows_the_flag_the_terminal_and_no_color(
    log_text: str,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    no_color: str | None,
    coloured: bool,
) -> None:
    """On a terminal auto colours unless $NO_COLOR is set; never and always are absolute."""
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    out = Terminal()
    _tail(log_text, *argv, stdout=out)

    assert ("\x1b[" in out.getvalue()) is coloured


def test_a_terminal_on_stdin_gets_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    """With no file and a terminal for stdin, tail explains how to pipe logs in and exits 2."""
    assert run_tail(_args(), Terminal(), io.StringIO()) == 2
    assert capsys.readouterr().err.strip() == HINT


@pytest.mark.parametrize(
    "argv",
    [
        ["--level", "loud"],
        ["--since", "yesterdayish"],
        ["--since", "10x"],
        ["--color", "sometimes"],
        ["a.log", "b.log"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits 2 with the usage line, as argparse does for the other commands."""
    with pytest.raises(SystemExit) as exited:
        _args(*argv)

    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_reads_a_file_to_its_end(log_text: str, tmp_path: Path) -> None:
    """Given a file, tail prints it like stdin and exits 0 at its end."""
    log = tmp_path / "bridge.log"
    log.write_bytes(log_text.encode() + b"\xff not utf-8\n")
    out = io.StringIO()

    assert run_tail(_args(str(log)), io.StringIO(), out) == 0
    lines = out.getvalue().splitlines()
    assert _events(lines) == ALL
    assert lines[-1] == "\ufffd not utf-8"


def test_a_missing_file_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that cannot be opened is reported on stderr with exit status 1."""
    assert run_tail(_args(str(tmp_path / "nope.log"), "-f"), io.StringIO(), io.StringIO()) == 1
    assert "bridge tail:" in capsys.readouterr().err


def _record(event: str) -> str:
    return json.dumps({"ts": "2026-11-21T10:00:00Z", "level": "info", "event": event}) + "\n"


def test_follow_survives_growth_truncation_and_rotation(tmp_path: Path) -> None:
    """Following a file prints lines as they are added, after truncation and after rotation."""
    log = tmp_path / "bridge.log"
    log.write_text(_record("first") + _record("second"))

    def append(path: Path, text: str) -> None:
        with path.open("a") as handle:
            handle.write(text)

    def rotate() -> None:
        log.rename(tmp_path / "bridge.log.1")
        append(tmp_path / "bridge.log.1", _record("late_in_old_file"))

    def stop() -> None:
        raise KeyboardInterrupt  # how an operator ends `bridge tail -f`

    half = _record("split_write")
    steps: list[Callable[[], object]] = [
        lambda: append(log, half[:20]),  # a line the writer has not finished
        lambda: append(log, half[20:]),
        lambda: log.write_text(_record("after_cut")),  # shorter than before: truncated
        rotate,
        lambda: None,  # rotated away, nothing new yet: keep the old file
        lambda: log.write_text(_record("new_file")),
        stop,
    ]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        steps.pop(0)()

    out = io.StringIO()
    code = run_tail(_args(str(log), "--follow"), io.StringIO(), out, sleep=sleep)

    assert code == 0
    assert _events(out.getvalue().splitlines()) == [
        "first",
        "second",
        "split_write",
        "after_cut",
        "late_in_old_file",
        "new_file",
    ]
    assert steps == []
    assert waits == [POLL_INTERVAL] * 7


def test_a_closed_pipe_ends_quietly(log_text: str) -> None:
    """When the reader goes away (| head), tail exits 0 instead of raising."""

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    assert run_tail(_args(), io.StringIO(log_text), ClosedPipe()) == 0


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ('{"event": "a"}', "a"),
        ('  {"event": "a"}  ', "a"),
        ('Nov 21 10:00:00 host bridge[123]: {"event": "a"}', "a"),
        ('2026-11-21T10:00:00+0000 host bridge[1]: {"event": "a"}', "a"),
        ("Traceback (most recent call last):", None),
        ("    d = {1: 2}", None),
        ('got {"event": "a"}', None),
        ('{"event": ', None),
        ("[1, 2]", None),
        ('host x: ["a"]', None),
        ("", None),
    ],
)
def test_parse_line_finds_json_objects_only(line: str, event: str | None) -> None:
    """parse_line returns the object of a bare or journal-prefixed JSON line, else None."""
    record = parse_line(line)

    assert (record or {}).get("event") == event
    assert (record is None) is (event is None)


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"ts": 5, "level": 3, "event": ["x"], "location": {"a": 1}},
        {"ts": "not a time", "level": None, "event": None},
        {"ts": "9999-12-31T23:59:59-05:00", "level": "loud\x1b[31m"},
        {"ts": "2026-11-21", "exception": 7, "stack": "", "entity": 12},
    ],
)
def test_render_and_matches_take_odd_records(record: dict[str, object]) -> None:
    """Records with missing keys or odd types render on one line and never raise."""
    filters = Filters(
        min_level=30,
        stream="s",
        location="l",
        events=("*",),
        contact="1",
        since=datetime(2020, 1, 1, tzinfo=UTC),
    )

    line = render(record, color=True)
    assert "\n" not in line
    assert not matches(record, filters)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
_KEYS = st.sampled_from(
    ["ts", "level", "event", "location", "stream", "entity", "source_key", "exception", "stack"]
)


@given(st.dictionaries(_KEYS | st.text(), _JSON, max_size=8), st.text(max_size=40))
def test_garbage_never_raises(record: dict[str, object], prefix: str) -> None:
    """Any JSON object, after any prefix, parses, renders and filters without raising."""
    line = prefix + json.dumps(record, ensure_ascii=False)
    parsed = parse_line(line)
    parse_line(prefix)
    for value in (record, parsed or {}):
        assert "\x1b" not in render(value, color=False)
        render(value, color=True)
        matches(value, Filters(min_level=10, events=("*",), contact="a"))
