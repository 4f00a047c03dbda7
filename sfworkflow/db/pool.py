"""PostgreSQL plumbing: the connection pool with its codecs, named SQL queries, database creation."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from sfworkflow.errors import StoreUnavailable
from sfworkflow.settings import redact_url

SQL_DIR = Path(__file__).resolve().parent / "sql"
_BLOCK = re.compile(r"^-- (?P<name>[a-z_]+) --\n(?P<body>.*?)(?=^-- [a-z_]+ --\n|\Z)", re.S | re.M)

# SQLSTATE classes after which the same work may succeed when retried: connection exceptions (08),
# transaction rollback: deadlock, serialization (40), insufficient resources: disk full, too many
# connections (53), operator intervention: shutdown, restart, cancel (57); plus 25006, a read-only
# transaction (a standby during failover).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")
_TRANSIENT_SQLSTATES = ("25006",)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same transaction later may succeed (the database, not the data, failed)."""
    if isinstance(exc, asyncpg.exceptions.DataError):  # client-side encoding of a value: deterministic
        return False
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    return isinstance(exc, _CONNECTION_CLASS)


# asyncpg's InternalClientError: a connection left in a broken protocol state (its backend killed
# mid-operation); the pool replaces it, so the work may be retried.
_CONNECTION_CLASS = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def is_connection_error(exc: BaseException) -> bool:
    """True when PostgreSQL itself is unreachable or going away (what /readyz reports), not a lock conflict."""
    if isinstance(exc, asyncpg.exceptions.DataError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in ("08", "57") or exc.sqlstate in _TRANSIENT_SQLSTATES
    return isinstance(exc, _CONNECTION_CLASS)


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    """Named blocks of every sql/*.sql file, read once (read_queries).

    queries.sql holds the event path's (db/repository.py), operations.sql what the operator tools, the admin
    API, the status page, the service's gauges and the demo read and write (db/operations.py)."""
    return read_queries(SQL_DIR)


def read_queries(directory: Path) -> dict[str, str]:
    """Named blocks of the directory's .sql files: `-- name --`, a comment line describing it, then the SQL.

    A name is unique across all the files: a second block of the same name is an error, never a silent
    override; so is a .sql file without any block (a file that holds SQL nobody can run)."""
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        found = 0
        for m in _BLOCK.finditer(path.read_text()):
            name = m["name"]
            if name in out:
                raise RuntimeError(
                    f"query {name!r} is defined twice, in {where[name]} and in {path.name}: "
                    f"rename one of the blocks (names are unique across {directory}/*.sql)"
                )
            out[name], where[name] = m["body"].strip(), path.name
            found += 1
        if not found:
            raise RuntimeError(f"no `-- name --` query blocks in {path}: each .sql file there holds named blocks")
    if not out:
        raise RuntimeError(f"no queries found in {directory}/*.sql")
    return out


def q(name: str) -> str:
    return queries()[name]


_JSONB_VERSION = b"\x01"


def _jsonb_encode(value: object) -> bytes:
    return _JSONB_VERSION + orjson.dumps(value)


def _jsonb_decode(data: bytes) -> object:
    if data[:1] != _JSONB_VERSION:
        raise ValueError(f"unknown jsonb binary format version {data[:1]!r}")
    return orjson.loads(memoryview(data)[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb as Python objects through orjson; uuid as plain lower-case strings.

    jsonb goes in PostgreSQL's binary format (a version byte, 1, then the JSON text): asyncpg then sends
    the event path's jsonb arrays as binary arrays, where the text format would escape every quote of every
    document (half the cost of encoding a batch's rows)."""
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec("uuid", encoder=str, decoder=str, schema="pg_catalog", format="text")


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: asyncpg has already rolled back a transaction
    left open (and dropped listeners) before calling this. Its default reset, one more round trip per release
    (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`, ~0.4 ms on a busy machine), came after every
    batch's commit and delayed its ack. Pool connections carry no session state: a session advisory lock
    (runtime/stats.py, db/migrate.py) or a LISTEN (runtime/relay.py) is taken on a connection of its own."""


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=size,
            init=init_connection,
            reset=_no_session_reset,
            command_timeout=30,
            statement_cache_size=256,
            # No JIT compilation: the event path's statements are short, and JIT only ever triggered on the
            # large estimates of the stuck count, adding 0.4 s of compiling to a 0.25 s query.
            # Every execution planned for its parameters and the tables as they are (force_custom_plan): a statement
            # is prepared once per connection, and after 5 runs PostgreSQL may keep a generic plan until an ANALYZE
            # (autovacuum's) replaces it; one made while the tables were small hashes them whole on every batch as
            # they grow (write_batch's instance update; tests/integration/test_index_use.py). Planning costs ~1 ms
            # of PostgreSQL CPU per batch.
            server_settings={"application_name": "sfworkflow", "jit": "off", "plan_cache_mode": "force_custom_plan"},
        )
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise StoreUnavailable(
            f"cannot reach PostgreSQL at {redact_url(url)} ({type(exc).__name__}); "
            "is it running, and is SFWORKFLOW_DATABASE_URL right?"
        ) from exc
    assert pool is not None
    return pool


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` when it does not exist; True when it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
    except asyncpg.exceptions.DuplicateDatabaseError:
        return False
    finally:
        await conn.close()
    return True
