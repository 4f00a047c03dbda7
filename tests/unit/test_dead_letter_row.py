"""`dead_letter_row`: the outbox row that sends a rejected message to sfworkflow.dead."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from sfworkflow.core.batch import OutboxRow, dead_letter_row
from sfworkflow.errors import DeadReason

BODY = b'{"event_type": "sequence.exploded", "x": "\xc3\xa9"}'
HEADERS = {"x-trace": "abc", "x-retry": 3}


def row(
    body: bytes = BODY,
    headers: dict | None = None,
    reason: DeadReason = DeadReason.SCHEMA_VIOLATION,
    detail: str = "envelope: <root>: 'tenant_id' is a required property",
    seed: str = "tenant/event-1",
    **kw: object,
) -> OutboxRow:
    return dead_letter_row(
        body, dict(HEADERS) if headers is None else headers, reason, detail, message_id_seed=seed, **kw
    )


def test_row_targets_the_dead_letter_queue_through_the_default_exchange() -> None:
    r = row()
    message_id, kind, exchange, routing_key, instance_id, body, mandatory = (
        r.message_id, r.kind, r.exchange, r.routing_key, r.instance_id, r.body, r.mandatory
    )  # fmt: skip
    assert uuid.UUID(message_id)
    assert (kind, exchange, routing_key) == ("dead_letter", "", "sfworkflow.dead")
    assert (instance_id, mandatory) == (None, True)
    assert body is BODY or body == BODY


@pytest.mark.parametrize("reason", list(DeadReason))
def test_headers_carry_reason_and_detail(reason: DeadReason) -> None:
    headers = row(reason=reason, detail=f"because {reason}").headers
    assert headers["x-sfworkflow-reason"] == reason.value
    assert type(headers["x-sfworkflow-reason"]) is str
    assert headers["x-sfworkflow-detail"] == f"because {reason}"


def test_original_headers_are_kept_and_not_mutated() -> None:
    original = {"x-trace": "abc", "x-retry": 3}
    headers = row(
        headers=original, routing_key="sequence.exploded", exchange="sfworkflow.events", content_type="application/json"
    ).headers
    assert original == {"x-trace": "abc", "x-retry": 3}
    assert headers["x-trace"] == "abc" and headers["x-retry"] == 3
    assert headers["x-sfworkflow-original-routing-key"] == "sequence.exploded"
    assert headers["x-sfworkflow-original-exchange"] == "sfworkflow.events"
    assert headers["x-sfworkflow-original-content-type"] == "application/json"
    assert datetime.fromisoformat(headers["x-sfworkflow-dead-lettered-at"]).tzinfo is not None


def test_no_content_type_header_without_content_type() -> None:
    assert "x-sfworkflow-original-content-type" not in row().headers


def test_long_detail_is_truncated() -> None:
    assert len(row(detail="x" * 5000).headers["x-sfworkflow-detail"]) == 1000


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"x" * 300_000, BODY])
def test_body_is_passed_through_unchanged(body: bytes) -> None:
    assert row(body=body).body == body


def test_message_id_is_deterministic() -> None:
    assert row().message_id == row().message_id
    assert row(headers={}).message_id == row().message_id  # headers and detail do not change the id
    assert row(detail="other").message_id == row().message_id


@pytest.mark.parametrize(
    "changes",
    [{"seed": "tenant/event-2"}, {"body": BODY + b" "}, {"reason": DeadReason.INVALID_JSON}],
    ids=["seed", "body", "reason"],
)
def test_message_id_changes_with_seed_body_and_reason(changes: dict) -> None:
    assert row(**changes).message_id != row().message_id


def test_a_redrive_keeps_the_tenant_header_and_drops_sfworkflows_others() -> None:
    """The tenant header picks the event's shard (fair admission): a redriven event keeps it."""
    from sfworkflow.contract.headers import PREFIX, REASON, TENANT
    from sfworkflow.ops.dead_letters import DeadLetter

    headers = {TENANT: "t-1", REASON: "schema_violation", PREFIX + "detail": "x", "app": "crm"}
    redriven = DeadLetter("m-1", b"{}", headers, None, 0, None).redrive_headers()  # type: ignore[arg-type]
    assert redriven == {TENANT: "t-1", "app": "crm", PREFIX + "redrives": 1}
