"""The self_improvement workflow end to end against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from sfworkflow.settings import Settings
from sfworkflow.workflows.self_improvement import claim_key, register_key
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, history_for_event, quick, wait_all_published
from tests.support import TENANT, Amqp, event, history, instance, outbox, running_service

WORKFLOW = "self_improvement"
COMMANDS_Q = f"sfworkflow.commands.{WORKFLOW}"
COMPENSATIONS_Q = f"sfworkflow.compensations.{WORKFLOW}"
H1 = "sha256:" + "1a" * 32
H2 = "sha256:" + "2b" * 32


def ev(name: str, entity: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return event(f"{WORKFLOW}.{name}", entity, data or {})


async def state_of(pg: asyncpg.Connection, entity: str) -> str | None:
    row = await instance(pg, entity, TENANT, WORKFLOW)
    return None if row is None else row["state"]


async def wait_state(pg: asyncpg.Connection, entity: str, state: str, timeout: float = 15.0) -> None:
    async def reached() -> bool:
        return await state_of(pg, entity) == state

    await wait_for(reached, timeout=timeout, what=f"{entity} in state {state!r}")


async def transitions(pg: asyncpg.Connection, entity: str) -> list[tuple[str, str, str, str]]:
    return [(h["event_type"], h["outcome"], h["from_state"], h["to_state"]) for h in await history(pg, entity)]


async def register(pg: asyncpg.Connection) -> Any:
    return await pg.fetchval("SELECT value FROM sfworkflow.register WHERE key = $1", register_key(TENANT))


async def claims(pg: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await pg.fetch("SELECT claim_key, entity_id FROM sfworkflow.claim ORDER BY claim_key")
    return [(r["claim_key"], r["entity_id"]) for r in rows]


def of_type(bodies: list[dict[str, Any]], entity: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        b for b in bodies if b["entity_id"] == entity and (name is None or b["command_type"] == f"{WORKFLOW}.{name}")
    ]


async def next_command(commands: Inbox, entity: str, name: str, n: int = 1, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for the n-th `name` command of `entity` and return it."""

    async def arrived() -> list[dict[str, Any]]:
        await commands.poll()
        found = of_type(commands.bodies, entity, name)
        return found if len(found) >= n else []

    return (await wait_for(arrived, timeout=timeout, what=f"{name} #{n} of {entity}"))[n - 1]


async def run_to_validating(
    mq: Amqp, commands: Inbox, pg: asyncpg.Connection, entity: str, eval_hash: str, patches: int = 1
) -> None:
    """Drive a cycle through the eval and `patches` applied patches (the last one being validated)."""
    await mq.publish(ev("cycle_started", entity, {"prompt_id": "prompt-sales-email", "max_patches": 3}))
    await next_command(commands, entity, "run_eval")
    await mq.publish(ev("eval_completed", entity, {"eval_hash": eval_hash, "score": 0.71}))
    await next_command(commands, entity, "propose_patch")
    for n in range(1, patches + 1):
        await mq.publish(ev("patch_proposed", entity, {"patch_id": f"{entity}-p{n}"}))
        await next_command(commands, entity, "apply_patch", n)
        await mq.publish(ev("patch_applied", entity, {"patch_id": f"{entity}-p{n}", "attempt": 1}))
        await next_command(commands, entity, "validate", n)
    await wait_state(pg, entity, "validating")


# ---- happy path --------------------------------------------------------------------------------------
async def test_happy_path_two_patches_validated_and_remembered(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await run_to_validating(mq, commands, pg, "c-happy", H1, patches=2)
        assert await claims(pg) == [(claim_key(TENANT, H1), "c-happy")]
        await mq.publish(ev("validated", "c-happy", {"round": 2, "score": 0.9}))
        await wait_state(pg, "c-happy", "improved")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        compensations = await mq.drain_json(COMPENSATIONS_Q)

    mine = of_type(bodies, "c-happy")
    assert [b["command_type"].removeprefix(f"{WORKFLOW}.") for b in mine] == [
        "run_eval",
        "propose_patch",
        "apply_patch",
        "validate",
        "apply_patch",
        "validate",
    ]
    assert mine[-1]["data"] == {"eval_hash": H1, "patch_ids": ["c-happy-p1", "c-happy-p2"], "round": 2}
    assert all(b["attempt"] == 1 for b in mine)
    assert all(H1 in b["idempotency_key"] for b in mine[1:])
    assert compensations == []
    assert await register(pg) == H1
    assert await claims(pg) == []  # released at the end
    assert [t[3] for t in await transitions(pg, "c-happy")] == [
        "evaluating",
        "checking",
        "proposing",
        "applying",
        "validating",
        "applying",
        "validating",
        "improved",
    ]
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "c-happy", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]


# ---- duplicates --------------------------------------------------------------------------------------
async def test_duplicate_events_are_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(ev("cycle_started", "c-dup"))
        await next_command(commands, "c-dup", "run_eval")
        done = ev("eval_completed", "c-dup", {"eval_hash": H1, "score": 0.5})
        await mq.publish(done, times=3)  # the same event redelivered
        await next_command(commands, "c-dup", "propose_patch")
        await mq.publish(ev("patch_proposed", "c-dup", {"patch_id": "p1"}))
        await next_command(commands, "c-dup", "apply_patch")
        await mq.publish(ev("patch_applied", "c-dup", {"patch_id": "p1"}))
        await next_command(commands, "c-dup", "validate")
        # the same facts again under new event ids: stale, ignored (not parked)
        again = [
            ev("patch_applied", "c-dup", {"patch_id": "p1"}),
            ev("patch_proposed", "c-dup", {"patch_id": "p1"}),
            ev("eval_completed", "c-dup", {"eval_hash": H2, "score": 0.9}),
        ]
        for e in again:
            await mq.publish(e)
        for e in again:
            await wait_for(lambda e=e: history_for_event(pg, e["event_id"]), what=f"{e['event_type']} recorded")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)

    assert [b["command_type"] for b in of_type(bodies, "c-dup")] == [
        f"{WORKFLOW}.run_eval",
        f"{WORKFLOW}.propose_patch",
        f"{WORKFLOW}.apply_patch",
        f"{WORKFLOW}.validate",
    ]
    assert len(await history_for_event(pg, done["event_id"])) == 1
    for e in again:
        (row,) = await history_for_event(pg, e["event_id"])
        assert (row["outcome"], row["to_state"]) == ("ignored", "validating")
    assert await state_of(pg, "c-dup") == "validating"
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0


async def test_an_eval_with_the_last_successful_hash_ends_unchanged_with_no_patch(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await run_to_validating(mq, commands, pg, "c-first", H1)
        await mq.publish(ev("validated", "c-first", {"round": 1}))
        await wait_state(pg, "c-first", "improved")
        assert await register(pg) == H1

        await mq.publish(ev("cycle_started", "c-again"))
        await next_command(commands, "c-again", "run_eval")
        await mq.publish(ev("eval_completed", "c-again", {"eval_hash": H1, "score": 0.9}))
        await wait_state(pg, "c-again", "unchanged")
        # a patch proposed anyway is ignored: the cycle is over
        late = ev("patch_proposed", "c-again", {"patch_id": "nope"})
        await mq.publish(late)
        await wait_for(lambda: history_for_event(pg, late["event_id"]), what="late proposal recorded")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [b["command_type"] for b in of_type(bodies, "c-again")] == [f"{WORKFLOW}.run_eval"]
    assert (await history_for_event(pg, late["event_id"]))[0]["outcome"] == "ignored"
    assert [t[3] for t in await transitions(pg, "c-again")] == ["evaluating", "checking", "unchanged", "unchanged"]
    lookup_row = (await history(pg, "c-again"))[2]
    assert lookup_row["event_type"] == f"{WORKFLOW}.lookup_result"
    assert {k: lookup_row["detail"][k] for k in ("unchanged", "last_success", "trigger")} == {
        "unchanged": True,
        "last_success": H1,
        "trigger": "lookup_result",
    }
    assert await claims(pg) == []
    assert await register(pg) == H1


async def test_a_second_live_cycle_on_the_same_eval_hash_is_refused(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(ev("cycle_started", "c-owner"))
        await mq.publish(ev("cycle_started", "c-twin"))
        await next_command(commands, "c-owner", "run_eval")
        await next_command(commands, "c-twin", "run_eval")
        await mq.publish(ev("eval_completed", "c-owner", {"eval_hash": H2, "score": 0.4}))
        await next_command(commands, "c-owner", "propose_patch")
        await mq.publish(ev("eval_completed", "c-twin", {"eval_hash": H2, "score": 0.4}))
        await wait_state(pg, "c-twin", "duplicate")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [b["command_type"] for b in of_type(bodies, "c-twin")] == [f"{WORKFLOW}.run_eval"]
    assert await state_of(pg, "c-owner") == "proposing"
    assert await claims(pg) == [(claim_key(TENANT, H2), "c-owner")]
    refused = (await history(pg, "c-twin"))[2]
    assert refused["event_type"] == f"{WORKFLOW}.claim_refused"
    assert {k: refused["detail"][k] for k in ("held_by", "claim", "trigger")} == {
        "held_by": "c-owner",
        "claim": claim_key(TENANT, H2),
        "trigger": "claim_refused",
    }


# ---- failures ----------------------------------------------------------------------------------------
async def test_fatal_error_after_patches_rolls_them_back_on_the_compensation_queue(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await run_to_validating(mq, commands, pg, "c-bad", H1, patches=2)
        await mq.publish(ev("fatal_error", "c-bad", {"error_code": "regression_detected"}))
        await wait_state(pg, "c-bad", "rolled_back")
        (comp,) = await compensations.wait(1)
        await wait_all_published(pg)
        assert await compensations.settle(0.3) == [comp]

    assert comp["command_type"] == f"{WORKFLOW}.rollback_prompt_patches"
    assert comp["kind"] == "compensation"
    assert comp["data"] == {
        "patch_ids": ["c-bad-p2", "c-bad-p1"],
        "eval_hash": H1,
        "error_code": "regression_detected",
        "unconfirmed_patch_id": None,
    }
    assert comp["idempotency_key"] == f"{TENANT}:{WORKFLOW}:c-bad:{H1}:rollback_prompt_patches"
    lifecycle = [m["body"] for m in await outbox(pg, "c-bad", "lifecycle")]
    assert [b["event_type"] for b in lifecycle] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    assert lifecycle[1]["data"] == {"reason": "fatal error: regression_detected", "error_code": "regression_detected"}
    assert lifecycle[2]["data"] == {"compensations": [f"{WORKFLOW}.rollback_prompt_patches"]}
    assert await claims(pg) == [] and await register(pg) is None


async def test_fatal_error_before_any_patch_fails_without_compensation(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(ev("cycle_started", "c-early"))
        await next_command(commands, "c-early", "run_eval")
        await mq.publish(ev("eval_completed", "c-early", {"eval_hash": H1, "score": 0.5}))
        await next_command(commands, "c-early", "propose_patch")
        await mq.publish(ev("fatal_error", "c-early", {"error_code": "no_patch_found"}))
        await wait_state(pg, "c-early", "failed")
        await wait_all_published(pg)
        await commands.settle(0.3)
        assert await mq.drain_json(COMPENSATIONS_Q) == []

    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "c-early", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.failed", "workflow.completed"]
    assert await outbox(pg, "c-early", "compensation") == []
    assert await claims(pg) == []  # a failed eval hash may be tried again


async def test_retryable_failures_retry_with_the_same_key_then_roll_back(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await run_to_validating(mq, commands, pg, "c-retry", H1)
        started = time.monotonic()
        failures = []
        for attempt in (1, 2, 3):
            failed = {"command": "validate", "error_code": "validator_busy", "retryable": True, "attempt": attempt}
            failures.append(ev("command_failed", "c-retry", {**failed, "round": 1}))
            await mq.publish(failures[-1])
            if attempt < 3:
                await next_command(commands, "c-retry", "validate", attempt + 1)
        waited = time.monotonic() - started
        await wait_state(pg, "c-retry", "rolled_back")
        (comp,) = await compensations.wait(1)
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    validates = of_type(bodies, "c-retry", "validate")
    assert [v["attempt"] for v in validates] == [1, 2, 3]
    assert {v["idempotency_key"] for v in validates} == {f"{TENANT}:{WORKFLOW}:c-retry:{H1}:validate:1"}
    assert len({v["command_id"] for v in validates}) == 3
    assert all(v["data"] == validates[0]["data"] for v in validates)
    # The backoffs the first two failures scheduled, ~1 s then ~2 s (+-20 % jitter), from the history rather
    # than a wall-clock reading, which a loaded machine stretches; no retry is sent before its time.
    delays = [(await history_for_event(pg, f["event_id"]))[0]["detail"]["retry_in_s"] for f in failures[:2]]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4, delays
    assert waited >= sum(delays) - 0.02, (waited, delays)
    assert comp["data"]["patch_ids"] == ["c-retry-p1"]
    assert comp["data"]["error_code"] == "validator_busy"
    assert [t[3] for t in await transitions(pg, "c-retry")][-5:] == [
        "retry_wait",
        "validating",
        "retry_wait",
        "validating",
        "rolled_back",
    ]


# ---- out of order ------------------------------------------------------------------------------------
async def test_out_of_order_events_are_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        # the eval result overtakes the cycle's start: parked until the instance exists
        early_eval = ev("eval_completed", "c-ooo", {"eval_hash": H1, "score": 0.6})
        await mq.publish(early_eval)
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) FROM sfworkflow.parked WHERE event_id = $1", early_eval["event_id"]),
            what="eval parked",
        )
        await mq.publish(ev("cycle_started", "c-ooo"))
        await next_command(commands, "c-ooo", "propose_patch")
        # the patch's application is reported before its proposal: parked until the patch is applied
        early_applied = ev("patch_applied", "c-ooo", {"patch_id": "p1"})
        await mq.publish(early_applied)
        await wait_for(
            lambda: pg.fetchval(
                "SELECT count(*) FROM sfworkflow.parked WHERE event_id = $1", early_applied["event_id"]
            ),
            what="patch_applied parked",
        )
        await mq.publish(ev("patch_proposed", "c-ooo", {"patch_id": "p1"}))
        await next_command(commands, "c-ooo", "validate")
        await wait_state(pg, "c-ooo", "validating")
        await mq.publish(ev("validated", "c-ooo", {"round": 1}))
        await wait_state(pg, "c-ooo", "improved")
        await wait_all_published(pg)

    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0
    rows = await history(pg, "c-ooo")
    by_event = {r["event_id"]: r for r in rows if r["event_id"]}
    assert by_event[early_eval["event_id"]]["detail"]["unparked"] is True
    assert by_event[early_applied["event_id"]]["detail"]["unparked"] is True
    assert [t[3] for t in await transitions(pg, "c-ooo")] == [
        "evaluating",
        "checking",
        "proposing",
        "applying",
        "validating",
        "improved",
    ]
    assert await register(pg) == H1
