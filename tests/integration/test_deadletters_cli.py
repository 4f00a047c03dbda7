"""`sfworkflow dead-letters list | show | redrive | purge` against the real service, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from sfworkflow.cli import main as cli
from sfworkflow.cli.dead_letters import dead_letters
from sfworkflow.cli.main import build_parser
from sfworkflow.ops import dead_letters as deadletter_queue
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import DEAD_Q, queue_depth, quick, wait_all_published, wait_state
from tests.support import Amqp, enrolled_data, event, instance, running_service


async def _cli(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `sfworkflow dead-letters ARGV`; its exit code and what it printed (without service log lines)."""
    args = build_parser().parse_args(["dead-letters", *argv])
    capsys.readouterr()
    rc = await dead_letters(settings, args)
    return rc, "\n".join(line for line in capsys.readouterr().out.splitlines() if not _is_log_line(line))


def _is_log_line(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and "level" in value


async def _listed(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out = await _cli(settings, capsys, "list", "--json", *argv)
    assert rc == 0, out
    return json.loads(out)


async def _depth(settings: Settings) -> int:
    return (await queue_depth(settings.amqp_url, DEAD_Q))[0]


async def _wait_depth(settings: Settings, n: int, timeout: float = 15.0) -> None:
    async def reached() -> bool:
        return await _depth(settings) == n

    await wait_for(reached, timeout=timeout, what=f"{n} message(s) in {DEAD_Q}")


def _dead_headers(reason: str, routing_key: str, at: datetime, **extra: Any) -> dict[str, Any]:
    """The headers the service sets on a dead letter."""
    return {
        "x-sfworkflow-reason": reason,
        "x-sfworkflow-detail": f"test dead letter ({reason})",
        "x-sfworkflow-original-routing-key": routing_key,
        "x-sfworkflow-original-exchange": "sfworkflow.events",
        "x-sfworkflow-dead-lettered-at": at.isoformat(),
        "x-sfworkflow-original-content-type": "application/json",
        **extra,
    }


async def _put_dead(url: str, body: bytes, headers: dict[str, Any], message_id: str | None = None) -> str:
    """Publish a message straight into sfworkflow.dead (as the relay would); its message id."""
    message_id = message_id or str(uuid.uuid4())
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        msg = aio_pika.Message(
            body,
            headers=headers,
            message_id=message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await ch.default_exchange.publish(msg, routing_key=DEAD_Q, mandatory=True)
    finally:
        await conn.close()
    return message_id


async def test_list_groups_by_reason_and_list_and_show_lose_nothing(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_version = orjson.dumps(event("sequence.enrolled", "v9", enrolled_data(steps=1), schema_version=9))
    bodies = [b"{not json", b"{still not json", bad_version]
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        for i, body in enumerate(bodies):
            await mq.publish_raw(body, headers={"x-producer": "tests", "x-n": i}, message_id=str(uuid.uuid4()))
        await _wait_depth(settings, 3)
        await wait_all_published(pg)

    listed = await _listed(settings, capsys)
    assert listed["read"] == listed["matching"] == 3
    assert [(g["reason"], g["count"]) for g in listed["by_reason"]] == [
        ("invalid_json", 2),
        ("unsupported_schema_version", 1),
    ]
    for g in listed["by_reason"]:
        assert g["oldest"] <= g["newest"]
    assert {m["reason"] for m in listed["messages"]} == {"invalid_json", "unsupported_schema_version"}
    assert all(m["original_routing_key"] == "sequence.enrolled" for m in listed["messages"])
    [versioned] = [m for m in listed["messages"] if m["reason"] == "unsupported_schema_version"]
    assert versioned["event_type"] == "sequence.enrolled" and "version 9" in versioned["detail"]

    rc, text = await _cli(settings, capsys, "list")
    assert rc == 0
    assert "sfworkflow.dead: 3 dead letter(s) of 3" in text
    assert any(line.split()[:2] == ["invalid_json", "2"] for line in text.splitlines())
    assert versioned["message_id"] in text

    assert (await _listed(settings, capsys, "--reason", "invalid_json"))["matching"] == 2
    assert len((await _listed(settings, capsys, "--limit", "1"))["messages"]) == 1

    rc, shown = await _cli(settings, capsys, "show", versioned["message_id"])
    assert rc == 0
    assert "x-sfworkflow-reason: unsupported_schema_version" in shown
    assert "x-sfworkflow-original-routing-key: sequence.enrolled" in shown
    assert "x-producer: tests" in shown
    assert '"schema_version": 9' in shown  # pretty JSON body
    invalid_id = next(m["message_id"] for m in listed["messages"] if m["reason"] == "invalid_json")
    rc, shown = await _cli(settings, capsys, "show", invalid_id)
    assert rc == 0 and "b'{" in shown  # not JSON: a repr of the bytes
    capsys.readouterr()
    rc = await dead_letters(settings, build_parser().parse_args(["dead-letters", "show", "no-such-id"]))
    out, missing = capsys.readouterr()  # an error: on stderr, stdout left empty
    assert (rc, out) == (1, "") and "no dead letter with message id 'no-such-id'" in missing

    # Nothing was taken away: the same three messages, byte for byte, with their headers.
    assert await _depth(settings) == 3
    async with Amqp(settings.amqp_url) as mq:
        left = await mq.drain(DEAD_Q)
    assert sorted(m.body for m in left) == sorted(bodies)
    assert sorted(m.headers["x-n"] for m in left) == [0, 1, 2]


async def test_redrive_of_a_still_invalid_event_is_dead_lettered_again_and_counted(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = event("sequence.enrolled", "still-bad", enrolled_data(steps=1), schema_version=7)
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await mq.publish_raw(orjson.dumps(ev), headers={"x-producer": "tests"}, message_id=ev["event_id"])
        await _wait_depth(settings, 1)
        for n in (1, 2):
            rc, out = await _cli(settings, capsys, "redrive")
            assert rc == 0, out
            assert "1 redriven, 0 refused, 0 failed" in out
            assert f"as sequence.enrolled (redrive {n})" in out
            # The service rejects it again; the new dead letter carries the redrive count.
            await wait_for(lambda n=n: _redrives_are(settings, [n]), what=f"dead letter with redrives {n}")
        rc, out = await _cli(settings, capsys, "redrive", "--max-redrives", "2")
        assert rc == 1
        assert "refused" in out and "already redriven 2 time(s)" in out
        assert "0 redriven, 1 refused, 0 failed" in out
        await wait_all_published(pg)

    async with Amqp(settings.amqp_url) as mq:
        [left] = await mq.drain(DEAD_Q)
    assert orjson.loads(left.body) == ev
    assert left.headers["x-sfworkflow-redrives"] == 2
    assert left.headers["x-sfworkflow-reason"] == "unsupported_schema_version"
    assert left.headers["x-producer"] == "tests"  # original headers survive every round
    # A redrive publishes it under the producer's message id, so that id survives every round too.
    assert left.headers["x-sfworkflow-original-message-id"] == ev["event_id"]
    assert left.content_type == "application/json"
    assert await instance(pg, "still-bad") is None


async def _redrives_are(settings: Settings, expected: list[int]) -> bool:
    async with deadletter_queue.DeadLetterQueue(settings) as dlq:
        return sorted([dl.redrives async for dl in dlq.read()]) == expected


async def test_redrive_applies_an_event_that_is_valid_now_and_dry_run_changes_nothing(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    fixed = event("sequence.enrolled", "fixed-now", enrolled_data(steps=1))
    other = event("sequence.enrolled", "left-alone", enrolled_data(steps=1))
    async with running_service(quick(settings)):
        fixed_id = await _put_dead(
            settings.amqp_url,
            orjson.dumps(fixed),
            _dead_headers("schema_violation", "sequence.enrolled", now - timedelta(minutes=5), **{"x-producer": "t"}),
        )
        other_id = await _put_dead(
            settings.amqp_url, orjson.dumps(other), _dead_headers("invalid_json", "sequence.enrolled", now)
        )
        rc, out = await _cli(settings, capsys, "redrive", "--reason", "schema_violation", "--dry-run")
        assert rc == 0
        assert f"would      {fixed_id} schema_violation: redrive to sfworkflow.events" in out
        assert "dry run: 1 would be redriven, 0 refused, 0 failed, 1 skipped" in out
        await asyncio.sleep(0.5)
        assert await _depth(settings) == 2
        assert await instance(pg, "fixed-now") is None

        rc, out = await _cli(settings, capsys, "redrive", "--event-type", "sequence.enrolled", "--id", fixed_id)
        assert rc == 0, out
        assert "1 redriven, 0 refused, 0 failed, 1 skipped" in out
        await wait_state(pg, "fixed-now", "sending")
        await wait_all_published(pg)

    assert await instance(pg, "left-alone") is None
    async with Amqp(settings.amqp_url) as mq:
        [left] = await mq.drain(DEAD_Q)
        assert left.message_id == other_id and orjson.loads(left.body) == other
        assert await mq.drain_events() == []


async def test_redrive_of_an_expired_parked_event_is_applied_once_its_instance_allows_it(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """transition_not_allowed: the event's id is in the inbox; the redrive releases it, so it is not a duplicate."""
    async with running_service(quick(settings, park_timeout_s=0.5)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "late", enrolled_data(steps=2)))
        await wait_state(pg, "late", "sending")
        early = event("sequence.step_sent", "late", {"step": 1, "provider_message_id": "p1"})
        await mq.publish(early)
        await _wait_depth(settings, 1, timeout=20)  # parked, then dead-lettered by the parked sweep
        await mq.publish(event("sequence.step_sent", "late", {"step": 0, "provider_message_id": "p0"}))
        await wait_for(lambda: _cursor_is(pg, "late", 1), what="step 1 being sent")

        rc, out = await _cli(settings, capsys, "redrive", "--reason", "transition_not_allowed", "--dry-run")
        assert rc == 0 and f"inbox entry of event {early['event_id']} would release" in out
        rc, out = await _cli(settings, capsys, "redrive", "--reason", "transition_not_allowed")
        assert rc == 0, out
        assert f"inbox entry of event {early['event_id']} released" in out
        await wait_state(pg, "late", "completed")
        await wait_all_published(pg)

        # Redriving an event that was applied since is skipped, not dropped silently as a duplicate.
        headers = _dead_headers("transition_not_allowed", "sequence.step_sent", datetime.now(UTC))
        await _put_dead(settings.amqp_url, orjson.dumps(early), headers)
        rc, out = await _cli(settings, capsys, "redrive")
        assert rc == 0 and "was applied or parked since" in out
        assert "0 redriven, 0 refused, 0 failed, 1 skipped" in out
        assert await _depth(settings) == 1

        # Still so once retention has pruned its inbox entry: its instance's history names it.
        await pg.execute("DELETE FROM sfworkflow.inbox WHERE event_id = $1", early["event_id"])
        rc, out = await _cli(settings, capsys, "redrive")
        assert rc == 0 and "was applied or parked since" in out
        assert "0 redriven, 0 refused, 0 failed, 1 skipped" in out
        assert await _depth(settings) == 1


async def _cursor_is(pg: asyncpg.Connection, entity: str, cursor: int) -> bool:
    row = await instance(pg, entity)
    return row is not None and row["context"].get("cursor") == cursor


async def test_purge_removes_only_dead_letters_older_than_the_age(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_service(quick(settings), consume=False):
        pass  # declares the topology
    now = datetime.now(UTC)
    body = orjson.dumps(event("sequence.enrolled", "old", enrolled_data(steps=1)))
    ten_days = await _put_dead(settings.amqp_url, body, _dead_headers("invalid_json", "a", now - timedelta(days=10)))
    three_hours = await _put_dead(settings.amqp_url, body, _dead_headers("too_large", "b", now - timedelta(hours=3)))
    recent = await _put_dead(settings.amqp_url, body, _dead_headers("invalid_json", "c", now - timedelta(minutes=5)))

    rc, out = await _cli(settings, capsys, "purge", "--older-than", "7d", "--dry-run")
    assert rc == 0 and f"would purge {ten_days}" in out and "dry run: would purge 1" in out
    assert await _depth(settings) == 3

    rc, out = await _cli(settings, capsys, "purge", "--older-than", "7d")
    assert rc == 0 and "purged 1 dead letter(s)" in out and "kept 2" in out
    rc, out = await _cli(settings, capsys, "purge", "--older-than", "1h", "--reason", "invalid_json")
    assert rc == 0 and "purged 0" in out
    rc, out = await _cli(settings, capsys, "purge", "--older-than", "30m")
    assert rc == 0 and f"purged      {three_hours}" in out and "purged 1" in out

    async with Amqp(settings.amqp_url) as mq:
        assert [m.message_id for m in await mq.drain(DEAD_Q)] == [recent]


def test_purge_rejects_an_unreadable_age(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dead-letters", "purge", "--older-than", "7 days"])
    assert "is not an age" in capsys.readouterr().err


def test_purge_refuses_an_age_without_a_unit(capsys: pytest.CaptureFixture[str]) -> None:
    """A purge deletes: `30` (seconds elsewhere) meant as 30 days would purge nearly everything."""
    for bare in ("30", "7.5", " 2 "):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["dead-letters", "purge", "--older-than", bare])
        assert "has no unit" in capsys.readouterr().err


async def test_quorum_dead_letters_read_many_times_are_refreshed_not_dropped(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quorum queues count every return to the queue; a worn message is re-published unchanged."""
    s = dataclasses.replace(settings, queue_type="quorum")
    async with running_service(quick(s), consume=False):
        pass
    monkeypatch.setattr(deadletter_queue, "REFRESH_AT", 3)
    message_id = await _put_dead(
        s.amqp_url, b'{"x": 1}', _dead_headers("not_an_object", "k", datetime.now(UTC), **{"x-producer": "t"})
    )
    counts = []
    for _ in range(6):
        async with deadletter_queue.DeadLetterQueue(s) as dlq:
            counts.extend([dl.delivery_count async for dl in dlq.read()])
    assert counts == [0, 1, 2, 3, 0, 1]  # refreshed after its third return
    assert "re-published unchanged" in capsys.readouterr().err
    async with Amqp(s.amqp_url) as mq:
        [left] = await mq.drain(DEAD_Q)
    assert (left.message_id, left.body, left.headers["x-producer"]) == (message_id, b'{"x": 1}', "t")
    assert left.headers["x-sfworkflow-reason"] == "not_an_object"


async def test_errors_say_what_happened_and_what_to_do(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFWORKFLOW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SFWORKFLOW_USE_UVLOOP", "false")
    monkeypatch.setenv("SFWORKFLOW_AMQP_URL", "amqp://guest:s3cret-pw@127.0.0.1:1/")
    rc = await asyncio.to_thread(cli.main, ["dead-letters", "list"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/" in err and "SFWORKFLOW_AMQP_URL" in err
    assert "s3cret-pw" not in err

    monkeypatch.setenv("SFWORKFLOW_AMQP_URL", settings.amqp_url)  # a fresh vhost: the service never ran there
    rc = await asyncio.to_thread(cli.main, ["dead-letters", "redrive"])
    err = capsys.readouterr().err
    assert rc == 1 and "queue sfworkflow.dead does not exist" in err and "sfworkflow run" in err
