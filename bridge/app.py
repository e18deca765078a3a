"""Composition root: the only module that knows which concrete classes make up the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog

from bridge.clock import Clock, SystemClock
from bridge.config import (
    ActionNetworkSource,
    ActiveDemandSource,
    Config,
    GhlLocation,
    listen_address,
    load_config,
)
from bridge.connectors.actionnetwork import AnClient, AnPeopleStream
from bridge.connectors.activedemand import AdClient, AdContactsStream, AdConversationsStream
from bridge.connectors.ad_target import AdTarget
from bridge.connectors.an_taggings import AnTaggingsStream
from bridge.connectors.an_target import AnWriteBackTarget
from bridge.connectors.ghl.auth import OAuthTokens, token_source
from bridge.connectors.ghl.client import GhlClient, TokenSource
from bridge.connectors.ghl.probe import ScopeCheck, check_location
from bridge.connectors.ghl.reverse import GhlMessagesStream
from bridge.connectors.ghl.target import GhlTarget
from bridge.errors import AuthError, ConfigError, Fatal, Retryable
from bridge.flows.action_network import ActionNetworkFlow
from bridge.flows.activedemand import ActiveDemandFlow
from bridge.flows.reverse import ReverseFlow
from bridge.models import BudgetRow, NewOp, SourceEvent
from bridge.observability.logs import configure_output
from bridge.observability.metrics import Metrics, Snapshot
from bridge.observability.service import ServiceView
from bridge.observability.systemd import Notifier
from bridge.pipeline import Pipeline, RunSummary, Stream, Target
from bridge.ratelimit import Limiters, ShareOf
from bridge.redact import register_secret
from bridge.reload import merge_reloadable
from bridge.rest import make_session
from bridge.shutdown import install_reload_signal, install_stop_signals
from bridge.store import Store
from bridge.streams import Mapper

log = structlog.get_logger("bridge.app")

BUDGET_REPORT_INTERVAL = 5.0
"""How often the daemon sends STATUS=; ``bridge cursor`` takes budgets written within three
of these as a sign that the daemon runs."""

BUDGET_SAVE_INTERVAL = 1.0
"""How often the daemon writes its bucket states, for ``bridge status`` and the next start."""

BUDGET_SAVE_SILENCE = 3.0
"""The longest a running daemon goes without writing its bucket states: the interval, the
supervisor's one-second sleep, and a slow write. ``bridge run`` assumes a previous process
sent nothing later than this after its last write (see :meth:`App.restore_budgets`)."""

DRAIN_TIMEOUT_MARGIN = 15.0
"""Asked of systemd on top of the drain grace while draining: closing the store and session."""

DONE_RETENTION = 86_400.0
"""Done ops are kept a day for ``bridge status`` and post-mortems, then pruned."""


def stream_names(config: Config) -> list[str]:
    """Every configured stream, named as its cursor is stored.

    An Action Network group has ``<source>.people`` (people changed, with their tags and
    activities) and ``<source>.taggings`` (a full scan for tag changes, which do not touch
    the person). An ActiveDEMAND account has ``<source>.contacts`` (a full scan) and
    ``<source>.conversations`` (changed conversations with their new messages).
    """
    names = [f"{s.name}.people" for s in config.sources.action_network]
    names += [
        f"{s.name}.taggings" for s in config.sources.action_network if "taggings" in s.streams
    ]
    names += [f"{s.name}.{stream}" for s in config.sources.activedemand for stream in s.streams]
    names += [f"{loc.name}.messages" for loc in config.ghl.locations if reads_back(config, loc)]
    return names


def an_flow(config: Config, source: ActionNetworkSource) -> ActionNetworkFlow:
    """The compiled flow of one group (raises ConfigError naming a bad mapping or rule)."""
    return ActionNetworkFlow(
        source,
        config.mapping.get(source.mapping),
        ghl_target=ghl_target_name(source.location),
        an_target=an_target_name(source.name),
    )


def ad_flow(config: Config, source: ActiveDemandSource) -> ActiveDemandFlow:
    """The compiled flow of one account (raises ConfigError naming a bad mapping or rule)."""
    return ActiveDemandFlow(
        source,
        config.mapping.get(source.mapping),
        ghl_target=ghl_target_name(source.location),
        ad_target=ad_target_name(source.name),
    )


def reverse_flow(config: Config, location: GhlLocation) -> ReverseFlow:
    """What the location's GHL messages become in the sources that send to it."""
    return ReverseFlow(
        location,
        ghl_target=ghl_target_name(location.name),
        action_network={
            s.name: (s, an_target_name(s.name))
            for s in config.sources.action_network
            if s.location == location.name
        },
        activedemand={
            s.name: (s, ad_target_name(s.name))
            for s in config.sources.activedemand
            if s.location == location.name
        },
    )


def reads_back(config: Config, location: GhlLocation) -> bool:
    """Whether the location has a reverse stream: enabled, and some source mirrors."""
    return _reads_back(location, reverse_flow(config, location))


def _reads_back(location: GhlLocation, flow: ReverseFlow) -> bool:
    return location.reverse.enabled and flow.active


class Flows(msgspec.Struct, frozen=True, kw_only=True):
    """Every source's compiled flow, by source name; the reverse flows by location."""

    action_network: dict[str, ActionNetworkFlow]
    activedemand: dict[str, ActiveDemandFlow]
    reverse: dict[str, ReverseFlow]


class LiveMapper:
    """A stream's mapper that a reload replaces between two events (see bridge.reload)."""

    def __init__(self, mapper: Mapper) -> None:
        self.current = mapper

    def __call__(self, event: SourceEvent) -> Sequence[NewOp]:
        return self.current(event)


def flow_mappers(flows: Flows) -> dict[str, Mapper]:
    """Each flow's mapper by name: the source's name, or ``reverse:<location>``."""
    mappers: dict[str, Mapper] = {}
    mappers |= flows.action_network
    mappers |= flows.activedemand
    mappers |= {f"reverse:{name}": flow for name, flow in flows.reverse.items()}
    return mappers


def poll_intervals(config: Config) -> dict[str, float]:
    """Each stream's poll interval by stream name, as the config gives it."""
    intervals: dict[str, float] = {}
    for an in config.sources.action_network:
        intervals[f"{an.name}.people"] = float(an.poll_interval)
        intervals[f"{an.name}.taggings"] = float(an.taggings_interval)
    for ad in config.sources.activedemand:
        intervals[f"{ad.name}.contacts"] = float(ad.poll_interval)
        intervals[f"{ad.name}.conversations"] = float(ad.conversations_interval)
    for loc in config.ghl.locations:
        intervals[f"{loc.name}.messages"] = float(loc.reverse.poll_interval)
    return intervals


def compile_flows(config: Config) -> Flows:
    """Every source's flow; a mapping or rule mistake raises ConfigError."""
    return Flows(
        action_network={s.name: an_flow(config, s) for s in config.sources.action_network},
        activedemand={s.name: ad_flow(config, s) for s in config.sources.activedemand},
        reverse={
            loc.name: flow
            for loc in config.ghl.locations
            if _reads_back(loc, flow := reverse_flow(config, loc))
        },
    )


def build_limiters(config: Config, clock: Clock) -> Limiters:
    """One bucket per GHL location and per source account, from the configured budgets."""
    limiters = Limiters(clock)
    for location in config.ghl.locations:
        limits = location.limits
        limiters.add(
            "ghl",
            location.name,
            capacity=limits.burst,
            window=float(limits.window),
            daily_cap=limits.daily,
        )
    sources = [("actionnetwork", s.name, s.rate) for s in config.sources.action_network]
    sources += [("activedemand", s.name, s.rate) for s in config.sources.activedemand]
    for api, name, rate in sources:
        # A rate of r/s is a budget of ceil(r) requests per ceil(r)/r seconds: exact for
        # whole rates (4/s -> 4 per 1 s) and never above r for fractional ones.
        capacity = max(1, math.ceil(rate))
        limiters.add(api, name, capacity=capacity, window=capacity / rate)
    return limiters


class GhlLocationParts(msgspec.Struct, frozen=True, kw_only=True):
    """What the daemon holds per GHL location.

    ``session`` is the location's own, with its configured ``timeout``: its API calls,
    token refreshes and start-up probes all go through it.
    """

    config: GhlLocation
    auth: TokenSource
    client: GhlClient
    session: aiohttp.ClientSession


class App:
    """Everything a run needs, built from the config and owned for the run's lifetime.

    ``mappers`` are the streams' mappers by flow name (see :func:`flow_mappers`); a reload
    swaps what they call. ``config_path`` is where SIGHUP reads the config again.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        limiters: Limiters,
        streams: Sequence[Stream],
        targets: Mapping[str, Target],
        clock: Clock,
        *,
        session: aiohttp.ClientSession,
        locations: Sequence[GhlLocationParts] = (),
        mappers: Mapping[str, LiveMapper] | None = None,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.limiters = limiters
        self.clock = clock
        self.session = session
        self.locations = list(locations)
        self.streams = list(streams)
        self.mappers = dict(mappers or {})
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        ghl_targets = {ghl_target_name(loc.name): loc.name for loc in config.ghl.locations}
        self.pipeline = Pipeline(
            store,
            streams,
            targets,
            config.pipeline,
            clock,
            locations=ghl_targets,
            metrics=self.metrics,
            on_drain=self._draining,
        )
        self.view = ServiceView(
            self.pipeline,
            limiters,
            streams,
            locations=ghl_targets,
            clock=clock,
            stall_timeout=float(config.pipeline.stall_timeout),
        )
        self.metrics.watch(self.snapshot)
        self._stopping = asyncio.Event()

    async def check_locations_of(
        self, locations: Sequence[GhlLocationParts]
    ) -> dict[str, list[ScopeCheck]]:
        """Probe GHL locations' tokens and scopes (raises AuthError for a bad token)."""
        results: dict[str, list[ScopeCheck]] = {}
        for parts in locations:
            loc = parts.config
            with structlog.contextvars.bound_contextvars(location=loc.name):
                results[loc.name] = await check_location(
                    parts.session,
                    name=loc.name,
                    base_url=loc.base_url,
                    location_id=loc.location_id,
                    auth=parts.auth,
                    bucket=self.limiters.get("ghl", loc.name),
                    clock=self.clock,
                )
        return results

    async def verify_locations(self) -> None:
        """Check every location's token and scopes, all at once, before the run starts.

        A location that fails is marked down (its ops wait; it is probed again after
        ``pipeline.target_recheck``) and the others start. Only when every location fails
        does the start fail, with the first one's error: nothing useful could run.
        """
        failures = [
            failure
            for failure in await asyncio.gather(*(self._verify(p) for p in self.locations))
            if failure is not None
        ]
        if failures and len(failures) == len(self.locations):
            raise failures[0]

    async def _verify(self, parts: GhlLocationParts) -> Fatal | None:
        """One location's start-up check; returns its error when it is unusable."""
        name = parts.config.name
        target = ghl_target_name(name)
        try:
            checks = (await self.check_locations_of([parts]))[name]
            missing = [c.scope for c in checks if not c.ok]
            if missing:
                raise AuthError(
                    f"GHL location {name!r} lacks scope(s) {', '.join(missing)}: grant them to"
                    " the app or private integration, then start again"
                )
        except Fatal as exc:
            await self.pipeline.health.mark_target_down(target, exc)
            return exc
        except Retryable as exc:
            # Unreachable or rate limited says nothing about the token; the location's
            # ops meet the same and go through the ordinary retries.
            log.warning("location_unverified", location=name, error=str(exc))
            return None
        log.info("location_verified", location=name)
        await self.pipeline.health.mark_target_up(target)
        return None

    async def run(self, *, once: bool) -> RunSummary:
        """Run the pipeline with signal handling, the health listener and the supervisor.

        READY=1 goes to systemd once the state is open and every location's token has
        been checked (a location that failed is down, and says so in STATUS=). Stop and
        reload signals are handled from the very start: a stop during the start-up checks
        ends them (see :meth:`_unless_stopped`) and returns without starting the pipeline
        or sending READY=1; a stop after READY=1 drains. ``bridge run`` first holds back
        what the previous process may still have counting at the APIs.
        """
        with install_stop_signals(self), install_reload_signal(self.reload):
            if not once:
                await self.restore_budgets()
            # From here on the buckets are written every second, the start-up probes'
            # requests included, so that a kill at any point leaves a recent report.
            supervisor = asyncio.create_task(self._supervise(), name="supervisor")
            supervisor.add_done_callback(self._supervisor_done)
            try:
                async with self._listening():
                    await self.store.prune_done(before=self.clock.time() - DONE_RETENTION)
                    if not await self._unless_stopped(self.verify_locations()):
                        log.info("start_abandoned", reason="stop requested during start-up")
                        return self.pipeline.summary
                    self.view.ready = True
                    self.notifier.ready(self.view.status_line())
                    log.info("service_ready", status=self.view.status_line())
                    return await self.pipeline.run(once=once)
            finally:
                supervisor.cancel()
                await asyncio.wait({supervisor})
                await self.save_budgets(final=True)
                failure = None if supervisor.cancelled() else supervisor.exception()
                if failure is not None:
                    raise failure

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: end the start-up checks, or stop intake and drain (signal-safe)."""
        self._stopping.set()
        self.pipeline.request_stop()

    async def _unless_stopped(self, checks: Coroutine[Any, Any, None]) -> bool:
        """Run ``checks`` to the end (True), unless a stop is requested first (False).

        The checks are then cancelled, which is safe: the probes write nothing, a health
        write rolls back, and an OAuth refresh under way commits its pair first
        (:meth:`bridge.connectors.ghl.auth.OAuthTokens.refresh`).
        """
        task = asyncio.ensure_future(checks)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if self._stopping.is_set():
            if not task.cancelled():
                task.exception()  # retrieved, not raised: whatever it was, we are stopping
            return False
        task.result()
        return True

    async def restore_budgets(self) -> None:
        """Hold back, bucket by bucket, what the previous process may still have counting.

        systemd restarts a killed daemon 5 s later, well inside GHL's 10 s window, and
        what the killed process sent after its last bucket report is unknown; so a bucket
        reported less than one window plus :data:`BUDGET_SAVE_SILENCE` ago starts empty
        and fills when that has passed (:meth:`TokenBucket.resume`). A reverse stream's
        share is not restored on its own: each of its requests also takes a parent token.
        """
        # After a clean stop the last report came after the last request, and says what
        # was spent: an idle daemon restarted by the operator is ready at once.
        clean = await self.store.budgets_final()
        for row in await self.store.budgets():
            bucket = self.limiters.find(row.api, row.tenant)
            if bucket is None:
                continue
            held = bucket.resume(
                reported_at=row.updated_at,
                silence=0.0 if clean else BUDGET_SAVE_SILENCE,
                used_today=row.used_today,
                paused_until=row.paused_until,
                spent=row.capacity - row.available if clean else None,
            )
            if held > 0:
                log.info(
                    "budget_held_from_last_run",
                    api=row.api,
                    tenant=row.tenant,
                    seconds=round(held, 1),
                )

    @contextlib.asynccontextmanager
    async def _listening(self) -> AsyncIterator[None]:
        """The /healthz, /readyz and /metrics listener, when ``[http] listen`` is set."""
        if not self.config.http.listen:
            yield
            return
        # Imported only here: aiohttp.web costs start-up time that a daemon without a
        # listener would spend for nothing.
        from bridge.observability.http import serve

        host, port = listen_address(self.config.http.listen)
        async with serve(self.view, self.metrics, host=host, port=port):
            yield

    async def _supervise(self) -> None:
        """Write budgets every second; once ready, feed the watchdog and send STATUS=."""
        interval = self.notifier.watchdog_interval
        next_ping = next_save = next_status = 0.0
        while True:
            now = self.clock.monotonic()
            if now >= next_save:
                await self.save_budgets()
                next_save = now + BUDGET_SAVE_INTERVAL
            if self.view.ready:
                if interval is not None and now >= next_ping and self.view.alive():
                    self.notifier.watchdog()
                    next_ping = now + interval
                if now >= next_status:
                    self.notifier.status(self.view.status_line())
                    next_status = now + BUDGET_REPORT_INTERVAL
            await asyncio.sleep(1.0 if interval is None else min(1.0, interval))

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        # A dead supervisor would leave the budgets unwritten while the pipeline spends
        # them, and a restart would then trust an old report: stop, and fail loudly.
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), error=str(task.exception()))
            self.request_stop()

    def _draining(self, in_flight: int, grace: float) -> None:
        self.notifier.stopping(f"draining {in_flight} op(s) in flight, up to {grace:g} s")
        self.notifier.extend_timeout(grace + DRAIN_TIMEOUT_MARGIN)

    def reload(self) -> None:
        """SIGHUP: apply the config file's new mappings, poll intervals and logging.

        A config that does not load or compile is rejected with the reason and the
        running one kept. Changes elsewhere are named in ``reload_needs_restart``.
        """
        if self.config_path is None:
            log.warning("reload_ignored", reason="no config file (demo or test run)")
            return
        try:
            new = load_config(self.config_path)
            merged, restart = merge_reloadable(self.config, new)
            flows = compile_flows(merged)
        except ConfigError as exc:
            log.error("reload_rejected", reason=str(exc), kept="the running config")
            return
        configure_output(
            level=merged.logging.level, fmt=merged.logging.format, file=merged.logging.file
        )
        for name, mapper in flow_mappers(flows).items():
            if name in self.mappers:
                self.mappers[name].current = mapper
        intervals = poll_intervals(merged)
        changed = []
        for stream in self.streams:
            interval = intervals.get(stream.name, stream.poll_interval)
            if interval != stream.poll_interval:
                changed.append(stream.name)
                stream.poll_interval = interval
        self.pipeline.intervals_changed()
        self.config = merged
        log.info("config_reloaded", intervals_changed=changed, mappings=sorted(merged.mapping))
        if restart:
            log.warning("reload_needs_restart", changed=restart)

    def snapshot(self) -> Snapshot:
        """The levels ``/metrics`` reports, read from the live objects."""
        down = self.pipeline.health.down_targets()
        oauth = [p.auth for p in self.locations if isinstance(p.auth, OAuthTokens)]
        return Snapshot(
            ready=self.view.ready,
            outbox=self.pipeline.open_by_target(),
            cursor_lag=self.view.cursor_lag(),
            poll_interval={s.name: s.poll_interval for s in self.streams},
            buckets=self.limiters.states(),
            location_up={
                p.config.name: ghl_target_name(p.config.name) not in down for p in self.locations
            },
            token_expires_at={a.name: a.expires_at for a in oauth if a.expires_at is not None},
            token_refreshes={a.name: a.refreshes for a in oauth},
        )

    async def save_budgets(self, *, final: bool = False) -> None:
        """Write every bucket's state; ``final`` once no request will follow (a clean stop)."""
        now = self.clock.time()
        offset = now - self.clock.monotonic()  # bucket pauses are monotonic; status wants wall
        await self.store.save_budgets(
            [
                BudgetRow(
                    api=s.api,
                    tenant=s.tenant,
                    capacity=s.capacity,
                    window=s.window,
                    available=s.available,
                    used_today=s.used_today,
                    daily_cap=s.daily_cap,
                    paused_until=None if s.paused_until is None else s.paused_until + offset,
                    updated_at=now,
                )
                for s in self.limiters.states()
            ],
            final=final,
        )


@contextlib.asynccontextmanager
async def open_app(
    config: Config,
    *,
    clock: Clock | None = None,
    backfill: tuple[str, datetime] | None = None,
    config_path: Path | None = None,
    notifier: Notifier | None = None,
) -> AsyncIterator[App]:
    """Open the state file and build streams and targets for every configured source.

    Connectors plug in here: each source account contributes its streams, each GHL
    location its target, all sharing one store and one set of rate limiters. With
    ``backfill=(source, since)`` the only stream is that source re-read from ``since``
    under a cursor of its own, so the live cursor is left as it was.
    """
    clock = clock or SystemClock()
    sources = [s.name for s in config.sources.action_network]
    sources += [s.name for s in config.sources.activedemand if "conversations" in s.streams]
    if backfill is not None and backfill[0] not in sources:
        raise ConfigError(
            "$.sources",
            f"no source named {backfill[0]!r} to backfill (known: {', '.join(sources) or 'none'};"
            " an ActiveDEMAND account needs the conversations stream)",
        )
    flows = compile_flows(config)  # before anything opens: a mistake stops the start
    mappers = {name: LiveMapper(m) for name, m in flow_mappers(flows).items()}
    for secret in config.secret_values():
        register_secret(secret)
    async with (
        Store.open(config.state.path) as store,
        make_session() as session,
        contextlib.AsyncExitStack() as sessions,
    ):
        limiters = build_limiters(config, clock)
        streams: list[Stream] = []
        targets: dict[str, Target] = {}
        locations = []
        for loc in config.ghl.locations:
            # Its own session, so that its configured timeout bounds every call it makes.
            loc_session = await sessions.enter_async_context(
                make_session(timeout=float(loc.timeout))
            )
            auth = token_source(loc, store=store, session=loc_session, clock=clock)
            client = GhlClient(
                loc_session,
                base_url=loc.base_url,
                location_id=loc.location_id,
                bucket=limiters.get("ghl", loc.name),
                auth=auth,
                clock=clock,
            )
            locations.append(
                GhlLocationParts(config=loc, auth=auth, client=client, session=loc_session)
            )
            targets[ghl_target_name(loc.name)] = GhlTarget(client, store, clock=clock)
            if loc.name in flows.reverse and backfill is None:
                share = ShareOf(
                    limiters.get("ghl", loc.name), fraction=loc.reverse.share, clock=clock
                )
                reader = GhlClient(
                    loc_session,
                    base_url=loc.base_url,
                    location_id=loc.location_id,
                    bucket=share,
                    auth=auth,
                    clock=clock,
                )
                mapper = mappers[f"reverse:{loc.name}"]
                streams.append(reverse_stream(loc, reader, store, config, mapper, clock))
        for source in config.sources.action_network:
            an_client = AnClient.from_config(
                session,
                source,
                bucket=limiters.get("actionnetwork", source.name),
                clock=clock,
            )
            targets[an_target_name(source.name)] = AnWriteBackTarget(an_client, store)
            since = backfill[1] if backfill is not None else None
            if backfill is not None and backfill[0] != source.name:
                continue
            flow = flows.action_network[source.name]
            streams.append(
                AnPeopleStream.from_config(
                    source,
                    an_client,
                    clock=clock,
                    mapper=mappers[source.name],
                    backfill_since=since,
                    own_fields=flow.own_fields,
                    own_tags=flow.own_tags,
                )
            )
            if "taggings" in source.streams and backfill is None:
                streams.append(
                    AnTaggingsStream(
                        an_client,
                        store,
                        source=source.name,
                        clock=clock,
                        mapper=mappers[source.name],
                        poll_interval=float(source.taggings_interval),
                        own_tags=flow.own_tags,
                    )
                )
        for ad in config.sources.activedemand:
            ad_client = AdClient.from_config(
                session, ad, bucket=limiters.get("activedemand", ad.name), clock=clock
            )
            targets[ad_target_name(ad.name)] = AdTarget(
                ad_client,
                store,
                max_recording_bytes=ad.max_recording_bytes,
                retention=float(ad.recording_retention),
            )
            if backfill is not None and backfill[0] != ad.name:
                continue
            ad_mapper = mappers[ad.name]
            # A backfill reads every contact too: the history's conversations need them.
            if "contacts" in ad.streams or backfill is not None:
                streams.append(
                    AdContactsStream.from_config(ad, ad_client, clock=clock, mapper=ad_mapper)
                )
            if "conversations" in ad.streams:
                streams.append(
                    AdConversationsStream.from_config(
                        ad,
                        ad_client,
                        clock=clock,
                        mapper=ad_mapper,
                        known=store.known_keys,
                        backfill_since=backfill[1] if backfill is not None else None,
                    )
                )
        log.info(
            "app_ready",
            state=str(store.path),
            locations=len(config.ghl.locations),
            streams=len(streams),
        )
        yield App(
            config,
            store,
            limiters,
            streams,
            targets,
            clock,
            session=session,
            locations=locations,
            mappers=mappers,
            config_path=config_path,
            notifier=notifier,
        )


def reverse_stream(
    location: GhlLocation,
    client: GhlClient,
    store: Store,
    config: Config,
    mapper: Mapper,
    clock: Clock,
) -> GhlMessagesStream:
    """The location's reverse stream; ``client`` reads through its share of the budget."""
    names = [s.name for s in config.sources.action_network]
    names += [s.name for s in config.sources.activedemand]
    return GhlMessagesStream(
        client,
        store,
        location=location.name,
        settings=location.reverse,
        own_prefixes=names,
        clock=clock,
        mapper=mapper,
    )


def ghl_target_name(location: str) -> str:
    """The outbox ``target`` of a GHL location's ops."""
    return f"ghl:{location}"


def an_target_name(source: str) -> str:
    """The outbox ``target`` of an Action Network group's write-backs."""
    return f"an:{source}"


def ad_target_name(source: str) -> str:
    """The outbox ``target`` of what the bridge writes into an ActiveDEMAND account."""
    return f"ad:{source}"
