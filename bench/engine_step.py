"""The pure engine step rate: events/s through `Engine.step` with no I/O. Prints one JSON line.

    python bench/engine_step.py [--seconds 3]

Drives whole `sequence` instances (enrolled, timer, step_sent x3 with one retryable failure and
retry on every fifth instance) so the mix matches what the service applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfworkflow.core.definition import EngineEvent, InstanceKey, InstanceView
from sfworkflow.core.engine import Engine, Outcome
from sfworkflow.workflows import DEFINITIONS

TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
STEPS = 3


def _script(i: int) -> list[tuple[str, dict[str, Any], bool]]:
    data = {
        "sequence_id": "s",
        "lead_id": f"l{i}",
        "recipient": {"channel": "email", "address": f"l{i}@x.example"},
        "steps": [{"template_id": f"t{s}", "delay_seconds": 0} for s in range(STEPS)],
    }
    out: list[tuple[str, dict[str, Any], bool]] = [("enrolled", data, False)]
    for s in range(STEPS):
        out.append(("timer_step_due", {}, True))
        if s == 1 and i % 5 == 0:
            out.append(("step_failed", {"step": s, "error_code": "provider_timeout", "retryable": True}, False))
            out.append(("timer_retry_due", {}, True))
        out.append(("step_sent", {"step": s, "provider_message_id": "p"}, False))
    return out


def measure(seconds: float = 3.0) -> dict[str, Any]:
    engine = Engine(DEFINITIONS)
    compiled = engine.workflow("sequence")
    assert compiled is not None
    now = datetime.now(UTC)
    scripts = [_script(i) for i in range(50)]
    steps = 0
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        key = InstanceKey(TENANT, "sequence", f"e{i}")
        view: InstanceView | None = None
        for n, (name, data, internal) in enumerate(scripts[i % 50]):
            d = engine.step(compiled, key, view, EngineEvent(f"ev{n}", name, data, now, internal=internal), now)
            if d.outcome is not Outcome.APPLIED:
                raise AssertionError(f"{name} was {d.outcome} in {view.state if view else None}")
            view = InstanceView(key, d.to_state, d.context, d.version, 1)
            steps += 1
        assert view is not None and view.state == "completed"
        i += 1
    elapsed = time.perf_counter() - start
    return {
        "bench": "engine step (pure)",
        "events_per_s": round(steps / elapsed),
        "steps": steps,
        "instances": i,
        "seconds": round(elapsed, 2),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    print(json.dumps(measure(ap.parse_args().seconds)))
