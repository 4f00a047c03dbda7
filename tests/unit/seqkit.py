"""Helpers for driving the `sequence` workflow through `Engine.step` in unit tests (no I/O)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sfworkflow import schemas
from sfworkflow.definition import ID_NAMESPACE, EngineEvent, InstanceKey, InstanceView, OutgoingMessage
from sfworkflow.engine import Decision, Engine, Outcome
from sfworkflow.workflows import DEFINITIONS
from sfworkflow.workflows.sequence import S

ENGINE = Engine(DEFINITIONS)
SEQ = ENGINE.workflow("sequence")
assert SEQ is not None

TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
ENTITY = "enrollment-42"
KEY = InstanceKey(TENANT, "sequence", ENTITY)
CORRELATION = "corr-enrollment-42"
T0 = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)

EXTERNAL = (
    "enrolled",
    "step_sent",
    "step_failed",
    "replied",
    "unsubscribed",
    "paused",
    "resumed",
    "cancelled",
)
INTERNAL = ("timer_step_due", "timer_retry_due", "effect_suppressed")
TRIGGERS = EXTERNAL + INTERNAL

STEPS = [
    {"template_id": "tpl-welcome", "delay_seconds": 0},
    {"template_id": "tpl-follow-up-1", "delay_seconds": 86400},
    {"template_id": "tpl-follow-up-2", "delay_seconds": 259200},
]
RECIPIENT = {"channel": "whatsapp", "address": "+5511987654321"}


def enrolled_data(steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "sequence_id": "seq-onboarding-7",
        "lead_id": "lead-1093",
        "recipient": dict(RECIPIENT),
        "steps": [dict(s) for s in (STEPS if steps is None else steps)],
    }


def sent(step: int, attempt: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"step": step, "provider_message_id": f"wamid.{step}"}
    if attempt is not None:
        d["attempt"] = attempt
    return d


def failed(
    step: int, code: str = "provider_timeout", retryable: bool = True, attempt: int | None = None
) -> dict[str, Any]:
    d: dict[str, Any] = {"step": step, "error_code": code, "retryable": retryable}
    if attempt is not None:
        d["attempt"] = attempt
    return d


def suppressed() -> dict[str, Any]:
    return {"effect_key": "sequence.send_step:x", "command_type": "sequence.send_step", "command_id": "c-1"}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    data = data or {}
    event_id = str(uuid.uuid5(ID_NAMESPACE, f"test/{name}/{sorted(data.items())!r}/{at.isoformat()}"))
    return EngineEvent(event_id, name, data, at, correlation_id=CORRELATION, internal=name in INTERNAL)


class Run:
    """One instance driven event by event; `view` is None until the start event is applied."""

    def __init__(self) -> None:
        self.view: InstanceView | None = None
        self.now = T0

    @property
    def ctx(self) -> dict[str, Any]:
        return self.view.context if self.view else {}

    @property
    def state(self) -> str:
        return self.view.state if self.view else ""

    def step(
        self, name: str, data: dict[str, Any] | None = None, *, now: datetime | None = None, at: datetime | None = None
    ) -> Decision:
        if now is not None:
            self.now = now
        d = ENGINE.step(SEQ, KEY, self.view, event(name, data, at or self.now), self.now)
        if d.outcome is Outcome.APPLIED:
            corr = self.view.correlation_id if self.view else CORRELATION
            self.view = InstanceView(KEY, d.to_state, d.context, d.version, 1, corr)
        return d

    def do(self, name: str, data: dict[str, Any] | None = None, **kw: Any) -> Decision:
        d = self.step(name, data, **kw)
        assert d.outcome is Outcome.APPLIED, (name, d.outcome, d.reason)
        return d


# ---- runs in each state, built by driving the engine from `enrolled` ---------------------------
def in_new() -> Run:
    return Run()


def in_waiting(steps: list[dict[str, Any]] | None = None) -> Run:
    r = Run()
    r.do("enrolled", enrolled_data(steps))
    return r


def in_sending(steps: list[dict[str, Any]] | None = None) -> Run:
    r = in_waiting(steps)
    r.do("timer_step_due")
    return r


def in_retry_wait(steps: list[dict[str, Any]] | None = None) -> Run:
    r = in_sending(steps)
    r.do("step_failed", failed(0, attempt=1))
    return r


def in_paused(paused_from: str = S.WAITING) -> Run:
    r = {S.WAITING: in_waiting, S.SENDING: in_sending, S.RETRY_WAIT: in_retry_wait}[paused_from]()
    r.do("paused", {"reason": "call next month"})
    return r


def in_completed() -> Run:
    r = in_sending(STEPS[:1])
    r.do("step_sent", sent(0, 1))
    return r


def in_stopped() -> Run:
    r = in_waiting()
    r.do("replied", {"channel": "whatsapp"})
    return r


def in_cancelled() -> Run:
    r = in_waiting()
    r.do("cancelled", {"reason": "lead converted"})
    return r


def in_compensated() -> Run:
    r = in_sending()
    r.do("step_failed", failed(0, "template_rejected", retryable=False, attempt=1))
    return r


BUILDERS = {
    S.NEW: in_new,
    S.WAITING: in_waiting,
    S.SENDING: in_sending,
    S.RETRY_WAIT: in_retry_wait,
    S.PAUSED: in_paused,
    S.COMPLETED: in_completed,
    S.STOPPED: in_stopped,
    S.CANCELLED: in_cancelled,
    S.COMPENSATED: in_compensated,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    """Data for `name` that refers to the run's current step and attempt."""
    cursor = run.ctx.get("cursor", 0)
    attempt = max(run.ctx.get("attempt", 0), 1)
    return {
        "enrolled": enrolled_data(),
        "step_sent": sent(cursor, attempt),
        "step_failed": failed(cursor, attempt=attempt),
        "replied": {"channel": "whatsapp"},
        "unsubscribed": {"channel": "email", "reason": "clicked unsubscribe"},
        "paused": {"reason": "on holiday"},
        "resumed": {"requested_by": "user-1"},
        "cancelled": {"reason": "lead converted"},
        "timer_step_due": {},
        "timer_retry_due": {},
        "effect_suppressed": suppressed(),
    }[name]


# ---- schema checks ---------------------------------------------------------------------------
def schema_errors(m: OutgoingMessage) -> list[str]:
    """Why an outgoing message fails its envelope or data schema (empty when valid)."""
    s = schemas.default()
    if m.kind in ("command", "compensation"):
        return s.errors("envelope", "command", m.body) + s.errors("commands", m.routing_key, m.body["data"])
    assert m.kind == "lifecycle", m.kind
    data_errors = s.errors("lifecycle", m.body["event_type"], m.body["data"])
    return s.errors("envelope", "lifecycle", m.body) + data_errors


def by_kind(d: Decision, kind: str) -> list[OutgoingMessage]:
    return [m for m in d.outgoing if m.kind == kind]


def lifecycle_types(d: Decision) -> list[str]:
    return [m.body["event_type"] for m in by_kind(d, "lifecycle")]
