"""Test-only fault points: the process exits abruptly at a named point, to prove crash safety.

Honoured only when SFWORKFLOW_FAULT_POINT names the point (and SFWORKFLOW_FAULT_AFTER, default 1,
says on which pass). Never set these in production.
"""

from __future__ import annotations

import os

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    target = os.environ.get("SFWORKFLOW_FAULT_POINT")
    if not target or target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(os.environ.get("SFWORKFLOW_FAULT_AFTER", "1")):
        os._exit(97)
