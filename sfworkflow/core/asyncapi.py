"""docs/asyncapi.json: sfworkflow's messages as an AsyncAPI 3.0 document, generated from the topology
(contract/topology.py) and the workflow definitions, with `$ref`s into `schemas/`.

Generated, never edited by hand: `sfworkflow diagram --write-docs` rewrites it with docs/workflows.md, a test fails
when the committed file differs from what the definitions generate, and another validates it with the AsyncAPI
project's own CLI (`asyncapi validate`). The operations are sfworkflow's: it receives events and sends commands,
compensation commands, lifecycle events and dead letters; a SalesFlow worker is the other side of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sfworkflow import __version__
from sfworkflow.contract import headers as wire
from sfworkflow.contract.topology import (
    COMMANDS_EXCHANGE,
    COMPENSATIONS_EXCHANGE,
    DEAD_QUEUE,
    EVENT_SHARDS_EXCHANGE,
    EVENTS_EXCHANGE,
    LIFECYCLE_EXCHANGE,
    SCHEDULES_EXCHANGE,
    commands_queue,
    compensations_queue,
)
from sfworkflow.contract.tracing import TRACEPARENT, TRACESTATE
from sfworkflow.core.engine import Engine

ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"
SCHEMAS = "../schemas"  # from docs/
LIFECYCLE_EVENTS = ("workflow.started", "workflow.completed", "workflow.failed", "workflow.compensated")
PERSISTENT = 2


def _exchange(name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"},
            "bindingVersion": "0.3.0",
        }
    }


def _queue(name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"},
            "bindingVersion": "0.3.0",
        }
    }


def _message(name: str, title: str, envelope: str, type_field: str, data_ref: str | None, summary: str) -> Any:
    """A message: the envelope schema, with its type field fixed and its `data` held to the type's schema."""
    narrowed: dict[str, Any] = {"type": "object", "properties": {type_field: {"const": name}}}
    if data_ref is not None:
        narrowed["properties"]["data"] = {"$ref": data_ref}
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/traceHeaders"},
        "payload": {"allOf": [{"$ref": f"{SCHEMAS}/envelope/{envelope}.v1.json"}, narrowed]},
        "bindings": {"amqp": {"messageType": name, "bindingVersion": "0.3.0"}},
    }


TRACE_HEADERS = {
    "type": "object",
    "properties": {
        TRACEPARENT: {
            "type": "string",
            "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$",
            "description": (
                "W3C trace context (optional). On an event: read before the envelope's `trace_id`. On what "
                "sfworkflow publishes: the trace of the event that caused it (or of the instance), and its parent "
                "span; a worker continues it into its handler and its answer."
            ),
        },
        TRACESTATE: {
            "type": "string",
            "description": "W3C trace context vendor state (optional): passed on beside the traceparent it came with.",
        },
        wire.TENANT: {
            "type": "string",
            "maxLength": 255,
            "description": (
                "On an event: its `tenant_id`, set by the producer (both SDK producers and the worker SDK do). "
                "RabbitMQ hashes it to pick the event's shard queue, so one tenant's burst does not delay another "
                "tenant's events; an event without it is applied all the same, from one fixed shard it shares with "
                "every producer that leaves it out. The envelope's `tenant_id` stays the authority."
            ),
        },
    },
}
PUBLISHED = {"amqp": {"deliveryMode": PERSISTENT, "mandatory": True, "bindingVersion": "0.3.0"}}  # and confirmed


def _key(name: str) -> str:
    return name.replace(".", "_")


def _channel_messages(names: list[str]) -> dict[str, Any]:
    return {_key(n): {"$ref": f"#/components/messages/{_key(n)}"} for n in names}


def _operation_messages(channel: str, names: list[str]) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel}/messages/{_key(n)}"} for n in names]


def document(engine: Engine) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the latest definition of every workflow."""
    definitions = [engine.compiled[(name, version)].definition for name, version in sorted(engine.latest.items())]
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    events = sorted(d.event_type(e) for d in definitions for e in d.events)
    for e in events:
        messages[_key(e)] = _message(
            e, e, "event", "event_type", f"{SCHEMAS}/events/{e}.v1.json", "An event SalesFlow publishes."
        )
    channels["events"] = {
        "address": "{eventType}",
        "title": f"Events in: exchange {EVENTS_EXCHANGE}",
        "description": (
            f"SalesFlow publishes every event to the topic exchange `{EVENTS_EXCHANGE}` with its `event_type` as "
            "the routing key: persistent, `message_id` = `event_id`, publisher confirms, mandatory, and the header "
            f"`{wire.TENANT}` = `tenant_id`. The exchange passes every event to `{EVENT_SHARDS_EXCHANGE}` "
            "(consistent-hash on that header), which puts each tenant's events on one of the service's shard queues."
        ),
        "parameters": {"eventType": {"enum": events, "description": "The event's `event_type`."}},
        "messages": _channel_messages(events),
        "bindings": _exchange(EVENTS_EXCHANGE),
    }
    operations["receiveEvents"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/events"},
        "summary": "sfworkflow applies each event once (inbox keyed on tenant_id, event_id).",
        "bindings": PUBLISHED,
        "messages": _operation_messages("events", events),
    }

    for d in definitions:
        for kind, exchange, queue, names in (
            ("commands", COMMANDS_EXCHANGE, commands_queue(d.name), d.commands),
            ("compensations", COMPENSATIONS_EXCHANGE, compensations_queue(d.name), d.compensations),
        ):
            if not names:
                continue
            types = sorted(f"{d.name}.{c}" for c in names)
            for t in types:
                summary = "A compensation command." if kind == "compensations" else "A command."
                messages[_key(t)] = _message(
                    t, t, "command", "command_type", f"{SCHEMAS}/commands/{t}.v1.json", summary
                )
            channel = f"{kind}_{d.name}"
            channels[channel] = {
                "address": queue,
                "title": f"{d.name}: {kind} (queue {queue})",
                "description": (
                    f"Published to the topic exchange `{exchange}` with the `command_type` as the routing key; "
                    f"the queue `{queue}` is bound with `{d.name}.#`. A worker consumes it, dedupes on `command_id`, "
                    "and acks only after its answer was confirmed."
                ),
                "messages": _channel_messages(types),
                "bindings": _queue(queue),
            }
            operations[f"send_{channel}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"sfworkflow's {d.name} instances publish these through the outbox, in instance order.",
                "bindings": PUBLISHED,
                "messages": _operation_messages(channel, types),
            }

    for e in LIFECYCLE_EVENTS:
        messages[_key(e)] = _message(
            e, e, "lifecycle", "event_type", f"{SCHEMAS}/lifecycle/{e}.v1.json", "A lifecycle event."
        )
    channels["lifecycle"] = {
        "address": "{lifecycleEvent}.{workflow}",
        "title": f"Lifecycle: exchange {LIFECYCLE_EXCHANGE}",
        "description": (
            f"Published to the topic exchange `{LIFECYCLE_EXCHANGE}` (no queue of sfworkflow's: bind your own). "
            "`workflow.completed` is the last lifecycle event of every ending."
        ),
        "parameters": {
            "lifecycleEvent": {"enum": list(LIFECYCLE_EVENTS)},
            "workflow": {"enum": [d.name for d in definitions]},
        },
        "messages": _channel_messages(list(LIFECYCLE_EVENTS)),
        "bindings": _exchange(LIFECYCLE_EXCHANGE),
    }
    operations["sendLifecycle"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/lifecycle"},
        "bindings": PUBLISHED,
        "messages": _operation_messages("lifecycle", list(LIFECYCLE_EVENTS)),
    }

    messages["schedule_tick"] = {
        "name": "schedule_tick",
        "title": "Schedule tick",
        "summary": "A tick of a schedule of kind tick, for SalesFlow's periodic job.",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "properties": {wire.TENANT: {"type": "string"}, wire.SCHEDULE: {"type": "string"}},
        },
        "payload": {"$ref": f"{SCHEMAS}/envelope/tick.v1.json"},
        "bindings": {"amqp": {"bindingVersion": "0.3.0"}},
    }
    ticks = sorted({s.event_type for d in definitions for s in d.schedules if s.kind == "tick"})
    channels["schedules"] = {
        "address": "{routingKey}",
        "title": f"Schedule ticks: exchange {SCHEDULES_EXCHANGE}",
        "description": (
            f"Published to the topic exchange `{SCHEDULES_EXCHANGE}` once per tick of each schedule of kind `tick` "
            "(no queue of sfworkflow's: a job binds its own to the schedule's routing key). The definitions declare "
            + ", ".join(f"`{t}`" for t in ticks)
            + "; a tenant's own come from `sfworkflow schedules add` and `POST /v1/schedules`. Unroutable ticks are "
            "dropped. Deduplicate on the AMQP `message_id` (the tick's)."
        ),
        "parameters": {"routingKey": {"description": "The schedule's routing key, e.g. follow_up.scan."}},
        "messages": {"schedule_tick": {"$ref": "#/components/messages/schedule_tick"}},
        "bindings": _exchange(SCHEDULES_EXCHANGE),
    }
    operations["sendScheduleTicks"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/schedules"},
        "bindings": PUBLISHED,
        "messages": [{"$ref": "#/channels/schedules/messages/schedule_tick"}],
    }

    dead_headers = (
        wire.REASON, wire.DETAIL, wire.ORIGINAL_ROUTING_KEY, wire.ORIGINAL_EXCHANGE, wire.ORIGINAL_CONTENT_TYPE,
        wire.ORIGINAL_MESSAGE_ID, wire.DEAD_LETTERED_AT,
    )  # fmt: skip
    messages["dead_letter"] = {
        "name": "dead_letter",
        "title": "Dead letter",
        "summary": "A message that could not be applied: its original body and headers, and why.",
        "description": (
            "The body is the original's, byte for byte (any content type), with its headers and these: "
            + ", ".join(f"`{h}`" for h in dead_headers)
            + " (the README's tables give the reason codes)."
        ),
        "headers": {
            "type": "object",
            "required": [wire.REASON, wire.DETAIL],
            "properties": {
                h: {"type": "string", **({"format": "date-time"} if h == wire.DEAD_LETTERED_AT else {})}
                for h in dead_headers
            },
        },
        "payload": {"description": "The original message's body, as it came."},
    }
    channels["dead"] = {
        "address": DEAD_QUEUE,
        "title": f"Dead letters (queue {DEAD_QUEUE})",
        "description": "Through the default exchange; read, redrive and purge with `sfworkflow dead-letters`.",
        "messages": {"dead_letter": {"$ref": "#/components/messages/dead_letter"}},
        "bindings": _queue(DEAD_QUEUE),
    }
    operations["sendDeadLetters"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/dead"},
        "bindings": PUBLISHED,
        "messages": [{"$ref": "#/channels/dead/messages/dead_letter"}],
    }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sfworkflow",
            "version": __version__,
            "description": (
                "Durable workflows for SalesFlow: events in from RabbitMQ, one state machine per workflow instance "
                "in PostgreSQL, commands, compensation commands and lifecycle events out through a transactional "
                "outbox. Generated from the definitions by `sfworkflow diagram --write-docs`; do not edit."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The RabbitMQ that sfworkflow and SalesFlow share (SFWORKFLOW_AMQP_URL).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": {"traceHeaders": TRACE_HEADERS}},
    }


def render(engine: Engine) -> str:
    """The document as committed: JSON, indented, keys in the order written, a final newline."""
    return json.dumps(document(engine), indent=2, ensure_ascii=False) + "\n"
