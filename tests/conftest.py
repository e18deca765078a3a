"""Shared fixtures: a HighLevel simulator on loopback and GHL clients wired to it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import pytest
import structlog

from bridge.connectors.ghl.client import GhlClient, TokenSource
from bridge.ratelimit import TokenBucket
from bridge.redact import clear_secrets
from bridge.rest import make_session
from bridge.sim.common import serve
from bridge.sim.ghl import GhlSim, build_app

GHL_LOCATION = "ve9EPM428h8vShlRW1KT"


class InstantClock:
    """Real clock readings, but ``sleep`` only records the delay, so backoff costs no time."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


class StaticTokens:
    """A TokenSource that hands out ``first`` and, after a refresh, ``fresh``."""

    def __init__(self, first: str, *, fresh: str | None = None) -> None:
        self.current = first
        self.fresh = fresh if fresh is not None else first
        self.refreshed: list[str] = []

    async def token(self) -> str:
        return self.current

    async def refresh(self, rejected: str) -> str:
        self.refreshed.append(rejected)
        self.current = self.fresh
        return self.fresh


@dataclass
class GhlServer:
    """A running simulator with one location and a private token for it."""

    sim: GhlSim
    base_url: str
    location_id: str
    token: str


class MakeGhlClient(Protocol):
    def __call__(
        self,
        *,
        auth: TokenSource | None = None,
        location_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        max_upload_bytes: int = ...,
    ) -> GhlClient: ...


@dataclass
class GhlClientParts:
    """The seams of the default client, for tests that look at them."""

    clock: InstantClock
    bucket: TokenBucket


@pytest.fixture
async def ghl_server() -> AsyncIterator[GhlServer]:
    sim = GhlSim(seed=1)
    sim.add_location(GHL_LOCATION)
    token = sim.add_private_token(GHL_LOCATION)
    async with serve(build_app(sim)) as base_url:
        yield GhlServer(sim, base_url, GHL_LOCATION, token)


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session() as session:
        yield session


@pytest.fixture
def ghl_parts() -> GhlClientParts:
    clock = InstantClock()
    bucket = TokenBucket("ghl", GHL_LOCATION, capacity=100, window=10.0, clock=clock)
    return GhlClientParts(clock, bucket)


@pytest.fixture
def make_ghl_client(
    ghl_server: GhlServer, http_session: aiohttp.ClientSession, ghl_parts: GhlClientParts
) -> MakeGhlClient:
    def make(
        *,
        auth: TokenSource | None = None,
        location_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        max_upload_bytes: int = 5 * 1024 * 1024,
    ) -> GhlClient:
        return GhlClient(
            session or http_session,
            base_url=ghl_server.base_url,
            location_id=location_id or ghl_server.location_id,
            bucket=ghl_parts.bucket,
            auth=auth or StaticTokens(ghl_server.token),
            clock=ghl_parts.clock,
            max_upload_bytes=max_upload_bytes,
        )

    return make


@pytest.fixture
def ghl_client(make_ghl_client: MakeGhlClient) -> GhlClient:
    return make_ghl_client()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog, stdlib logging and the secret registry back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    clear_secrets()
    root.handlers[:] = handlers
    root.setLevel(level)
