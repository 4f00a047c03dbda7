"""The committed corpus of recorded histories (tests/histories/<workflow>.jsonl, written by `sfworkflow
export-histories` from the demo and the chaos suite) replayed against the current definitions: a change that would
treat a recorded history differently (another state, other commands or timers, an event no longer taken) fails
here with the diff, before it ships. A compatible change passes. Regenerate after a deliberate change (README:
'Definition changes')."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfworkflow.core.definition import Transition, WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.ops.compat import check_corpus_line
from sfworkflow.workflows import DEFINITIONS
from sfworkflow.workflows import sequence as seq

CORPUS = Path(__file__).resolve().parents[1] / "histories"
WORKFLOWS = sorted({d.name for d in DEFINITIONS})


def _lines(workflow: str) -> list[dict[str, Any]]:
    path = CORPUS / f"{workflow}.jsonl"
    return [orjson.loads(t) for t in path.read_text().splitlines() if t.strip()]


def _failures(engine: Engine, workflow: str) -> list[str]:
    return [d for line in _lines(workflow) if (d := check_corpus_line(engine, line)) is not None]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_every_workflow_has_a_corpus_with_histories_that_reach_its_ends(workflow: str) -> None:
    lines = _lines(workflow)
    assert len(lines) >= 5, f"tests/histories/{workflow}.jsonl: run `sfworkflow export-histories` after the demo"
    assert all(line["workflow"] == workflow for line in lines)
    definition = next(d for d in DEFINITIONS if d.name == workflow)
    ends = {line["expected"][-1]["state"] for line in lines}
    assert ends & set(definition.terminal), f"no history in the corpus ends {workflow}"


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_the_committed_histories_replay_as_they_did_when_recorded(workflow: str) -> None:
    failures = _failures(Engine(DEFINITIONS), workflow)
    assert failures == [], "\n\n".join(failures[:5]) + (
        f"\n… and {len(failures) - 5} more" if len(failures) > 5 else ""
    )


def _sequence_with(transitions: tuple[Transition, ...]) -> Engine:
    changed: WorkflowDefinition = dataclasses.replace(seq.DEFINITION, transitions=transitions)
    return Engine(tuple(changed if d.name == "sequence" else d for d in DEFINITIONS))


def test_an_incompatible_change_to_sequence_fails_the_corpus_with_a_readable_diff() -> None:
    """A reply now cancels the enrollment instead of stopping it: recorded replies would end elsewhere."""
    moved = tuple(
        dataclasses.replace(t, dest=seq.S.CANCELLED) if t.trigger == "replied" else t
        for t in seq.DEFINITION.transitions
    )
    failures = _failures(_sequence_with(moved), "sequence")
    assert failures, "the corpus has no recorded reply: regenerate it from the demo (its reply rate is 5 %)"
    first = failures[0]
    assert "sequence v1 now diverges at step" in first and "sequence.replied" in first, first
    assert "state: stopped -> cancelled" in first, first
    assert "+ lifecycle workflow.completed.sequence" in first or "final_state" in first, first


def test_a_compatible_change_to_sequence_passes_the_corpus() -> None:
    """A new event no recorded history took (an operator's nudge while waiting) changes nothing recorded."""
    added = (*seq.DEFINITION.transitions, Transition("nudged", seq.S.WAITING, None, action=seq.note_resume))
    changed = dataclasses.replace(seq.DEFINITION, transitions=added, events=seq.DEFINITION.events | {"nudged"})
    engine = Engine(tuple(changed if d.name == "sequence" else d for d in DEFINITIONS))
    assert _failures(engine, "sequence") == []
