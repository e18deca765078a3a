"""Splitting a page msgspec refuses into its items, and saying what is wrong with a bad one."""

from __future__ import annotations

import math

import msgspec
import pytest

from bridge import json_items

GOOD = (
    b'{"id": 1, "name": "caf\\u00e9 \\ud83d\\ude00 \xc3\xa9",'
    b' "n": [0.1, -2e-07, 12345678901234567890, true, null, {}]}'
)


def judge(raw: bytes) -> object:
    """An item as a connector decodes it: its value, or the exception msgspec raises."""
    try:
        return msgspec.json.decode(raw)
    except json_items.REFUSED as exc:
        return exc


def split(body: bytes) -> list[bytes]:
    """The items of a ``{"data": [...]}`` page that msgspec refuses as a whole."""
    with pytest.raises(json_items.REFUSED):
        msgspec.json.decode(body, type=dict[str, list[msgspec.Raw]])
    return json_items.items(json_items.loads(body), ["data"])


def test_good_items_decode_as_they_were_written() -> None:
    """Items written out again decode to the same values msgspec reads from the originals."""
    got = json_items.items(json_items.loads(b'{"data": [' + GOOD + b", 7, []]}"), ["data"])
    assert [judge(raw) for raw in got] == [msgspec.json.decode(GOOD), 7, []]
    assert json_items.items(json_items.loads(b'{"data": null}'), ["data"]) == []


def test_a_lone_surrogate_costs_only_its_item() -> None:
    """A lone surrogate escape fails the page; split, it fails only its own item, which
    names the field and the escape and still gives up its id."""
    bad = b'{"id": 2, "name": "x\\ud800"}'
    first, second, third = split(b'{"data": [' + GOOD + b", " + bad + b', {"id": 3}]}')
    assert judge(first) == msgspec.json.decode(GOOD)
    assert judge(third) == {"id": 3}
    assert second == bad
    failure = judge(second)
    assert isinstance(failure, msgspec.DecodeError)
    assert json_items.why(failure, second) == "$.name holds a lone surrogate escape (\\ud800)"
    assert json_items.salvage(second) == {"id": 2}


def test_invalid_utf8_goes_out_as_the_bytes_served() -> None:
    """On a page split for another reason, an item with bytes that are not UTF-8 keeps
    them, so it fails as invalid UTF-8 naming the field, and its clean id still reads."""
    bad = b'{"id": 2, "name": "caf\xe9", "ok": "\xc3\xa9"}'
    _, got = split(b'{"data": [{"x": "\\udfff"}, ' + bad + b"]}")
    assert got == bad
    failure = judge(got)
    assert isinstance(failure, UnicodeDecodeError)
    assert json_items.why(failure, got) == "$.name holds invalid UTF-8"
    assert json_items.salvage(got) == {"id": 2, "ok": "é"}


def test_nan_costs_only_its_item() -> None:
    """NaN fails the page; split, it fails only its own item, as JSON that is not valid."""
    bad, good = split(b'{"data": [{"id": 1, "n": NaN}, {"id": 2}]}')
    assert bad == b'{"id": 1, "n": NaN}'
    assert judge(good) == {"id": 2}
    failure = judge(bad)
    assert isinstance(failure, msgspec.DecodeError)
    assert json_items.why(failure, bad).startswith("not valid JSON: ")
    (salvaged,) = [v for k, v in json_items.salvage(bad).items() if k == "n"]
    assert math.isnan(salvaged)


def test_nesting_too_deep_for_any_parser_is_cut_to_nan() -> None:
    """A container nested past the recursion limit is cut to NaN 200 levels down, so the
    page splits and that item fails alone."""
    deep = b"[" * 5000 + b"]" * 5000
    bad, good = split(b'{"data": [{"n": ' + deep + b'}, {"id": 2}]}')
    assert bad == b'{"n": ' + b"[" * 196 + b"NaN" + b"]" * 196 + b"}"
    assert judge(good) == {"id": 2}
    assert isinstance(judge(bad), msgspec.DecodeError)
    too_deep = judge(deep)
    assert isinstance(too_deep, RecursionError)
    assert json_items.why(too_deep, deep) == "nested too deeply to read"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"data": [{"id": 1}, {"id": 2, "name": "cut', ["data"]),
        (b"<html><body>Bad gateway</body></html>", []),
        (b'[{"id": 1} {"id": 2}]', []),
        (b'{"data": [{"id": 1}]} trailing', ["data"]),
        (b'{"data": {"items": "\\ud800"}}', ["data", "items"]),
        (b'{"data": [{"id": 1}]}', ["result"]),
    ],
    ids=["cut short", "html", "missing comma", "bytes after", "not a list", "no such path"],
)
def test_a_body_that_cannot_be_split_is_unsplittable(body: bytes, path: list[str]) -> None:
    """A body the standard library cannot read, or without a list at the path, is
    Unsplittable: nothing on it can be told apart."""
    with pytest.raises(json_items.Unsplittable):
        json_items.items(json_items.loads(body), path)


def test_reasons_are_one_short_line_naming_the_field() -> None:
    """A validation error keeps msgspec's ``$.path``; a fault in a field name says so; a
    name with a line break or a huge value cannot break or bloat the line."""
    with pytest.raises(msgspec.ValidationError) as invalid:
        msgspec.json.decode(b'{"a": 7}', type=dict[str, str])
    assert json_items.why(invalid.value, b"") == "Expected `str`, got `int` - at `$[...]`"
    raw = b'{"k\\ud800": 1}'
    failure = judge(raw)
    assert isinstance(failure, msgspec.DecodeError)
    assert (
        json_items.why(failure, raw) == "a field name in $ holds a lone surrogate escape (\\ud800)"
    )
    raw = b'{"line\\nbreak": {"' + b"x" * 500 + b'": "\\udc00"}}'
    failure = judge(raw)
    assert isinstance(failure, msgspec.DecodeError)
    reason = json_items.why(failure, raw)
    assert reason.startswith("$.line\\nbreak.xxx")
    assert "\n" not in reason
    assert len(reason) < 260
    assert json_items.salvage(raw) == {}
