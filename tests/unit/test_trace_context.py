"""Reading an event's trace context (contract/tracing.py): the `traceparent` header first, then the envelope's
trace_id; and what the parser makes of both."""

from __future__ import annotations

import orjson
import pytest

from sfworkflow.contract.envelope import EventParser, IncomingEvent, event_from_body
from sfworkflow.contract.schemas import default
from sfworkflow.contract.tracing import Trace, derived_trace, parse_traceparent, trace_of

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{SPAN}-01"
EVENT_ID = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TP, Trace(TRACE, TP)),
        (TP.upper(), None),  # the specification: upper-case hex is not trace context
        (f" {TP} ".encode(), Trace(TRACE, TP)),  # some clients send header values as bytes
        (f"01-{TRACE}-{SPAN}-01-future", Trace(TRACE, TP)),  # a later version may add fields; read as 00
        (f"01-{TRACE}-{SPAN}-ff", Trace(TRACE, TP)),  # ... and only the flag version 00 knows: sampled
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("garbage", None),
        (42, None),
        (None, None),
    ],
)
def test_a_traceparent_header_is_read_only_when_it_is_w3c_trace_context(header: object, expected: Trace) -> None:
    assert parse_traceparent(header) == expected


def test_tracestate_travels_with_a_valid_traceparent_only() -> None:
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert trace_of(None, {"traceparent": TP, "tracestate": state}, EVENT_ID) == Trace(TRACE, TP, state)
    assert trace_of(TRACE, {"traceparent": "bad", "tracestate": state}, EVENT_ID).tracestate is None  # type: ignore[union-attr]


def test_the_header_wins_over_the_envelope_and_an_invalid_header_falls_back_to_it() -> None:
    other = "a" * 32
    assert trace_of(other, {"traceparent": TP}, EVENT_ID) == Trace(TRACE, TP)
    from_envelope = trace_of(other, {"traceparent": "bad"}, EVENT_ID)
    assert from_envelope is not None and from_envelope.trace_id == other


def test_a_w3c_trace_id_in_the_envelope_alone_gets_a_parent_derived_from_the_event_id() -> None:
    first = trace_of(TRACE.upper(), None, EVENT_ID)
    assert first is not None and first.traceparent is not None
    assert first.trace_id == TRACE
    assert parse_traceparent(first.traceparent) == first  # a valid header naming the same trace
    assert trace_of(TRACE, None, EVENT_ID) == first  # the same event always yields the same outbox rows
    other = trace_of(TRACE, None, "another-event")
    assert other is not None and other.traceparent != first.traceparent


def test_a_trace_id_that_is_not_w3c_is_carried_verbatim_without_a_traceparent() -> None:
    assert trace_of("dd-1234:abc", {}, EVENT_ID) == Trace("dd-1234:abc", None)
    assert trace_of(None, None, EVENT_ID) is None
    assert trace_of("", None, EVENT_ID) is None


def test_a_derived_trace_is_valid_w3c_and_the_same_for_the_same_seed() -> None:
    t = derived_trace("tenant/sequence/e-1/event")
    assert t == derived_trace("tenant/sequence/e-1/event") != derived_trace("tenant/sequence/e-2/event")
    assert t.traceparent is not None and parse_traceparent(t.traceparent) == t


def _body(**overrides: object) -> bytes:
    doc = {
        "event_id": EVENT_ID, "event_type": "sequence.paused", "spec_version": "1.0", "schema_version": 1,
        "tenant_id": "9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59", "entity_id": "enr-1", "correlation_id": None,
        "causation_id": None, "source": "tests", "actor_type": "user", "timestamp": "2026-11-26T08:00:00Z",
        "data": {}, **overrides,
    }  # fmt: skip
    return orjson.dumps(doc)


PARSER = EventParser(default(), {"sequence.paused"}, 256 * 1024)


def test_the_parser_reads_the_trace_from_the_headers_and_a_parked_event_keeps_it() -> None:
    body = _body(trace_id="a" * 32)
    e = PARSER.parse(body, "application/json", {"traceparent": TP})
    assert isinstance(e, IncomingEvent)
    assert e.trace == Trace(TRACE, TP)
    assert event_from_body(body, {"traceparent": TP}).trace == e.trace  # parked with its headers
    plain = PARSER.parse(_body())
    assert isinstance(plain, IncomingEvent) and plain.trace is None
