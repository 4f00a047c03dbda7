"""Ages as people write them: `90s`, `30m`, `1.5h`, `7d`, `2w`, or plain seconds (`90`).

One grammar for every age sfworkflow reads: `--older-than` of `sfworkflow stuck`, `sfworkflow replay` and
`sfworkflow dead-letters purge`, and `older_than` of the admin API (whose OpenAPI document states a bounded
part of it, built from `UNITS`). An age is

- a number written as the SFWORKFLOW_* durations are (sfworkflow.settings): ASCII digits with an optional
  fraction and exponent (`1.5`, `.5`, `5.`, `1e3`), an optional `+`; no sign `-`, no `_`, no `nan` or `inf`;
- then an optional unit, in any case: s seconds (the default), m minutes, h hours, d days, w weeks;
- with spaces allowed around the number and the unit (`" 30 m "`), and nothing else.

It is the union of the two grammars sfworkflow had before (stuck: decimals and plain seconds with s/m/h/d;
dead letters: whole numbers with s/m/h/d/w), so every age that was accepted still is, with the same meaning.
One restriction on top, and only where a mistake deletes: `dead-letters purge --older-than` refuses a plain
number (`30` meant as days would purge nearly everything); the admin API takes a bounded part of the grammar
(at most 6 digits and 3 decimals, no exponent, no spaces).
Pure: no I/O.
"""

from __future__ import annotations

import math
import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}  # seconds per unit
_AGE = re.compile(
    r"\s*\+?(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*(?P<unit>[smhdw]?)\s*",
    re.IGNORECASE | re.ASCII,
)
WITH_UNITS = "90s, 30m, 1.5h, 7d, 2w"  # every help text and error names these, so they all say the same
EXAMPLES = f"{WITH_UNITS} or plain seconds"


def unit_of(text: str) -> str | None:
    """The unit `text` is written with (`s`, `m`, `h`, `d`, `w`), None when it has none or is not an age."""
    m = _AGE.fullmatch(text)
    return (m["unit"].lower() or None) if m else None


def parse_age(text: str) -> float:
    """`text` as seconds (a finite number, 0 or more); ValueError saying the accepted forms otherwise."""
    m = _AGE.fullmatch(text)
    seconds = float(m["number"]) * UNITS[m["unit"].lower() or "s"] if m else math.nan
    if not math.isfinite(seconds):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"{shown!r} is not an age: write a number and a unit, e.g. {EXAMPLES}")
    return seconds
