"""Which parts of a changed config SIGHUP applies, and which wait for a restart.

A reload takes the field mappings (``[mapping.*]``), every poll interval and
``[logging]``. Everything else (sources, locations, budgets, credentials, the state
file, pipeline tuning, mirror rules) shapes the streams, targets and buckets built at
start, so a change there is reported and kept for the next start rather than half
applied. Ops already in the outbox were mapped when they were read and go out as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from bridge.config import Config

__all__ = ["merge_reloadable"]


def merge_reloadable(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``old`` with ``new``'s mappings, poll intervals and logging; and what else differs.

    The second item lists the config paths (``$.sources.action_network[0].rate``) whose
    new values need a restart.
    """
    merged = msgspec.structs.replace(
        old,
        mapping=new.mapping,
        logging=new.logging,
        sources=_with_intervals(old, new),
        ghl=_with_reverse_intervals(old, new),
    )
    return merged, sorted(_differences(merged, new, "$"))


def _with_intervals(old: Config, new: Config) -> object:
    replace = msgspec.structs.replace
    an_new = {s.name: s for s in new.sources.action_network}
    ad_new = {s.name: s for s in new.sources.activedemand}
    action_network = [
        replace(s, poll_interval=n.poll_interval, taggings_interval=n.taggings_interval)
        if (n := an_new.get(s.name))
        else s
        for s in old.sources.action_network
    ]
    activedemand = [
        replace(s, poll_interval=m.poll_interval, conversations_interval=m.conversations_interval)
        if (m := ad_new.get(s.name))
        else s
        for s in old.sources.activedemand
    ]
    return replace(old.sources, action_network=action_network, activedemand=activedemand)


def _with_reverse_intervals(old: Config, new: Config) -> object:
    replace = msgspec.structs.replace
    by_name = {loc.name: loc for loc in new.ghl.locations}
    locations = [
        replace(loc, reverse=replace(loc.reverse, poll_interval=n.reverse.poll_interval))
        if (n := by_name.get(loc.name))
        else loc
        for loc in old.ghl.locations
    ]
    return replace(old.ghl, locations=locations)


def _differences(a: object, b: object, path: str) -> Iterator[str]:
    if type(a) is not type(b):
        yield path
    elif isinstance(a, msgspec.Struct):
        for field in msgspec.structs.fields(a):
            name = field.name
            yield from _differences(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            yield path
        else:
            for index, (x, y) in enumerate(zip(a, b, strict=True)):
                yield from _differences(x, y, f"{path}[{index}]")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if key not in a or key not in b:
                yield f"{path}.{key}"
            else:
                yield from _differences(a[key], b[key], f"{path}.{key}")
    elif a != b:  # Secret compares by value in constant time and never shows it
        yield path
