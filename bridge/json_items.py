"""Splitting a JSON page body into its items, so that one malformed item costs only itself.

msgspec reads a page whose items are typed ``msgspec.Raw`` without checking their UTF-8,
so invalid UTF-8 in one item fails only that item's own decode. A lone surrogate escape
(``"\\ud800"``), NaN, a raw control character or nesting deeper than the recursion limit
anywhere makes it refuse the whole body (:data:`REFUSED`). Such a body is read by the
standard library instead (:func:`loads`), and :func:`items` writes each item out again so
that its own msgspec decode meets the same fault: it alone becomes a dead letter, and
:func:`why` and :func:`salvage` say what is wrong with it and where its id may be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import msgspec

__all__ = ["REFUSED", "Unsplittable", "dumps", "items", "loads", "salvage", "why"]

# What msgspec raises for JSON it will not read (ValidationError is a DecodeError).
REFUSED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

# Under surrogateescape a byte that is not UTF-8 reads as U+DC80..U+DCFF; any other
# surrogate came from a lone surrogate escape.
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON string (its escapes skipped) or a bracket: enough to count nesting.
_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}]', re.DOTALL)
# The standard library reads and writes no deeper than the recursion limit either, so a
# container this deep is cut to NaN, which its item then fails on like any other fault.
_DEEPEST = 200
_MAX_DETAIL = 200


class Unsplittable(ValueError):
    """Not JSON even to the standard library (cut short, an HTML error page), or no items
    where they should be: nothing on it can be told apart."""


def loads(body: bytes) -> Any:
    """``body`` as the standard library reads it, faults and all: a bad byte is kept as
    surrogateescape text, a lone surrogate escape as that surrogate, NaN as a float, a
    container ``_DEEPEST`` levels down as NaN; a raw control character in a string is
    read as itself (so written out escaped, its item reads)."""
    try:
        return json.loads(_shallow(body.decode("utf-8", "surrogateescape")), strict=False)
    except (ValueError, RecursionError) as exc:
        raise Unsplittable(_clip(str(exc))) from None


def items(doc: Any, path: Sequence[str]) -> list[bytes]:
    """Each item of the list at ``path`` (member names) in what :func:`loads` read,
    written out again; null there is no items."""
    for name in path:
        if not isinstance(doc, dict) or name not in doc:
            raise Unsplittable(f"no {'.'.join(path)!r} in it")
        doc = doc[name]
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise Unsplittable("its items are not a list")
    return [dumps(item) for item in doc]


def dumps(value: Any) -> bytes:
    """``value`` as JSON with its faults where its source had them: a bad byte goes out as
    that byte, a lone surrogate as its escape."""
    text = _ESCAPED.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(value, ensure_ascii=False))
    return text.encode("utf-8", "surrogateescape")


def why(exc: BaseException, raw: bytes) -> str:
    """One short line on why an item does not decode, naming the field where it can."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    if isinstance(exc, msgspec.ValidationError):
        # "Expected `str | null`, got `int` - at `$.given_name`": the field and the fault.
        return _clip(str(exc))
    bad = _BAD_BYTE if isinstance(exc, UnicodeDecodeError) else _ESCAPED
    try:
        found = _fault(loads(raw), bad)
    except Unsplittable:
        found = None
    if found is None:
        return _clip(f"not valid JSON: {exc}")
    where, char = found
    if bad is _BAD_BYTE:
        return f"{where} holds invalid UTF-8"
    return f"{where} holds a lone surrogate escape (\\u{ord(char):04x})"


def salvage(raw: bytes) -> dict[str, Any]:
    """The members of a broken item that read and hold no bad text: where its id may be."""
    try:
        item = loads(raw)
    except Unsplittable:
        return {}
    if not isinstance(item, dict):
        return {}
    return {k: v for k, v in item.items() if _fault({k: v}, _SURROGATE) is None}


def _shallow(text: str) -> str:
    """``text`` with each container ``_DEEPEST`` levels down cut to NaN."""
    kept: list[str] = []
    depth = at = start = 0
    for token in _NESTING.finditer(text):
        bracket = token[0]
        if bracket in "[{":
            depth += 1
            if depth == _DEEPEST:
                start = token.start()
        elif bracket in "]}":
            if depth == _DEEPEST:
                kept += [text[at:start], "NaN"]
                at = token.end()
            depth -= 1
    return "".join(kept) + text[at:]


def _fault(value: Any, bad: re.Pattern[str]) -> tuple[str, str] | None:
    """The ``$.path`` of the first text in ``value`` where ``bad`` matches, and the match."""
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        path, here = stack.pop()
        if isinstance(here, str):
            found = bad.search(here)
            if found is not None:
                return _clip(path), found[0]
        elif isinstance(here, dict):
            for key in here:
                found = bad.search(key)
                if found is not None:
                    return _clip(f"a field name in {path}"), found[0]
            # Escaped as JSON would, so a name with a line break cannot break the line.
            named = [
                (f"{path}.{json.dumps(k, ensure_ascii=False)[1:-1]}", v) for k, v in here.items()
            ]
            stack.extend(reversed(named))
        elif isinstance(here, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(here)]))
    return None


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"
