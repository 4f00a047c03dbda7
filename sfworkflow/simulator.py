"""A simulated SalesFlow worker: consumes sfworkflow commands and answers with events.

Used by the demo, the end-to-end tests and the benchmark. For each `sequence.send_step` it
decides, deterministically from the command's idempotency key and attempt, whether the send
succeeds (`step_sent`), fails retryably, fails for good, or fails `consent_missing`, and publishes
the answer (sometimes twice, to exercise dedupe). It dedupes commands on `command_id` the way a
real worker should, and counts what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from sfworkflow.producer import EventPublisher, build_event
from sfworkflow.topology import commands_queue, compensations_queue


@dataclass
class WorkerProfile:
    failure_rate: float = 0.0  # retryable failures
    fatal_rate: float = 0.0  # non-retryable failures (lead to compensation)
    consent_rate: float = 0.0  # consent_missing (step skipped)
    duplicate_rate: float = 0.0  # answers published twice
    delay_s: float = 0.0  # seconds before answering
    silent: bool = False  # never answer (a worker that hangs)
    seed: int = 7


@dataclass
class WorkerStats:
    commands: Counter[str] = field(default_factory=Counter)
    duplicate_commands: int = 0  # same command_id delivered again (deduped here)
    answers: Counter[str] = field(default_factory=Counter)
    compensations: Counter[str] = field(default_factory=Counter)
    # (tenant, command type, template, recipient address, UTC day) -> idempotency keys seen for it:
    # more than one key means the same effect was asked for twice as different decisions.
    sends: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def sends_twice(self) -> int:
        return sum(1 for keys in self.sends.values() if len(keys) > 1)


def _roll(seed: int, *parts: Any) -> float:
    digest = hashlib.blake2b(("/".join(map(str, (seed, *parts)))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SimulatedWorker:
    def __init__(self, amqp_url: str, profile: WorkerProfile, workflows: tuple[str, ...] = ("sequence",)) -> None:
        self.amqp_url = amqp_url
        self.profile = profile
        self.workflows = workflows
        self.stats = WorkerStats()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: EventPublisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        self._publisher = await EventPublisher.connect(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=256)
        for w in self.workflows:
            q = await channel.get_queue(commands_queue(w))
            await q.consume(self._on_command)
            k = await channel.get_queue(compensations_queue(w))
            await k.consume(self._on_compensation)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._publisher:
            await self._publisher.close()
        if self._connection:
            await self._connection.close()

    async def _on_compensation(self, message: AbstractIncomingMessage) -> None:
        cmd = orjson.loads(message.body)
        self.stats.compensations[cmd["command_type"]] += 1
        await message.ack()

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        cmd = orjson.loads(message.body)
        await message.ack()
        s = self.stats
        if cmd["command_id"] in s.seen:
            s.duplicate_commands += 1
            return
        s.seen.add(cmd["command_id"])
        s.commands[cmd["command_type"]] += 1
        data = cmd["data"]
        effect = (
            cmd["tenant_id"],
            cmd["command_type"],
            str(data.get("template_id")),
            str((data.get("recipient") or {}).get("address")),
            cmd["issued_at"][:10],
        )
        s.sends.setdefault(effect, set()).add(cmd["idempotency_key"])
        if self.profile.silent:
            return
        task = asyncio.create_task(self._answer(cmd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def decide(self, cmd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The answer to a send_step command: (event name, data)."""
        p = self.profile
        step = cmd["data"]["step"]
        r = _roll(p.seed, cmd["idempotency_key"], cmd["attempt"])
        base = {"step": step, "attempt": cmd["attempt"]}
        if r < p.fatal_rate:
            return "step_failed", {**base, "error_code": "template_rejected", "retryable": False}
        r -= p.fatal_rate
        if r < p.consent_rate:
            return "step_failed", {**base, "error_code": "consent_missing", "retryable": False}
        r -= p.consent_rate
        if r < p.failure_rate:
            return "step_failed", {**base, "error_code": "provider_timeout", "retryable": True}
        return "step_sent", {**base, "provider_message_id": f"pm-{cmd['command_id'][:8]}"}

    async def _answer(self, cmd: dict[str, Any]) -> None:
        assert self._publisher is not None
        if self.profile.delay_s:
            await asyncio.sleep(self.profile.delay_s)
        workflow = cmd["workflow"]
        name, data = self.decide(cmd)
        event = build_event(
            f"{workflow}.{name}",
            tenant_id=cmd["tenant_id"],
            entity_id=cmd["entity_id"],
            data=data,
            source="salesflow.worker",
            actor_type="worker",
            correlation_id=cmd.get("correlation_id"),
            causation_id=cmd["command_id"],
        )
        await self._publisher.publish(event, validate=False)
        self.stats.answers[name] += 1
        if _roll(self.profile.seed, "dup", event["event_id"]) < self.profile.duplicate_rate:
            await self._publisher.publish(event, validate=False)
            self.stats.answers["duplicate"] += 1
