"""Test hooks on the event path; no-ops in production.

`fault_point(name)` marks a point where the chaos suite makes the process exit abruptly (between commit and
ack, between publish and mark), or where a test makes the task passing it raise (`NAME:raise`: a consumer
batch loop that dies, for supervision). The fault points themselves live with the demo code
(sfworkflow/demo/faults.py), which is not part of the service image: `install_fault_points()` puts them in
place only when SFWORKFLOW_FAULT_POINT is set and that module is present.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog

log = structlog.get_logger("sfworkflow.hooks")


def _no_fault(name: str) -> None:
    return None


fault_point: Callable[[str], None] = _no_fault


def install_fault_points() -> None:
    """Honour SFWORKFLOW_FAULT_POINT when it is set (tests and the chaos suite only)."""
    global fault_point
    if not os.environ.get("SFWORKFLOW_FAULT_POINT"):
        fault_point = _no_fault
        return
    try:
        from sfworkflow.demo import faults
    except ImportError:
        log.warning("SFWORKFLOW_FAULT_POINT is set but this installation has no fault points; ignored")
        return
    fault_point = faults.fault_point
