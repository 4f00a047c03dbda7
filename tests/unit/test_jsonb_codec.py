"""The jsonb codec of every connection (db/pool.py): PostgreSQL's binary format, a version byte then the JSON."""

from __future__ import annotations

from typing import Any

import pytest

from sfworkflow.db.pool import _jsonb_decode, _jsonb_encode


@pytest.mark.parametrize(
    "value",
    [{}, [], None, 0, "text", {"a": [1, 2.5, None, True], "ü": "\u2603", "nested": {"x": {"y": []}}}],
)
def test_jsonb_round_trips_through_the_binary_format(value: Any) -> None:
    data = _jsonb_encode(value)
    assert data[:1] == b"\x01"
    assert _jsonb_decode(data) == value


def test_jsonb_of_an_unknown_format_version_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown jsonb binary format version"):
        _jsonb_decode(b'\x02{"a": 1}')
