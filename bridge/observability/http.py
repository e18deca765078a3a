"""The optional loopback listener: ``/healthz``, ``/readyz`` and ``/metrics``.

It runs on the daemon's own event loop, so a ``/healthz`` that answers at all shows the
loop turns; the body adds whether the pipeline is stuck. ``/readyz`` is 503 until the
start-up checks are done and while every GHL location is failing auth.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
import structlog
from aiohttp import web

from bridge.observability.metrics import CONTENT_TYPE, Metrics
from bridge.observability.service import ServiceView

log = structlog.get_logger("bridge.http")

_encode = msgspec.json.Encoder().encode


def build_app(view: ServiceView, metrics: Metrics) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        alive = view.alive()
        body = {"status": "ok" if alive else "stalled", "stalled_seconds": view.stalled_for()}
        return _json(body, 200 if alive else 503)

    async def readyz(request: web.Request) -> web.Response:
        if not view.ready:
            return _json({"status": "starting"}, 503)
        down = view.locations_down()
        if not view.serving():
            return _json({"status": "every location down", "down": down}, 503)
        return _json({"status": "ready", "down": down}, 200)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


@contextlib.asynccontextmanager
async def serve(view: ServiceView, metrics: Metrics, *, host: str, port: int) -> AsyncIterator[int]:
    """Listen on ``host:port`` for the block's duration; yields the bound port."""
    runner = web.AppRunner(build_app(view, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info("http_listening", host=host, port=bound)
        yield int(bound)
    finally:
        await runner.cleanup()
