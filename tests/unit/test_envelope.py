"""`EventParser.parse`: every rejection reason, and what a valid event parses into."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from sfworkflow.contract import schemas
from sfworkflow.contract.envelope import EventParser, IncomingEvent
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.workflows import DEFINITIONS

MAX = 256 * 1024
KNOWN = {d.event_type(e) for d in DEFINITIONS for e in d.events}
PARSER = EventParser(schemas.default(), KNOWN, MAX)

TENANT = "9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59"
EVENT_ID = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
ENROLLED = {
    "sequence_id": "seq-onboarding-7",
    "lead_id": "lead-1093",
    "recipient": {"channel": "whatsapp", "address": "+5511987654321"},
    "steps": [{"template_id": "tpl-welcome", "delay_seconds": 0}],
}


def envelope(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_type": "sequence.enrolled",
        "spec_version": "1.0",
        "schema_version": 1,
        "tenant_id": TENANT,
        "entity_id": "enrollment-42",
        "correlation_id": "corr-42",
        "causation_id": None,
        "source": "crm-api",
        "actor_type": "user",
        "timestamp": "2026-11-26T08:00:00Z",
        "trace_id": None,
        "data": copy.deepcopy(ENROLLED),
    }
    for k, v in changes.items():
        if v is ...:
            del doc[k]
        else:
            doc[k] = v
    return doc


def body(**changes: Any) -> bytes:
    return orjson.dumps(envelope(**changes))


def rejected(b: bytes, content_type: str | None = None) -> Rejection:
    r = PARSER.parse(b, content_type)
    assert isinstance(r, Rejection), r
    assert isinstance(r.detail, str) and len(r.detail.strip()) > 10
    return r


def test_known_event_types_are_each_workflows_events() -> None:
    assert "sequence.enrolled" in KNOWN and "sequence.step_sent" in KNOWN
    assert {t.partition(".")[0] for t in KNOWN} == {d.name for d in DEFINITIONS}


# ---- rejections ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [MAX + 1, MAX * 4])
def test_too_large(size: int) -> None:
    r = rejected(b" " * size)
    assert r.reason is DeadReason.TOO_LARGE
    assert str(size) in r.detail and str(MAX) in r.detail


def test_a_body_of_exactly_max_bytes_is_not_too_large() -> None:
    b = body()
    padded = b[:-1] + b" " * (MAX - len(b)) + b"}"
    assert len(padded) == MAX
    assert isinstance(PARSER.parse(padded), IncomingEvent)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/octet-stream", "text/html"])
def test_unsupported_content_type(content_type: str) -> None:
    r = rejected(body(), content_type)
    assert r.reason is DeadReason.UNSUPPORTED_CONTENT_TYPE
    assert content_type in r.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage",
        b"{",
        b"",
        b"\xff\xfe",
        b'{"a": "\xff"}',
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"{'single': 'quotes'}",
        b"NaN",
    ],
    ids=[
        "garbage",
        "truncated",
        "empty",
        "bad-utf8",
        "bad-utf8-in-string",
        "deep-list",
        "deep-object",
        "single-quotes",
        "nan",
    ],
)
def test_invalid_json(raw: bytes) -> None:
    assert rejected(raw).reason is DeadReason.INVALID_JSON


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b"42", b"-1.5", b'"a string"', b"true", b"null"])
def test_not_an_object(raw: bytes) -> None:
    r = rejected(raw)
    assert r.reason is DeadReason.NOT_AN_OBJECT
    assert "not an object" in r.detail


SCHEMA_VIOLATIONS = {
    "missing-tenant": {"tenant_id": ...},
    "missing-data": {"data": ...},
    "missing-timestamp": {"timestamp": ...},
    "extra-field": {"priority": "high"},
    "bad-event-uuid": {"event_id": "not-a-uuid"},
    "bad-tenant-uuid": {"tenant_id": "3f6e5d0e-3a52-4a8f-8d7e"},
    "entity-with-slash": {"entity_id": "enrollment/42"},
    "entity-with-space": {"entity_id": "enrollment 42"},
    "empty-entity": {"entity_id": ""},
    "timestamp-without-tz": {"timestamp": "2026-11-26T08:00:00"},
    "timestamp-date-only": {"timestamp": "2026-11-26"},
    "timestamp-impossible-day": {"timestamp": "2026-02-30T08:00:00Z"},
    "spec-version": {"spec_version": "2.0"},
    "schema-version-zero": {"schema_version": 0},
    "schema-version-string": {"schema_version": "1"},
    "event-type-no-dot": {"event_type": "enrolled"},
    "event-type-upper": {"event_type": "Sequence.Enrolled"},
    "bad-actor": {"actor_type": "robot"},
    "data-not-object": {"data": [1]},
    "steps-empty": {"data": {**ENROLLED, "steps": []}},
    "unknown-channel": {"data": {**ENROLLED, "recipient": {"channel": "pigeon", "address": "x"}}},
    "negative-delay": {"data": {**ENROLLED, "steps": [{"template_id": "t", "delay_seconds": -1}]}},
    "data-extra-field": {"data": {**ENROLLED, "colour": "blue"}},
    "data-missing-lead": {"data": {k: v for k, v in ENROLLED.items() if k != "lead_id"}},
    "step-sent-without-step": {"event_type": "sequence.step_sent", "data": {"provider_message_id": "x"}},
    "step-failed-bad-code": {
        "event_type": "sequence.step_failed",
        "data": {"step": 0, "error_code": "Bad Code", "retryable": True},
    },
}


@pytest.mark.parametrize("changes", SCHEMA_VIOLATIONS.values(), ids=SCHEMA_VIOLATIONS.keys())
def test_schema_violation(changes: dict[str, Any]) -> None:
    r = rejected(body(**changes))
    assert r.reason is DeadReason.SCHEMA_VIOLATION
    assert r.detail.startswith(("envelope: ", "data of sequence."))


def test_schema_violation_detail_names_the_field() -> None:
    assert "tenant_id" in rejected(body(tenant_id=...)).detail
    assert "steps" in rejected(body(data={**ENROLLED, "steps": []})).detail


@pytest.mark.parametrize("event_type", ["sequence.exploded", "billing.paid", "sequence.send_step"])
def test_unknown_event_type(event_type: str) -> None:
    r = rejected(body(event_type=event_type))
    assert r.reason is DeadReason.UNKNOWN_EVENT_TYPE
    assert event_type in r.detail


@pytest.mark.parametrize("version", [2, 99])
def test_unsupported_schema_version(version: int) -> None:
    r = rejected(body(schema_version=version))
    assert r.reason is DeadReason.UNSUPPORTED_SCHEMA_VERSION
    assert f"version {version}" in r.detail and "[1]" in r.detail


# ---- valid events --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "text/json",
        "application/cloudevents+json",
    ],
)
def test_valid_event_parses(content_type: str | None) -> None:
    e = PARSER.parse(body(event_id=EVENT_ID.upper(), tenant_id=TENANT.upper()), content_type)
    assert isinstance(e, IncomingEvent), e
    assert (e.event_id, e.tenant_id) == (EVENT_ID, TENANT)
    assert (e.event_type, e.workflow, e.name) == ("sequence.enrolled", "sequence", "enrolled")
    assert (e.entity_id, e.correlation_id, e.causation_id) == ("enrollment-42", "corr-42", None)
    assert e.schema_version == 1
    assert e.timestamp == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    assert e.data == ENROLLED


def test_entity_id_keeps_its_case() -> None:
    e = PARSER.parse(body(entity_id="Enrollment-ABC"))
    assert isinstance(e, IncomingEvent) and e.entity_id == "Enrollment-ABC"


def test_optional_envelope_fields_may_be_absent() -> None:
    e = PARSER.parse(body(correlation_id=..., causation_id=..., actor_type=..., trace_id=...))
    assert isinstance(e, IncomingEvent)
    assert e.correlation_id is None and e.causation_id is None


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (
            "2026-11-26T08:00:01.250-03:00",
            datetime(2026, 11, 26, 8, 0, 1, 250000, tzinfo=timezone(timedelta(hours=-3))),
        ),
        ("2026-11-26T08:00:00+00:00", datetime(2026, 11, 26, 8, 0, tzinfo=UTC)),
        ("2026-11-26t08:00:00Z", datetime(2026, 11, 26, 8, 0, tzinfo=UTC)),
        ("2026-11-26T08:00:00z", datetime(2026, 11, 26, 8, 0, tzinfo=UTC)),
    ],
)
def test_rfc3339_timestamps_parse(ts: str, expected: datetime) -> None:
    e = PARSER.parse(body(timestamp=ts))
    assert isinstance(e, IncomingEvent), e
    assert e.timestamp == expected and e.timestamp.tzinfo is not None


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("sequence.step_sent", {"step": 0, "provider_message_id": None}),
        (
            "sequence.step_failed",
            {"step": 1, "error_code": "provider_timeout", "retryable": True, "attempt": 2},
        ),
        ("sequence.replied", {}),
        ("sequence.unsubscribed", {"channel": "email"}),
        ("sequence.paused", {"reason": "x"}),
        ("sequence.resumed", {}),
        ("sequence.cancelled", {}),
    ],
)
def test_every_known_event_type_parses(event_type: str, data: dict[str, Any]) -> None:
    e = PARSER.parse(body(event_type=event_type, data=data))
    assert isinstance(e, IncomingEvent), e
    assert e.name == event_type.split(".", 1)[1] and e.data == data


def test_parser_with_a_smaller_limit() -> None:
    small = EventParser(schemas.default(), KNOWN, 100)
    assert small.parse(body()).reason is DeadReason.TOO_LARGE  # type: ignore[union-attr]


def test_an_event_type_not_given_to_the_parser_is_unknown() -> None:
    only_enrolled = EventParser(schemas.default(), {"sequence.enrolled"}, MAX)
    r = only_enrolled.parse(body(event_type="sequence.replied", data={}))
    assert isinstance(r, Rejection) and r.reason is DeadReason.UNKNOWN_EVENT_TYPE
