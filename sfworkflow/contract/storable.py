"""Values PostgreSQL can store: its text and jsonb types hold no NUL character, and nothing sfworkflow
writes may hold an unpaired UTF-16 surrogate (it is not UTF-8 at all).

What producers control beyond the body (header names and values, the routing key, the content type) and
sentences that quote them (a schema error naming a property) are cleaned here before they reach a
text or jsonb column: each such character becomes U+FFFD, and the caller is told how many, so a dead
letter's detail can say what was replaced. Bodies are stored as bytea and never need this.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(s: str) -> tuple[str, int]:
    """`s` with every NUL and unpaired surrogate replaced by U+FFFD, and how many were replaced."""
    if _UNSTORABLE.search(s) is None:
        return s, 0
    cleaned, n = _UNSTORABLE.subn(REPLACEMENT, s)
    return cleaned, n


def clean_json(value: Any) -> tuple[Any, int]:
    """A JSON-able value with every string (keys included) cleaned, and how many characters were replaced."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        total = 0
        for k, v in value.items():
            ck, nk = clean_text(str(k))
            cv, nv = clean_json(v)
            out[ck] = cv
            total += nk + nv
        return out, total
    if isinstance(value, list | tuple):
        items = [clean_json(v) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    return value, 0


def replaced_note(counts: dict[str, int]) -> str:
    """A sentence for a dead letter's detail naming what was replaced where ('' when nothing was)."""
    parts = [f"{n} in the {where}" for where, n in counts.items() if n]
    if not parts:
        return ""
    return (
        "; characters PostgreSQL cannot store (NUL, unpaired surrogates) were replaced with U+FFFD: "
        + ", ".join(parts)
        + " (the body is kept byte for byte)"
    )
