"""Configuration: one typed settings object read from `SFWORKFLOW_*` environment variables.

Every default works against this machine's local PostgreSQL and RabbitMQ. Every value is checked at
start-up (`Settings.from_env`, `Settings.check`): a value sfworkflow cannot use is a `SettingsError` naming
the variable, the value given (never a secret's; URLs with their password redacted) and what to use instead.
An unknown `SFWORKFLOW_*` variable (most likely a typo) is a warning (`unknown_variables`).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit, urlunsplit

import structlog

from sfworkflow.client.urls import split_urls
from sfworkflow.core.limits import parse_overrides

PREFIX = "SFWORKFLOW_"

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sfworkflow"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_HTTP_PORT = 8080
DEFAULT_PREFETCH = 256  # deliveries in flight per consumer channel
DEFAULT_CONSUMERS = 2  # batch loops, each with a channel per event shard, applying one micro-batch at a time
DEFAULT_EVENT_SHARDS = 16  # event queues, a tenant hashed to one (contract/topology.py)
MAX_EVENT_SHARDS = 256
DEFAULT_BATCH_SIZE = 128  # events per transaction at most
DEFAULT_BATCH_LINGER_MS = 2.0  # milliseconds a batch waits for more deliveries
DEFAULT_POOL_SIZE = 10  # PostgreSQL connections: consumers, relay rounds, timers, retention, HTTP
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # bytes; larger bodies are dead-lettered `too_large`
DEFAULT_PARK_TIMEOUT_S = 3600.0  # seconds an out-of-place event waits before dead-lettering
DEFAULT_TIMER_POLL_MS = 200.0  # milliseconds between due-timer polls
DEFAULT_RELAY_POLL_MS = 500.0  # milliseconds between outbox polls when no NOTIFY arrives
DEFAULT_RELAY_BATCH = 500  # outbox rows claimed per relay round
DEFAULT_RELAY_ROUNDS = 4  # relay rounds in flight at once, each waiting for its confirms on its own connection
DEFAULT_RELAY_MAX_ATTEMPTS = 20  # publishes the broker refused (unroutable, nacked) before a row is given up
DEFAULT_SHUTDOWN_TIMEOUT_S = 8.0  # seconds to drain on SIGTERM before giving up
DEFAULT_QUEUE_TYPE = "quorum"  # or "classic"
DEFAULT_STUCK_AFTER_S = 900.0  # seconds without progress before an instance counts as stuck (unless its
# definition sets its own threshold for the state)
DEFAULT_RETENTION_DAYS = 14.0  # days ended instances, published outbox rows and inbox ids are kept
MIN_ADMIN_TOKEN_LENGTH = 16  # characters; a shorter SFWORKFLOW_ADMIN_TOKEN is refused

# The redelivery window, in days: a producer may re-publish, and the broker may redeliver, an event up to
# this long after sfworkflow first accepted it, and that copy is still recognised as a duplicate (the inbox
# keeps the event's id at least this long). A copy arriving later is not deduplicated: it is applied again.
# Seven days outlasts a producer or consumer outage over a long weekend, and the backlog behind it, with
# days to spare.
REDELIVERY_WINDOW_DAYS = 7
MIN_RETENTION_DAYS = REDELIVERY_WINDOW_DAYS  # days; a shorter SFWORKFLOW_RETENTION_DAYS is refused (inbox ids)
MAX_RETENTION_DAYS = 36500  # days (100 years); the retention sweep's `now() - N days` stays within PostgreSQL's range
MAX_PORT = 65535
MAX_PREFETCH = 65535  # an AMQP prefetch count is a 16-bit number
QUEUE_TYPES = ("quorum", "classic")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "on": True, "off": False}

# SFWORKFLOW_* variables sfworkflow reads that are not settings: fault injection (sfworkflow/demo/faults.py), the
# JSON Schema directory (sfworkflow/contract/schemas.py), the chaos suite's base port (bench/chaos.py); and the
# prefixes of the test suite's and the benchmarks' own variables.
OTHER_VARIABLES = ("SFWORKFLOW_FAULT_POINT", "SFWORKFLOW_FAULT_AFTER", "SFWORKFLOW_SCHEMA_DIR", "SFWORKFLOW_CHAOS_PORT")
OTHER_PREFIXES = ("SFWORKFLOW_TEST_", "SFWORKFLOW_BENCH_")


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
    event_shards: int = DEFAULT_EVENT_SHARDS
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_linger_ms: float = DEFAULT_BATCH_LINGER_MS
    pool_size: int = DEFAULT_POOL_SIZE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    park_timeout_s: float = DEFAULT_PARK_TIMEOUT_S
    timer_poll_ms: float = DEFAULT_TIMER_POLL_MS
    relay_poll_ms: float = DEFAULT_RELAY_POLL_MS
    relay_batch: int = DEFAULT_RELAY_BATCH
    relay_rounds: int = DEFAULT_RELAY_ROUNDS
    relay_max_attempts: int = DEFAULT_RELAY_MAX_ATTEMPTS
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    queue_type: str = DEFAULT_QUEUE_TYPE
    retention_days: float = DEFAULT_RETENTION_DAYS
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S
    log_level: str = "info"
    log_format: str = "auto"  # console on a terminal, JSON otherwise; or "json", "console"
    use_uvloop: bool = True
    processes: int = 1  # service processes of `sfworkflow run`; 0: one per usable core
    # The deployment's rates replacing the definitions' (core/limits.py): `LIMIT=PER_S[/BURST][/daily:CAP|/daily:off]`
    # or `LIMIT=off`, comma separated, e.g. `sequence.send_step/per_sender=20/40` (the definition's daily cap kept).
    rate_limits: str = ""
    # Bearer token of the admin HTTP API under /v1/ (empty: the admin API is off). A secret: never
    # logged, never in repr().
    admin_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every field from `SFWORKFLOW_<FIELD>` (empty: unset), explicit overrides win; then `check`."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        given: dict[str, str] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "" or f.name in overrides:
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
            given[f.name] = raw
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check(given)
        return settings

    def check(self) -> None:
        """Refuse (SettingsError) any value sfworkflow cannot use. Runs in `from_env`, not on construction."""
        self._check({})

    def _check(self, given: Mapping[str, str]) -> None:
        """`given`: the raw text of the values read from the environment, shown in errors as written."""

        def shown(name: str) -> str:
            return _shown(name, given.get(name, getattr(self, name)))

        for name, rule in RULES.items():
            if not rule.ok(getattr(self, name)):
                raise _refusal(name, given.get(name, getattr(self, name)))
        if self.batch_size > self.prefetch:
            raise SettingsError(
                f"SFWORKFLOW_BATCH_SIZE={shown('batch_size')}: use at most SFWORKFLOW_PREFETCH={shown('prefetch')} "
                "(a batch is made of the deliveries in flight)"
            )
        # A parked event's id is in the inbox from its first delivery; the sweep deletes it after the retention
        # period. If the parking outlasted it, a redelivery of the parked event would no longer be recognised:
        # parked, and applied, twice.
        kept_s = self.retention_days * 86400
        if self.park_timeout_s > kept_s:
            raise SettingsError(
                f"SFWORKFLOW_PARK_TIMEOUT_S={shown('park_timeout_s')}: use at most the retention period, "
                f"SFWORKFLOW_RETENTION_DAYS={shown('retention_days')} ({kept_s:.0f} s), "
                "so that a parked event is still deduplicated until it is applied or expires; "
                "or raise SFWORKFLOW_RETENTION_DAYS"
            )


@dataclass(frozen=True, slots=True)
class Rule:
    """What a setting accepts: `accepted` says it (in errors, as in the README), `ok` checks a value."""

    accepted: str
    ok: Callable[[object], bool]


def _whole_in(low: int, high: int | None = None) -> Callable[[object], bool]:
    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high)

    return ok


def _count(high: int | None = None, note: str = "") -> Rule:
    most = f" and at most {high}" if high is not None else ""
    return Rule(f"a whole number, at least 1{most}{note}", _whole_in(1, high))


def _number(unit: str, low: float, *, low_ok: bool, high: float | None = None, note: str = "") -> Rule:
    def ok(v: object) -> bool:
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v >= low if low_ok else v > low) and (high is None or v <= high)

    if low == 0:
        span = "0 or more" if low_ok else "above 0"
    else:
        span = f"at least {low:g}" if low_ok else f"above {low:g}"
    most = f" and at most {high:g}" if high is not None else ""
    return Rule(f"a number of {unit}, {span}{most}{note}", ok)


def _one_of(choices: tuple[str, ...], *, any_case: bool = False) -> Rule:
    def ok(v: object) -> bool:
        return isinstance(v, str) and (v.lower() if any_case else v) in choices

    return Rule("one of " + ", ".join(choices) + (" (any case)" if any_case else ""), ok)


def _url(*schemes: str, several: str = "") -> Rule:
    """A URL of one of `schemes`; with `several` (what the list names), also a comma-separated list of them."""

    def one(v: str) -> bool:
        try:
            parts = urlsplit(v)
            userinfo, at, hosts = parts.netloc.rpartition("@")
            if several:  # a list is of whole URLs: a comma in a host, or a ',' or '@' after it, is a mistake
                items = [hosts]
                if "," in hosts or "," in parts.path or "@" in parts.path:
                    return False
            else:  # PostgreSQL's multi-host URL (a primary and its standbys): host[:port] items separated by commas
                items = hosts.split(",")
                if len(items) > 1 and not all(items):
                    return False
            for host in items:
                urlsplit(f"{parts.scheme}://{userinfo}{at}{host}").port  # noqa: B018 -- ValueError: not 0..65535
        except ValueError:
            return False
        return parts.scheme.lower() in schemes

    def ok(v: object) -> bool:
        if not isinstance(v, str):
            return False
        try:
            urls = split_urls(v) if several else [v]
        except ValueError:
            return False
        return all(one(u) for u in urls)

    accepted = " or ".join(f"{s}://" for s in schemes)
    also = f", or several separated by commas ({several})" if several else ""
    return Rule(f"a URL starting with {accepted}{also} (special characters in the password %-encoded)", ok)


def _host(v: object) -> bool:
    return isinstance(v, str) and v != "" and not any(c.isspace() for c in v)


def _rate_limits(v: object) -> bool:
    try:
        parse_overrides(v) if isinstance(v, str) else None
    except ValueError:
        return False
    return isinstance(v, str)


def _token(v: object) -> bool:
    return isinstance(v, str) and (v == "" or len(v) >= MIN_ADMIN_TOKEN_LENGTH)


RULES: dict[str, Rule] = {  # one per Settings field, in field order
    "database_url": _url("postgresql", "postgres"),
    "amqp_url": _url("amqp", "amqps", several="the nodes of one RabbitMQ cluster, tried in turn"),
    "http_host": Rule("a host name or IP address to listen on (0.0.0.0: every interface)", _host),
    "http_port": Rule(f"a whole number from 0 to {MAX_PORT} (0: any free port)", _whole_in(0, MAX_PORT)),
    "prefetch": _count(MAX_PREFETCH, " (an AMQP prefetch count)"),
    "consumers": _count(),
    "event_shards": Rule(
        f"a whole number from 1 to {MAX_EVENT_SHARDS} (event queues a tenant is hashed over; raise it, never lower it "
        "while events wait: see the runbook)",
        _whole_in(1, MAX_EVENT_SHARDS),
    ),
    "batch_size": _count(),
    "batch_linger_ms": _number(
        "milliseconds", 0, low_ok=True, note=" (0: a batch is what is already delivered, without waiting for more)"
    ),
    "pool_size": _count(),
    "max_message_bytes": _count(),
    "park_timeout_s": _number("seconds", 0, low_ok=False, note=" and at most SFWORKFLOW_RETENTION_DAYS"),
    "timer_poll_ms": _number("milliseconds", 0, low_ok=False),
    "relay_poll_ms": _number("milliseconds", 0, low_ok=False),
    "relay_batch": _count(),
    "relay_rounds": _count(),
    "relay_max_attempts": _count(),
    "shutdown_timeout_s": _number("seconds", 0, low_ok=False),
    "queue_type": _one_of(QUEUE_TYPES),
    "retention_days": _number(
        "days",
        MIN_RETENTION_DAYS,
        low_ok=True,
        high=MAX_RETENTION_DAYS,
        note=f" ({MIN_RETENTION_DAYS} days is the redelivery window, REDELIVERY_WINDOW_DAYS: the inbox must keep an "
        "event's id that long to recognise a re-published or redelivered copy as a duplicate)",
    ),
    "stuck_after_s": _number("seconds", 0, low_ok=False),
    "log_level": _one_of(LOG_LEVELS, any_case=True),
    "log_format": _one_of(LOG_FORMATS, any_case=True),
    "processes": Rule("a whole number, 0 or more (0: one per usable core)", _whole_in(0)),
    "rate_limits": Rule(
        "comma-separated LIMIT=PER_S[/BURST][/daily:CAP|/daily:off] or LIMIT=off, each LIMIT one a definition "
        "declares, e.g. "
        "sequence.send_step/per_sender=20/40",
        _rate_limits,
    ),
    "use_uvloop": Rule("one of " + ", ".join(BOOLEANS) + " (any case)", lambda v: isinstance(v, bool)),
    "admin_token": Rule(
        f"at least {MIN_ADMIN_TOKEN_LENGTH} random characters (e.g. python -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'), or leave it empty to turn the admin API off",
        _token,
    ),
}
SECRETS = frozenset({"admin_token"})  # never shown, in errors or anywhere else
URLS = frozenset({"database_url", "amqp_url"})  # shown only with their password redacted

_WHOLE = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _parse(name: str, type_name: str, raw: str) -> object:
    """The typed value of `raw`, or a SettingsError: plain ASCII decimals only (no '1_000', 'nan', '0x10')."""
    text = raw.strip()
    if type_name == "int":
        if _WHOLE.fullmatch(text):
            return int(text)
        raise _refusal(name, raw)
    if type_name == "float":
        if _DECIMAL.fullmatch(text):
            return float(text)  # may be inf ('1e999'): the rule refuses it
        raise _refusal(name, raw)
    if type_name == "bool":
        if text.lower() in BOOLEANS:
            return BOOLEANS[text.lower()]
        raise _refusal(name, raw)
    if name in ("log_level", "log_format"):
        return text.lower()
    return raw


def _shown(name: str, value: object) -> str:
    if name in SECRETS:
        return "(not shown)"
    if name in URLS and isinstance(value, str):
        return repr(redact_url(value))
    return repr(value)


def _refusal(name: str, value: object) -> SettingsError:
    var = PREFIX + name.upper()
    accepted = RULES[name].accepted
    if name in SECRETS:  # the message names the length, never the value
        size = f"{len(value)} characters" if isinstance(value, str) else f"a {type(value).__name__}"
        return SettingsError(f"{var} is too short ({size}; the value is never shown): use {accepted}")
    return SettingsError(f"{var}={_shown(name, value)}: use {accepted}")


# ---- unknown SFWORKFLOW_* variables ----------------------------------------------------------------------------
def known_variables() -> tuple[str, ...]:
    """Every SFWORKFLOW_* variable sfworkflow reads by its full name (besides those under OTHER_PREFIXES)."""
    return tuple(PREFIX + f.name.upper() for f in fields(Settings)) + OTHER_VARIABLES


def _unknown(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, the known one it most likely means or None) per unknown SFWORKFLOW_* variable, by name."""
    known = known_variables()
    by_suffix = {k[len(PREFIX) :]: k for k in known}
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(PREFIX) or name in known or name.startswith(OTHER_PREFIXES):
            continue
        if upper in known or upper.startswith(OTHER_PREFIXES):
            out.append((name, upper))  # the right name in the wrong case: the environment is case-sensitive
            continue
        # Compare what follows the prefix: every name shares it, which would make anything look close.
        close = difflib.get_close_matches(upper[len(PREFIX) :], list(by_suffix), n=1)
        out.append((name, by_suffix[close[0]] if close else None))
    return out


def _sentence(name: str, suggestion: str | None) -> str:
    sentence = f"{name} is not a setting sfworkflow knows"
    return f"{sentence}; did you mean {suggestion}?" if suggestion else sentence


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One warning sentence per SFWORKFLOW_* variable of `env` that sfworkflow does not read (names, no values)."""
    return [_sentence(name, suggestion) for name, suggestion in _unknown(env)]


def log_unknown_variables(env: Mapping[str, str] | None = None) -> None:
    """Log `unknown_variables` as structured warnings: once per start-up, after logging is configured."""
    log = structlog.get_logger("sfworkflow.settings")
    for name, suggestion in _unknown(os.environ if env is None else env):
        log.warning(_sentence(name, suggestion), variable=name, did_you_mean=suggestion)


UNPARSEABLE = "<unparseable url>"


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, safe for logs, errors and /readyz; each URL of a comma-separated
    list (a cluster's nodes) alike."""
    try:
        urls = split_urls(url)
    except ValueError:  # nothing but commas and spaces
        urls = [url]
    if len(urls) > 1:
        shown = [_redact_one(u) for u in urls]
        # A part that does not parse is a list split inside a password: its neighbours may hold the rest of it.
        return "<unparseable list of urls>" if UNPARSEABLE in shown else ",".join(shown)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo = rest.rsplit("@", 1)[0] if sep and "@" in rest else ""
    if rest.count("@") > 1:
        # A second '@' (an unencoded one in a password, or a node listed without its scheme, whose user:password
        # would stand in the path): hide everything between the scheme and the last '@'.
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    try:
        parts = urlsplit(url)
        password = parts.password
        if not userinfo:
            parts.port  # noqa: B018 -- ValueError: 'user:pass' read as host:port (a list split inside a password)
    except ValueError:
        # Unparseable: hide whatever stands before the '@' (it may hold a password).
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}" if userinfo else UNPARSEABLE
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
