"""Security: SQL injection strings are stored verbatim through every field that reaches SQL; connection
URLs with passwords never show in logs, errors, /readyz or /metrics; /metrics and logs carry no
recipient addresses or phone numbers.

The password and personal-data checks run the real CLI (`python -m sfworkflow run`, JSON logs) as a
subprocess and read everything it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import orjson
import pytest

from sfworkflow import db
from sfworkflow.ops.inspect import load_instance
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.fuzz_support import http_get
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    DEAD_Q,
    Inbox,
    quick,
    same_utc_day_for,
    wait_all_published,
    wait_state,
)
from tests.support import TENANT, Amqp, event, running_service, terminate

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "S3cretPass"

# ---- (a) SQL injection ----------------------------------------------------------------------------
INJECTIONS = [
    "'; DROP TABLE sfworkflow.instance; --",
    "\\' OR 1=1 --",
    "$1",
    "’ OR ’1’=’1",  # unicode quotes
    '" OR ""="',
    "1); DELETE FROM sfworkflow.inbox; --",
    "$$; TRUNCATE sfworkflow.outbox; $$",
    "E'\\x27' || pg_sleep(5) || '",
    "%s %(x)s {0} :name ?",
    "'||(SELECT current_user)||'",
]
# entity_id admits no whitespace and no '/': the same attacks, spelled without them.
ENTITY_INJECTIONS = [
    "';DROP/**/TABLE/**/sfworkflow.instance;--".replace("/", ""),
    "\\'OR'1'='1'--",
    "$1",
    "’OR’1’=’1",
    '"OR""="',
    "1);DELETE(FROM)sfworkflow.inbox;--",
    "$$;TRUNCATE(sfworkflow.outbox);$$",
    "E'\\x27'||pg_sleep(5)||'",
    "%s%(x)s{0}:name?",
    "'||(SELECT(current_user))||'",
]


async def _tables(pg: asyncpg.Connection) -> list[str]:
    rows = await pg.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'sfworkflow' ORDER BY tablename")
    return [r["tablename"] for r in rows]


async def test_injection_strings_are_stored_verbatim_and_the_tables_stay_intact(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    tables = await _tables(pg)
    assert "instance" in tables and "inbox" in tables and "outbox" in tables
    cases = []
    for i, (entity, text) in enumerate(zip(ENTITY_INJECTIONS, INJECTIONS, strict=True)):
        data = {
            "sequence_id": text,
            "lead_id": text + f" #{i}",
            "recipient": {"channel": "email", "address": f"{text} <x{i}@example.com>"},
            "steps": [{"template_id": f"{text} tpl{i}", "delay_seconds": 0}],
        }
        ev = event("sequence.enrolled", entity, data, correlation_id=text, causation_id=text, trace_id=text)
        cases.append((entity, text, ev))
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        dead = Inbox(mq, DEAD_Q)
        for entity, text, ev in cases:
            await mq.publish_raw(orjson.dumps(ev), message_id=ev["event_id"], headers={"x-inj": text, text: entity})
        for entity, _text, _ev in cases:
            await wait_state(pg, entity, "sending")
        # Headers reach SQL with parked events and dead letters (jsonb).
        parked_ev = event("sequence.replied", ENTITY_INJECTIONS[0] + "-nobody", {}, causation_id=INJECTIONS[0])
        await mq.publish_raw(orjson.dumps(parked_ev), routing_key="sequence.replied", headers={"x-inj": INJECTIONS[0]})
        await mq.publish_raw(b"{not json", headers={"x-inj": INJECTIONS[1], INJECTIONS[2]: INJECTIONS[3]})
        # The worker answers with injection strings too.
        for entity, text, _ev in cases[:3]:
            answer = event(
                "sequence.step_sent",
                entity,
                {"step": 0, "provider_message_id": text},
                causation_id=text,
                correlation_id=text,
            )
            await mq.publish(answer)
        for entity, _t, _e in cases[:3]:
            await wait_state(pg, entity, "completed")
        sent = await commands.wait(len(cases))
        await wait_for(lambda: pg.fetchval("SELECT count(*) = 1 FROM sfworkflow.parked"), what="the parked event")
        letters = await dead.wait_raw(1)
        await wait_all_published(pg)

    assert await _tables(pg) == tables  # nothing dropped
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.instance") == len(cases)
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox") == len(cases) + 1 + 3
    for entity, text, ev in cases:
        row = await pg.fetchrow(
            "SELECT * FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = 'sequence' AND entity_id = $2",
            TENANT,
            entity,
        )
        assert row is not None, entity
        assert row["correlation_id"] == text
        ctx = row["context"]
        assert ctx["sequence_id"] == text and ctx["lead_id"] == ev["data"]["lead_id"]
        assert ctx["recipient"] == ev["data"]["recipient"] and ctx["steps"] == ev["data"]["steps"]
        assert (
            await pg.fetchval(
                "SELECT entity_id FROM sfworkflow.inbox WHERE tenant_id = $1 AND event_id = $2", TENANT, ev["event_id"]
            )
            == entity
        )
        effect = await pg.fetchval("SELECT effect_key FROM sfworkflow.effect WHERE instance_id = $1", row["id"])
        assert ev["data"]["steps"][0]["template_id"] in effect
        # What sfworkflow inspect reads: the same instance, found by its injection-string entity id.
        shown = await load_instance(pg, TENANT, "sequence", entity)
        assert shown is not None and shown["instance"]["entity_id"] == entity
    by_entity = {c["entity_id"]: c for c in sent}
    assert sorted(by_entity) == sorted(e for e, _t, _v in cases)
    for entity, text, ev in cases:
        c = by_entity[entity]
        assert c["correlation_id"] == text
        assert c["data"]["sequence_id"] == text and c["data"]["lead_id"] == ev["data"]["lead_id"]
        assert c["data"]["recipient"] == ev["data"]["recipient"]
        assert c["data"]["template_id"] == ev["data"]["steps"][0]["template_id"]
    parked = await pg.fetchrow("SELECT * FROM sfworkflow.parked")
    assert parked["entity_id"] == parked_ev["entity_id"] and parked["headers"]["x-inj"] == INJECTIONS[0]
    h = letters[0].headers
    assert h["x-inj"] == INJECTIONS[1] and h[INJECTIONS[2]] == INJECTIONS[3]
    stored = await pg.fetchval("SELECT headers FROM sfworkflow.outbox WHERE kind = 'dead_letter'")
    assert stored["x-inj"] == INJECTIONS[1] and stored[INJECTIONS[2]] == INJECTIONS[3]


async def test_a_command_issued_in_the_start_events_batch_carries_its_correlation_id(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    data = {
        "sequence_id": "s",
        "lead_id": "l",
        "recipient": {"channel": "sms", "address": "+15550000000"},
        "steps": [{"template_id": "t", "delay_seconds": 0}],
    }
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "corr-1", data, correlation_id="corr-xyz"))
        commands = await Inbox(mq, COMMANDS_Q).wait(1)
        await wait_all_published(pg)
    assert await pg.fetchval("SELECT correlation_id FROM sfworkflow.instance") == "corr-xyz"
    assert commands[0]["correlation_id"] == "corr-xyz"


# ---- running the CLI as a subprocess ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")}
    env.update({"SFWORKFLOW_PROCESSES": "1", **{"SFWORKFLOW_" + k.upper(): v for k, v in settings.items()}})
    env.setdefault("SFWORKFLOW_LOG_FORMAT", "json")
    env.setdefault("SFWORKFLOW_HTTP_HOST", "127.0.0.1")
    env.setdefault("SFWORKFLOW_QUEUE_TYPE", "classic")
    return env


# `sfworkflow run` with the start-up retry window cut from 30 s to 2 s (the only change), so a test of an
# unreachable dependency ends in seconds.
RUN_FAST_FAIL = (
    "import sys; import sfworkflow.runtime.service as s; s.STARTUP_RETRY_S = 2.0; "
    "from sfworkflow.cli.main import main; sys.exit(main(['run']))"
)


async def _run_to_exit(env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_FAST_FAIL,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


class CliService:
    """`python -m sfworkflow run` in a subprocess; everything it writes is kept in `output`."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env = env
        self.port = port
        self.output = ""
        self.returncode: int | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CliService]:
        with tempfile.TemporaryFile() as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sfworkflow", "run", cwd=REPO, env=self.env, stdout=log, stderr=log
            )
            try:
                await wait_for(self._ready, timeout=60, interval=0.2, what="the CLI service ready")
                yield self
            finally:
                await terminate(proc, 20)
                self.returncode = proc.returncode
                log.seek(0)
                self.output = log.read().decode("utf-8", "replace")

    async def _ready(self) -> bool:
        try:
            status, _ = await http_get(self.port, "/readyz")
        except OSError:
            return False
        return status == 200


def _log_lines(output: str) -> list[dict[str, Any]]:
    out = []
    for line in output.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


# ---- (b) passwords in connection URLs -------------------------------------------------------------
async def test_unreachable_postgres_url_password_never_shown() -> None:
    env = _env(
        database_url=f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/nope",
        amqp_url=f"amqp://guest:{PASSWORD}@127.0.0.1:2/",
        http_port="0",
        log_level="debug",
    )
    rc, out = await _run_to_exit(env)
    assert rc == 1, out[-2000:]
    assert PASSWORD not in out, out
    assert "postgresql://postgres:***@127.0.0.1:1/nope" in out  # the redacted form, in the logs and the error
    assert any(line.get("event") == "waiting for dependency" for line in _log_lines(out)), out[-2000:]
    assert "sfworkflow: PostgreSQL at postgresql://postgres:***@127.0.0.1:1/nope is not reachable" in out


@pytest.mark.parametrize("target", ["unreachable", "wrong_password"])
async def test_rabbitmq_url_password_never_shown(database_url: str, amqp_url: str, target: str) -> None:
    if target == "unreachable":
        amqp = f"amqp://guest:{PASSWORD}@127.0.0.1:1/"
    else:  # the broker answers, and refuses the password
        amqp = _with_password(amqp_url, PASSWORD)
    env = _env(
        database_url=_with_password(database_url, PASSWORD),  # trust auth: accepted whatever the password
        amqp_url=amqp,
        http_port="0",
        log_level="debug",
    )
    rc, out = await _run_to_exit(env)
    assert rc == 1, out[-2000:]
    assert PASSWORD not in out, out
    assert "guest:***@" in out
    assert "is not reachable" in out


@pytest.mark.parametrize("password", ["S3cret#Pass", "S3cret/Pass", "S3cret?Pass"])
async def test_a_password_with_url_delimiters_is_never_shown(password: str) -> None:
    env = _env(database_url=f"postgresql://postgres:{password}@127.0.0.1:1/nope", http_port="0")
    rc, out = await _run_to_exit(env)
    assert rc != 0
    assert "S3cret" not in out and "Pass@" not in out, out[-1500:]


async def test_readyz_metrics_and_logs_of_a_running_service_hold_no_password(database_url: str, amqp_url: str) -> None:
    assert "guest:guest@" in amqp_url  # the real broker's credentials are in the URL the service uses
    port = _free_port()
    env = _env(
        database_url=_with_password(database_url, PASSWORD),
        amqp_url=amqp_url,
        http_port=str(port),
        log_level="debug",
    )
    cli = CliService(env, port)
    async with cli.running():
        ready = await http_get(port, "/readyz")
        metrics = await http_get(port, "/metrics")
        health = await http_get(port, "/healthz")
        async with Amqp(amqp_url) as mq:
            await mq.publish_raw(b"{not json")  # a logged failure path
            await wait_for(lambda: _dead_count(amqp_url), what="the dead letter")
    assert ready[0] == 200 and metrics[0] == 200 and health[0] == 200
    assert cli.returncode == 0, cli.output[-2000:]
    for where, text in (("/readyz", ready[1]), ("/metrics", metrics[1]), ("logs", cli.output)):
        assert PASSWORD not in text, where
        assert "guest:guest" not in text, where
    started = [line for line in _log_lines(cli.output) if line.get("event") == "sfworkflow started"]
    assert started, cli.output[-2000:]
    assert started[0]["database"] == _with_password(database_url, "***")
    assert started[0]["amqp"] == _with_password(amqp_url, "***")


async def _dead_count(amqp_url: str) -> bool:
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(DEAD_Q, passive=True)
        assert q.declaration_result is not None
        return (q.declaration_result.message_count or 0) >= 1
    finally:
        await conn.close()


# ---- (c) no personal data in /metrics and logs ----------------------------------------------------
EMAIL = "secret.person@example.com"
PHONE = "+5511999990000"


@pytest.mark.timeout(240)  # the default 120 s, plus up to a minute waiting for a UTC day with room for the run
async def test_metrics_and_logs_carry_no_recipient_addresses(database_url: str, amqp_url: str) -> None:
    """Enrollments run through send, retry, failure with compensation, suppression, parking and a dead
    letter, all carrying a distinctive address; neither /metrics nor the info-level logs show it."""
    port = _free_port()
    env = _env(database_url=database_url, amqp_url=amqp_url, http_port=str(port), log_level="info")
    env["SFWORKFLOW_TIMER_POLL_MS"] = "50"
    env["SFWORKFLOW_RELAY_POLL_MS"] = "100"
    cli = CliService(env, port)

    def enrolled(channel: str, address: str, template: str) -> dict[str, Any]:
        steps = [{"template_id": f"{template}-{i}", "delay_seconds": 0} for i in range(2)]
        recipient = {"channel": channel, "address": address}
        return {"sequence_id": "seq-pii", "lead_id": "lead-pii", "recipient": recipient, "steps": steps}

    async with cli.running():
        # The twin's step 0 is suppressed only on the day pii-email sent it (the UTC day is in the effect key);
        # the worker below gives up after 45 s.
        await same_utc_day_for(60)
        async with Amqp(amqp_url) as mq:
            await mq.publish(event("sequence.enrolled", "pii-email", enrolled("email", EMAIL, "tpl-pii")))
            await mq.publish(event("sequence.enrolled", "pii-phone", enrolled("whatsapp", PHONE, "tpl-pii")))
            twin = event("sequence.enrolled", "pii-twin", enrolled("email", EMAIL, "tpl-pii"))
            # Invalid (dead-lettered) and early (parked) events carrying the address too.
            bad = event("sequence.enrolled", "pii-bad", enrolled("pigeon", EMAIL, "tpl-bad"))
            await mq.publish_raw(orjson.dumps(bad))
            await mq.publish(event("sequence.replied", "pii-nobody", {"channel": "sms"}))
            pg = await asyncpg.connect(database_url)
            await db.init_connection(pg)
            try:
                outcomes = await _act_as_worker(mq, pg, twin)
            finally:
                await pg.close()
            _status, metrics = await http_get(port, "/metrics")
            _status, ready = await http_get(port, "/readyz")
    assert cli.returncode == 0, cli.output[-2000:]
    assert outcomes["sent_to"] >= {EMAIL, PHONE}, outcomes  # the address did flow, in the commands
    assert outcomes["states"] == {"pii-email": "compensated", "pii-phone": "completed", "pii-twin": "completed"}
    assert outcomes["suppressed"] >= 1  # the twin's first send was suppressed (its effect key was taken)
    logs = _log_lines(cli.output)
    assert logs and all(line.get("level") != "debug" for line in logs)
    for where, text in (("/metrics", metrics), ("/readyz", ready), ("logs", cli.output)):
        for secret in (EMAIL, PHONE, PHONE.lstrip("+"), "secret.person"):
            assert secret not in text, f"{secret!r} appears in {where}"


async def _act_as_worker(mq: Amqp, pg: asyncpg.Connection, twin: dict[str, Any]) -> dict[str, Any]:
    """Answer send_step commands: pii-email sends step 0 then fails step 1 for good (compensated);
    pii-phone fails step 0 retryably once, then sends both. Once pii-email is done, `twin` (same address
    and templates, same day) is enrolled: its step 0 is suppressed, and it completes."""
    sent_to: set[str] = set()
    states: dict[str, str] = {}
    answered: set[tuple[str, int, int]] = set()
    done = {"pii-email": "compensated", "pii-phone": "completed", "pii-twin": "completed"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 45
    while loop.time() < deadline:
        for cmd in await mq.drain_json(COMMANDS_Q):
            entity, step, attempt = cmd["entity_id"], cmd["data"]["step"], cmd["attempt"]
            sent_to.add(cmd["data"]["recipient"]["address"])
            if (entity, step, attempt) in answered:
                continue
            answered.add((entity, step, attempt))
            if entity == "pii-email" and step == 1:
                data = {"step": 1, "error_code": "invalid_recipient", "retryable": False, "message": f"bad {EMAIL}"}
                await mq.publish(event("sequence.step_failed", entity, data, causation_id=cmd["command_id"]))
            elif entity == "pii-phone" and step == 0 and attempt == 1:
                data = {"step": 0, "error_code": "rate_limited", "retryable": True, "message": f"busy {PHONE}"}
                await mq.publish(event("sequence.step_failed", entity, data, causation_id=cmd["command_id"]))
            else:
                data = {"step": step, "provider_message_id": f"p-{uuid.uuid4().hex[:6]}", "attempt": attempt}
                await mq.publish(event("sequence.step_sent", entity, data, causation_id=cmd["command_id"]))
        states = {
            r["entity_id"]: r["state"]
            for r in await pg.fetch(
                "SELECT entity_id, state FROM sfworkflow.instance WHERE entity_id = ANY($1)", list(done)
            )
        }
        if states == done:
            suppressed = await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.history h JOIN sfworkflow.instance i ON i.id = h.instance_id "
                "WHERE i.entity_id = 'pii-twin' AND h.outcome = 'suppressed'"
            )
            return {"sent_to": sent_to, "states": states, "suppressed": suppressed}
        if states.get("pii-email") == "compensated" and "pii-twin" not in states and twin:
            await mq.publish(twin)
            twin = {}
        await asyncio.sleep(0.1)
    return {"sent_to": sent_to, "states": states}
