"""Is a definition change safe for the instances in flight? Replay their recorded histories and compare. Pure.

An instance's history (sfworkflow.history) records every step it took: each external event applied with its body
(migration 0017), each internal one (a timer, the database's answer) with its trigger and data, and the state it
led to. `replay` steps a fresh in-memory instance through those events with a definition (the engine's `step`, no
I/O, each step at the instant it was recorded), and `compare` finds the first step where two replays part: a
different outcome (an event now ignored or not allowed), a different state, different commands (type, data,
idempotency key, attempt) or different timers. `check` replays through the instance's own version (which must
reproduce the recorded states: an edit in place shows here) and through the candidate version.

A history is replayable up to its first step no definition can redo: an operator's action (replay, migration), or
an external event recorded before bodies were kept. Events ignored or parked at the time are not steps; a change
that would now apply one is not seen (its body was not kept).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from sfworkflow.contract.envelope import parse_timestamp
from sfworkflow.core.definition import EngineEvent, InstanceKey, InstanceView
from sfworkflow.core.engine import CompiledWorkflow, Decision, Engine, Outcome

OPERATOR_OUTCOMES = frozenset({"replayed", "migrated"})  # history entries that change an instance outside a step


@dataclass(frozen=True, slots=True)
class Recorded:
    """One step an instance took, as its history recorded it."""

    seq: int
    event_type: str  # as history names it: sequence.step_sent, sequence.timer.step_due, sequence.lookup_result
    trigger: str  # the engine's name for it: step_sent, timer_step_due, lookup_result
    event_id: str
    data: dict[str, Any]
    timestamp: datetime  # the event's own (an external event's envelope), else when it was applied
    at: datetime  # when it was applied: the step's `now`
    internal: bool
    to_state: str  # the state history recorded after it
    correlation_id: str | None = None
    causation_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "event_type": self.event_type, "trigger": self.trigger, "event_id": self.event_id,
            "data": self.data, "timestamp": self.timestamp.isoformat(), "at": self.at.isoformat(),
            "internal": self.internal, "to_state": self.to_state, "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recorded:
        return cls(
            d["seq"], d["event_type"], d["trigger"], d["event_id"], d["data"], datetime.fromisoformat(d["timestamp"]),
            datetime.fromisoformat(d["at"]), d["internal"], d["to_state"], d.get("correlation_id"),
            d.get("causation_id"),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class History:
    key: InstanceKey
    definition_version: int  # the version the instance ran on
    steps: list[Recorded]
    cut: str | None = None  # why the replay stops before the instance's end (None: the whole history)
    cut_at: int | None = None  # the seq it stops at


def from_rows(key: InstanceKey, definition_version: int, rows: list[Any]) -> History:
    """An instance's history rows (seq, event_id, event_type, outcome, to_state, detail, body, created_at), in order,
    as steps to replay."""
    steps: list[Recorded] = []
    for r in rows:
        outcome, event_type = r["outcome"], r["event_type"]
        if outcome in OPERATOR_OUTCOMES:
            # The steps before a migration ran on the version it moved the instance from.
            before = (r["detail"] or {}).get("from_version") if outcome == "migrated" else None
            version = before if isinstance(before, int) else definition_version
            return History(key, version, steps, f"an operator's action ({outcome})", r["seq"])
        if outcome != "applied":
            continue
        detail = r["detail"] or {}
        if "trigger" in detail:  # internal: a timer, the database's answer
            at = r["created_at"]
            steps.append(
                Recorded(r["seq"], event_type, detail["trigger"], str(r["event_id"]), dict(detail.get("data") or {}),
                         at, at, True, r["to_state"])
            )  # fmt: skip
            continue
        if r["body"] is None:
            return History(key, definition_version, steps, "an event recorded before bodies were kept (migration 0017)",
                           r["seq"])  # fmt: skip
        try:
            envelope = orjson.loads(r["body"])
            timestamp = parse_timestamp(envelope["timestamp"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return History(key, definition_version, steps, "an event body that could not be read", r["seq"])
        steps.append(
            Recorded(
                r["seq"], event_type, event_type.partition(".")[2], str(r["event_id"]), envelope.get("data") or {},
                timestamp, r["created_at"], False, r["to_state"], envelope.get("correlation_id"),
                envelope.get("causation_id"),
            )
        )  # fmt: skip
    return History(key, definition_version, steps)


@dataclass(frozen=True, slots=True)
class Replayed:
    """What one step did under a definition."""

    outcome: str  # applied, ignored, parked (not allowed in its state), raised
    state: str
    reason: str | None = None
    commands: tuple[tuple[str, str, str], ...] = ()  # (kind, type, the parts that must not change, as JSON)
    timers: tuple[str, ...] = ()  # names set
    cancelled: tuple[str, ...] = ()  # names cancelled ('*': all)

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "state": self.state, "reason": self.reason,
            "commands": [list(c) for c in self.commands], "timers": list(self.timers),
            "cancelled": list(self.cancelled),
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Replayed:
        return cls(
            d["outcome"], d["state"], d.get("reason"), tuple((c[0], c[1], c[2]) for c in d["commands"]),
            tuple(d["timers"]), tuple(d["cancelled"]),
        )  # fmt: skip


def _walk(
    compiled: CompiledWorkflow, engine: Engine, history: History, answer: Callable[[Recorded], Recorded] | None = None
) -> Iterator[tuple[Recorded, Decision | Exception, InstanceView | None]]:
    """Step a fresh instance through the recorded steps (each through `answer` first, when given), yielding each
    step, its decision (or what the definition raised) and the instance before it; stops after the first step that
    is not applied (what follows depends on it)."""
    view: InstanceView | None = None
    for recorded in history.steps:
        r = answer(recorded) if answer is not None else recorded
        event = EngineEvent(r.event_id, r.trigger, r.data, r.timestamp, r.correlation_id, r.causation_id, r.internal)
        try:
            d = engine.step(compiled, history.key, view, event, r.at)
        except Exception as exc:  # a definition's action raising is what the check is for
            yield r, exc, view
            return
        yield r, d, view
        if d.outcome is not Outcome.APPLIED:
            return
        view = InstanceView(history.key, d.to_state, d.context, d.version, compiled.definition.version)


def replay(compiled: CompiledWorkflow, engine: Engine, history: History) -> list[Replayed]:
    """Each recorded step taken again under `compiled`, from a fresh instance, up to the first not applied."""
    out: list[Replayed] = []
    for _r, d, view in _walk(compiled, engine, history):
        if isinstance(d, Exception):
            out.append(Replayed("raised", view.state if view else "", f"{type(d).__name__}: {d}"[:300]))
        elif d.outcome is not Outcome.APPLIED:
            out.append(Replayed(str(d.outcome), d.to_state or (view.state if view else ""), d.reason))
        else:
            commands = tuple(
                (m.kind, m.routing_key, orjson.dumps(_lasting(m.body), option=orjson.OPT_SORT_KEYS).decode())
                for m in d.outgoing
            )
            cancelled = ("*",) if d.cancel_all_timers else tuple(d.timers_cancelled)
            out.append(Replayed("applied", d.to_state, None, commands, tuple(t.name for t in d.timers_set), cancelled))
    return out


def align_answers(compiled: CompiledWorkflow, engine: Engine, history: History) -> History:
    """`history` with sfworkflow's answers (lookup_result, claim_refused, effect_suppressed) rewritten to answer what
    the replay asks: after redaction a lookup's key is derived from pseudonyms, and the recorded answer, which
    names the original key, would not be taken for its answer. Each answer is matched to the oldest open question
    of its kind (a lookup of the same name, a claim, an effect of the same command type)."""
    lookups: list[tuple[str, str]] = []
    claims: list[str] = []
    effects: list[tuple[str, str, str]] = []  # (command type, effect key, command id)

    def answer(r: Recorded) -> Recorded:
        data = dict(r.data)
        if r.internal and r.trigger == "lookup_result":
            match = next((x for x in lookups if x[0] == data.get("name")), None)
            if match is not None:
                lookups.remove(match)
                data["key"] = match[1]
        elif r.internal and r.trigger == "claim_refused" and claims:
            data["key"] = claims.pop(0)
        elif r.internal and r.trigger == "effect_suppressed":
            effect = next((x for x in effects if x[0] == data.get("command_type")), None)
            if effect is not None:
                effects.remove(effect)
                data["effect_key"], data["command_id"] = effect[1], effect[2]
        return replace(r, data=data)

    steps: list[Recorded] = []
    for r, d, _view in _walk(compiled, engine, history, answer):
        steps.append(r)
        if not isinstance(d, Exception):  # the questions it asked, for the answers that follow
            lookups.extend(d.requests.lookups)
            claims.extend(d.requests.claims)
            effects.extend((m.routing_key, m.effect_key, m.message_id) for m in d.outgoing if m.effect_key is not None)
    return replace(history, steps=steps + history.steps[len(steps) :])


def _lasting(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a message that a definition change must keep: its data, and a command's idempotency key and
    attempt (a worker dedupes on them); ids, times and traces are the run's."""
    keep = ("data", "idempotency_key", "attempt", "final_state")
    return {k: body[k] for k in keep if k in body}


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where two replays of one history part, and how."""

    index: int  # the step (0-based) where they part
    step: Recorded | None  # None: one replay has steps the other has not
    lines: list[str] = field(default_factory=list)

    def text(self, key: InstanceKey, against: str) -> str:
        where = "" if self.step is None else f" at step {self.index + 1}, {self.step.event_type} (seq {self.step.seq})"
        return "\n".join([f"{key}: {against} diverges{where}", *(f"    {line}" for line in self.lines)])


def compare(expected: list[Replayed], got: list[Replayed], history: History) -> Divergence | None:
    """The first step where `got` parts from `expected`, with a readable diff; None when they agree."""
    for i, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a == b:
            continue
        lines = []
        if a.outcome != b.outcome:
            lines.append(f"outcome: {a.outcome} -> {b.outcome}" + (f" ({b.reason})" if b.reason else ""))
        if a.state != b.state:
            lines.append(f"state: {a.state} -> {b.state}")
        for sign, c in [("-", c) for c in a.commands if c not in b.commands] + [
            ("+", c) for c in b.commands if c not in a.commands
        ]:
            lines.append(f"{sign} {c[0]} {c[1]} {c[2]}")
        if a.timers != b.timers:
            lines.append(f"timers set: {list(a.timers)} -> {list(b.timers)}")
        if a.cancelled != b.cancelled:
            lines.append(f"timers cancelled: {list(a.cancelled)} -> {list(b.cancelled)}")
        return Divergence(i, history.steps[i] if i < len(history.steps) else None, lines)
    if len(expected) != len(got):
        i = min(len(expected), len(got))
        return Divergence(i, history.steps[i] if i < len(history.steps) else None,
                          [f"steps replayed: {len(expected)} -> {len(got)}"])  # fmt: skip
    return None


def recorded_states(history: History) -> list[Replayed]:
    """The recorded outcome of each step (applied, to its recorded state), for comparing states only."""
    return [Replayed("applied", r.to_state) for r in history.steps]


def states_only(replayed: list[Replayed]) -> list[Replayed]:
    return [Replayed(r.outcome, r.state, r.reason if r.outcome != "applied" else None) for r in replayed]


@dataclass(frozen=True, slots=True)
class Checked:
    """One instance checked against a definition version."""

    key: InstanceKey
    steps: int
    cut: str | None
    divergence: Divergence | None
    against: str  # what it was compared with, for the text


def check(engine: Engine, history: History, version: int) -> Checked:
    """Replay `history` through its own definition version (it must reproduce the recorded states) and through
    `version` (it must do what the own version does: outcomes, states, commands, timers)."""
    workflow = history.key.workflow
    own = engine.compiled.get((workflow, history.definition_version))
    if own is None:
        missing = Divergence(0, None, [f"this release has no {workflow} v{history.definition_version} to replay it"])
        return Checked(history.key, len(history.steps), history.cut, missing, f"v{history.definition_version}")
    expected = replay(own, engine, history)
    drift = compare(recorded_states(history), states_only(expected), history)
    if drift is not None:
        return Checked(history.key, len(history.steps), history.cut, drift,
                       f"v{history.definition_version} replayed against its recorded history")  # fmt: skip
    candidate = engine.compiled[(workflow, version)]
    got = replay(candidate, engine, history) if version != history.definition_version else expected
    parted = compare(expected, got, history)
    return Checked(history.key, len(history.steps), history.cut, parted,
                   f"v{version} against v{history.definition_version}")  # fmt: skip
