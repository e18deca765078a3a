"""Tests for sd_notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge.observability.systemd import Notifier


@dataclass
class Receiver:
    """The systemd end: a bound datagram socket and the NOTIFY_SOCKET value naming it."""

    sock: socket.socket
    notify_socket: str

    def messages(self) -> list[bytes]:
        """Everything queued so far; a unix datagram is queued before sendto returns."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096))
            except BlockingIOError:
                return received


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory short enough for sockaddr_un (~107 bytes): tmp_path, or one under /tmp."""
    if len(os.fsencode(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def receiver(socket_dir: Path) -> Iterator[Receiver]:
    """A receiver bound to a filesystem path."""
    path = str(socket_dir / "notify.sock")
    sock = _bind(path)
    yield Receiver(sock, path)
    sock.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    """A notifier aimed at ``receiver``."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})
    yield notifier
    notifier.close()


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda n: n.ready("serving 3 locations"), b"READY=1\nSTATUS=serving 3 locations"),
        (lambda n: n.status("polling"), b"STATUS=polling"),
        (lambda n: n.status("two\nlines\r\nhere\n"), b"STATUS=two lines here"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping("draining 4 ops"), b"STOPPING=1\nSTATUS=draining 4 ops"),
        (lambda n: n.ready("a\nb"), b"READY=1\nSTATUS=a b"),
        (lambda n: n.extend_timeout(30), b"EXTEND_TIMEOUT_USEC=30000000"),
        (lambda n: n.extend_timeout(2.5), b"EXTEND_TIMEOUT_USEC=2500000"),
        (lambda n: n.extend_timeout(-1), b"EXTEND_TIMEOUT_USEC=0"),
    ],
)
def test_message_bytes(
    notifier: Notifier, receiver: Receiver, send: Callable[[Notifier], None], expected: bytes
) -> None:
    """Each call sends exactly one datagram with the protocol's exact bytes."""
    assert notifier.enabled
    send(notifier)
    assert receiver.messages() == [expected]


def test_noop_without_notify_socket() -> None:
    """Without NOTIFY_SOCKET every call does nothing and nothing is logged."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "60000000"}, pid=1234)
    with capture_logs() as logs:
        notifier.ready("ready")
        notifier.status("busy")
        notifier.watchdog()
        notifier.extend_timeout(10)
        notifier.stopping("bye")
        notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert logs == []


def test_from_process_environment(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no arguments the notifier reads os.environ and compares against os.getpid()."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    notifier.watchdog()
    notifier.close()
    assert notifier.watchdog_interval == 5.0
    assert receiver.messages() == [b"WATCHDOG=1"]


@pytest.mark.parametrize(
    ("watchdog_env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval(
    receiver: Receiver, watchdog_env: dict[str, str], interval: float | None
) -> None:
    """The interval is half of WATCHDOG_USEC, and None when the watchdog is another pid's."""
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": receiver.notify_socket, **watchdog_env}, pid=4242
    )
    notifier.close()
    assert notifier.watchdog_interval == interval


@pytest.mark.parametrize(
    "watchdog_env",
    [
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "1_000"},
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "me"},
    ],
)
def test_invalid_watchdog_is_logged_not_raised(
    receiver: Receiver, watchdog_env: dict[str, str]
) -> None:
    """A malformed watchdog value leaves notifications on, the watchdog off, and one warning."""
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket, **watchdog_env})
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("sd_watchdog_invalid", "warning")]
    notifier.close()


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234", "/" + "x" * 200])
def test_unusable_notify_socket_disables(value: str) -> None:
    """A NOTIFY_SOCKET we cannot send to disables the notifier with one warning."""
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "60000000"})
        notifier.ready("ready")
        notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("sd_notify_disabled", "warning")]


def test_abstract_socket() -> None:
    """An "@name" NOTIFY_SOCKET reaches the abstract socket named by a leading NUL byte."""
    name = f"bridge-test-{uuid.uuid4().hex}"
    sock = _bind("\0" + name)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("up")
        notifier.close()
        assert Receiver(sock, "@" + name).messages() == [b"READY=1\nSTATUS=up"]
    finally:
        sock.close()


def test_removed_socket_logs_once(notifier: Notifier, receiver: Receiver) -> None:
    """A vanished socket never raises and is reported by one sd_notify_failed warning."""
    receiver.sock.close()
    os.unlink(receiver.notify_socket)
    with capture_logs() as logs:
        for _ in range(5):
            notifier.watchdog()
        notifier.status("still here")
        notifier.stopping("bye")
    failed = [e for e in logs if e["event"] == "sd_notify_failed"]
    assert len(logs) == len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["kind"] == "WATCHDOG"


def test_failure_then_recovery_rearms_the_warning(notifier: Notifier, socket_dir: Path) -> None:
    """After systemd's socket comes back, sends resume and a later outage warns again."""
    path = str(socket_dir / "notify.sock")
    with capture_logs() as logs:
        os.unlink(path)
        notifier.watchdog()
        notifier.watchdog()
        revived = _bind(path)
        notifier.watchdog()
        revived.close()
        os.unlink(path)
        notifier.watchdog()
    assert [e["event"] for e in logs] == [
        "sd_notify_failed",
        "sd_notify_recovered",
        "sd_notify_failed",
    ]


def test_full_queue_does_not_block(notifier: Notifier, receiver: Receiver) -> None:
    """When systemd reads nothing, sends fail fast with EAGAIN and warn once."""
    with capture_logs() as logs:
        for _ in range(2000):
            notifier.watchdog()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert receiver.messages()  # the queue took some before it filled


def test_status_deduplicated(notifier: Notifier, receiver: Receiver) -> None:
    """A status equal to the last one sent (by status, ready or stopping) is not sent again."""
    notifier.ready("idle")
    notifier.status("idle")
    notifier.status("polling")
    notifier.status("polling")
    notifier.status("polling\n")
    notifier.watchdog()
    notifier.status("idle")
    notifier.stopping("idle")
    assert receiver.messages() == [
        b"READY=1\nSTATUS=idle",
        b"STATUS=polling",
        b"WATCHDOG=1",
        b"STATUS=idle",
        b"STOPPING=1\nSTATUS=idle",
    ]


def test_failed_status_is_sent_again(notifier: Notifier, socket_dir: Path) -> None:
    """A status that did not get through is not remembered, so the next identical one goes."""
    path = str(socket_dir / "notify.sock")
    os.unlink(path)
    with capture_logs():
        notifier.status("polling")
    revived = _bind(path)
    try:
        notifier.status("polling")
        assert Receiver(revived, path).messages() == [b"STATUS=polling"]
    finally:
        revived.close()


def test_close_is_idempotent(notifier: Notifier, receiver: Receiver) -> None:
    """After close the notifier is disabled, sends nothing and closes again quietly."""
    notifier.close()
    notifier.close()
    notifier.watchdog()
    assert not notifier.enabled
    assert receiver.messages() == []
