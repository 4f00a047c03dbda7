"""The RabbitMQ topology sfworkflow owns, declared idempotently at start-up.

exchange sfworkflow.events        (topic)  -> queue sfworkflow.events                      binding '#'
exchange sfworkflow.commands      (topic)  -> queue sfworkflow.commands.<workflow>         binding '<workflow>.#'
exchange sfworkflow.compensations (topic)  -> queue sfworkflow.compensations.<workflow>    binding '<workflow>.#'
exchange sfworkflow.lifecycle     (topic)     routing key '<workflow.event>.<workflow>', no queue of ours
queue sfworkflow.dead                         dead letters, published through the default exchange
"""

from __future__ import annotations

from typing import Any

# Every exchange and queue name sfworkflow uses is defined here, once (header names: contract/headers.py).
EVENTS_EXCHANGE = "sfworkflow.events"  # events in, routing key = event_type
EVENTS_QUEUE = "sfworkflow.events"  # the queue the service consumes, bound to EVENTS_EXCHANGE with '#'
COMMANDS_EXCHANGE = "sfworkflow.commands"  # commands out, routing key = command_type
COMPENSATIONS_EXCHANGE = "sfworkflow.compensations"  # compensation commands out, routing key = command_type
LIFECYCLE_EXCHANGE = "sfworkflow.lifecycle"  # workflow.started/completed/failed/compensated, for observers
DEAD_QUEUE = "sfworkflow.dead"  # dead letters, published to it through DEFAULT_EXCHANGE
DEFAULT_EXCHANGE = ""  # AMQP's default exchange: the routing key is the queue's name


def commands_queue(workflow: str) -> str:
    """The queue of one workflow's commands: sfworkflow.commands.<workflow>."""
    return f"{COMMANDS_EXCHANGE}.{workflow}"


def compensations_queue(workflow: str) -> str:
    """The queue of one workflow's compensation commands: sfworkflow.compensations.<workflow>."""
    return f"{COMPENSATIONS_EXCHANGE}.{workflow}"


def queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type}
