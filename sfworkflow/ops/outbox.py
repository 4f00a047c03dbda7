"""Outbox rows the relay gave up on, and republishing them (`sfworkflow outbox failed|republish`).

The relay gives a row up after SFWORKFLOW_RELAY_MAX_ATTEMPTS publishes the broker refused (returned as
unroutable, or nacked): it is marked failed and no longer retried, so it neither loops for ever nor holds back
its instance's later rows. Republishing clears the mark and the attempt count and makes the row due now; the
service's relays are woken by NOTIFY and publish it with the message id it always had (consumers dedupe on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from sfworkflow.db import outbox
from sfworkflow.errors import MigrationError
from sfworkflow.ops.dead_letters import connect_database
from sfworkflow.settings import Settings


async def list_failed(settings: Settings, kind: str | None, limit: int) -> list[dict[str, Any]]:
    """Rows given up, oldest first: id, message_id, kind, routing_key, instance, attempts, last_error, times."""
    conn = await connect_database(settings)
    try:
        return [dict(r) for r in await _missing_column_is_a_migration(outbox.list_failed(conn, kind, limit))]
    finally:
        await conn.close()


async def republish(settings: Settings, *, ids: Sequence[int] = (), kind: str | None = None) -> int:
    """Make given-up rows due again: those in `ids`, or with no ids every one (of `kind` when given). Returns
    how many; the service's relays publish them within moments (NOTIFY wakes them)."""
    conn = await connect_database(settings)
    try:
        async with conn.transaction():
            return int(await _missing_column_is_a_migration(outbox.republish_failed(conn, list(ids) or None, kind)))
    finally:
        await conn.close()


async def _missing_column_is_a_migration(step: Any) -> Any:
    try:
        return await step
    except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError) as exc:
        raise MigrationError(
            "this database has no outbox failure marks yet: run `sfworkflow migrate` (or check SFWORKFLOW_DATABASE_URL)"
        ) from exc
