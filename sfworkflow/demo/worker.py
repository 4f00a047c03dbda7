"""A simulated SalesFlow worker: consumes sfworkflow commands and answers with events.

Used by the demo, the end-to-end tests and the benchmark. What it answers to each command is up to
that workflow's module in sfworkflow/demo/profiles/. It dedupes commands on `command_id` the way a
real worker should, publishes some answers twice (to exercise dedupe), and counts what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.contract.topology import commands_queue, compensations_queue
from sfworkflow.demo import profiles as simulation
from sfworkflow.demo.profiles import Answer, Profile

WorkerProfile = Profile  # the name the benchmark and tests use


@dataclass
class WorkerStats:
    commands: Counter[str] = field(default_factory=Counter)
    duplicate_commands: int = 0  # same command_id delivered again (deduped here)
    hung: int = 0  # commands taken and never answered (a hung worker)
    answers: Counter[str] = field(default_factory=Counter)
    compensations: Counter[str] = field(default_factory=Counter)
    # (tenant, command type, template, recipient address, UTC day) -> idempotency keys of the sends the
    # worker carried out for it: more than one means the same send happened twice. (A send that failed
    # for good frees its effect key, so a later decision may send the same thing: that is not a twice.)
    sends: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def sends_twice(self) -> int:
        return sum(1 for keys in self.sends.values() if len(keys) > 1)


class SimulatedWorker:
    def __init__(
        self,
        amqp_url: str,
        profile: Profile,
        workflows: Iterable[str] | None = None,
        hang: Iterable[tuple[str, str]] = (),
        record: list[dict[str, Any]] | None = None,
    ) -> None:
        self.record = record  # when a list: every event this worker publishes is appended to it
        self.amqp_url = amqp_url
        self.hang = set(hang)  # (workflow, entity) whose commands this worker takes and never answers
        self.profile = profile
        self.modules = simulation.modules()
        self.workflows = tuple(workflows) if workflows is not None else tuple(self.modules)
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
        if self.profile.silent or (cmd["workflow"], cmd["entity_id"]) in self.hang:
            self.stats.hung += 1
            return
        module = self.modules.get(cmd["workflow"])
        if module is None:
            return
        answers = module.answer(cmd, self.profile)
        data = cmd["data"]
        sent = any("fail" not in a.event_type.rpartition(".")[2] for a in answers)
        if sent and "template_id" in data and "recipient" in data:
            effect = (
                cmd["tenant_id"],
                cmd["command_type"],
                str(data["template_id"]),
                str(data["recipient"].get("address")),
                cmd["issued_at"][:10],
            )
            s.sends.setdefault(effect, set()).add(cmd["idempotency_key"])
        for a in answers:
            task = asyncio.create_task(self._publish_answer(cmd, a))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish_answer(self, cmd: dict[str, Any], a: Answer) -> None:
        assert self._publisher is not None
        delay = a.delay_s + self.profile.delay_s
        if delay:
            await asyncio.sleep(delay)
        event = build_event(
            a.event_type,
            tenant_id=cmd["tenant_id"],
            entity_id=cmd["entity_id"],
            data=a.data,
            source="salesflow.worker",
            actor_type="worker",
            correlation_id=cmd.get("correlation_id"),
            causation_id=cmd["command_id"],
        )
        await self._publish(event)
        if self.record is not None:
            self.record.append(event)
        self.stats.answers[a.event_type] += 1
        if self.profile.roll("dup", event["event_id"]) < self.profile.duplicate_rate:
            await self._publish(event)
            self.stats.answers["duplicate"] += 1

    async def _publish(self, event: dict[str, Any]) -> None:
        """Publish with confirms; while RabbitMQ is away, retry (as a real worker must) for up to a minute."""
        assert self._publisher is not None
        delay = 0.2
        for _ in range(40):
            try:
                await self._publisher.publish(event, validate=False)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        raise RuntimeError(f"could not publish {event['event_type']} for a minute")
