"""ActiveDEMAND client: paced v1 calls, the proposed feeds, capped downloads.

The v1 calls follow API_FACTS §1.3 (``.json`` suffixes, bare arrays, form-encoded
writes). Conversations, messages, calls and histories are the PROPOSED contract the
simulator serves (§3); where and how those feeds page is
:class:`~bridge.connectors.ad_feeds.Feeds` config, so a live contract that differs is a
settings change, not a code change.

Choices where API_FACTS says "not found":

* paging: ``page``/``per_page`` (100) on every list, contacts included; a walk stops on
  an empty or short page and is Fatal on a repeated one (§3.2);
* auth: the account key as ``x-api-key`` by default, or as ``api-key`` (query string on
  GETs, form field on POSTs, as the WP plugin sends it); a partner
  ``X-Application-Api-Key`` on every request when configured (§1.2);
* 401 is a refused key and 403 a key without access to the account (the Shopify app's
  reading), both :class:`AuthError`; 429 honours Retry-After (§2: throttling not found);
* one contact by id: the PROPOSED ``feeds.contact_path`` (``contacts/{id}.json``), a 404
  meaning no such contact; without that setting a lookup walks ``contacts.json``;
* writes: ``contacts.json`` takes ``contact[...]`` fields and answers a one-element array
  with the id; form posts use the form's dotted keys; histories use ``history[...]``;
* message, recording and transcription URLs are built from the configured base and the
  message id, never taken from a response, so the key only goes where it was configured.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
)
from datetime import datetime
from pathlib import Path
from typing import Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec
import structlog

from bridge import json_items, rest
from bridge.clock import Clock
from bridge.config import ActiveDemandSource
from bridge.connectors.ad_feeds import (
    BadRecord,
    FeedConfig,
    FeedPage,
    Feeds,
    PageRule,
    read_one,
    read_page,
)
from bridge.connectors.ad_files import (
    DEFAULT_MAX_ATTACHMENT_BYTES,
    DEFAULT_MAX_RECORDING_BYTES,
    file_where,
    open_body,
    refused,
)
from bridge.connectors.ad_models import (
    ContactData,
    FieldDef,
    Form,
    History,
    MessageStatus,
    Sentence,
    WireConversation,
    WireMessage,
    contact_data,
)
from bridge.downloads import body_chunks, save_body
from bridge.errors import Fatal, InDoubt, Rejected, Retryable, TokenExpired
from bridge.ratelimit import TokenBucket
from bridge.streams import format_utc

__all__ = [
    "APP_KEY_HEADER",
    "AdClient",
    "AuthMode",
    "BadRecord",
    "Batch",
    "Entry",
]

log = structlog.get_logger("bridge.connectors.activedemand")

T = TypeVar("T")
R = TypeVar("R")
AuthMode = Literal["header", "query"]

APP_KEY_HEADER = "X-Application-Api-Key"

_READ_TRIES = 5
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_FORM_CACHE_TTL = 3_600.0


class Entry(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A feed record decoded as ``T``, with the id and version its feed config points at."""

    id: str
    version: str
    updated: datetime | None
    value: T


class Batch(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """One page of a feed: its records read as ``T``, in the feed's order, and those that
    could not be read (each one a dead letter for the stream, with its reason)."""

    items: list[T]
    bad: list[BadRecord] = []


class _Created(msgspec.Struct, frozen=True, kw_only=True):
    id: int | str


class AdClient:
    """One ActiveDEMAND account: paced calls, retried reads, paged feeds, capped downloads.

    Every API request spends a token from ``bucket`` (the account's budget); a 429 also
    pauses it. Reads are retried ``read_tries`` times in all on :class:`Retryable`; writes
    are not (the pipeline retries them and reconciles an :class:`InDoubt`). The key is
    sent as configured and never appears in an error or a log: error texts name the
    method and path only, and response bodies are redacted by :mod:`bridge.rest`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        application_key: str | None = None,
        bucket: TokenBucket | None,
        clock: Clock,
        feeds: Feeds | None = None,
        auth_mode: AuthMode = "header",
        read_tries: int = _READ_TRIES,
        form_cache_ttl: float = _FORM_CACHE_TTL,
        rng: random.Random | None = None,
    ) -> None:
        if read_tries < 1:
            raise ValueError(f"read_tries must be at least 1, got {read_tries}")
        if auth_mode not in ("header", "query"):
            raise ValueError(f"auth_mode must be 'header' or 'query', got {auth_mode!r}")
        self.feeds = feeds if feeds is not None else Feeds()
        # The single-contact answer is one bare object: the list envelope does not apply,
        # the id field does.
        self._one_contact = msgspec.structs.replace(self.feeds.contacts, records=None)
        self._session = session
        self._base = base_url.rstrip("/")
        self._base_path = urlsplit(self._base).path
        self._headers = {"Accept": "application/json"}
        if auth_mode == "header":
            self._headers["x-api-key"] = api_key
        if application_key:
            self._headers[APP_KEY_HEADER] = application_key
        # Query mode: a query parameter on GETs and a form field on POSTs (API_FACTS §1.2).
        self._key_fields: list[tuple[str, str]] = (
            [("api-key", api_key)] if auth_mode == "query" else []
        )
        self._bucket = bucket
        self._clock = clock
        self._read_tries = read_tries
        self._form_cache_ttl = form_cache_ttl
        self._form_fields: dict[str, tuple[float, list[FieldDef]]] = {}
        # Feeds that have served a record with a usable id: see ad_feeds.read_page.
        self._identified: set[str] = set()
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography

    @classmethod
    def from_config(
        cls,
        session: aiohttp.ClientSession,
        source: ActiveDemandSource,
        *,
        bucket: TokenBucket | None,
        clock: Clock,
    ) -> AdClient:
        app_key = source.application_key
        return cls(
            session,
            base_url=source.base_url,
            api_key=source.api_key.reveal(),
            application_key=app_key.reveal() if app_key is not None else None,
            bucket=bucket,
            clock=clock,
            feeds=source.feeds,
            auth_mode=source.auth_mode,
        )

    # ----------------------------------------------------------------- v1

    async def probe(self) -> None:
        """Prove the key opens the account (reads the field catalogue), or raise AuthError."""
        await self.contact_fields()

    async def contact_pages(self) -> AsyncGenerator[Batch[ContactData], None]:
        """Every contact, one API page at a time (no change filter exists)."""
        feed = self.feeds.contacts
        async with contextlib.aclosing(self._walk(feed, "contacts", feed.path, [])) as walk:
            async for page in walk:
                items = [contact_data(r.id, r.record) for r in page.records]
                yield Batch(items=items, bad=page.bad)

    async def contact(self, contact_id: str) -> ContactData | None:
        """PROPOSED ``GET contacts/{id}.json``: one contact, or None when it is a 404.

        Only for an account whose ``feeds.contact_path`` is set (Fatal otherwise; callers
        that cannot know should use :meth:`find_contacts`). An account without the
        endpoint would answer 404 for every id, which reads as "no such contact", so the
        setting must be cleared for it rather than left at the default. A contact that
        cannot be read (bad text, an unusable id) is None too, and logged: the contacts
        stream dead-letters it when its scan reaches it.
        """
        template = self.feeds.contact_path
        if not template:
            raise Fatal(
                "feeds.contact_path is unset: this account has no get-contact-by-id "
                "endpoint; look contacts up with find_contacts"
            )
        path = template.format_map({"contact_id": _q(contact_id)})
        where = self._where("GET", path)
        try:
            response = await self._read(path, [])
        except Rejected as exc:
            if exc.status == 404:
                return None
            raise
        read = read_one(response.body, self._one_contact, label="contacts", where=where)
        if isinstance(read, BadRecord):
            if read.keyless:
                raise Fatal(f"{read.reason}; check feeds.contact_path and feeds.contacts.id_field")
            log.warning("ad_contact_unreadable", contact_id=contact_id, reason=read.reason)
            return None
        return contact_data(read.id, read.record)

    async def find_contacts(self, ids: Collection[str]) -> dict[str, ContactData]:
        """The contacts of ``ids`` that exist, keyed by the id asked for; others are absent.

        With ``feeds.contact_path`` set, one request per id; without it, a walk over
        ``contacts.json`` that stops at the first page by which every id was seen (a
        missing id costs the whole walk).
        """
        wanted = set(ids)
        found: dict[str, ContactData] = {}
        if not wanted:
            return found
        if self.feeds.contact_path:
            for contact_id in sorted(wanted):
                contact = await self.contact(contact_id)
                if contact is not None:
                    found[contact_id] = contact
            return found
        async with contextlib.aclosing(self.contact_pages()) as pages:
            async for page in pages:
                found.update((c.id, c) for c in page.items if c.id in wanted)
                if len(found) == len(wanted):
                    break
        return found

    async def contact_fields(self) -> list[FieldDef]:
        """``GET contacts/fields.json``: the catalogue, custom fields included."""
        return await self._get(list[FieldDef], "/contacts/fields.json", [])

    async def create_contact(self, values: Mapping[str, str]) -> str:
        """``POST contacts.json`` with ``contact[<key>]`` fields; returns the contact id.

        Empty values are left out: whether the API clears a field on an empty value is
        not known, and a sync must never blank data by accident.
        """
        fields = [(f"contact[{k}]", v) for k, v in values.items() if v]
        return await self._created("/contacts.json", fields)

    async def forms(self) -> list[Form]:
        """``GET forms.json``."""
        return await self._get(list[Form], "/forms.json", [])

    async def form_fields(self, form_id: str | int) -> list[FieldDef]:
        """``GET forms/fields.json?form_id=``, cached for ``form_cache_ttl`` seconds."""
        key = str(form_id)
        now = self._clock.monotonic()
        cached = self._form_fields.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        fields = await self._get(list[FieldDef], "/forms/fields.json", [("form_id", key)])
        self._form_fields[key] = (now + self._form_cache_ttl, fields)
        return fields

    async def submit_form(self, form_id: str | int, values: Mapping[str, str]) -> None:
        """``POST forms/{id}`` form-encoded with the form's own (dotted) keys.

        Keys the form does not have are dropped, as the form itself would; they are
        logged by name only, since values are personal data.
        """
        known = {f.key for f in await self.form_fields(form_id)}
        dropped = sorted(k for k in values if k not in known)
        if dropped:
            log.warning("ad_form_fields_dropped", form_id=str(form_id), fields=dropped)
        fields = [(k, v) for k, v in values.items() if k in known]
        await self._post(f"/forms/{_q(str(form_id))}", fields)

    async def add_history(self, contact_id: str, kind: str, text: str) -> str:
        """PROPOSED ``POST histories.json`` with ``history[...]`` fields; returns its id."""
        fields = [
            ("history[contact_id]", contact_id),
            ("history[kind]", kind),
            ("history[text]", text),
        ]
        return await self._created(self.feeds.histories.path, fields)

    # ----------------------------------------------------------------- proposed feeds

    async def conversation_pages(
        self, *, updated_since: datetime | None = None
    ) -> AsyncIterator[Batch[Entry[WireConversation]]]:
        """Conversations changed since a time (every one, if the feed has no filter)."""
        feed = self.feeds.conversations
        query = _since(feed, None if updated_since is None else format_utc(updated_since))
        where = self._where("GET", feed.path)
        async for page in self._walk(feed, "conversations", feed.path, query):
            yield _typed(WireConversation, page, "conversations", where)

    async def message_pages(
        self, conversation_id: str, *, since_id: str | None = None
    ) -> AsyncIterator[Batch[Entry[WireMessage]]]:
        """A conversation's messages after ``since_id`` (exclusive), in the feed's order."""
        feed = self.feeds.messages
        path = feed.path.format_map({"conversation_id": _q(conversation_id)})
        where = self._where("GET", path)
        async for page in self._walk(feed, "messages", path, _since(feed, since_id)):
            yield _typed(WireMessage, page, "messages", where)

    async def history_pages(
        self, *, since_id: str | None = None, contact_id: str | None = None
    ) -> AsyncIterator[list[Entry[History]]]:
        """History entries after ``since_id``, optionally of one contact.

        Only read to find an entry the bridge wrote, so one that cannot be read is
        logged and skipped: there is no stream to dead-letter it in.
        """
        feed = self.feeds.histories
        query = _since(feed, since_id)
        if contact_id is not None:
            query.append(("contact_id", contact_id))
        where = self._where("GET", feed.path)
        async for page in self._walk(feed, "histories", feed.path, query):
            batch = _typed(History, page, "histories", where)
            for bad in batch.bad:
                log.warning("ad_record_skipped", feed="histories", id=bad.id, reason=bad.reason)
            yield batch.items

    async def message_status(self, message_id: str) -> MessageStatus:
        """A message's delivery status."""
        return await self._get(
            MessageStatus, self._message_path(self.feeds.message_status_path, message_id), []
        )

    async def transcription(self, message_id: str) -> list[Sentence]:
        """A call's transcription sentences (404, i.e. Rejected, until one exists)."""
        path = self._message_path(self.feeds.transcription_path, message_id)
        return await self._get(list[Sentence], path, [])

    async def transcription_text(self, message_id: str) -> str:
        """A call's transcription as the plain-text download."""
        path = self._message_path(self.feeds.transcription_text_path, message_id)
        response = await self._read(path, [])
        return response.body.decode("utf-8", "replace")

    async def download_recording(
        self, message_id: str, dest: Path, *, max_bytes: int = DEFAULT_MAX_RECORDING_BYTES
    ) -> int:
        """Stream a call's recording to ``dest``; returns its size.

        The URL is built from the configured base, never taken from the feed, so the key
        can only go to the host it was configured for. Past ``max_bytes`` this raises
        :class:`Rejected` and no file (partial or not) is left behind.
        """
        path = self._message_path(self.feeds.recording_path, message_id)
        where = self._where("GET", path)

        async def attempt() -> int:
            async with self._open(self._base + path, api=True, where=where) as response:
                return await save_body(response, dest, max_bytes=max_bytes, where=where)

        return await self._retrying(attempt, path)

    @contextlib.asynccontextmanager
    async def attachment(
        self, url: str, *, max_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open an attachment URL and yield its body as chunks, capped at ``max_bytes``.

        Attachments live on a storage host, not the API, so neither key nor budget goes
        with them. For handing a body on without a file (a GHL upload); not retried,
        since a half-consumed body cannot be replayed.
        """
        where = file_where(url)
        async with (
            self._open(url, api=False, where=where) as response,
            contextlib.aclosing(body_chunks(response, max_bytes, where)) as chunks,
        ):
            yield chunks

    async def download_attachment(
        self, url: str, dest: Path, *, max_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    ) -> int:
        """Stream an attachment to ``dest`` (retried like a read); returns its size."""
        where = file_where(url)

        async def attempt() -> int:
            async with self._open(url, api=False, where=where) as response:
                return await save_body(response, dest, max_bytes=max_bytes, where=where)

        return await self._retrying(attempt, urlsplit(url).path)

    # ----------------------------------------------------------------- plumbing

    @staticmethod
    def _message_path(template: str, message_id: str) -> str:
        return template.format_map({"message_id": _q(message_id)})

    def _where(self, method: str, path: str) -> str:
        return f"{method} {self._base_path}{path}"

    async def _walk(
        self, feed: FeedConfig, label: str, path: str, query: list[tuple[str, str]]
    ) -> AsyncGenerator[FeedPage, None]:
        """Every non-empty page of a feed, until the page rule says it has ended.

        Bad records count as records for the rule: a full page with one bad record is
        still full, so the walk goes on past it.
        """
        where = self._where("GET", path)
        rule = PageRule(feed, where=where)
        while True:
            paged = list(query)
            if feed.page_param is not None:
                paged.append((feed.page_param, str(rule.number)))
            if feed.per_page_param is not None:
                paged.append((feed.per_page_param, str(feed.per_page)))
            response = await self._read(path, paged)
            page = read_page(
                response.body, feed, label=label, where=where, identified=label in self._identified
            )
            if page.records:
                self._identified.add(label)
            ids = page.ids
            rule.check(ids)
            if ids:
                yield page
            adopted = rule.adopted
            if not rule.more(ids):
                return
            if rule.adopted != adopted:
                log.warning("ad_page_size_adopted", feed=label, asked=feed.per_page, got=len(ids))

    async def _get(self, tp: type[T], path: str, query: list[tuple[str, str]]) -> T:
        response = await self._read(path, query)
        return rest.decode_body(tp, response, write=False, where=self._where("GET", path))

    async def _read(self, path: str, query: list[tuple[str, str]]) -> rest.Response:
        async def attempt() -> rest.Response:
            return await self._request("GET", path, params=[*query, *self._key_fields])

        return await self._retrying(attempt, path)

    async def _created(self, path: str, fields: list[tuple[str, str]]) -> str:
        """POST a form that answers with a one-element array, and return its id."""
        response = await self._post(path, fields)
        where = self._where("POST", path)
        created = rest.decode_body(list[_Created], response, write=True, where=where)
        if not created:
            raise InDoubt(f"{where}: HTTP {response.status} without the new record's id")
        return str(created[0].id)

    async def _post(self, path: str, fields: list[tuple[str, str]]) -> rest.Response:
        return await self._request("POST", path, data=[*fields, *self._key_fields])

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: list[tuple[str, str]] | None = None,
    ) -> rest.Response:
        try:
            return await rest.request(
                self._session,
                method,
                self._base + path,
                bucket=self._bucket,
                write=method != "GET",
                clock=self._clock,
                headers=self._headers,
                params=params,
                data=data,
            )
        except TokenExpired:
            raise refused(self._where(method, path)) from None

    async def _retrying(self, attempt: Callable[[], Awaitable[R]], path: str) -> R:
        """Run a read, retrying Retryable with full-jitter backoff (Retry-After a floor)."""
        tries = 0
        while True:
            try:
                return await attempt()
            except Retryable as exc:
                tries += 1
                if tries >= self._read_tries:
                    raise
                delay = rest.backoff_delay(
                    tries - 1,
                    base=_BACKOFF_BASE,
                    cap=_BACKOFF_CAP,
                    retry_after=exc.retry_after,
                    rng=self._rng,
                )
                log.warning(
                    "ad_read_retry",
                    path=path,
                    status=exc.status,
                    attempt=tries,
                    retry_in=round(delay, 3),
                    error=str(exc),
                )
                await self._clock.sleep(delay)

    def _open(
        self, url: str, *, api: bool, where: str
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """Open a body too big to hold: API URLs with key, headers and budget, files bare."""
        return open_body(
            self._session,
            url,
            storage=not api,
            headers=self._headers if api else None,
            params=self._key_fields if api else None,
            bucket=self._bucket if api else None,
            clock=self._clock,
            where=where,
        )


def _since(feed: FeedConfig, value: str | None) -> list[tuple[str, str]]:
    """The change filter, when the feed has one; without it the whole feed is read."""
    if value is None or feed.since_param is None:
        return []
    return [(feed.since_param, value)]


def _typed(tp: type[T], page: FeedPage, label: str, where: str) -> Batch[Entry[T]]:
    """A page's records decoded as ``tp``; one that does not fit joins the bad ones.

    A malformed record is one bad record, not a broken feed: the rest of the page is
    still delivered, and the reason names the field (msgspec's ``$.path``).
    """
    entries: list[Entry[T]] = []
    bad = list(page.bad)
    for record in page.records:
        try:
            value = msgspec.convert(record.record, tp)
        except msgspec.ValidationError as exc:
            reason = f"{where}: {label} record {record.id}: {json_items.why(exc, record.raw)}"
            bad.append(BadRecord(id=record.id, raw=record.raw, reason=reason))
            continue
        entries.append(
            Entry(id=record.id, version=record.version, updated=record.updated, value=value)
        )
    return Batch(items=entries, bad=bad)


def _q(segment: str) -> str:
    """An id as one path segment, so a stray slash cannot reach another endpoint."""
    return quote(segment, safe="")
