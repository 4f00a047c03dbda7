"""A worker on the SDK for the tests: `python -m tests.integration.sdk_worker AMQP_URL DATABASE_URL [POINT]`
handles sequence.send_step (each execution recorded in the table sdk_execution, which the test creates) and
runs until SIGTERM; with POINT (executed, recorded, published) it exits abruptly with code 97 there, as a
worker killed between executing a command and acking it."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from sfworkflow.client.worker import Answer, Command, CommandWorker, PostgresDedupe

KILLED = 97


class KillableWorker(CommandWorker):
    point = ""

    def _checkpoint(self, name: str) -> None:
        if name == self.point:
            os._exit(KILLED)


async def main(amqp_url: str, database_url: str, point: str) -> None:
    store = await PostgresDedupe.open(database_url)
    worker = KillableWorker(amqp_url, store=store, source="tests.sdk_worker")
    worker.point = point
    conn = await asyncpg.connect(database_url)

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        await conn.execute(
            "INSERT INTO sdk_execution (command_id, idempotency_key) VALUES ($1, $2)", cmd.command_id,
            cmd.idempotency_key,
        )  # fmt: skip
        return cmd.answer("sequence.step_sent", {"step": cmd.data["step"], "provider_message_id": "p"})

    await worker.run()
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
