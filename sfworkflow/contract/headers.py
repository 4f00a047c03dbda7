"""The AMQP header names sfworkflow writes and reads, each defined once (every module imports them from here).

All of them start with PREFIX. A dead letter in sfworkflow.dead carries the original message's body and
headers plus REASON, DETAIL and the ORIGINAL_* headers; `sfworkflow dead-letters redrive` strips every
PREFIX header but TENANT before it re-publishes the original, and adds REDRIVES.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sfworkflow.contract.tracing import TRACEPARENT

PREFIX = "x-sfworkflow-"  # every sfworkflow header starts with this; others belong to the message's producer

TENANT = "x-sfworkflow-tenant"  # an event's tenant_id, set by its producer: RabbitMQ hashes it to pick its shard

SCHEDULE = "x-sfworkflow-schedule"  # a message a schedule published: the schedule's name (its tenant: TENANT)
REASON = "x-sfworkflow-reason"  # a dead letter's reason code (sfworkflow.errors.DeadReason)
FIRST_REASON = "x-sfworkflow-first-reason"  # an unstorable dead letter: the reason it was rejected for first
DETAIL = "x-sfworkflow-detail"  # a dead letter's readable sentence: what was wrong, what to do
ORIGINAL_ROUTING_KEY = "x-sfworkflow-original-routing-key"  # the routing key the message arrived with
ORIGINAL_EXCHANGE = "x-sfworkflow-original-exchange"  # the exchange the message arrived through
ORIGINAL_CONTENT_TYPE = "x-sfworkflow-original-content-type"  # the content type the message arrived with
ORIGINAL_MESSAGE_ID = "x-sfworkflow-original-message-id"  # the AMQP message_id it arrived with (when it had one)
DEAD_LETTERED_AT = "x-sfworkflow-dead-lettered-at"  # when it was dead-lettered (ISO 8601, UTC)
REDRIVES = "x-sfworkflow-redrives"  # how many times `dead-letters redrive` re-published this message
HEADERS_DROPPED = "x-sfworkflow-headers-dropped"  # the original headers were dropped (too large, unstorable): why


def event_headers(event: Mapping[str, Any], traceparent: str | None = None) -> dict[str, str]:
    """The AMQP headers a producer sets on an event: TENANT (its tenant_id, when it has a text one) and, when given,
    the W3C `traceparent`. Both SDK producers use it; a producer in another language sets the same."""
    h: dict[str, str] = {}
    tenant = event.get("tenant_id")
    if isinstance(tenant, str) and tenant:
        h[TENANT] = tenant[:255]
    if traceparent:
        h[TRACEPARENT] = traceparent
    return h


def dead_letter_headers(
    reason: str,
    detail: str,
    *,
    routing_key: str,
    exchange: str,
    content_type: str | None,
    message_id: str | None,
    first_reason: str | None = None,
) -> dict[str, str]:
    """The headers sfworkflow adds to a dead letter, beside the original's own: what was wrong and where it came
    from (the content type and message id only when it had them). Every dead letter is built here: the service's
    (core/batch.py), the unstorable ones the consumer publishes raw, the worker SDK's. Texts as given: a caller
    storing them in PostgreSQL cleans them first (contract/storable.py)."""
    h = {
        REASON: reason,
        DETAIL: detail,
        ORIGINAL_ROUTING_KEY: routing_key,
        ORIGINAL_EXCHANGE: exchange,
        DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
    }
    if first_reason is not None:
        h[FIRST_REASON] = first_reason
    if content_type:
        h[ORIGINAL_CONTENT_TYPE] = content_type
    if message_id:
        h[ORIGINAL_MESSAGE_ID] = message_id[:255]
    return h


__all__ = [
    "DEAD_LETTERED_AT",
    "DETAIL",
    "FIRST_REASON",
    "HEADERS_DROPPED",
    "ORIGINAL_CONTENT_TYPE",
    "ORIGINAL_EXCHANGE",
    "ORIGINAL_MESSAGE_ID",
    "ORIGINAL_ROUTING_KEY",
    "PREFIX",
    "REASON",
    "REDRIVES",
    "TENANT",
]  # the header names (tests/unit/test_layout.py holds each to the prefix); dead_letter_headers is public too
