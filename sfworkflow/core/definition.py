"""The data a workflow definition is made of, and the `Step` its actions write their decision to.

A definition is a table: states, the events that start an instance, transitions
(trigger, source states, destination, guard conditions, one action). Actions and conditions are
pure functions of a `Step`: they read the event and the instance context and record commands,
compensations, timers and notes on it. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.contract.ids import uuid5_text
from sfworkflow.contract.tracing import Trace
from sfworkflow.core.limits import Limit
from sfworkflow.core.schedules import Schedule

# Namespace of every id sfworkflow derives (command ids, lifecycle event ids, timer event ids).
ID_NAMESPACE = uuid.UUID("5b0c4b6e-8f61-4f57-9a4e-2f1f3c6d7a10")
_NAMESPACE_BYTES = ID_NAMESPACE.bytes


def derive_id(name: str) -> str:
    """`str(uuid.uuid5(ID_NAMESPACE, name))`, the same text, in a third of the time (no UUID object): ids
    derived on the event path, a few per event. Its unit test holds it to `uuid.uuid5`."""
    return uuid5_text(_NAMESPACE_BYTES, name)


ANY_ACTIVE = "*"  # source wildcard: every non-terminal state except the initial one
DEFAULT_STUCK_AFTER_S = 900.0  # seconds without progress (and no pending timer) before an instance is stuck
TIMER_GRACE_S = 120.0  # seconds a timer may be overdue before its instance is stuck (timers not firing)

Condition = Callable[["Step"], bool]
Action = Callable[["Step"], None]


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of a workflow's transition table."""

    trigger: str
    source: str | Sequence[str]
    dest: str | None  # None: an internal transition (the action runs, the state stays)
    conditions: Sequence[Condition] = ()
    action: Action | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with deterministic jitter; attempts count the first try."""

    max_attempts: int = 3
    base_s: float = 1.0
    cap_s: float = 60.0

    def delay_s(self, attempt: int, seed: str) -> float:
        """Seconds to wait before attempt `attempt + 1`: base·2^(attempt-1), capped, jittered ±20 %."""
        raw = min(self.cap_s, self.base_s * (2.0 ** min(max(0, attempt - 1), 62)))
        digest = hashlib.blake2b(f"{seed}/{attempt}".encode(), digest_size=2).digest()
        jitter = 0.8 + 0.4 * (int.from_bytes(digest, "big") / 65535)
        return min(self.cap_s, raw * jitter)


@dataclass(frozen=True)
class WorkflowDefinition:
    """Everything the engine needs to know about one version of one workflow."""

    name: str
    version: int
    states: type[StrEnum]
    initial: str
    terminal: frozenset[str]
    start_events: frozenset[str]
    transitions: tuple[Transition, ...]
    events: frozenset[str]  # external event names (without the `<workflow>.` prefix)
    commands: frozenset[str]  # command names published to sfworkflow.commands.<workflow>
    compensations: frozenset[str]  # command names published to sfworkflow.compensations.<workflow>
    internal_events: frozenset[str] = frozenset()  # triggers sfworkflow raises itself (timers, feedback)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Non-terminal states in which an instance waits for a person (an operator's decision), not for
    # the system: the demo counts them as settled; `stuck` reporting treats them on their own terms.
    waits_for_operator: frozenset[str] = frozenset()
    # When an instance counts as stuck, per state (seconds in the state with no pending timer; None:
    # never by age). States not named use DEFAULT_STUCK_AFTER_S. An instance with a pending timer is
    # stuck only once that timer is overdue by TIMER_GRACE_S (the timer, e.g. an SLA, is the deadline);
    # a state in waits_for_operator is stuck from the moment it is entered: a person must act.
    stuck_after_s: Mapping[str, float | None] = field(default_factory=dict)
    # Returns a reason when an event refers to the past (an older step or attempt): it is then
    # recorded as ignored instead of parked.
    stale: Callable[[Step], str | None] | None = None
    description: str = ""
    # Limits on outgoing commands (core/limits.py): a rate limit defers a command over it, a concurrency limit queues
    # it until a slot is free; neither drops one.
    limits: tuple[Limit, ...] = ()
    # Schedules it declares (core/schedules.py): upserted at start-up under the nil tenant; each publishes a tick for
    # SalesFlow's periodic job (kind tick) or an event (kind event) at every tick, once whatever the replicas.
    schedules: tuple[Schedule, ...] = ()

    def event_type(self, name: str) -> str:
        return f"{self.name}.{name}"


@dataclass(slots=True)
class EngineEvent:
    """One event as the engine sees it: external (from RabbitMQ) or internal (timer, feedback)."""

    event_id: str
    name: str  # trigger name, e.g. "step_sent" or "timer_step_due"
    data: Mapping[str, Any]
    timestamp: datetime
    correlation_id: str | None = None
    causation_id: str | None = None
    internal: bool = False
    trace: Trace | None = None  # None for internal events: they belong to the instance's trace


@dataclass(frozen=True, slots=True)
class InstanceKey:
    tenant_id: str
    workflow: str
    entity_id: str

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.workflow}/{self.entity_id}"


@dataclass(slots=True)
class InstanceView:
    """The persisted part of an instance the engine reads: state, context, transition count."""

    key: InstanceKey
    state: str
    context: dict[str, Any]
    version: int  # number of applied transitions so far
    definition_version: int
    correlation_id: str | None = None
    trace: Trace | None = None  # the trace of the event that started it (contract/tracing.py)


@dataclass(slots=True)
class OutgoingMessage:
    """A command, compensation or lifecycle event the decision asks to publish."""

    kind: str  # "command" | "compensation" | "lifecycle"
    message_id: str
    routing_key: str
    body: dict[str, Any]
    effect_key: str | None = None  # unique in PostgreSQL: a second request is suppressed
    trace: Trace | None = None  # the trace it belongs to: its envelope's trace_id, the headers it is published with


@dataclass(slots=True)
class TimerRequest:
    name: str
    due_at: datetime
    payload: dict[str, Any]


@dataclass(slots=True)
class Requests:
    """What a step asks the store to resolve in the same transaction, besides messages and timers.

    claims:   unique keys held by this instance (sfworkflow.claim); a key another instance holds
              comes back as internal event `claim_refused` {key, holder_entity_id, holder_workflow}.
    releases: keys this instance gives up.
    release_effects: effect keys of commands of this instance whose effect did not happen (a send
              that failed for good), so a later request for the same effect is not suppressed.
    lookups:  (name, key) read from sfworkflow.register; answered by internal event
              `lookup_result` {name, key, value} (value None when unset).
    remember: key -> value written to sfworkflow.register.

    Order of the answers: effects first (`effect_suppressed`), then claims (`claim_refused`), then
    lookups (`lookup_result`). So a lookup asked in the same step as claims is answered only once
    those claims are settled: if no `claim_refused` came before it, every claim of that step is held.
    Later events of the same instance in the same batch wait until these answers are in.
    """

    claims: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    release_effects: list[str] = field(default_factory=list)
    lookups: list[tuple[str, str]] = field(default_factory=list)
    remember: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.claims or self.releases or self.release_effects or self.lookups or self.remember)


class Step:
    """What an action sees and writes: the event, a copy of the context, and the decision so far."""

    __slots__ = (
        "_n",
        "cancel_all_timers",
        "context",
        "correlation_id",
        "definition",
        "event",
        "from_state",
        "key",
        "notes",
        "now",
        "outgoing",
        "requests",
        "seq",
        "timers_cancelled",
        "timers_set",
        "trace",
    )

    def __init__(
        self,
        definition: WorkflowDefinition,
        key: InstanceKey,
        event: EngineEvent,
        context: dict[str, Any],
        seq: int,
        now: datetime,
        correlation_id: str | None,
        from_state: str = "",
        trace: Trace | None = None,
    ) -> None:
        self.definition = definition
        self.from_state = from_state  # the state this transition leaves
        self.key = key
        self.event = event
        self.context = context
        self.seq = seq  # the version this transition will give the instance
        self.now = now
        self.correlation_id = correlation_id
        self.trace = trace  # what this step's messages carry: the event's trace, else the instance's
        self.outgoing: list[OutgoingMessage] = []
        self.timers_set: list[TimerRequest] = []
        self.timers_cancelled: list[str] = []
        self.cancel_all_timers = False
        self.notes: dict[str, Any] = {}
        self.requests = Requests()
        self._n = 0

    @property
    def data(self) -> Mapping[str, Any]:
        return self.event.data

    def _derive_id(self, what: str) -> str:
        self._n += 1
        return derive_id(f"{self.key}/{self.seq}/{self._n}/{what}")

    def command(
        self,
        name: str,
        data: dict[str, Any],
        *,
        idempotency_key: str,
        attempt: int = 1,
        effect_key: str | None = None,
        compensation: bool = False,
    ) -> None:
        """Ask for a command (or compensation command) to be published once this step commits."""
        command_type = f"{self.definition.name}.{name}"
        kind = "compensation" if compensation else "command"
        command_id = self._derive_id(command_type)
        self._emit(
            OutgoingMessage(
                kind=kind,
                message_id=command_id,
                routing_key=command_type,
                effect_key=effect_key,
                body={
                    "command_id": command_id,
                    "command_type": command_type,
                    "kind": kind,
                    "tenant_id": self.key.tenant_id,
                    "entity_id": self.key.entity_id,
                    "workflow": self.definition.name,
                    "causation_id": self.event.event_id,
                    "correlation_id": self.correlation_id,
                    "idempotency_key": idempotency_key,
                    "issued_at": self.now.isoformat(),
                    "attempt": attempt,
                    "data": data,
                },
            )
        )

    def compensate(self, name: str, data: dict[str, Any], *, idempotency_key: str) -> None:
        self.command(name, data, idempotency_key=idempotency_key, compensation=True)

    def lifecycle(self, event_type: str, state: str, data: dict[str, Any]) -> None:
        """Publish a `workflow.*` lifecycle event to sfworkflow.lifecycle."""
        event_id = self._derive_id(event_type)
        self._emit(
            OutgoingMessage(
                kind="lifecycle",
                message_id=event_id,
                routing_key=f"{event_type}.{self.definition.name}",
                body={
                    "event_id": event_id,
                    "event_type": event_type,
                    "spec_version": "1.0",
                    "tenant_id": self.key.tenant_id,
                    "entity_id": self.key.entity_id,
                    "workflow": self.definition.name,
                    "definition_version": self.definition.version,
                    "state": state,
                    "correlation_id": self.correlation_id,
                    "causation_id": self.event.event_id,
                    "timestamp": self.now.isoformat(),
                    "data": data,
                },
            )
        )

    def _emit(self, m: OutgoingMessage) -> None:
        """Queue a message, with the step's trace: `trace_id` in the envelope (only when there is one: the field is
        optional in v1) and the `traceparent` it is published with."""
        if self.trace is not None:
            m.body["trace_id"] = self.trace.trace_id
            m.trace = self.trace
        self.outgoing.append(m)

    def set_timer(self, name: str, due_at: datetime, payload: dict[str, Any] | None = None) -> None:
        """Schedule (or move) the instance's timer `name`; it fires trigger `timer_<name>`."""
        self.timers_set = [t for t in self.timers_set if t.name != name]
        self.timers_set.append(TimerRequest(name, due_at, payload or {}))

    def set_timer_in(self, name: str, seconds: float, payload: dict[str, Any] | None = None) -> None:
        self.set_timer(name, self.now + timedelta(seconds=seconds), payload)

    def cancel_timer(self, name: str) -> None:
        self.timers_set = [t for t in self.timers_set if t.name != name]
        self.timers_cancelled.append(name)

    def cancel_timers(self) -> None:
        self.timers_set = []
        self.cancel_all_timers = True

    def claim(self, key: str) -> None:
        """Hold `key` for this instance; if another instance holds it, `claim_refused` follows."""
        self.requests.claims.append(key)

    def release(self, key: str) -> None:
        self.requests.releases.append(key)

    def release_effect(self, effect_key: str) -> None:
        """The effect behind `effect_key` did not happen after all: free the key for a later request."""
        self.requests.release_effects.append(effect_key)

    def lookup(self, name: str, key: str) -> None:
        """Read register `key`; the answer arrives as internal event `lookup_result` {name, key, value}."""
        self.requests.lookups.append((name, key))

    def remember(self, key: str, value: Any) -> None:
        """Write register `key` (a value shared across instances, e.g. a tenant's last good eval)."""
        self.requests.remember[key] = value

    def note(self, **detail: Any) -> None:
        """Add facts to this transition's history entry."""
        self.notes.update(detail)
