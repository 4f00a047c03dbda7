"""The pure engine step: (definition, instance, event, now) -> Decision. No I/O.

One `transitions.Machine` per loaded (workflow, version) is built once from the definition's table: it checks
the table and holds the machine's transitions, per trigger and source state, in the order they are tried.
The step runs those `Transition` objects itself (`Route`: their conditions, destination and `after` actions,
with the `Step` as the argument guards and actions take) instead of calling the machine's trigger, which
built an `EventData`, walked every callback list and logged at each stage: 22 % of planning an event.
That is all a transition of ours does: a definition has guards and one action per transition, no state,
`before`, `prepare` or machine-level callbacks (`CompiledWorkflow` refuses a machine that has any), so the
result is the machine's own; tests/unit/test_engine_routes.py holds the two to the same decisions. Asking
for an event the state does not accept returns a PARKED decision (or IGNORED when the instance is terminal,
the event is stale, or it is internal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from transitions import Machine

from sfworkflow.contract.tracing import Trace, derived_trace
from sfworkflow.core.definition import (
    ANY_ACTIVE,
    EngineEvent,
    InstanceKey,
    InstanceView,
    OutgoingMessage,
    Requests,
    Step,
    TimerRequest,
    WorkflowDefinition,
)
from sfworkflow.core.limits import ConcurrencyLimit, Rate, RateLimit, RateSetting, check_overrides, limit_name
from sfworkflow.errors import DefinitionError

# The lifecycle event every ending publishes, exactly once and last (its data: final_state). workflow.failed and
# workflow.compensated report a failure and its compensations when they happen: before it at an ending, or in a
# state that waits for an operator or a replay (agent's dead_lettered, follow_up's needs_attention).
LIFECYCLE_END = "workflow.completed"
LIFECYCLE_ENDS = (LIFECYCLE_END,)


class Outcome(StrEnum):
    APPLIED = "applied"
    PARKED = "parked"
    IGNORED = "ignored"


@dataclass(slots=True)
class Decision:
    """What applying one event means; the store turns it into rows."""

    outcome: Outcome
    from_state: str
    to_state: str
    version: int  # the instance version after this decision
    context: dict[str, Any]
    reason: str | None = None
    trigger: str = ""
    outgoing: list[OutgoingMessage] = field(default_factory=list)
    timers_set: list[TimerRequest] = field(default_factory=list)
    timers_cancelled: list[str] = field(default_factory=list)
    cancel_all_timers: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    terminal: bool = False
    requests: Requests = field(default_factory=Requests)
    trace: Trace | None = None  # the trace its messages carry (see Engine.step)


class _Cursor:
    """The model bound to a machine (`transitions` needs one to build it; the step does not use it).

    No __slots__: `transitions` attaches its convenience methods to the model.
    """

    def __init__(self, initial: str) -> None:
        self.state = initial


@dataclass(frozen=True, slots=True)
class Route:
    """One of the machine's `Transition` objects as the step runs it: it applies when every condition's
    predicate, given the Step, equals its target (True; False for an `unless`); then the state becomes `dest`
    (None: an internal transition, the state stays) and the `after` actions run, in order."""

    conditions: tuple[tuple[Callable[[Step], Any], bool], ...]
    dest: str | None
    actions: tuple[Callable[[Step], Any], ...]


def machine_routes(machine: Machine) -> dict[tuple[str, str], tuple[Route, ...]]:
    """(source state, trigger) -> the machine's transitions for it, in the order the machine tries them."""
    extra = [
        name for name in ("prepare_event", "finalize_event", "before_state_change", "after_state_change",
                          "on_exception", "on_final") if getattr(machine, name, None)
    ]  # fmt: skip
    extra += [f"{s.name}.{c}" for s in machine.states.values() for c in ("on_enter", "on_exit") if getattr(s, c)]
    routes: dict[tuple[str, str], tuple[Route, ...]] = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            out = []
            for t in transitions:
                extra += [f"{trigger} from {source}: {c}" for c in ("prepare", "before") if getattr(t, c)]
                conditions = tuple((c.func, bool(c.target)) for c in t.conditions if callable(c.func))
                actions = tuple(a for a in t.after if callable(a))
                if len(conditions) < len(t.conditions) or len(actions) < len(t.after):
                    extra.append(f"{trigger} from {source}: a callback named by a string")
                out.append(Route(conditions, t.dest, actions))
            routes[(source, trigger)] = tuple(out)
    if extra:
        raise DefinitionError(
            f"{machine.name or 'a workflow'}: the engine runs guards and one action per transition, not "
            f"{', '.join(sorted(set(extra)))}"
        )
    return routes


def _wrap_condition(cond: Any) -> Any:
    def check(step: Step) -> bool:  # a guard's truthy value counts as True (transitions compares `== True`)
        return bool(cond(step))

    check.__name__ = getattr(cond, "__name__", "condition")
    return check


class CompiledWorkflow:
    """A definition with its machine built once, and lookup tables for the hot path."""

    def __init__(self, definition: WorkflowDefinition) -> None:
        self.definition = definition
        states = [str(s.value) for s in definition.states]
        check_definition(definition, states)
        active = [s for s in states if s not in definition.terminal and s != definition.initial]
        table: list[dict[str, Any]] = []
        for t in definition.transitions:
            # Plain strings, never Enum members: `transitions` names Enum states by member name.
            sources = (
                active
                if t.source == ANY_ACTIVE
                else [str(t.source)]
                if isinstance(t.source, str)
                else [str(x) for x in t.source]
            )
            table.append(
                {
                    "trigger": t.trigger,
                    "source": sources,
                    "dest": None if t.dest is None else str(t.dest),
                    "conditions": [_wrap_condition(c) for c in t.conditions],
                    "after": [t.action] if t.action else [],
                }
            )
        self.initial = str(definition.initial)
        self.cursor = _Cursor(self.initial)
        self.machine = Machine(
            model=self.cursor,
            states=states,
            transitions=table,
            initial=str(definition.initial),
            auto_transitions=False,
            send_event=False,  # callbacks get the trigger's arguments: the Step, as actions and guards take it
            ignore_invalid_triggers=False,
            model_attribute="state",
        )
        self.routes = machine_routes(self.machine)
        self.triggers_by_state: dict[str, frozenset[str]] = {s: frozenset(self.machine.get_triggers(s)) for s in states}
        self.table = table
        # command type -> its rate limits, each with its full name (`sequence.send_step/per_sender`)
        self.rate_limits: dict[str, list[tuple[str, RateLimit]]] = {}
        # command type -> its concurrency limit (at most one), with its full name
        self.concurrency: dict[str, tuple[str, ConcurrencyLimit]] = {}
        for lim in definition.limits:
            command_type = definition.event_type(lim.command)
            if isinstance(lim, ConcurrencyLimit):
                self.concurrency[command_type] = (limit_name(definition.name, lim), lim)
            else:
                self.rate_limits.setdefault(command_type, []).append((limit_name(definition.name, lim), lim))

    def mermaid(self) -> str:
        """The transition table as a Mermaid state diagram."""
        d = self.definition
        lines = ["stateDiagram-v2", f"    [*] --> {d.initial}"]
        for row in self.table:
            for src in row["source"]:
                guard = ",".join(c.__name__ for c in row["conditions"])
                label = row["trigger"] + (f" [{guard}]" if guard else "")
                lines.append(f"    {src} --> {row['dest'] or src}: {label}")
        for s in sorted(d.terminal):
            lines.append(f"    {s} --> [*]")
        return "\n".join(lines) + "\n"

    def dot(self) -> str:
        """The transition table as a Graphviz DOT digraph (terminal states double-circled)."""
        d = self.definition
        lines = [f'digraph "{d.name}_v{d.version}" {{', "    rankdir=LR;", "    node [shape=circle, fontsize=10];"]
        lines.append('    "__start" [shape=point];')
        for s in self.machine.states:
            shape = "doublecircle" if s in d.terminal else ("octagon" if s in d.waits_for_operator else "circle")
            lines.append(f'    "{s}" [shape={shape}];')
        lines.append(f'    "__start" -> "{self.initial}";')
        for row in self.table:
            for src in row["source"]:
                guard = ",".join(c.__name__ for c in row["conditions"])
                label = row["trigger"] + (f" [{guard}]" if guard else "")
                lines.append(f'    "{src}" -> "{row["dest"] or src}" [label="{label}", fontsize=8];')
        lines.append("}")
        return "\n".join(lines) + "\n"


def check_definition(d: WorkflowDefinition, states: Iterable[str]) -> None:
    known = set(states)
    if d.initial not in known:
        raise DefinitionError(f"{d.name} v{d.version}: initial state {d.initial!r} is not a state")
    for s in d.terminal:
        if s not in known:
            raise DefinitionError(f"{d.name} v{d.version}: terminal state {s!r} is not a state")
    triggers = d.events | d.internal_events
    for t in d.transitions:
        if t.source != ANY_ACTIVE:
            sources = [t.source] if isinstance(t.source, str) else list(t.source)
            for src in sources:
                if str(src) not in known:
                    raise DefinitionError(f"{d.name} v{d.version}: transition {t.trigger!r} from unknown state {src!r}")
        if t.trigger not in triggers:
            raise DefinitionError(
                f"{d.name} v{d.version}: transition trigger {t.trigger!r} is neither an event nor an internal event"
            )
        if t.dest is not None and t.dest not in known:
            raise DefinitionError(f"{d.name} v{d.version}: transition to unknown state {t.dest!r}")
    for e in d.start_events:
        if e not in d.events:
            raise DefinitionError(f"{d.name} v{d.version}: start event {e!r} is not an event")
    names: set[str] = set()
    gated: set[str] = set()
    for lim in d.limits:
        kind = "concurrency limit" if isinstance(lim, ConcurrencyLimit) else "rate limit"
        if lim.command not in d.commands:
            what = "a compensation: an undo never waits" if lim.command in d.compensations else "not a command"
            raise DefinitionError(f"{d.name} v{d.version}: {kind} {lim.name!r} is on {lim.command!r}, {what}")
        if lim.name in names:
            raise DefinitionError(f"{d.name} v{d.version}: limit {lim.name!r} is declared twice")
        names.add(lim.name)
        if isinstance(lim, ConcurrencyLimit):
            if any(isinstance(r, RateLimit) and r.command == lim.command for r in d.limits):
                raise DefinitionError(
                    f"{d.name} v{d.version}: {lim.command!r} has a rate and a concurrency limit: its rate slot would "
                    "be booked when decided, not when the gate lets it out; keep one"
                )
            if lim.command in gated:
                raise DefinitionError(f"{d.name} v{d.version}: {lim.command!r} has two concurrency limits; keep one")
            gated.add(lim.command)
            unknown = sorted(set(lim.held_in) - known)
            if unknown:
                raise DefinitionError(f"{d.name} v{d.version}: {kind} {lim.name!r} held_in names unknown {unknown}")
            ends = sorted(set(lim.held_in) & set(d.terminal))
            if ends:
                raise DefinitionError(
                    f"{d.name} v{d.version}: {kind} {lim.name!r} is held in terminal {ends}: it would never be released"
                )


class Engine:
    """Every loaded workflow definition, compiled once; `step` is pure and synchronous."""

    def __init__(
        self, definitions: Iterable[WorkflowDefinition], rate_overrides: Mapping[str, RateSetting | None] | None = None
    ) -> None:
        self.compiled: dict[tuple[str, int], CompiledWorkflow] = {}
        self.latest: dict[str, int] = {}
        for d in definitions:
            if (d.name, d.version) in self.compiled:
                raise DefinitionError(f"{d.name} v{d.version} is defined twice")
            self.compiled[(d.name, d.version)] = CompiledWorkflow(d)
            self.latest[d.name] = max(self.latest.get(d.name, 0), d.version)
        # The rate in force per limit name: the deployment's setting (SFWORKFLOW_RATE_LIMITS; None: not enforced),
        # else the definition's (a setting that names no daily cap keeps the definition's).
        self.rate_overrides: dict[str, RateSetting | None] = dict(rate_overrides or {})
        try:
            check_overrides(self.rate_overrides, self.limit_names())
        except ValueError as exc:
            raise DefinitionError(f"SFWORKFLOW_RATE_LIMITS: {exc}") from None

    def event_types(self) -> set[str]:
        """Every external event type the loaded definitions take (sequence.enrolled, …)."""
        return {cw.definition.event_type(e) for cw in self.compiled.values() for e in cw.definition.events}

    def limit_names(self) -> list[str]:
        """Every rate limit the loaded definitions declare, by full name."""
        return sorted({n for c in self.compiled.values() for ls in c.rate_limits.values() for n, _ in ls})

    def limit_labels(self) -> list[tuple[str, str, str]]:
        """(workflow, command type, limit name) of every declared rate limit: the metrics' label values."""
        return sorted(
            {(c.definition.name, cmd, n) for c in self.compiled.values() for cmd, ls in c.rate_limits.items()
             for n, _ in ls}
        )  # fmt: skip

    def concurrency_labels(self) -> list[tuple[str, str, str]]:
        """(workflow, command type, limit name) of every declared concurrency limit: the metrics' label values."""
        return sorted(
            {(c.definition.name, cmd, n) for c in self.compiled.values() for cmd, (n, _l) in c.concurrency.items()}
        )

    def concurrency_limits(self) -> dict[str, ConcurrencyLimit]:
        """Every declared concurrency limit by full name (the latest version's declaration when versions differ)."""
        out: dict[str, ConcurrencyLimit] = {}
        for (_name, _version), c in sorted(self.compiled.items()):
            for n, lim in c.concurrency.values():
                out[n] = lim
        return out

    def rate_limits(self, compiled: CompiledWorkflow, command_type: str) -> list[tuple[str, RateLimit, Rate]]:
        """The rate limits in force on a command type: (full name, declaration, rate)."""
        out = []
        for name, lim in compiled.rate_limits.get(command_type, ()):
            rate = self.rate_in_force(name, lim)
            if rate is not None:
                out.append((name, lim, rate))
        return out

    def rate_in_force(self, name: str, limit: RateLimit) -> Rate | None:
        """The rate this deployment enforces for a declared rate limit: SFWORKFLOW_RATE_LIMITS's over the
        definition's, or None when the setting turns the limit off (a tenant's override may still replace it)."""
        if name not in self.rate_overrides:
            return limit.rate
        setting = self.rate_overrides[name]
        return None if setting is None else setting.over(limit.rate)

    def workflow(self, name: str, version: int | None = None) -> CompiledWorkflow | None:
        v = self.latest.get(name) if version is None else version
        return None if v is None else self.compiled.get((name, v))

    def step(
        self,
        compiled: CompiledWorkflow,
        key: InstanceKey,
        instance: InstanceView | None,
        event: EngineEvent,
        now: datetime,
    ) -> Decision:
        """Apply `event` to `instance` (None: it does not exist yet) and return the decision."""
        d = compiled.definition
        trigger = event.name
        if instance is None:
            if trigger not in d.start_events:
                return Decision(Outcome.PARKED, "", "", 0, {}, "instance does not exist yet", trigger)
            state, context, version, correlation = compiled.initial, {}, 0, event.correlation_id
        else:
            state, context, version = instance.state, instance.context, instance.version
            correlation = instance.correlation_id or event.correlation_id
        if state in d.terminal:
            return Decision(Outcome.IGNORED, state, state, version, context, f"instance is {state}", trigger)
        if trigger in d.start_events and state != compiled.initial:
            return Decision(Outcome.IGNORED, state, state, version, context, "instance already started", trigger)

        # The event's own trace, else the instance's (timers, internal events, producers that trace nothing); an
        # instance without one (its start event had none) gets one derived from its key and that event, which the
        # plan keeps on the instance.
        trace = event.trace or (instance.trace if instance is not None else None)
        if trace is None:
            trace = derived_trace(f"{key}/{event.event_id}")
        step = Step(d, key, event, dict(context), version + 1, now, correlation, state, trace)
        # A report about the past (an older step or attempt) is ignored before any transition may match it.
        stale = d.stale(step) if d.stale and instance is not None else None
        if stale is not None:
            return Decision(Outcome.IGNORED, state, state, version, context, stale, trigger)
        new_state = _fire(compiled.routes.get((state, trigger), ()), state, step)
        if new_state is None:
            if event.internal:
                reason = f"{trigger} does not apply in state {state}"
                return Decision(Outcome.IGNORED, state, state, version, context, reason, trigger)
            return Decision(
                Outcome.PARKED, state, state, version, context, f"{trigger} is not allowed in state {state}", trigger
            )

        terminal = new_state in d.terminal
        if state == compiled.initial:
            step.lifecycle("workflow.started", new_state, {"start_event_type": d.event_type(trigger)})
        if terminal:
            step.cancel_timers()
            if not any(m.kind == "lifecycle" and m.body["event_type"] == LIFECYCLE_END for m in step.outgoing):
                step.lifecycle(LIFECYCLE_END, new_state, {"final_state": new_state})
        return Decision(
            outcome=Outcome.APPLIED,
            from_state=state,
            to_state=new_state,
            version=version + 1,
            context=step.context,
            trigger=trigger,
            outgoing=step.outgoing,
            timers_set=step.timers_set,
            timers_cancelled=step.timers_cancelled,
            cancel_all_timers=step.cancel_all_timers,
            notes=step.notes,
            terminal=terminal,
            requests=step.requests,
            trace=trace,
        )


def _fire(routes: tuple[Route, ...], state: str, step: Step) -> str | None:
    """The state after the first route whose conditions hold has run its actions; None when none applies."""
    for route in routes:
        for predicate, target in route.conditions:
            if predicate(step) != target:
                break
        else:
            for action in route.actions:
                action(step)
            return route.dest or state
    return None
