"""Numbered plain-SQL migrations (migrations/NNNN_name.sql), applied in order, each in a transaction.

Applied versions are recorded in sfworkflow.schema_migration. An advisory lock makes concurrent
`migrate` runs (two replicas starting at once) wait for each other instead of racing.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from sfworkflow.errors import MigrationError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x5F_77_6F_72  # advisory lock key held while migrating


def available() -> list[tuple[int, Path]]:
    out = []
    for p in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = _NAME.match(p.name)
        if not m:
            raise MigrationError(f"{p.name}: migration files are named NNNN_description.sql")
        out.append((int(m.group(1)), p))
    return out


async def applied(conn: asyncpg.Connection) -> list[int]:
    exists = await conn.fetchval("SELECT to_regclass('sfworkflow.schema_migration') IS NOT NULL")
    if not exists:
        return []
    return [r[0] for r in await conn.fetch("SELECT version FROM sfworkflow.schema_migration ORDER BY version")]


async def pending(conn: asyncpg.Connection) -> list[int]:
    done = set(await applied(conn))
    return [v for v, _ in available() if v not in done]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration; returns the versions applied now (empty when up to date)."""
    done_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        done = set(await applied(conn))
        for version, path in available():
            if version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS sfworkflow.schema_migration ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    await conn.execute(
                        "INSERT INTO sfworkflow.schema_migration (version, name) VALUES ($1, $2)",
                        version,
                        path.name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {path.name} failed: {exc}") from exc
            done_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return done_now
