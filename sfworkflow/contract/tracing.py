"""Trace context on the wire: the envelope's `trace_id` and the W3C `traceparent` AMQP header. Pure, no I/O.

An event's trace is read from its `traceparent` header when that is valid W3C trace context, else from its
envelope's `trace_id`; a `tracestate` header beside a valid `traceparent` travels with it, untouched. Everything
an event causes (commands, compensations, lifecycle events, history entries) carries that trace: `trace_id` in the
envelope, and a `traceparent` header whose parent is the event's own span (the header's parent id; for an
envelope-only W3C trace id, a span id derived from the event id, so the same event always yields the same outbox
rows). A `trace_id` that is not a W3C trace id (32 hex digits) is carried verbatim in envelopes and history,
without a `traceparent`.

A parent span id sfworkflow makes up (for an envelope-only trace id, or a derived trace) is flagged sampled: the
trace goes on into the workers, and tracing backends show the first real span under a parent they never received.
A sampler that should thin such traces samples by trace id (`traceidratio`), not by parent.

An instance keeps the trace of its start event; what an instance does on its own (a timer firing) belongs to that
trace, and the database's answer to a step (a claim refused, a lookup, an effect suppressed) to the step's. An
instance whose start event had no trace context gets a W3C trace id derived from the instance key and that event's
id, so every instance has one trace to search logs, history and a tracing backend by.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TRACEPARENT = "traceparent"  # the W3C Trace Context header (https://www.w3.org/TR/trace-context/)
TRACESTATE = "tracestate"  # vendor state beside a traceparent: passed on, never read

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(frozen=True, slots=True)
class Trace:
    """The trace something belongs to: `trace_id` as envelopes carry it, `traceparent` for the messages it causes
    (None when trace_id is not a W3C trace id)."""

    trace_id: str
    traceparent: str | None = None
    tracestate: str | None = None  # the vendor state that came with the traceparent, passed on as it came


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


def parse_traceparent(value: object, tracestate: object = None) -> Trace | None:
    """A `traceparent` header's trace (with the `tracestate` that came with it), or None when it is absent or not
    valid W3C trace context: lower-case hex only, as the specification requires. A later version is read as
    version 00 (its first four fields, the sampled flag alone)."""
    text = _text(value)
    if text is None:
        return None
    m = _TRACEPARENT.match(text.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or (version == "00" and rest):
        return None
    state = _text(tracestate)
    return Trace(trace_id, f"00-{trace_id}-{span_id}-{int(flags, 16) & 1:02x}", state.strip()[:512] if state else None)


def _span_id(seed: str) -> str:
    span = hashlib.sha256(("span/" + seed).encode()).hexdigest()[:16]
    return span if span != _ZERO_SPAN else "0" * 15 + "1"


def trace_of(trace_id: object, headers: Mapping[str, Any] | None, event_id: str) -> Trace | None:
    """The trace of an event: its `traceparent` header when valid, else its envelope `trace_id` (None: neither)."""
    if headers:
        parsed = parse_traceparent(headers.get(TRACEPARENT), headers.get(TRACESTATE))
        if parsed is not None:
            return parsed
    if not isinstance(trace_id, str) or not trace_id:
        return None
    lowered = trace_id.lower()
    if _TRACE_ID.match(lowered) and lowered != _ZERO_TRACE:
        return Trace(lowered, f"00-{lowered}-{_span_id(event_id)}-01")
    return Trace(trace_id)


def derived_trace(seed: str) -> Trace:
    """A W3C trace for something that came without one (an instance whose start event had none)."""
    digest = hashlib.sha256(("trace/" + seed).encode()).hexdigest()
    trace_id = digest[:32] if digest[:32] != _ZERO_TRACE else "0" * 31 + "1"
    return Trace(trace_id, f"00-{trace_id}-{_span_id(seed)}-01")


def trace_from_columns(trace_id: str | None, traceparent: str | None, tracestate: str | None = None) -> Trace | None:
    """A trace as the instance table stores it (nullable columns)."""
    return None if trace_id is None else Trace(trace_id, traceparent, tracestate)


def trace_headers(trace: Trace | None) -> dict[str, str]:
    """The AMQP headers that carry `trace` (none for a trace id that is not W3C)."""
    if trace is None or trace.traceparent is None:
        return {}
    if trace.tracestate:
        return {TRACEPARENT: trace.traceparent, TRACESTATE: trace.tracestate}
    return {TRACEPARENT: trace.traceparent}
