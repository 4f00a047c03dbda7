"""Turning an AMQP body into an `IncomingEvent`, or a `Rejection` with a named reason.

Order of checks: size, content type, JSON, object, envelope schema, known event type, schema
version, data schema. Nothing here touches the network or the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sfworkflow.contract.schemas import SchemaSet
from sfworkflow.contract.tracing import Trace, trace_of
from sfworkflow.errors import DeadReason, Rejection

JSON_CONTENT_TYPES = frozenset({"application/json", "text/json", "application/cloudevents+json"})


@dataclass(slots=True)
class IncomingEvent:
    """A valid event, with the fields the engine and the store use."""

    event_id: str
    event_type: str
    workflow: str
    name: str  # the trigger: event_type without its workflow prefix
    tenant_id: str
    entity_id: str
    timestamp: datetime
    correlation_id: str | None
    causation_id: str | None
    schema_version: int
    data: dict[str, Any]
    trace: Trace | None = None  # from the `traceparent` header or the envelope's trace_id (contract/tracing.py)


MIN_YEAR, MAX_YEAR = 1, 9000  # event times sfworkflow can add delays to without overflowing


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 as the schema admits it (Python 3.11's fromisoformat refuses a lower-case `z`)."""
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


class EventParser:
    """Validates bodies against the schema set for the event types the engine knows."""

    def __init__(self, schemas: SchemaSet, known_event_types: set[str], max_bytes: int) -> None:
        self.schemas = schemas
        self.known = frozenset(known_event_types)
        self.max_bytes = max_bytes
        envelope = schemas.validator("envelope", "event", 1)
        if envelope is None:
            raise ValueError("schema envelope/event.v1.json is missing")
        self.envelope = envelope
        self.data_validators = {
            (name, v): schemas.validator("events", name, v)
            for name in known_event_types
            for v in schemas.versions("events", name)
        }

    def parse(
        self, body: bytes, content_type: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> IncomingEvent | Rejection:
        """`headers`: the message's AMQP headers, read for its W3C `traceparent`."""
        if len(body) > self.max_bytes:
            return Rejection(DeadReason.TOO_LARGE, f"body is {len(body)} bytes; the limit is {self.max_bytes} bytes")
        if content_type and content_type.split(";", 1)[0].strip().lower() not in JSON_CONTENT_TYPES:
            return Rejection(
                DeadReason.UNSUPPORTED_CONTENT_TYPE,
                f"content_type {content_type[:100]!r} is not application/json",
            )
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return Rejection(DeadReason.INVALID_JSON, f"body is not valid UTF-8 JSON: {str(exc)[:200]}")
        if not isinstance(doc, dict):
            return Rejection(DeadReason.NOT_AN_OBJECT, f"body is a JSON {type(doc).__name__}, not an object")
        try:
            return self._validated(doc, body, headers)
        except ValueError as exc:  # the validator's recursion limit: nesting deeper than it can follow
            return Rejection(DeadReason.INVALID_JSON, f"body nests too deeply to validate ({str(exc)[:100]})")

    def _validated(
        self, doc: dict[str, Any], body: bytes, headers: Mapping[str, Any] | None
    ) -> IncomingEvent | Rejection:
        if not self.envelope.is_valid(doc):
            errors = self.schemas.errors("envelope", "event", doc)
            return Rejection(DeadReason.SCHEMA_VIOLATION, "envelope: " + "; ".join(errors))
        event_type: str = doc["event_type"]
        if event_type not in self.known:
            return Rejection(DeadReason.UNKNOWN_EVENT_TYPE, f"no workflow handles event type {event_type!r}")
        version: int = doc["schema_version"]
        validator = self.data_validators.get((event_type, version))
        if validator is None:
            return Rejection(
                DeadReason.UNSUPPORTED_SCHEMA_VERSION,
                f"{event_type} has no data schema version {version} "
                f"(known: {self.schemas.versions('events', event_type)})",
            )
        data = doc["data"]
        if not validator.is_valid(data):
            errors = self.schemas.errors("events", event_type, data, version)
            return Rejection(DeadReason.SCHEMA_VIOLATION, f"data of {event_type}: " + "; ".join(errors))
        try:
            timestamp = parse_timestamp(doc["timestamp"])
            if not MIN_YEAR <= timestamp.astimezone(UTC).year <= MAX_YEAR:
                raise OverflowError
        except ValueError:
            return Rejection(DeadReason.SCHEMA_VIOLATION, f"timestamp {doc['timestamp'][:40]!r} is not RFC 3339")
        except OverflowError:
            return Rejection(
                DeadReason.SCHEMA_VIOLATION,
                f"timestamp {doc['timestamp'][:40]!r} is outside the years {MIN_YEAR}-{MAX_YEAR}",
            )
        if b"\\u0000" in body and _has_nul(doc):
            return Rejection(
                DeadReason.SCHEMA_VIOLATION,
                "a string contains a NUL character (\\u0000), which PostgreSQL cannot store: remove it",
            )
        workflow, _, name = event_type.partition(".")
        event_id = doc["event_id"].lower()
        return IncomingEvent(
            event_id=event_id,
            event_type=event_type,
            workflow=workflow,
            name=name,
            tenant_id=doc["tenant_id"].lower(),
            entity_id=doc["entity_id"],
            timestamp=timestamp,
            correlation_id=doc.get("correlation_id"),
            causation_id=doc.get("causation_id"),
            schema_version=version,
            data=data,
            trace=trace_of(doc.get("trace_id"), headers, event_id),
        )


def event_from_body(body: bytes, headers: Mapping[str, Any] | None = None) -> IncomingEvent:
    """Rebuild an event from a body (and the headers) that was validated before (a parked event)."""
    doc = orjson.loads(body)
    workflow, _, name = doc["event_type"].partition(".")
    event_id = doc["event_id"].lower()
    return IncomingEvent(
        event_id=event_id,
        event_type=doc["event_type"],
        workflow=workflow,
        name=name,
        tenant_id=doc["tenant_id"].lower(),
        entity_id=doc["entity_id"],
        timestamp=parse_timestamp(doc["timestamp"]),
        correlation_id=doc.get("correlation_id"),
        causation_id=doc.get("causation_id"),
        schema_version=doc["schema_version"],
        data=doc["data"],
        trace=trace_of(doc.get("trace_id"), headers, event_id),
    )
