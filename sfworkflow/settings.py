"""Configuration: one typed settings object read from `SFWORKFLOW_*` environment variables.

Every default works against this machine's local PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit, urlunsplit

PREFIX = "SFWORKFLOW_"

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sfworkflow"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_HTTP_PORT = 8080
DEFAULT_PREFETCH = 256  # deliveries in flight per consumer channel
DEFAULT_CONSUMERS = 2  # consumer channels, each applying one micro-batch at a time
DEFAULT_BATCH_SIZE = 128  # events per transaction at most
DEFAULT_BATCH_LINGER_MS = 2.0  # milliseconds a batch waits for more deliveries
DEFAULT_POOL_SIZE = 8  # PostgreSQL connections
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # bytes; larger bodies are dead-lettered `too_large`
DEFAULT_PARK_TIMEOUT_S = 3600.0  # seconds an out-of-place event waits before dead-lettering
DEFAULT_TIMER_POLL_MS = 200.0  # milliseconds between due-timer polls
DEFAULT_RELAY_POLL_MS = 500.0  # milliseconds between outbox polls when no NOTIFY arrives
DEFAULT_RELAY_BATCH = 500  # outbox rows claimed per relay round
DEFAULT_SHUTDOWN_TIMEOUT_S = 8.0  # seconds to drain on SIGTERM before giving up
DEFAULT_QUEUE_TYPE = "quorum"  # or "classic"
DEFAULT_STUCK_AFTER_S = 900.0  # seconds without progress before an instance counts as stuck (unless its
# definition sets its own threshold for the state)
DEFAULT_RETENTION_DAYS = 14.0  # days ended instances, published outbox rows and inbox ids are kept
MIN_ADMIN_TOKEN_LENGTH = 16  # characters; a shorter SFWORKFLOW_ADMIN_TOKEN is refused


class SettingsError(ValueError):
    """A SFWORKFLOW_* variable holds a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    amqp_url: str = DEFAULT_AMQP_URL
    http_host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    prefetch: int = DEFAULT_PREFETCH
    consumers: int = DEFAULT_CONSUMERS
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_linger_ms: float = DEFAULT_BATCH_LINGER_MS
    pool_size: int = DEFAULT_POOL_SIZE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    park_timeout_s: float = DEFAULT_PARK_TIMEOUT_S
    timer_poll_ms: float = DEFAULT_TIMER_POLL_MS
    relay_poll_ms: float = DEFAULT_RELAY_POLL_MS
    relay_batch: int = DEFAULT_RELAY_BATCH
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    queue_type: str = DEFAULT_QUEUE_TYPE
    retention_days: float = DEFAULT_RETENTION_DAYS
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S
    log_level: str = "info"
    log_format: str = "json"  # or "console"
    use_uvloop: bool = True
    # Bearer token of the admin HTTP API under /v1/ (empty: the admin API is off). A secret: never
    # logged, never in repr().
    admin_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every field from `SFWORKFLOW_<FIELD>`; explicit overrides win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if self.queue_type not in ("quorum", "classic"):
            raise SettingsError(f"SFWORKFLOW_QUEUE_TYPE={self.queue_type!r}: use 'quorum' (default) or 'classic'")
        for name in ("prefetch", "consumers", "batch_size", "pool_size", "max_message_bytes", "relay_batch"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"SFWORKFLOW_{name.upper()} must be at least 1")
        if self.batch_size > self.prefetch:
            raise SettingsError("SFWORKFLOW_BATCH_SIZE must not exceed SFWORKFLOW_PREFETCH")
        if self.admin_token and len(self.admin_token) < MIN_ADMIN_TOKEN_LENGTH:
            raise SettingsError(  # the message names the length, never the value
                f"SFWORKFLOW_ADMIN_TOKEN is too short: use at least {MIN_ADMIN_TOKEN_LENGTH} random characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )


def _convert(name: str, type_name: object, raw: str) -> object:
    t = str(type_name)
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {t}") from exc
    return raw


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, safe for logs, errors and /readyz."""
    scheme, sep, rest = url.partition("://")
    userinfo = rest.rsplit("@", 1)[0] if sep and "@" in rest else ""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Unparseable: hide whatever stands before the '@' (it may hold a password).
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}" if userinfo else "<unparseable url>"
    if password is not None and urlsplit(f"{scheme}://{userinfo}@x").password == password:
        netloc = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(
            (parts.scheme, f"{parts.username or ''}:***@{netloc}", parts.path, parts.query, parts.fragment)
        )
    if ":" in userinfo:
        # user:password that urlsplit did not read whole (an unencoded '#', '/' or '?' in the
        # password ends the netloc early): hide everything between the scheme and the last '@'.
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
