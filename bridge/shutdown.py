"""SIGTERM and SIGINT as the first phase of a two-phase shutdown; SIGHUP as a reload."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog

log = structlog.get_logger("bridge.shutdown")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stoppable(Protocol):
    def request_stop(self) -> None: ...


@contextlib.contextmanager
def install_stop_signals(target: Stoppable) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT ask ``target`` to stop intake and drain.

    A repeated signal is only logged: the drain grace is bounded already, and systemd's
    TimeoutStopSec is the hard stop above it.
    """
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            log.info("stop_requested", signal=name)
            target.request_stop()
        else:
            log.info("stop_already_requested", signal=name)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


@contextlib.contextmanager
def install_reload_signal(reload: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGHUP calls ``reload`` (systemctl reload sends it via ExecReload).

    Without this, SIGHUP would end the process: its default action is to terminate.
    """
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        log.info("reload_requested", signal="SIGHUP")
        reload()

    loop.add_signal_handler(signal.SIGHUP, on_signal)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
