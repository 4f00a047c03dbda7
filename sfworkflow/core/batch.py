"""The values a batch plan reads, asks for and writes: typed, without I/O.

A batch plan (core/plan.py) starts from deliveries or due timers, asks the database questions as *requests*
(each answered by the repository, db/repository.py, with one statement or two) and ends with a *write set*:
every row the transaction writes, as dataclasses. Nothing here touches PostgreSQL or RabbitMQ.

    request           the repository answers with
    InsertInbox       set of (tenant_id, event_id) inserted now (the others were seen before: duplicates)
    LockInstances     the instance rows, created when missing, locked in key order (Row; `parked_for_key`: a
                      row created now whose key has events parked before it existed)
    LoadParked        the parked rows of those instances (Row)
    ClaimEffects      set of effect keys claimed now (the others were claimed before: suppressed)
    ClaimKeys         ClaimAnswer: keys taken now, and who holds the others
    ReadRegisters     dict of register key -> stored value
    TakeRates         RateAnswer: each bucket's theoretical arrival time after the reservations, the rate it
                      was taken at (a tenant's override wins) and the transaction's now() (core/limits.py turns
                      them into slots)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sfworkflow.contract import headers as wire
from sfworkflow.contract.envelope import IncomingEvent
from sfworkflow.contract.storable import clean_json, clean_text, replaced_note
from sfworkflow.contract.topology import DEAD_QUEUE, DEFAULT_EXCHANGE
from sfworkflow.core.definition import InstanceKey, derive_id
from sfworkflow.core.limits import DayCount, Rate
from sfworkflow.errors import DeadReason, Rejection


class Row(Protocol):
    """A row as the repository returns it (an asyncpg Record, or a dict in tests): read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


# ---- what comes in ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Delivery:
    """One message as it came from RabbitMQ, with what the parser made of it."""

    parsed: IncomingEvent | Rejection
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""
    exchange: str = ""
    content_type: str | None = None
    message_id: str | None = None
    replaced_in_headers: int = 0  # NUL/surrogate characters the consumer replaced in `headers` (storable.py)


# ---- what the plan asks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InsertInbox:
    """Record these events as received (dedupe on tenant_id, event_id); sorted, so concurrent batches take
    the inbox's index locks in one order."""

    events: list[IncomingEvent]


@dataclass(frozen=True, slots=True)
class NewInstance:
    key: InstanceKey
    definition_version: int
    initial_state: str
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class LockInstances:
    """Insert every key (a start event's instance or a placeholder), sorted by key, then lock every row."""

    instances: list[NewInstance]


@dataclass(frozen=True, slots=True)
class LoadParked:
    keys: list[InstanceKey]


@dataclass(frozen=True, slots=True)
class EffectClaim:
    effect_key: str
    tenant_id: str
    instance_id: int | None
    command_id: str
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class ClaimEffects:
    """Insert these effect keys (sorted); the answer says which were claimed now."""

    claims: list[EffectClaim]


@dataclass(frozen=True, slots=True)
class KeyRelease:
    """A claim or effect key an instance gives up."""

    key: str
    instance_id: int | None


@dataclass(frozen=True, slots=True)
class KeyClaim:
    key: str
    instance: InstanceKey
    instance_id: int | None


@dataclass(frozen=True, slots=True)
class ClaimKeys:
    """Delete `releases` first (a key may pass from one instance to another), then insert `claims` (sorted)."""

    releases: list[KeyRelease]
    claims: list[KeyClaim]


@dataclass(frozen=True, slots=True)
class Holder:
    instance_id: int | None
    workflow: str
    entity_id: str


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    taken: set[str]  # inserted now
    holders: dict[str, Holder]  # for the keys not taken: who holds them (absent: released, not committed yet)


@dataclass(frozen=True, slots=True)
class ReadRegisters:
    keys: list[str]


@dataclass(frozen=True, slots=True)
class RateTake:
    """`n` reservations from one rate-limit bucket (core/limits.py) at `rate`, unless the tenant has its own."""

    bucket_key: str
    tenant_id: str
    limit_name: str
    n: int
    rate: Rate


@dataclass(frozen=True, slots=True)
class TakeRates:
    """Move each bucket's theoretical arrival time on by its reservations (sorted by key: the lock order)."""

    takes: list[RateTake]


@dataclass(frozen=True, slots=True)
class RateAnswer:
    tat: dict[str, datetime]  # bucket key -> its theoretical arrival time after this batch's reservations
    rates: dict[str, Rate]  # bucket key -> the rate it was taken at (the tenant's override, or the one asked)
    now: datetime  # the transaction's clock, which the buckets run on
    counts: dict[str, DayCount] = field(default_factory=dict)  # capped bucket key -> its daily count before


Request = InsertInbox | LockInstances | LoadParked | ClaimEffects | ClaimKeys | ReadRegisters | TakeRates


# ---- what the plan writes --------------------------------------------------------------------------


@dataclass(slots=True)
class InstanceUpdate:
    instance_id: int
    state: str
    context: dict[str, Any]
    version: int
    terminal: bool
    parked_count: int
    last_event_id: str | None
    last_event_type: str | None
    definition_version: int  # changes only when an operator migrates the instance (ops/versions.py)
    restart_clock: bool = False  # the state's stuck clock starts again (an operator acted on it: replay)
    trace_id: str | None = None  # the instance's trace; stored only where the row has none yet
    traceparent: str | None = None
    tracestate: str | None = None
    deferred_until: datetime | None = None  # the latest slot its messages now wait for (kept when later)


@dataclass(slots=True)
class HistoryEntry:
    instance_id: int | None
    seq: int  # the instance version the entry belongs to
    event_id: str | None
    event_type: str
    outcome: str  # applied, ignored, suppressed, failed; replayed, migrated (operator actions)
    from_state: str
    to_state: str
    detail: dict[str, Any] | None
    trace_id: str | None = None  # the trace of what caused the entry
    body: bytes | None = None  # an external event applied: its body as it came (replays: core/replay.py)


@dataclass(frozen=True, slots=True)
class TimerSet:
    instance_id: int
    name: str
    due_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TimerCancel:
    instance_id: int
    name: str


@dataclass(frozen=True, slots=True)
class ParkedInsert:
    event: IncomingEvent
    body: bytes
    headers: dict[str, Any]
    reason: str
    deadline: datetime
    awaiting_version: int | None


@dataclass(frozen=True, slots=True)
class ParkedCountRaise:
    """Events parked for a replica with the instance's definition version: the instance's count goes up."""

    instance_id: int
    added: int


@dataclass(frozen=True, slots=True)
class RegisterWrite:
    key: str
    value: Any
    tenant_id: str
    instance_id: int | None


OUTBOX_KINDS = ("command", "compensation", "lifecycle", "dead_letter", "schedule")  # what an outbox row carries


@dataclass(frozen=True, slots=True)
class OutboxRow:
    message_id: str
    kind: str  # one of OUTBOX_KINDS
    exchange: str
    routing_key: str
    instance_id: int | None
    body: bytes
    headers: dict[str, Any]
    mandatory: bool  # unroutable is an error (everything but lifecycle events)
    deferred_until: datetime | None = None  # a rate limit's slot: the row is not published before it
    deferred_by: str | None = None  # the limit that deferred it (core/limits.py: limit_name)
    gate_key: str | None = None  # queued for a slot of this concurrency key: not published before one is granted
    gate_timers: list[GateTimer] | None = None  # the issuing step's timers that start when the slot is granted
    # Its instance's workflow has concurrency limits: it waits (never due) while an earlier message of its instance
    # waits for a slot, in this batch (behind_gate) or an earlier one (found by write_batch), and falls due with it.
    behind_gate: bool = False
    check_gate: bool = False


@dataclass(frozen=True, slots=True)
class GateTimer:
    """A timer set with a command a concurrency limit queues: set `delay_s` after the slot is granted."""

    name: str
    delay_s: float
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SlotRelease:
    """An instance of a workflow with concurrency limits, as the batch leaves it: the slots it holds in states it is
    no longer in (or every slot, when it ended) are released."""

    instance_id: int
    state: str
    terminal: bool
    reissued: tuple[str, ...] = ()  # limits it issued a new command under: the slot it held for the last one goes


@dataclass(frozen=True, slots=True)
class BucketWrite:
    """A capped rate-limit bucket after the batch booked its slots (core/limits.py reserve)."""

    bucket_key: str
    tat: datetime
    count: DayCount


@dataclass(slots=True)
class WriteSet:
    """Every row one batch writes, in the order the repository writes them."""

    instances: list[InstanceUpdate] = field(default_factory=list)
    unstarted: list[int] = field(default_factory=list)  # placeholders no start event used: deleted
    history: list[HistoryEntry] = field(default_factory=list)
    cancel_all_timers: list[int] = field(default_factory=list)  # instance ids
    cancel_timers: list[TimerCancel] = field(default_factory=list)
    timers: list[TimerSet] = field(default_factory=list)
    parked: list[ParkedInsert] = field(default_factory=list)
    parked_counts: list[ParkedCountRaise] = field(default_factory=list)
    parked_seen: list[int] = field(default_factory=list)  # awaiting a version, now seen by a replica with it
    parked_done: list[int] = field(default_factory=list)  # applied or dead-lettered: deleted
    claim_releases: list[KeyRelease] = field(default_factory=list)
    effect_releases: list[KeyRelease] = field(default_factory=list)
    registers: list[RegisterWrite] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    slot_releases: list[SlotRelease] = field(default_factory=list)
    buckets: list[BucketWrite] = field(default_factory=list)  # capped rate-limit buckets booked (locked: take_rates)


@dataclass
class BatchReport:
    """What a batch did, for metrics and logs. Keys are (workflow, outcome) etc.; never tenant ids."""

    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workflow, outcome)
    transitions: Counter[str] = field(default_factory=Counter)  # workflow
    queued: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workflow, kind)
    suppressed: Counter[str] = field(default_factory=Counter)  # workflow
    dead: Counter[str] = field(default_factory=Counter)  # reason
    unparked: Counter[str] = field(default_factory=Counter)  # workflow
    timers_fired: int = 0
    timer_failures: int = 0  # timers put back because firing them failed
    outbox_rows: int = 0
    deferred: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (workflow, command, limit)
    deferral_s: list[tuple[str, str, float]] = field(default_factory=list)  # (workflow, limit, seconds deferred)
    capped: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (workflow, command, limit): to a later day
    gated: Counter[tuple[str, str, str]] = field(
        default_factory=Counter
    )  # (workflow, command, limit): queued for a slot
    # Envelope timestamps of the events applied for the first time (not duplicates, not redriven dead letters):
    # the lag histogram observes these, so a retry or a redrive of an old event is not counted as lag.
    first_seen: list[datetime] = field(default_factory=list)

    def merge(self, other: BatchReport) -> None:
        self.events.update(other.events)
        self.transitions.update(other.transitions)
        self.queued.update(other.queued)
        self.suppressed.update(other.suppressed)
        self.dead.update(other.dead)
        self.unparked.update(other.unparked)
        self.timers_fired += other.timers_fired
        self.timer_failures += other.timer_failures
        self.outbox_rows += other.outbox_rows
        self.deferred.update(other.deferred)
        self.deferral_s += other.deferral_s
        self.gated.update(other.gated)
        self.first_seen += other.first_seen


def dead_letter_row(
    body: bytes,
    headers: dict[str, Any],
    reason: DeadReason,
    detail: str,
    *,
    message_id_seed: str,
    routing_key: str = "",
    exchange: str = "",
    content_type: str | None = None,
    original_message_id: str | None = None,
    replaced_in_headers: int = 0,
) -> OutboxRow:
    """An outbox row that publishes the original body to sfworkflow.dead with the reason headers.

    Every text that lands in the row's jsonb headers is made storable first (NUL and unpaired
    surrogates become U+FFFD, see contract/storable.py) and the detail says what was replaced where, so one
    message can never make its own dead letter unwritable. `replaced_in_headers`: characters the
    consumer already replaced in the original headers when it received them."""
    h, in_headers = clean_json(headers)  # a new dict: the caller's headers are not touched
    detail, in_detail = clean_text(detail[:1000])
    routing_key, in_routing_key = clean_text(routing_key)
    exchange, in_exchange = clean_text(exchange)
    counts = {
        "header names and values": in_headers + replaced_in_headers,
        "routing key": in_routing_key,
        "exchange": in_exchange,
        "detail": in_detail,
    }
    if content_type:
        content_type, counts["content type"] = clean_text(content_type)
    if original_message_id:
        original_message_id, counts["message id"] = clean_text(original_message_id[:255])
    h.update(
        wire.dead_letter_headers(
            str(reason), detail + replaced_note(counts), routing_key=routing_key, exchange=exchange,
            content_type=content_type, message_id=original_message_id,
        )
    )  # fmt: skip
    digest = hashlib.sha256(body).hexdigest()
    message_id = derive_id(f"dead/{reason}/{message_id_seed}/{digest}")
    return OutboxRow(message_id, "dead_letter", DEFAULT_EXCHANGE, DEAD_QUEUE, None, body, h, True)
