"""The RabbitMQ topology sfworkflow owns, declared idempotently at start-up.

exchange sfworkflow.events        (topic)  -> exchange sfworkflow.events.by-tenant          binding '#'
exchange sfworkflow.events.by-tenant (x-consistent-hash on header x-sfworkflow-tenant)
                                           -> queues sfworkflow.events.shard.<k>, k < SFWORKFLOW_EVENT_SHARDS
exchange sfworkflow.commands      (topic)  -> queue sfworkflow.commands.<workflow>         binding '<workflow>.#'
exchange sfworkflow.compensations (topic)  -> queue sfworkflow.compensations.<workflow>    binding '<workflow>.#'
exchange sfworkflow.lifecycle     (topic)     routing key '<workflow.event>.<workflow>', no queue of ours
exchange sfworkflow.schedules     (topic)     schedule ticks for SalesFlow's jobs, routing key = the schedule's
                                              event_type (e.g. 'follow_up.scan'), no queue of ours
queue sfworkflow.dead                         dead letters, published through the default exchange
"""

from __future__ import annotations

from typing import Any

# Every exchange and queue name sfworkflow uses is defined here, once (header names: contract/headers.py).
EVENTS_EXCHANGE = "sfworkflow.events"  # events in, routing key = event_type
# Events are spread over shard queues by tenant (RabbitMQ's consistent-hash exchange, a plugin that ships with the
# broker): a tenant's burst fills its shard only, and a batch takes a fair share of every shard (core/admission.py).
# A message without the tenant header (contract/headers.py TENANT) lands on one fixed shard.
EVENT_SHARDS_EXCHANGE = "sfworkflow.events.by-tenant"  # bound to EVENTS_EXCHANGE with '#'
CONSISTENT_HASH = "x-consistent-hash"  # its type: the plugin rabbitmq_consistent_hash_exchange
CONSISTENT_HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"
LEGACY_EVENTS_QUEUE = "sfworkflow.events"  # the one events queue before shards: unbound and drained if it exists
COMMANDS_EXCHANGE = "sfworkflow.commands"  # commands out, routing key = command_type
COMPENSATIONS_EXCHANGE = "sfworkflow.compensations"  # compensation commands out, routing key = command_type
LIFECYCLE_EXCHANGE = "sfworkflow.lifecycle"  # workflow.started/completed/failed/compensated, for observers
SCHEDULES_EXCHANGE = "sfworkflow.schedules"  # schedule ticks out (kind tick), routing key = the tick's event_type
DEAD_QUEUE = "sfworkflow.dead"  # dead letters, published to it through DEFAULT_EXCHANGE
DEFAULT_EXCHANGE = ""  # AMQP's default exchange: the routing key is the queue's name


def event_shard_queue(k: int) -> str:
    """The queue of event shard k: sfworkflow.events.shard.<k>."""
    return f"{EVENTS_EXCHANGE}.shard.{k}"


def event_queues(shards: int) -> list[str]:
    """Every event shard queue, in shard order."""
    return [event_shard_queue(k) for k in range(shards)]


def commands_queue(workflow: str) -> str:
    """The queue of one workflow's commands: sfworkflow.commands.<workflow>."""
    return f"{COMMANDS_EXCHANGE}.{workflow}"


def compensations_queue(workflow: str) -> str:
    """The queue of one workflow's compensation commands: sfworkflow.compensations.<workflow>."""
    return f"{COMPENSATIONS_EXCHANGE}.{workflow}"


def queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type}
