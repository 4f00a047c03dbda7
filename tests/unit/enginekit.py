"""Driving any workflow definition through the pure `Engine.step` in unit tests (no I/O).

- `Run`: one instance moved event by event from its start event, as the store would keep it.
- `event`: the `EngineEvent` for a trigger (internal triggers from `definition.internal_events`).
- `check_table_covers` / `check_table_cell` / `check_deterministic`: the checks the state x trigger tables
  and purity tests share.
- `schema_errors`, `of_kind`, `kinds`, `lifecycle_types`: looking at a decision's outgoing messages.
- `Walk`, `with_optional`, `weighted`: for the hypothesis tests that feed random event sequences.

Workflow-specific data builders, state builders and tables stay in each test module.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from sfworkflow.contract import schemas
from sfworkflow.core.definition import ID_NAMESPACE, EngineEvent, InstanceKey, InstanceView, OutgoingMessage
from sfworkflow.core.definition import WorkflowDefinition as Definition
from sfworkflow.core.engine import CompiledWorkflow, Decision, Engine, Outcome
from sfworkflow.workflows import DEFINITIONS

A, P, I = Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED
ENGINE = Engine(DEFINITIONS)
TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
T0 = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def workflow(definition: Definition) -> CompiledWorkflow:
    """`definition` as compiled in `ENGINE` (every shipped workflow)."""
    wf = ENGINE.workflow(definition.name, definition.version)
    assert wf is not None and wf.definition is definition, definition.name
    return wf


def event(
    definition: Definition,
    name: str,
    data: dict[str, Any] | None = None,
    at: datetime = T0,
    n: int | None = None,
    *,
    correlation: str | None = None,
) -> EngineEvent:
    """The event `name` of `definition`; its id is derived from name, data, time (and `n` when given),
    so the same arguments give the same event."""
    data = data or {}
    seed = f"test/{name}/{sorted(data.items())!r}/{at.isoformat()}" + ("" if n is None else f"/{n}")
    event_id = str(uuid.uuid5(ID_NAMESPACE, seed))
    return EngineEvent(
        event_id, name, data, at, correlation_id=correlation, internal=name in definition.internal_events
    )


class Run:
    """One instance driven event by event; `view` is None until the start event is applied.

    `key` defaults to a `TENANT` instance of the definition's workflow, `correlation` to "corr-<entity>".
    Each step happens at `now` (when given; else the previous time plus `tick`) and its event is stamped
    `at` (default: now). With `numbered`, event ids also carry the step count, so repeated events differ.
    """

    def __init__(
        self,
        definition: Definition,
        key: InstanceKey | None = None,
        *,
        t0: datetime = T0,
        correlation: str | None = None,
        tick: timedelta = timedelta(0),
        numbered: bool = False,
    ) -> None:
        self.definition = definition
        self.workflow = workflow(definition)
        self.key = key or InstanceKey(TENANT, definition.name, f"{definition.name}-1")
        self.correlation = correlation or f"corr-{self.key.entity_id}"
        self.tick = tick
        self.numbered = numbered
        self.count = 0  # step() calls so far
        self.view: InstanceView | None = None
        self.now = t0

    @property
    def ctx(self) -> dict[str, Any]:
        return self.view.context if self.view else {}

    @property
    def state(self) -> str:
        return self.view.state if self.view else ""

    def decide(self, ev: EngineEvent, now: datetime) -> Decision:
        """The decision for `ev` on the current view, not applied."""
        return ENGINE.step(self.workflow, self.key, self.view, ev, now)

    def step(
        self, name: str, data: dict[str, Any] | None = None, *, now: datetime | None = None, at: datetime | None = None
    ) -> Decision:
        """Send `name` and, when applied, move the view on as the store would."""
        self.now = now if now is not None else self.now + self.tick
        self.count += 1
        n = self.count if self.numbered else None
        d = self.decide(event(self.definition, name, data, at or self.now, n, correlation=self.correlation), self.now)
        if d.outcome is A:
            corr = self.view.correlation_id if self.view else self.correlation
            self.view = InstanceView(self.key, d.to_state, d.context, d.version, self.definition.version, corr)
        return d

    def do(self, name: str, data: dict[str, Any] | None = None, **kw: Any) -> Decision:
        """`step`, which must be applied."""
        d = self.step(name, data, **kw)
        assert d.outcome is A, (name, d.outcome, d.reason)
        return d


# ---- checks shared by the state x trigger tables and the purity tests --------------------------------
def check_table_covers(
    definition: Definition, table: dict[str, dict[str, Any]], states: Any, external: Any, internal: Any
) -> None:
    """The trigger lists are the definition's, and the table has a row per state with a cell per trigger."""
    assert set(external) == definition.events
    assert set(internal) == definition.internal_events
    assert set(table) == {str(s) for s in states}
    assert all(set(row) == set(external) | set(internal) for row in table.values())


def check_table_cell(run: Run, ev: EngineEvent, cell: tuple[Outcome, str | None], now: datetime) -> Decision:
    """Decide `ev` on `run` (not applied) and check it against one cell of a state x trigger table:
    (outcome, destination), where "same" is an internal transition that keeps the state. Checks that the
    input context is not mutated, an applied step moves the version on with valid messages only, and any
    other outcome has a reason and changes nothing, publishes nothing and sets no timer."""
    view = run.view
    before = copy.deepcopy(view.context) if view else None
    version = view.version if view else 0
    outcome, dest = cell
    d = run.decide(ev, now)
    assert d.outcome is outcome, (d.outcome, d.reason)
    if view is not None:
        assert view.context == before, "step mutated the input context"
    if outcome is A:
        dest = run.state if dest == "same" else dest
        assert d.to_state == dest
        assert d.version == version + 1
        assert d.terminal == (dest in run.definition.terminal)
        assert all(schema_errors(m) == [] for m in d.outgoing)
    else:
        assert d.to_state == run.state
        assert d.version == version
        assert d.reason
        assert d.outgoing == [] and d.timers_set == []
    return d


def check_deterministic(run: Run, ev: EngineEvent, now: datetime) -> tuple[Decision, Decision]:
    """Decide `ev` on `run` twice: the decisions are equal and the view's context is not mutated."""
    assert run.view is not None
    snapshot = copy.deepcopy(run.view.context)
    first, second = run.decide(ev, now), run.decide(ev, now)
    assert first == second
    assert run.view.context == snapshot
    return first, second


# ---- outgoing messages ----------------------------------------------------------------------------------
def schema_errors(m: OutgoingMessage) -> list[str]:
    """Why an outgoing message fails its envelope or data schema (empty when valid)."""
    s = schemas.default()
    if m.kind in ("command", "compensation"):
        return s.errors("envelope", "command", m.body) + s.errors("commands", m.routing_key, m.body["data"])
    assert m.kind == "lifecycle", m.kind
    return s.errors("envelope", "lifecycle", m.body) + s.errors("lifecycle", m.body["event_type"], m.body["data"])


def of_kind(d: Decision, kind: str) -> list[OutgoingMessage]:
    """The outgoing messages of one kind: "command", "compensation" or "lifecycle"."""
    return [m for m in d.outgoing if m.kind == kind]


def kinds(d: Decision) -> list[tuple[str, str]]:
    """(kind, routing key) of every outgoing message, in order."""
    return [(m.kind, m.routing_key) for m in d.outgoing]


def lifecycle_types(d: Decision) -> list[str]:
    return [m.body["event_type"] for m in of_kind(d, "lifecycle")]


# ---- property tests ---------------------------------------------------------------------------------------
class Walk:
    """One instance fed arbitrary events, as a property test generates them: event ids e0, e1, ..., no
    correlation id; `view` follows every applied decision."""

    def __init__(self, definition: Definition, key: InstanceKey, t0: datetime) -> None:
        self.definition = definition
        self.workflow = workflow(definition)
        self.key = key
        self.view: InstanceView | None = None
        self.now = t0
        self.count = 0

    def step(self, name: str, data: dict[str, Any], gap_s: float = 0) -> Decision:
        """Send `name` `gap_s` seconds after the previous event; never raises."""
        self.now += timedelta(seconds=gap_s)
        ev = EngineEvent(f"e{self.count}", name, data, self.now, internal=name in self.definition.internal_events)
        self.count += 1
        d = ENGINE.step(self.workflow, self.key, self.view, ev, self.now)
        if d.outcome is A:
            self.view = InstanceView(self.key, d.to_state, d.context, d.version, self.definition.version)
        return d


def with_optional(d: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """`d` plus each keyword that is not None."""
    return {**d, **{k: v for k, v in optional.items() if v is not None}}


def weighted(
    strategies: dict[str, st.SearchStrategy[dict[str, Any]]], weights: dict[str, int]
) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(name, data) pairs, each name drawn `weights[name]` times (default 1) as often as a name of weight 1."""
    names = [name for name in strategies for _ in range(weights.get(name, 1))]
    return st.sampled_from(names).flatmap(lambda name: st.tuples(st.just(name), strategies[name]))
