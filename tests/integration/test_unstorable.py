"""Messages PostgreSQL cannot store as they are (a NUL character where a jsonb value or a dead letter's
header row would hold it) never jam a consumer channel: each is dead-lettered with its unstorable parts
replaced (the detail says so), and a good event published right after it is applied within seconds.
"""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import DEAD_Q, Inbox, quick
from tests.support import Amqp, enrolled_data, event, instance, running_service


def _with_nul_property_name() -> bytes:
    ev = event("sequence.enrolled", f"nul-{uuid.uuid4().hex[:6]}", enrolled_data())
    ev["\u0000"] = "x"  # an extra property whose name is a NUL: the schema error names it
    return orjson.dumps(ev)


def _with_nul_data_property_name() -> bytes:
    data = enrolled_data()
    data["recipient"]["\u0000evil"] = 1
    return orjson.dumps(event("sequence.enrolled", f"nul-{uuid.uuid4().hex[:6]}", data))


# (what, publish keyword arguments): each one a message that cannot be stored exactly as it came.
CASES = {
    "nul in an envelope property name": {"body": _with_nul_property_name()},
    "nul in a data property name": {"body": _with_nul_data_property_name()},
    "nul in a non-JSON content type": {"body": b"hello", "content_type": "text/plain\x00; x=\x00"},
    "nul in the routing key": {"body": b"not json", "routing_key": "sequence.enrolled\x00"},
    "nul in a header name": {"body": b"not json", "headers": {"x-\x00name": "v"}},
    "nul in a header value": {"body": b"not json", "headers": {"x-name": "a\x00b", "x-list": ["\x00", {"\x00": 1}]}},
    "nul in a nested header table": {"body": b"not json", "headers": {"x-t": {"k\x00": {"\x00": "\x00"}}}},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_an_unstorable_message_is_dead_lettered_and_the_next_event_applied(
    settings: Settings, pg: asyncpg.Connection, case: str
) -> None:
    kw = dict(CASES[case])
    body = kw.pop("body")
    routing_key = kw.pop("routing_key", "sequence.enrolled")
    # One consumer channel: the good event waits behind the bad one unless the bad one is settled.
    async with running_service(quick(settings, consumers=1)), Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        await mq.publish_raw(body, routing_key=routing_key, message_id=str(uuid.uuid4()), **kw)
        await mq.publish(event("sequence.enrolled", "after-the-bad-one", enrolled_data(delay_s=3600)))
        await wait_for(lambda: instance(pg, "after-the-bad-one"), timeout=10, what="the good event applied")
        (m,) = await dead.wait_raw(1, timeout=10)
        assert m.body == body  # the original bytes, untouched
        headers = m.headers or {}
        assert headers["x-sfworkflow-reason"] in ("schema_violation", "unsupported_content_type", "invalid_json")
        for k, v in headers.items():  # nothing NUL survives in what was stored and published
            assert "\x00" not in k and "\x00" not in repr(v)
        detail = str(headers["x-sfworkflow-detail"])
        assert "NUL" in detail and "U+FFFD" in detail  # says what was replaced, and with what


async def test_a_message_whose_dead_letter_cannot_be_stored_at_all_is_published_raw(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    # The database refuses every dead-letter row (as it would a value no cleaning can fix) and counts
    # the tries in a sequence, which a rollback does not undo.
    await pg.execute(
        """
        CREATE SEQUENCE dead_letter_tries;
        CREATE FUNCTION refuse_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM nextval('dead_letter_tries'); RAISE EXCEPTION 'refused by the test'; END $$;
        CREATE TRIGGER refuse_dead_letters BEFORE INSERT ON sfworkflow.outbox
            FOR EACH ROW WHEN (NEW.kind = 'dead_letter') EXECUTE FUNCTION refuse_dead_letters();
        """
    )
    async with running_service(quick(settings, consumers=1)), Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        message_id = str(uuid.uuid4())
        await mq.publish_raw(b"not json", routing_key="sequence.enrolled", message_id=message_id, headers={"x-a": "1"})
        await mq.publish(event("sequence.enrolled", "after-the-bad-one", enrolled_data(delay_s=3600)))
        await wait_for(lambda: instance(pg, "after-the-bad-one"), timeout=10, what="the good event applied")
        (m,) = await dead.wait_raw(1, timeout=10)
        assert (m.body, m.message_id) == (b"not json", message_id)
        headers = m.headers or {}
        assert headers["x-sfworkflow-reason"] == "unstorable"
        assert headers["x-sfworkflow-first-reason"] == "invalid_json"
        assert "refused by the test" in str(headers["x-sfworkflow-detail"])
        assert headers["x-sfworkflow-original-routing-key"] == "sequence.enrolled"
    # The batch, the dead letter with its headers, the dead letter without them: then the raw publish.
    assert await pg.fetchval("SELECT last_value FROM dead_letter_tries") <= 3
