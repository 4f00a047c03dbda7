"""Helpers for driving the `sequence` workflow through `Engine.step` in unit tests (no I/O), on enginekit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sfworkflow.core.definition import EngineEvent, InstanceKey
from sfworkflow.workflows.sequence import DEFINITION, S
from tests.unit import enginekit
from tests.unit.enginekit import T0, TENANT

SEQ = enginekit.workflow(DEFINITION)

ENTITY = "enrollment-42"
KEY = InstanceKey(TENANT, "sequence", ENTITY)
CORRELATION = "corr-enrollment-42"

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
    return enginekit.with_optional({"step": step, "provider_message_id": f"wamid.{step}"}, attempt=attempt)


def failed(
    step: int, code: str = "provider_timeout", retryable: bool = True, attempt: int | None = None
) -> dict[str, Any]:
    return enginekit.with_optional({"step": step, "error_code": code, "retryable": retryable}, attempt=attempt)


def suppressed() -> dict[str, Any]:
    return {"effect_key": "sequence.send_step:x", "command_type": "sequence.send_step", "command_id": "c-1"}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `sequence` instance (`KEY`) driven event by event."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION)


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
