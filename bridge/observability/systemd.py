"""sd_notify for a ``Type=notify`` unit, stdlib only, and a no-op outside systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("bridge.systemd")

# sockaddr_un.sun_path; Python refuses a longer address at every send, so refuse it once here.
_MAX_ADDRESS: Final = 108


def _uint(raw: str) -> int | None:
    # int() would also take " 5", "1_000" and non-ASCII digits, which systemd never writes.
    return int(raw) if raw.isascii() and raw.isdigit() else None


def _one_line(text: str) -> str:
    # The protocol is newline-separated assignments: a newline would start a new one.
    return " ".join(text.splitlines())


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    raw_usec, raw_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not raw_usec:
        return None
    usec = _uint(raw_usec)
    owner = _uint(raw_pid) if raw_pid else pid
    if not usec or owner is None:
        log.warning("sd_watchdog_invalid", watchdog_usec=raw_usec, watchdog_pid=raw_pid)
        return None
    if owner != pid:
        # Inherited from a parent that systemd watches; pinging for it would hide its hang.
        return None
    # Half the timeout, as sd_watchdog_enabled(3) advises, so one late ping is not fatal.
    return usec / 2_000_000


class Notifier:
    """Tells systemd about readiness, status, liveness and shutdown over ``$NOTIFY_SOCKET``.

    Nothing here raises into the daemon: a bad address disables the notifier, and a failed
    send is logged once per outage, because a missed ping costs less than a crashed daemon.
    """

    def __init__(self, notify_socket: str = "", *, watchdog_interval: float | None = None) -> None:
        self._name = notify_socket
        self._address = ""
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._failing = False
        self.watchdog_interval: float | None = None
        if not notify_socket:
            return
        if notify_socket.startswith("@"):
            # The abstract namespace: "@" is systemd's spelling of the leading NUL byte.
            address = "\0" + notify_socket[1:]
        elif notify_socket.startswith("/"):
            address = notify_socket
        else:
            # vsock:CID:PORT (systemd 254+) or a relative path: nothing we can send to.
            log.warning("sd_notify_disabled", notify_socket=notify_socket, reason="unsupported")
            return
        if len(os.fsencode(address)) > _MAX_ADDRESS:
            log.warning("sd_notify_disabled", notify_socket=notify_socket, reason="too_long")
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("sd_notify_disabled", notify_socket=notify_socket, reason=str(exc))
            return
        # A full receive queue must cost us a skipped message, never a blocked event loop.
        sock.setblocking(False)
        self._sock, self._address = sock, address
        self.watchdog_interval = watchdog_interval

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        notify_socket = env.get("NOTIFY_SOCKET", "")
        # Without a socket there is nobody to ping, so the watchdog values are not read.
        interval = _watchdog_interval(env, pid) if notify_socket else None
        return cls(notify_socket, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere."""
        return self._sock is not None

    def ready(self, status: str) -> None:
        """Start-up is done: systemd starts the units ordered after us."""
        self._send_status("READY=1", status)

    def status(self, text: str) -> None:
        """Show ``text`` in ``systemctl status`` (one line; a repeat is not sent again)."""
        if _one_line(text) != self._last_status:
            self._send_status(None, text)

    def watchdog(self) -> None:
        """Tell systemd we are still making progress."""
        self._send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        """Shutdown has begun."""
        self._send_status("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more from now before the start or stop timeout fires."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_status(self, head: str | None, text: str) -> None:
        line = _one_line(text)
        message = f"STATUS={line}" if head is None else f"{head}\nSTATUS={line}"
        if self._send(message):
            self._last_status = line

    def _send(self, message: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # Watchdog pings come every few seconds: one line per outage, not one per ping.
            if not self._failing:
                self._failing = True
                log.warning(
                    "sd_notify_failed",
                    notify_socket=self._name,
                    kind=message.partition("=")[0],
                    error=exc.strerror or type(exc).__name__,
                )
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify_recovered", notify_socket=self._name)
        return True
