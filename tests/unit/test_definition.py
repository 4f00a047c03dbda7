"""Compiling definitions: the Mermaid diagram, and the consistency checks `Engine` runs at start-up."""

from __future__ import annotations

import dataclasses
import uuid
from enum import StrEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import ANY_ACTIVE, ID_NAMESPACE, Transition, WorkflowDefinition, derive_id
from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.errors import DefinitionError
from sfworkflow.workflows import DEFINITIONS


class T(StrEnum):
    IDLE = "idle"
    ON = "on"
    OFF = "off"
    DONE = "done"


def is_ready(step) -> bool:
    return True


TOY = WorkflowDefinition(
    name="toy",
    version=1,
    states=T,
    initial=T.IDLE,
    terminal=frozenset({T.DONE}),
    start_events=frozenset({"begin"}),
    events=frozenset({"begin", "flip", "finish"}),
    internal_events=frozenset({"timer_tick"}),
    commands=frozenset(),
    compensations=frozenset(),
    transitions=(
        Transition("begin", T.IDLE, T.ON),
        Transition("flip", T.ON, T.OFF, [is_ready]),
        Transition("flip", T.OFF, T.ON),
        Transition("timer_tick", [T.ON, T.OFF], T.ON),
        Transition("finish", ANY_ACTIVE, T.DONE),
    ),
)


def toy(**changes: object) -> WorkflowDefinition:
    return dataclasses.replace(TOY, **changes)


def _expected_lines(d: WorkflowDefinition) -> set[str]:
    states = [str(s) for s in d.states]
    active = [s for s in states if s not in d.terminal and s != d.initial]
    lines = set()
    for t in d.transitions:
        sources = active if t.source == ANY_ACTIVE else [t.source] if isinstance(t.source, str) else t.source
        guard = ",".join(c.__name__ for c in t.conditions)
        for src in sources:
            dest = t.dest if t.dest is not None else src  # an internal transition is drawn as a self-loop
            lines.add(f"    {src} --> {dest}: {t.trigger}" + (f" [{guard}]" if guard else ""))
    return lines


@pytest.mark.parametrize("definition", [TOY, *DEFINITIONS], ids=lambda d: f"{d.name}.v{d.version}")
def test_mermaid_contains_every_transition(definition: WorkflowDefinition) -> None:
    text = CompiledWorkflow(definition).mermaid()
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert f"    [*] --> {definition.initial}" in lines
    expected = _expected_lines(definition)
    assert expected <= set(lines)
    assert sum(1 for line in lines if ": " in line) == len(expected)
    for s in definition.terminal:
        assert f"    {s} --> [*]" in lines


def test_toy_mermaid_expands_wildcard_and_lists_guards() -> None:
    lines = CompiledWorkflow(TOY).mermaid().splitlines()
    assert "    on --> off: flip [is_ready]" in lines
    assert {"    on --> done: finish", "    off --> done: finish"} <= set(lines)
    assert "    idle --> done: finish" not in lines  # the wildcard excludes the initial state
    assert "    done --> done: finish" not in lines  # ... and terminal states


def test_sequence_mermaid_mentions_every_state() -> None:
    (seq,) = [d for d in DEFINITIONS if d.name == "sequence"]
    text = CompiledWorkflow(seq).mermaid()
    for s in seq.states:
        assert f" {s}" in text


def test_valid_toy_compiles_and_latest_version_wins() -> None:
    engine = Engine([TOY, toy(version=3), toy(version=2)])
    assert engine.latest == {"toy": 3}
    assert engine.workflow("toy").definition.version == 3
    assert engine.workflow("toy", 2).definition.version == 2
    assert engine.workflow("toy", 9) is None
    assert engine.workflow("missing") is None
    assert engine.workflow("toy", 1).triggers_by_state["on"] == {"flip", "timer_tick", "finish"}
    assert engine.workflow("toy", 1).triggers_by_state["done"] == frozenset()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"transitions": (*TOY.transitions, Transition("flip", T.OFF, "nowhere"))},
            "unknown state 'nowhere'",
        ),
        ({"transitions": (*TOY.transitions, Transition("explode", T.ON, T.DONE))}, "'explode'"),
        ({"start_events": frozenset({"begin", "ghost"})}, "start event 'ghost' is not an event"),
        ({"start_events": frozenset({"timer_tick"})}, "start event 'timer_tick' is not an event"),
        ({"initial": "limbo"}, "initial state 'limbo'"),
        ({"terminal": frozenset({T.DONE, "gone"})}, "terminal state 'gone'"),
    ],
    ids=[
        "unknown-dest",
        "unknown-trigger",
        "start-not-event",
        "start-internal",
        "bad-initial",
        "bad-terminal",
    ],
)
def test_engine_rejects_inconsistent_definitions(changes: dict, message: str) -> None:
    with pytest.raises(DefinitionError, match="toy v1") as exc:
        Engine([toy(**changes)])
    assert message in str(exc.value)


def test_engine_rejects_a_duplicate_name_and_version() -> None:
    with pytest.raises(DefinitionError, match="toy v1 is defined twice"):
        Engine([TOY, toy(description="again")])


def test_same_version_of_different_workflows_is_fine() -> None:
    engine = Engine([TOY, toy(name="other")])
    assert set(engine.compiled) == {("toy", 1), ("other", 1)}


def test_engine_rejects_an_unknown_source_state() -> None:
    with pytest.raises(DefinitionError):
        Engine([toy(transitions=(*TOY.transitions, Transition("flip", "nowhere", T.DONE)))])


@pytest.mark.parametrize(
    "name", ["", "a", "timer/t/sequence/e/step/2026-03-10T08:00:00+00:00", "dead/x/ü/\u2603", "k" * 5000]
)
def test_derive_id_is_uuid5_in_the_id_namespace(name: str) -> None:
    assert derive_id(name) == str(uuid.uuid5(ID_NAMESPACE, name))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text())
def test_derive_id_matches_uuid5_on_any_text(name: str) -> None:
    assert derive_id(name) == str(uuid.uuid5(ID_NAMESPACE, name))
