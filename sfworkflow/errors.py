"""Errors of sfworkflow, and the named reasons a message is dead-lettered.

    SfworkflowError
    ├── ConfigurationError      a setting or the environment cannot be used
    ├── DefinitionError         a workflow definition is inconsistent (found at start-up)
    ├── MigrationError          the database schema cannot be brought up to date
    ├── StoreUnavailable        PostgreSQL cannot be reached; the caller retries with backoff
    ├── StepLimitExceeded       one instance looped in a batch; the consumer splits the batch
    ├── InvalidEvent            an event to publish does not match its schema (client.producer)
    ├── DeadLetterQueueError    sfworkflow.dead cannot be read (the dead-letters tools)
    ├── VersionMigrationError   a migration between definition versions cannot run as asked
    └── UsageError              a command was given arguments it cannot use (the CLI exits 2)

Exceptions that never leave their module are not listed: the admin API's ApiError and validation's
Invalid (both become an HTTP answer), SettingsError (a ValueError naming the SFWORKFLOW_* variable,
which the CLI prints and exits 2 on) and the demo's FaultInjected.

A message that cannot be applied never raises out of the consumer: it becomes a `Rejection`
with a `DeadReason` code, lands in `sfworkflow.dead` and is acked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SfworkflowError(Exception):
    """sfworkflow failed; the message says what happened and what to do."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(SfworkflowError):
    """A setting or the environment cannot be used; check the SFWORKFLOW_* variables."""


class DefinitionError(SfworkflowError):
    """A workflow definition is inconsistent; fix the module under sfworkflow/workflows/."""


class MigrationError(SfworkflowError):
    """The database schema cannot be brought up to date; run `sfworkflow migrate` and read its error."""


class StoreUnavailable(SfworkflowError):
    """PostgreSQL cannot be reached; nothing was acked and the work will be retried."""


class StepLimitExceeded(SfworkflowError):
    """An instance made more than MAX_TRANSITIONS_PER_INSTANCE transitions in one batch; the batch is split."""


class InvalidEvent(SfworkflowError):
    """The event does not match its JSON Schema; fix the fields named in the message before publishing."""


class DeadLetterQueueError(SfworkflowError):
    """sfworkflow.dead cannot be read; check that RabbitMQ runs and SFWORKFLOW_AMQP_URL points to it."""


class VersionMigrationError(SfworkflowError):
    """The migration cannot run as asked (a version not loaded, a bad --map entry); nothing was changed."""


class UsageError(SfworkflowError):
    """A command was given arguments it cannot use; see its --help."""


class DeadReason(StrEnum):
    """Machine-readable codes carried in the `x-sfworkflow-reason` header of a dead letter."""

    INVALID_JSON = "invalid_json"  # body is not UTF-8 JSON (or nests too deep)
    NOT_AN_OBJECT = "not_an_object"  # JSON, but not an object
    TOO_LARGE = "too_large"  # body larger than SFWORKFLOW_MAX_MESSAGE_BYTES
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"  # content_type set and not JSON
    SCHEMA_VIOLATION = "schema_violation"  # envelope or data fails its JSON Schema
    UNKNOWN_EVENT_TYPE = "unknown_event_type"  # no workflow defines this event type
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"  # no schema for that version
    TRANSITION_NOT_ALLOWED = "transition_not_allowed"  # parked past its deadline
    UNKNOWN_DEFINITION_VERSION = "unknown_definition_version"  # instance on a version not loaded
    INTERNAL_ERROR = "internal_error"  # the engine raised while applying this event alone
    UNSTORABLE = "unstorable"  # not even its dead letter could be stored: published raw by the consumer


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one message cannot be applied: a code and a readable sentence."""

    reason: DeadReason
    detail: str
