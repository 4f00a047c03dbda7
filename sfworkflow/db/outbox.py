"""The outbox as the relay and the gauges see it: claim due rows, mark what was published or failed, the backlog.

The statements are the event path's named blocks in sql/queries.sql (claim_outbox, claim_handed, mark_published,
mark_publish_failed, outbox_backlog, and the rows given up: outbox_failed_count, outbox_failed,
republish_failed); the relay, the gauges and ops/outbox.py call these functions, never the SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from sfworkflow.core.batch import OutboxRow
from sfworkflow.db.pool import q


@dataclass(frozen=True, slots=True)
class Queued:
    """An outbox row as its transaction committed it: its id in sfworkflow.outbox, and the row."""

    id: int
    row: OutboxRow


async def claim_due(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` unpublished rows due for a publish attempt, in id order, locked (rows another relay holds
    are skipped); call inside the transaction that marks them."""
    return list(await conn.fetch(q("claim_outbox"), limit))


async def claim_handed(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, int]:
    """Of these rows (committed by this process), those locked here for publishing now, with their publish attempts
    so far; call inside the transaction that marks them. The others are another relay's, or wait behind an earlier
    row of their instance: claim_due takes them once they are due."""
    return {r["id"]: r["publish_attempts"] for r in await conn.fetch(q("claim_handed"), list(ids))}


async def mark_published(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    """The broker confirmed these rows."""
    await conn.execute(q("mark_published"), list(ids))


async def mark_publish_failed(conn: asyncpg.Connection, failures: Sequence[tuple[int, str, float, bool]]) -> None:
    """(row id, error, seconds until the next attempt, give up) of each row whose publish failed; a row given up
    is not attempted again until republished."""
    await conn.execute(q("mark_publish_failed"), *(list(column) for column in zip(*failures, strict=True)))


async def backlog(conn: asyncpg.Connection) -> asyncpg.Record:
    """`backlog`: unpublished rows; `oldest_s`: the age in seconds of the oldest (0 when none)."""
    return await conn.fetchrow(q("outbox_backlog"))


async def slots_by_limit(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Concurrency slots `held` and commands `waiting` for one, per `limit_name` (limits with neither not listed)."""
    return list(await conn.fetch(q("slots_by_limit")))


async def failed_count(conn: asyncpg.Connection) -> int:
    """Rows given up, waiting for an operator's republish."""
    return int(await conn.fetchval(q("outbox_failed_count")))


async def list_failed(conn: asyncpg.Connection, kind: str | None, limit: int) -> list[asyncpg.Record]:
    """Rows given up, oldest first."""
    return list(await conn.fetch(q("outbox_failed"), kind, limit))


async def republish_failed(conn: asyncpg.Connection, ids: Sequence[int] | None, kind: str | None) -> int:
    """Make given-up rows (these ids, or all; of `kind` when given) due again and wake every relay; how many."""
    n = int(await conn.fetchval(q("republish_failed"), None if ids is None else list(ids), kind))
    if n:
        await conn.execute(q("notify_relays"))
    return n
