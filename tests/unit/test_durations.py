"""`parse_age`: the one grammar of ages (`--older-than`, the admin API's `older_than`)."""

from __future__ import annotations

import re

import pytest

from sfworkflow.core.durations import UNITS, parse_age, unit_of
from sfworkflow.http import openapi


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        # what `sfworkflow stuck` / `replay` and the admin API accepted: decimals, plain seconds, s/m/h/d
        ("0s", 0.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0), ("1.5h", 5400.0),
        ("90", 90.0), ("0", 0.0), ("2.5", 2.5), (".5m", 30.0), ("5.", 5.0), ("1e3", 1000.0), ("1E2s", 100.0),
        ("30M", 1800.0), (" 30m ", 1800.0), ("30 m", 1800.0), ("+5m", 300.0), ("007d", 604800.0),
        # what `sfworkflow dead-letters purge` accepted besides: weeks, any case
        ("2w", 1209600.0), ("1W", 604800.0), ("7D", 604800.0), ("45S", 45.0),
        ("999999.999d", 999999.999 * 86400),  # the largest the admin API's pattern allows
    ],
)  # fmt: skip
def test_accepted_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "m", "soon", "7 days", "5y", "1mo", "30mm", "-5m", "-1", "1_000", "1,5h", "0x10", "nan", "inf",
        "infinity", "1e999", "1e999d", "٣d", "1.2.3s", "5e", "e5", "3 0m", "30m ago", "30\x00m",
    ],
)  # fmt: skip
def test_refused_ages_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape("is not an age: write a number and a unit, e.g. 90s, 30m")) as err:
        parse_age(text)
    assert len(str(err.value)) < 200  # a long input is not echoed whole


def test_every_unit_is_in_the_admin_api_pattern_and_what_the_pattern_allows_parses() -> None:
    pattern = re.compile(openapi.AGE)
    for unit in UNITS:
        assert pattern.fullmatch(f"3{unit}") and parse_age(f"3{unit}") == 3 * UNITS[unit]
    for text in ("0", "999999", "999999.999", "1.5h", "12h", "7d", "2w"):
        assert pattern.fullmatch(text), text
        parse_age(text)


@pytest.mark.parametrize(("text", "unit"), [("30", None), ("+30", None), ("1e3", None), (" 7 d ", "d"), ("2W", "w")])
def test_unit_of(text: str, unit: str | None) -> None:
    assert unit_of(text) == unit
