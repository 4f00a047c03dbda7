"""Which lifecycle events an ending publishes, held over every workflow's property walk (random event sequences:
tests/unit/test_*_properties.py): the contract the README states.

Every ending (a transition into a terminal state) publishes `workflow.completed` {final_state} exactly once, as its
last lifecycle event, whatever the ending was (a success, a stop, a cancellation, a failure, a compensation).
`workflow.failed` and `workflow.compensated` report a failure and its compensations when they happen: before
`workflow.completed` at an ending, or in a state that waits for an operator or a replay (agent's dead_lettered,
follow_up's needs_attention). A transition that does not end the instance never publishes `workflow.completed`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from sfworkflow.core import engine
from sfworkflow.core.engine import Outcome
from tests.unit.test_engine_routes import WALKS


@pytest.mark.parametrize("walk", WALKS, ids=[m.__name__.rpartition(".")[2] for m in WALKS])
def test_every_ending_publishes_workflow_completed_once_and_last(
    walk: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = engine.Engine.step
    seen = {"endings": 0}

    def checked(self: engine.Engine, *args: Any, **kwargs: Any) -> Any:
        d = step(self, *args, **kwargs)
        if d.outcome is not Outcome.APPLIED:
            return d
        lifecycle = [m.body for m in d.outgoing if m.kind == "lifecycle"]
        types = [b["event_type"] for b in lifecycle]
        if d.terminal:
            seen["endings"] += 1
            assert types.count("workflow.completed") == 1 and types[-1] == "workflow.completed", (d.to_state, types)
            assert lifecycle[-1]["data"] == {"final_state": d.to_state}
        else:
            assert "workflow.completed" not in types, (d.to_state, types)
        return d

    monkeypatch.setattr(engine.Engine, "step", checked)
    walk.test_random_event_sequences_keep_the_engine_sound()
    assert seen["endings"] > 0
