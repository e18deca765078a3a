"""Live probes for ``bridge check``: one line per configured API, ``OK`` or what to fix.

Each probe is the cheapest authenticated read the API has, spent through the same
bucket the daemon uses, so a check run beside a live daemon stays inside the budget:

- a GHL location: :meth:`bridge.app.App.check_locations_of` (one read or empty write per
  scope, see :mod:`bridge.connectors.ghl.probe`);
- an Action Network group: page 1 of ``/people`` with one person per page. The entry
  point would be cheaper to answer but says 200 to any key (API_FACTS §1);
- an ActiveDEMAND account: ``contacts/fields.json``, one small array that needs the key
  (and the application key, when one is sent).

Each probe makes a single attempt: the clients' read retries would keep an operator
waiting a minute on a dead host only to print the same error.
"""

from __future__ import annotations

from typing import TextIO

from bridge.app import App, GhlLocationParts
from bridge.config import ActionNetworkSource, ActiveDemandSource
from bridge.connectors.actionnetwork import AnClient
from bridge.connectors.ad_client import AdClient
from bridge.connectors.an_models import HalPage, Person
from bridge.errors import AuthError, BridgeError, Rejected, Retryable
from bridge.redact import redact

__all__ = ["live_checks"]

AN_KEY_PLACE = "Start Organizing > Details > API & Sync"
"""Where an Action Network group's API key is shown (the group's own admin pages)."""


async def live_checks(app: App, out: TextIO) -> bool:
    """Probe every GHL location and source account of ``app.config``; True when all are OK."""
    ok = True
    for parts in app.locations:
        ok = await _check_ghl(app, parts, out) and ok
    for index, an in enumerate(app.config.sources.action_network):
        ok = await _check_action_network(app, index, an, out) and ok
    for index, ad in enumerate(app.config.sources.activedemand):
        ok = await _check_activedemand(app, index, ad, out) and ok
    return ok


async def _check_ghl(app: App, parts: GhlLocationParts, out: TextIO) -> bool:
    name = parts.config.name
    label = f"GHL {name}"
    try:
        checks = (await app.check_locations_of([parts]))[name]
    except BridgeError as exc:
        return _failed(out, label, _reason(exc, base_url=parts.config.base_url))
    for check in checks:
        verdict = "OK" if check.ok else f"MISSING: {check.fix}"
        _say(out, f"{label}: {check.scope:<32} {verdict}")
    return all(check.ok for check in checks)


async def _check_action_network(
    app: App, index: int, source: ActionNetworkSource, out: TextIO
) -> bool:
    label = f"Action Network {source.name}"
    client = AnClient(
        app.session,
        base_url=source.base_url,
        api_key=source.api_key.reveal(),
        bucket=app.limiters.get("actionnetwork", source.name),
        clock=app.clock,
        read_tries=1,
    )
    try:
        hal = await client.page(Person, "/people", page=1, per_page=1)
    except AuthError:
        # 401 and 403 alike: AN answers a bad key with 403, the OSDI spec says 401.
        return _failed(
            out,
            label,
            f"the API key is refused: set sources.action_network[{index}].api_key"
            f" to a key from {AN_KEY_PLACE}",
        )
    except BridgeError as exc:
        return _failed(out, label, _reason(exc, base_url=source.base_url))
    _say(out, f"{label}: OK ({_people_seen(hal)})")
    return True


def _people_seen(hal: HalPage[Person]) -> str:
    if hal.total_records is not None:
        return f"{hal.total_records} people visible"
    # /people leaves its totals out (API_FACTS §4); counting would mean paging them all.
    if any((hal.embedded or {}).values()):
        return "key accepted, people readable"
    return "key accepted, no people in the group yet"


async def _check_activedemand(
    app: App, index: int, source: ActiveDemandSource, out: TextIO
) -> bool:
    label = f"ActiveDEMAND {source.name}"
    app_key = source.application_key
    client = AdClient(
        app.session,
        base_url=source.base_url,
        api_key=source.api_key.reveal(),
        application_key=app_key.reveal() if app_key is not None else None,
        bucket=app.limiters.get("activedemand", source.name),
        clock=app.clock,
        feeds=source.feeds,
        auth_mode=source.auth_mode,
        read_tries=1,
    )
    try:
        fields = await client.contact_fields()
    except AuthError as exc:
        return _failed(out, label, _ad_key_fix(exc, index, has_app_key=app_key is not None))
    except BridgeError as exc:
        return _failed(out, label, _reason(exc, base_url=source.base_url))
    _say(out, f"{label}: OK (key accepted, {len(fields)} contact fields readable)")
    return True


def _ad_key_fix(exc: AuthError, index: int, *, has_app_key: bool) -> str:
    """What to change for a refused key; 401 is a bad key, 403 one without this account.

    The statuses are read as ActiveDEMAND's own Shopify app reads them (API_FACTS §1.2).
    """
    where = f"sources.activedemand[{index}]"
    if "HTTP 403" in str(exc):
        if has_app_key:
            return (
                f"the application key may not use this account: ask ActiveDEMAND to grant"
                f" {where}.application_key access to it, or set {where}.api_key to this"
                " account's own key"
            )
        return (
            f"the API key lacks permission for this account: set {where}.api_key to the"
            " key from this account's settings"
        )
    fix = f"the API key is refused: set {where}.api_key to the key from the account's settings page"
    if has_app_key:
        fix += f", and check {where}.application_key (the partner Application API Key)"
    return fix


def _reason(exc: BridgeError, *, base_url: str) -> str:
    """The error, with the base URL when the host could not be reached or the path is wrong."""
    if isinstance(exc, Retryable):
        if exc.status is None:
            return f"cannot reach {base_url}: {exc}"
        return f"{exc} (the API is busy or failing: try again later)"
    if isinstance(exc, Rejected) and exc.status == 404:
        return f"{exc}: is {base_url} the API root?"
    return str(exc)


def _failed(out: TextIO, label: str, reason: str) -> bool:
    _say(out, f"{label}: FAILED: {reason}")
    return False


def _say(out: TextIO, line: str) -> None:
    # Every line, not only error texts: a base URL may carry a key in its query string.
    out.write(redact(line) + "\n")
