"""The outbox as the relay and the gauges see it: claim due rows, mark what was published or failed, the backlog.

The statements are the event path's named blocks in sql/queries.sql (claim_outbox, mark_published,
mark_publish_failed, outbox_backlog); the relay calls these functions, never the SQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sfworkflow.db.pool import q


async def claim_due(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` unpublished rows due for a publish attempt, in id order, locked (rows another relay holds
    are skipped); call inside the transaction that marks them."""
    return list(await conn.fetch(q("claim_outbox"), limit))


async def mark_published(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    """The broker confirmed these rows."""
    await conn.execute(q("mark_published"), list(ids))


async def mark_publish_failed(conn: asyncpg.Connection, failures: Sequence[tuple[int, str, float]]) -> None:
    """(row id, error, seconds until the next attempt) of each row whose publish failed."""
    await conn.execute(
        q("mark_publish_failed"), [f[0] for f in failures], [f[1] for f in failures], [f[2] for f in failures]
    )


async def backlog(conn: asyncpg.Connection) -> asyncpg.Record:
    """`backlog`: unpublished rows; `oldest_s`: the age in seconds of the oldest (0 when none)."""
    return await conn.fetchrow(q("outbox_backlog"))
