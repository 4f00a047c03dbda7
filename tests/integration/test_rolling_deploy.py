"""A rolling deploy, with real service processes: a replica with only sequence v1 runs beside (or instead
of) a replica with v1 and v2. An event for an instance on a version a replica has not loaded is left for a
replica that has it (parked against that instance, counted), never parked as "does not exist yet" and
stranded, and never applied to nothing; the replica with the version applies it within seconds, so the
instance moves on and nothing is sent twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import COMMANDS_Q, DEAD_Q, Inbox, events_depth
from tests.integration.replicas import Replica
from tests.integration.storekit import delivery, direct_store
from tests.support import TENANT, Amqp, enrolled_data, event, history, instance

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def replicas(settings: Settings, tmp_path: Path) -> Iterator[dict[str, Replica]]:
    made = {"v1": Replica(settings, "1", tmp_path / "v1.log"), "v1+v2": Replica(settings, "2", tmp_path / "v2.log")}
    yield made
    for r in made.values():
        r.stop()


async def _state(pg: asyncpg.Connection, entity: str) -> tuple[str, int] | None:
    row = await instance(pg, entity)
    return None if row is None else (row["state"], row["definition_version"])


async def _answer_sends(mq: Amqp, commands: Inbox, answered: set[str]) -> None:
    """The worker: every send_step not answered yet gets its step_sent."""
    for m in await commands.poll():
        body = orjson.loads(m.body)
        if body["command_type"] != "sequence.send_step" or body["command_id"] in answered:
            continue
        answered.add(body["command_id"])
        data = {"step": body["data"]["step"], "provider_message_id": f"p-{body['command_id']}"}
        await mq.publish(event("sequence.step_sent", body["entity_id"], data, causation_id=body["command_id"]))


async def test_events_for_a_version_a_replica_lacks_wait_for_one_that_has_it(
    settings: Settings, pg: asyncpg.Connection, replicas: dict[str, Replica]
) -> None:
    v1, v2 = replicas["v1"], replicas["v1+v2"]
    async with Amqp(settings.amqp_url) as mq:
        # An instance on v2, made by the v1+v2 replica.
        v2.start()
        await v2.ready()
        await mq.publish(event("sequence.enrolled", "on-v2", enrolled_data(steps=1)))
        await wait_for(lambda: _is(pg, "on-v2", "sending"), what="on-v2 sending")
        assert await _state(pg, "on-v2") == ("sending", 2)
        v2.stop()

        # Only the v1 replica runs: the worker's answer and a second start event reach it.
        v1.start()
        await v1.ready()
        sent = event("sequence.step_sent", "on-v2", {"step": 0, "provider_message_id": "p-1"})
        again = event("sequence.enrolled", "on-v2", enrolled_data(steps=1))
        await mq.publish(sent)
        await mq.publish(again)

        async def both_taken() -> bool:
            n = await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.inbox WHERE event_id = ANY($1::uuid[])",
                [sent["event_id"], again["event_id"]],
            )
            return n == 2 and await mq_depth_zero(settings)

        await wait_for(both_taken, what="both events taken by the v1 replica")
        row = await instance(pg, "on-v2")
        assert (row["state"], row["definition_version"], row["parked_count"]) == ("sending", 2, 2)
        assert await v1.counter("sfworkflow_events_total", workflow="sequence", outcome="awaiting_version") == 2
        # Nothing was applied to nothing: no command, lifecycle event or history row without its instance.
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE kind <> 'dead_letter' "
                                 "AND instance_id IS NULL") == 0  # fmt: skip

        # The v1+v2 replica comes back: it applies what waited for it, in order, within seconds.
        v2.start()
        await v2.ready()
        await wait_for(lambda: _is(pg, "on-v2", "completed"), timeout=20, what="on-v2 completed on v2")
        outcomes = {h["event_id"]: h["outcome"] for h in await history(pg, "on-v2") if h["event_id"]}
        assert outcomes[sent["event_id"]] == "applied"
        assert outcomes[again["event_id"]] == "ignored"  # "already started", recorded by the replica with v2
        assert (await instance(pg, "on-v2"))["parked_count"] == 0
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0

        # Both replicas under traffic: instances on either version, answers landing on either replica.
        commands, dead, answered = Inbox(mq, COMMANDS_Q), Inbox(mq, DEAD_Q), set[str]()
        entities = [f"mixed-{i}" for i in range(40)]
        for e in entities:
            await mq.publish(event("sequence.enrolled", e, enrolled_data(steps=2)))

        async def all_completed() -> bool:
            await _answer_sends(mq, commands, answered)
            n = await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.instance WHERE entity_id = ANY($1::text[]) AND state = 'completed'",
                entities,
            )
            return n == len(entities)

        await wait_for(all_completed, timeout=60, interval=0.2, what="every mixed instance completed")
        versions = Counter(
            r["definition_version"]
            for r in await pg.fetch("SELECT definition_version FROM sfworkflow.instance WHERE entity_id = ANY($1)",
                                    entities)
        )  # fmt: skip
        assert sum(versions.values()) == len(entities)
        sends = Counter(
            (b["idempotency_key"], b["attempt"]) for b in commands.bodies if b["command_type"] == "sequence.send_step"
        )
        assert sends and max(sends.values()) == 1  # nothing sent twice
        assert all(attempt == 1 for _key, attempt in sends)  # nothing re-issued
        assert await dead.settle(0.3) == []
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0


async def _is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    s = await _state(pg, entity)
    return s is not None and s[0] == state


async def mq_depth_zero(settings: Settings) -> bool:
    return (await events_depth(settings.amqp_url))[0] == 0


async def test_an_event_no_replica_with_its_version_takes_expires_as_unknown_definition_version(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version) "
        "VALUES ($1, 'sequence', 'on-v9', 9, 'sending', 3)",
        TENANT,
    )
    # A replica with sequence v1 only; the deadline is now: the event expires at the next sweep.
    async with direct_store(database_url, park_timeout_s=0.0) as store:
        ev = event("sequence.step_sent", "on-v9", {"step": 0, "provider_message_id": "p"})
        report = await store.apply_deliveries([delivery(ev)])
        assert report.events[("sequence", "awaiting_version")] == 1
        parked = await pg.fetchrow("SELECT awaiting_version, reason FROM sfworkflow.parked")
        assert parked["awaiting_version"] == 9 and "sequence v9" in parked["reason"]
        assert await store.redrive_awaiting_version() == 0  # this replica does not have v9 either
        assert await store.expire_parked() == {"unknown_definition_version": 1}
    (row,) = await pg.fetch("SELECT headers FROM sfworkflow.outbox WHERE kind = 'dead_letter'")
    assert row["headers"]["x-sfworkflow-reason"] == "unknown_definition_version"
    assert "a replica that has sequence v9" in row["headers"]["x-sfworkflow-detail"]
    assert (await instance(pg, "on-v9"))["state"] == "sending"  # untouched
