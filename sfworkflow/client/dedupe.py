"""Where a command worker (client/worker.py) remembers what it answered, so a redelivered command is answered
again without being executed again.

A store keeps, per `command_id`, either a *claim* (a worker is executing it, until a lease runs out) or the
*answers* recorded once it was executed. The worker claims before it executes, records before it publishes
and acks after the broker confirmed the answers, so:

- a command delivered twice (a redelivery after a lost ack, a second worker) is executed once: the second
  delivery finds the answers and publishes them again (the same event ids: sfworkflow's inbox drops the copy);
- a worker that dies after recording, or after publishing, loses nothing: the redelivery publishes the
  recorded answers;
- a worker that dies while executing leaves a claim that runs out after its lease; the redelivery then executes
  the command again, with the same `idempotency_key`, which the handler passes on to its provider (an email or
  WhatsApp API) so the provider drops the second request. Nothing but the provider can close that window.

`PostgresDedupe` is the default (a table of its own schema, `sfworkflow_worker`, in any PostgreSQL database:
INSERT … ON CONFLICT is the claim); `MemoryDedupe` keeps the same rules in one process (tests, a worker whose
commands are harmless to repeat). Another store (Redis, the SalesFlow database's own table) implements
`DedupeStore`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import orjson

from sfworkflow.db.pool import read_queries

SQL_DIR = Path(__file__).resolve().parent / "sql"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a command: `claimed` (execute it now), or its recorded `answers`, or neither:
    another worker holds it for `held_s` more seconds."""

    claimed: bool
    answers: list[dict[str, Any]] | None = None
    held_s: float = 0.0


class DedupeStore(Protocol):
    async def claim(self, command_id: str, command_type: str, lease_s: float, owner: str) -> Claim:
        """Claim a command for `owner` (a worker process's id), or say why not (answered already, or held by
        another worker). A claim `owner` holds already is taken again: its handling failed midway."""
        ...

    async def record(self, command_id: str, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record a claimed command's answers; returns the answers it has now (the first recorded win)."""
        ...

    async def release(self, command_id: str) -> None:
        """Give a claim up with nothing recorded, so that a redelivery may execute the command again."""
        ...

    async def close(self) -> None: ...


@lru_cache(maxsize=1)
def _queries() -> dict[str, str]:
    return read_queries(SQL_DIR)


class PostgresDedupe:
    """The dedupe store in PostgreSQL: `sfworkflow_worker.command_answer`, created on `open` when missing."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, database_url: str, *, pool_size: int = 4) -> PostgresDedupe:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=pool_size)
        assert pool is not None
        async with pool.acquire() as conn:
            await conn.execute(_queries()["create_store"])
        return cls(pool)

    async def claim(self, command_id: str, command_type: str, lease_s: float, owner: str) -> Claim:
        q = _queries()
        async with self.pool.acquire() as conn:
            if await conn.fetchval(q["claim"], command_id, command_type, lease_s, owner) is not None:
                return Claim(claimed=True)
            row = await conn.fetchrow(q["answers_of"], command_id)
        if row is None:  # released between the two statements: the next delivery claims it
            return Claim(claimed=False)
        answers = None if row["answers"] is None else orjson.loads(row["answers"])
        return Claim(claimed=False, answers=answers, held_s=row["claim_left_s"])

    async def record(self, command_id: str, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval(_queries()["record"], command_id, orjson.dumps(answers).decode())
        if stored is None:
            raise LookupError(f"command {command_id} has no claim to record answers on (pruned meanwhile?)")
        result: list[dict[str, Any]] = orjson.loads(stored)
        return result

    async def release(self, command_id: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(_queries()["release"], command_id)

    async def prune(self, older_than_s: float, limit: int = 10_000) -> int:
        """Forget answers recorded more than `older_than_s` ago (run it daily: a command is not redelivered
        days later); how many rows went."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(_queries()["prune"], older_than_s, limit)
        return int(status.split()[-1])

    async def close(self) -> None:
        await self.pool.close()


class MemoryDedupe:
    """The same rules in one process's memory: lost with the process (tests, harmless commands)."""

    def __init__(self) -> None:
        self._claims: dict[str, tuple[str, float]] = {}  # command_id -> (owner, monotonic time its lease runs out)
        self._answers: dict[str, list[dict[str, Any]]] = {}

    async def claim(self, command_id: str, command_type: str, lease_s: float, owner: str) -> Claim:
        if command_id in self._answers:
            return Claim(claimed=False, answers=self._answers[command_id])
        now = time.monotonic()
        holder, until = self._claims.get(command_id, (owner, 0.0))
        if holder != owner and until > now:
            return Claim(claimed=False, held_s=until - now)
        self._claims[command_id] = (owner, now + lease_s)
        return Claim(claimed=True)

    async def record(self, command_id: str, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._claims.pop(command_id, None)
        return self._answers.setdefault(command_id, answers)

    async def release(self, command_id: str) -> None:
        self._claims.pop(command_id, None)

    async def close(self) -> None:
        return None
