"""OpenTelemetry spans for the producers, the worker SDK and the service, when the application configured tracing.

The W3C `traceparent` header travels with every message whatever is configured (contract/tracing.py). Spans are
extra: `tracer()` returns a tracer only when opentelemetry-api is installed (`pip install 'sfworkflow[otel]'`) and
a tracer provider is set (the application's, e.g. by `opentelemetry-instrument`, or one passed in explicitly);
otherwise it returns None and the callers skip every span, so tracing that is not configured costs nothing.

Context travels in W3C trace context only (TraceContextTextMapPropagator), whatever propagators the application
set globally: that is the contract SalesFlow's other languages implement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sfworkflow import __version__
from sfworkflow.contract.tracing import TRACEPARENT, TRACESTATE, parse_traceparent, trace_headers

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the extra is not installed: no spans, traceparent headers still travel
    otel_trace = None  # type: ignore[assignment]

INSTRUMENTATION = "sfworkflow"
_PROPAGATOR = TraceContextTextMapPropagator() if otel_trace is not None else None


def tracer(provider: Any = None) -> Any:
    """A tracer from `provider` (default: the global one), or None when OpenTelemetry is not installed or no
    provider was configured: then nothing is traced and nothing is spent on it."""
    if otel_trace is None:
        return None
    p = provider if provider is not None else otel_trace.get_tracer_provider()
    if isinstance(p, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        return None
    return p.get_tracer(INSTRUMENTATION, __version__)


def parent_context(traceparent: object, tracestate: object = None) -> Context | None:
    """An OpenTelemetry context whose (remote) parent is `traceparent`; None when it is not valid trace context."""
    parsed = parse_traceparent(traceparent, tracestate)
    if parsed is None or _PROPAGATOR is None:
        return None
    return _PROPAGATOR.extract(trace_headers(parsed))


def start_context(parent: Context | None) -> Any:
    """The context to start a span in: its parent's, else a new trace (never whatever span happens to be current
    where the service or the worker was started)."""
    return parent if parent is not None else Context()


def link(traceparent: object, tracestate: object = None) -> Any:
    """A span link to the span `traceparent` names (None when it names none)."""
    ctx = parent_context(traceparent, tracestate)
    if ctx is None:
        return None
    span_context = otel_trace.get_current_span(ctx).get_span_context()
    return otel_trace.Link(span_context) if span_context.is_valid else None


def headers_of(span: Any) -> dict[str, str]:
    """The `traceparent` (and `tracestate`) headers naming `span` as the parent."""
    if _PROPAGATOR is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=otel_trace.set_span_in_context(span))
    return {k: v for k, v in carrier.items() if k in (TRACEPARENT, TRACESTATE)}


def traceparent_of(span: Any) -> str | None:
    """The `traceparent` header naming `span` as the parent."""
    return headers_of(span).get(TRACEPARENT)


def current_traceparent() -> str | None:
    """The `traceparent` of the span current where this is called (the application's own span), if any."""
    if otel_trace is None:
        return None
    span = otel_trace.get_current_span()
    return traceparent_of(span) if span.get_span_context().is_valid else None


def current_traceparent_for(event: Mapping[str, Any]) -> str | None:
    """The current span's `traceparent`, for publishing `event`: only when the event is in the same trace (or
    names none), so a trace_id the caller chose is never overridden by the header."""
    tp = current_traceparent()
    trace_id = event.get("trace_id")
    if tp is None or (trace_id is not None and tp.split("-")[1] != str(trace_id).lower()):
        return None
    return tp


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the span current where this is called, if any."""
    if otel_trace is None:
        return None
    span_context = otel_trace.get_current_span().get_span_context()
    return otel_trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None


def incoming(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """A message's valid trace context headers (`traceparent`, and `tracestate` beside it), normalised; {} when
    it has none."""
    h = headers or {}
    return trace_headers(parse_traceparent(h.get(TRACEPARENT), h.get(TRACESTATE)))


def span_kind(name: str) -> Any:
    """`SpanKind.<name>` (CONSUMER, PRODUCER), for callers that only hold a tracer."""
    return getattr(otel_trace.SpanKind, name)


def error_status(description: str) -> Any:
    return otel_trace.Status(otel_trace.StatusCode.ERROR, description[:300])
