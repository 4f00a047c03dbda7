"""sfworkflow: durable workflows for SalesFlow.

RabbitMQ events in, one explicit state machine per workflow instance persisted in PostgreSQL,
commands and compensation commands out through a transactional outbox.
"""

from __future__ import annotations

# The one place the version is written: the wheel's metadata (pyproject.toml, [tool.hatch.version]) and the
# OpenAPI document read it from here.
__version__ = "0.1.0"
