"""Bad input: every unusable message lands in sfworkflow.dead, unchanged, with a reason code and a
readable detail; it is acked (nothing stuck, nothing requeued) and the queue keeps flowing."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    DEAD_Q,
    Inbox,
    counter,
    events_depth,
    quick,
    wait_all_published,
    wait_state,
)
from tests.support import Amqp, enrolled_data, event, running_service


def _enrolled(**overrides: Any) -> dict[str, Any]:
    ev = event("sequence.enrolled", f"bad-{uuid.uuid4().hex[:6]}", enrolled_data(steps=1))
    ev.update(overrides)
    return ev


def _without_tenant() -> bytes:
    ev = _enrolled()
    del ev["tenant_id"]
    return orjson.dumps(ev)


def _invalid_data() -> bytes:
    ev = _enrolled()
    ev["data"]["steps"] = []  # minItems 1
    ev["data"]["recipient"]["channel"] = "pigeon"
    return orjson.dumps(ev)


def _too_large() -> bytes:
    ev = _enrolled()
    ev["data"]["sequence_id"] = "s" * 200
    ev["data"]["steps"] = [{"template_id": f"tpl-{'x' * 60}-{i}", "delay_seconds": 0} for i in range(25)]
    body = orjson.dumps(ev)
    assert 2048 <= len(body) < 4096
    return body


# (case id, body, publish kwargs, expected reason, settings overrides, expected detail fragment)
CASES = [
    ("invalid_json", b"{not json", {}, "invalid_json", {}, "not valid UTF-8 JSON"),
    ("invalid_utf8", b"\xff\xfe", {}, "invalid_json", {}, "not valid UTF-8 JSON"),
    ("not_an_object", b"[1,2]", {}, "not_an_object", {}, "list"),
    ("too_large", _too_large(), {}, "too_large", {"max_message_bytes": 1024}, "limit is 1024"),
    (
        "unsupported_content_type",
        orjson.dumps(_enrolled()),
        {"content_type": "text/plain"},
        "unsupported_content_type",
        {},
        "text/plain",
    ),
    ("schema_violation_envelope", _without_tenant(), {}, "schema_violation", {}, "tenant_id"),
    ("schema_violation_data", _invalid_data(), {}, "schema_violation", {}, "data of sequence.enrolled"),
    (
        "unknown_event_type",
        orjson.dumps(_enrolled(event_type="sequence.exploded")),
        {"routing_key": "sequence.exploded"},
        "unknown_event_type",
        {},
        "sequence.exploded",
    ),
    (
        "unsupported_schema_version",
        orjson.dumps(_enrolled(schema_version=2)),
        {},
        "unsupported_schema_version",
        {},
        "version 2",
    ),
]


@pytest.mark.parametrize(
    ("body", "kwargs", "reason", "overrides", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_message_is_dead_lettered(
    settings: Settings,
    pg: asyncpg.Connection,
    body: bytes,
    kwargs: dict[str, Any],
    reason: str,
    overrides: dict[str, Any],
    fragment: str,
) -> None:
    s = quick(settings, **overrides)
    headers = {"x-producer": "tests", "x-attempt": 1}
    async with running_service(s) as service, Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        commands = Inbox(mq, COMMANDS_Q)
        original_id = str(uuid.uuid4())
        await mq.publish_raw(body, headers=headers, message_id=original_id, **kwargs)
        # A valid event after the bad one is applied: the queue keeps flowing.
        good = event("sequence.enrolled", "good-after", enrolled_data(steps=1))
        await mq.publish(good)
        await wait_state(pg, "good-after", "sending")
        await dead.wait_raw(1)
        await commands.wait(1)
        await wait_all_published(pg)
        letters = await dead.settle_raw(0.3)
        dead_metric = counter(service.metrics.dead, reason)
        dl_metric = counter(service.metrics.events, "sequence", "dead_lettered")

    assert len(letters) == 1
    m = dead.messages[0]
    assert m.body == body  # byte for byte
    assert m.headers["x-sfworkflow-reason"] == reason
    detail = m.headers["x-sfworkflow-detail"]
    assert isinstance(detail, str) and detail.strip(), detail
    assert fragment in detail, detail
    assert m.headers["x-sfworkflow-original-routing-key"] == kwargs.get("routing_key", "sequence.enrolled")
    assert m.headers["x-sfworkflow-original-exchange"] == "sfworkflow.events"
    assert m.headers["x-producer"] == "tests" and m.headers["x-attempt"] == 1  # original headers kept
    # The dead letter has a message id of its own (it dedupes re-published dead letters); the original's is kept.
    assert m.headers["x-sfworkflow-original-message-id"] == original_id
    assert datetime.fromisoformat(m.headers["x-sfworkflow-dead-lettered-at"]).utcoffset() == timedelta(0)
    assert m.content_type == kwargs.get("content_type", "application/json")
    assert dead_metric == 1 and dl_metric == 1
    # Nothing stuck or requeued: once the service stopped (unacked deliveries would return), it is empty.
    assert await events_depth(settings.amqp_url) == (0, 0)
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox") == 1  # only the good event
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.instance") == 1
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'dead_letter' AND published_at IS NOT NULL"
        )
        == 1
    )


async def test_many_bad_messages_in_one_batch_do_not_block_good_ones(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """All the bad inputs at once, interleaved with good events: every one lands where it should."""
    s = quick(settings, max_message_bytes=1024)
    bad = [(c[1], c[2], c[3]) for c in CASES]
    async with running_service(s, consume=False) as service, Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        for i, (body, kwargs, _reason) in enumerate(bad):
            await mq.publish_raw(body, **kwargs)
            await mq.publish(event("sequence.enrolled", f"good-{i}", enrolled_data(steps=1)))
        assert service.consumer is not None
        await service.consumer.start()  # everything is in the queue: batches mix good and bad
        await wait_for(lambda: _instances(pg, len(bad)), what="every good event applied")
        await dead.wait_raw(len(bad))
        await wait_all_published(pg)
        letters = await dead.settle_raw(0.3)

    assert len(letters) == len(bad)
    assert sorted(m.headers["x-sfworkflow-reason"] for m in dead.messages) == sorted(r for _b, _k, r in bad)
    assert sorted(m.body for m in dead.messages) == sorted(b for b, _k, _r in bad)
    assert await events_depth(settings.amqp_url) == (0, 0)


async def _instances(pg: asyncpg.Connection, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE state = 'sending'") == n
