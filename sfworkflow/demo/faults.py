"""Test-only fault points: at a named point the process exits abruptly, or the task passing it raises.

Honoured only when SFWORKFLOW_FAULT_POINT names the point (and SFWORKFLOW_FAULT_AFTER, default 1, says on
which pass). `SFWORKFLOW_FAULT_POINT=NAME` exits the process there (exit code 97: proves crash safety);
`SFWORKFLOW_FAULT_POINT=NAME:raise` raises FaultInjected there once, on that pass, so the task passing the
point dies (proves supervision: runtime/supervisor.py). Never set these in production.
"""

from __future__ import annotations

import os

EXIT_CODE = 97  # the exit code of a process stopped at a fault point
RAISE = "raise"  # the mode after the point's name: NAME:raise

_counts: dict[str, int] = {}


class FaultInjected(RuntimeError):
    """Raised at a fault point named NAME:raise in SFWORKFLOW_FAULT_POINT (tests only)."""


def fault_point(name: str) -> None:
    target, _, mode = os.environ.get("SFWORKFLOW_FAULT_POINT", "").partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    after = int(os.environ.get("SFWORKFLOW_FAULT_AFTER", "1"))
    if mode == RAISE:
        if _counts[name] == after:
            raise FaultInjected(f"fault injected at {name} on pass {after} (SFWORKFLOW_FAULT_POINT, tests only)")
        return
    if _counts[name] >= after:
        os._exit(EXIT_CODE)
