"""Parked events: events waiting until their instance allows them, each with its deadline (`sfworkflow parked`)."""

from __future__ import annotations

from typing import Any

import asyncpg

from sfworkflow.db import operations
from sfworkflow.errors import MigrationError
from sfworkflow.ops.dead_letters import connect_database
from sfworkflow.settings import Settings


async def list_parked(settings: Settings, workflow: str | None, tenant: str | None, limit: int) -> list[dict[str, Any]]:
    """Parked events, the nearest deadline first; `time_left` is measured by the database's clock."""
    conn = await connect_database(settings)
    try:
        records = await operations.list_parked(conn, workflow, tenant, limit)
    except asyncpg.UndefinedTableError as exc:
        raise MigrationError(
            "table sfworkflow.parked does not exist in this database: run `sfworkflow migrate` "
            "(or check SFWORKFLOW_DATABASE_URL)"
        ) from exc
    finally:
        await conn.close()
    return [dict(r) for r in records]
