"""The worker SDK's pure parts: answers built from a command, failures mapped by the policy, handlers declared."""

from __future__ import annotations

from typing import Any

import pytest

from sfworkflow.client.producer import validate_event
from sfworkflow.client.worker import Command, CommandWorker, FailurePolicy, Fatal, MemoryDedupe, Retryable
from sfworkflow.contract import schemas

TENANT = "9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59"


def send_step(attempt: int = 2, **extra: Any) -> Command:
    envelope = {
        "command_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "command_type": "sequence.send_step",
        "tenant_id": TENANT, "entity_id": "enrollment-42", "workflow": "sequence",
        "causation_id": "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00", "correlation_id": "corr-42",
        "idempotency_key": f"{TENANT}:enrollment-42:sequence.send_step:0", "issued_at": "2026-11-26T08:00:00Z",
        "attempt": attempt, "kind": "command",
        "data": {"step": 3, "template_id": "tpl", "recipient": {"channel": "email", "address": "a@example.com"},
                 "sequence_id": "seq", "lead_id": "lead"},
        **extra,
    }  # fmt: skip
    return Command(envelope, "salesflow.messaging", schemas.default())


def test_an_answer_carries_the_command_s_tenant_entity_causation_correlation_and_attempt() -> None:
    cmd = send_step(attempt=2)
    a = cmd.answer("sequence.step_sent", {"step": 3, "provider_message_id": "p-1"})
    validate_event(a)
    assert (a["tenant_id"], a["entity_id"], a["causation_id"], a["correlation_id"]) == (
        TENANT, "enrollment-42", cmd.command_id, "corr-42",
    )  # fmt: skip
    assert a["data"]["attempt"] == 2  # step_sent has an `attempt` field: echoed
    assert (a["source"], a["actor_type"]) == ("salesflow.messaging", "worker")


def test_an_answer_built_again_has_the_same_event_id_and_a_second_answer_another() -> None:
    """A command executed twice (its worker died mid-handler) answers with the same event id: applied once."""
    first = send_step().answer("sequence.step_sent", {"step": 3, "provider_message_id": "p-1"})
    again = send_step().answer("sequence.step_sent", {"step": 3, "provider_message_id": "p-2"})
    other = send_step().answer("sequence.step_sent", {"step": 3, "provider_message_id": "p-1"}, n=1)
    assert first["event_id"] == again["event_id"] != other["event_id"]


def test_a_failure_event_takes_the_fields_it_shares_with_the_command() -> None:
    f = send_step(attempt=1).failure("sequence.step_failed", "template_rejected", False, "rejected by the provider")
    validate_event(f)
    assert f["data"] == {
        "step": 3, "error_code": "template_rejected", "retryable": False, "message": "rejected by the provider",
        "attempt": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Fatal("consent_missing", "no consent"), ("consent_missing", False, "no consent")),
        (Retryable("rate_limited"), ("rate_limited", True, "")),
        (TimeoutError("slow"), ("worker_error", True, "TimeoutError: slow")),
        (KeyError("x"), ("worker_error", True, "KeyError: 'x'")),
    ],
)
def test_the_default_policy_retries_what_it_cannot_classify(exc: BaseException, expected: tuple[Any, ...]) -> None:
    assert FailurePolicy().classify(exc) == expected


def test_a_policy_declares_fatal_exceptions() -> None:
    policy = FailurePolicy(fatal=(ValueError,), otherwise_retryable=False)
    assert policy.classify(ValueError("bad address"))[1] is False
    assert policy.classify(ConnectionError("reset"))[1] is True
    assert policy.classify(KeyError("x"))[1] is False


def test_a_handler_is_declared_for_a_known_command_type_and_failure_event() -> None:
    worker = CommandWorker("amqp://unused", store=MemoryDedupe(), source="tests")

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def handle(cmd: Command) -> None:
        return None

    assert worker.handlers["sequence.send_step"].failure == "sequence.step_failed"
    with pytest.raises(ValueError, match="has a handler already"):
        worker.handler("sequence.send_step")
    with pytest.raises(ValueError, match=r"unknown command type 'sequence\.send_stpe'"):
        worker.handler("sequence.send_stpe")
    with pytest.raises(ValueError, match=r"unknown failure event 'sequence\.step_fail'"):
        worker.handler("sequence.raise_alert", failure="sequence.step_fail")


async def test_the_memory_store_keeps_the_dedupe_rules() -> None:
    store = MemoryDedupe()
    assert (await store.claim("c1", "t", 60, "w1")).claimed
    held = await store.claim("c1", "t", 60, "w2")
    assert not held.claimed and held.answers is None and held.held_s > 0
    assert (await store.claim("c1", "t", 60, "w1")).claimed  # its own claim: handling failed midway
    assert await store.record("c1", [{"a": 1}]) == [{"a": 1}]
    assert await store.record("c1", [{"a": 2}]) == [{"a": 1}]  # the first recorded win
    assert (await store.claim("c1", "t", 60, "w2")).answers == [{"a": 1}]
    assert (await store.claim("c2", "t", 60, "w1")).claimed
    await store.release("c2")
    assert (await store.claim("c2", "t", 60, "w2")).claimed
    assert (await store.claim("c3", "t", 0, "w1")).claimed
    assert (await store.claim("c3", "t", 60, "w2")).claimed  # a lapsed lease: its worker died
