"""A simulated SalesFlow worker: consumes sfworkflow commands and answers with events.

Used by the demo, the end-to-end tests and the benchmark. What it answers to each command is up to
that workflow's module in sfworkflow/demo/profiles/. It dedupes commands on `command_id` the way a
real worker should, publishes some answers twice (to exercise dedupe), and counts what it saw.

It is cheap, because the benchmark's closed loop runs it on the same cores as the service: deliveries take
aiormq's path (runtime/deliveries.py), what arrived together is taken in one go and acked with one
multiple-ack, and the answers of that go are published together on the aiormq channel under the
publisher's (confirms; aio-pika's path only to retry while RabbitMQ is away). Built on aio-pika objects per
message and a task per answer it cost ~550 us of CPU per command, as much as RabbitMQ, and its process was
what the live benchmark's closed loop waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from pamqp.commands import Basic

from sfworkflow.client import amqp
from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.contract.topology import EVENTS_EXCHANGE, commands_queue, compensations_queue
from sfworkflow.demo import profiles as simulation
from sfworkflow.demo.profiles import Answer, Profile
from sfworkflow.runtime.deliveries import (
    Received,
    ack_batch,
    received_from_aio_pika,
    received_from_frames,
    retake_fast_path,
    take_fast_path,
)

log = structlog.get_logger("sfworkflow.demo.worker")

WorkerProfile = Profile  # the name the benchmark and tests use


@dataclass
class WorkerStats:
    commands: Counter[str] = field(default_factory=Counter)
    duplicate_commands: int = 0  # same command_id delivered again (deduped here)
    hung: int = 0  # commands taken and never answered (a hung worker)
    unreadable: int = 0  # commands it could not read (skipped)
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
        self._arrived: list[Received] = []
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._connection = await amqp.connect_robust(self.amqp_url)
        self._publisher = await EventPublisher.connect(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=256)
        assert isinstance(channel, AbstractRobustChannel)
        for w in self.workflows:
            for name in (commands_queue(w), compensations_queue(w)):
                queue = await channel.get_queue(name)
                tag = await queue.consume(self._slow)
                await take_fast_path(channel, tag, self._fast)
                channel.reopen_callbacks.add(partial(retake_fast_path, tag=tag, fast=self._fast))
        self._spawn(self._work())

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fast(self, m: aiormq.abc.DeliveredMessage) -> None:
        self._arrived.append(received_from_frames(m))
        self._wake.set()

    async def _slow(self, m: AbstractIncomingMessage) -> None:
        self._arrived.append(received_from_aio_pika(m))
        self._wake.set()

    async def _work(self) -> None:
        """Take what arrived, ack it (one multiple-ack per channel), answer it; publish the answers together."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            taken, self._arrived = self._arrived, []
            await ack_batch(taken)
            now: list[dict[str, Any]] = []
            for m in taken:
                try:
                    cmd = orjson.loads(m.body)
                    if cmd.get("kind") == "compensation":
                        self.stats.compensations[cmd["command_type"]] += 1
                    else:
                        self._on_command(cmd, now)
                except Exception as exc:  # one command it cannot read must not stop the worker
                    self.stats.unreadable += 1
                    log.warning("command not understood; skipped", error=repr(exc)[:200], routing_key=m.routing_key)
            if now:
                self._spawn(self._publish_all(now))

    def _on_command(self, cmd: dict[str, Any], now: list[dict[str, Any]]) -> None:
        """Dedupe, count, and decide the answers: those without a delay join `now`, the others wait."""
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
            if a.delay_s + self.profile.delay_s:
                self._spawn(self._answer_later(cmd, a))
            else:
                now.extend(self._answer(cmd, a))

    def _answer(self, cmd: dict[str, Any], a: Answer) -> list[dict[str, Any]]:
        """The event answering `cmd`, once or (duplicate_rate) twice, counted as published."""
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
        if self.record is not None:
            self.record.append(event)
        self.stats.answers[a.event_type] += 1
        if self.profile.roll("dup", event["event_id"]) < self.profile.duplicate_rate:
            self.stats.answers["duplicate"] += 1
            return [event, event]
        return [event]

    async def _answer_later(self, cmd: dict[str, Any], a: Answer) -> None:
        await asyncio.sleep(a.delay_s + self.profile.delay_s)
        await self._publish_all(self._answer(cmd, a))

    async def _publish_all(self, events: list[dict[str, Any]]) -> None:
        """Publish events in the list's order as one batch, confirms awaited together; one that fails (RabbitMQ
        away) is published again through aio-pika, retried as a real worker must, for a minute."""
        assert self._publisher is not None
        batch = [amqp.Outgoing(orjson.dumps(e), EVENTS_EXCHANGE, e["event_type"], True, _properties(e)) for e in events]
        try:
            channel = await self._publisher.channel.get_underlay_channel()
            outcomes = await amqp.publish_many(channel, batch)
        except Exception as exc:
            outcomes = [exc] * len(events)
        for e, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, BaseException) or not isinstance(outcome, Basic.Ack):
                await self._publish(e)

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


def _properties(event: dict[str, Any]) -> Basic.Properties:
    """What EventPublisher sets: JSON, persistent, message_id = event_id."""
    return Basic.Properties(
        content_type="application/json", delivery_mode=amqp.PERSISTENT, message_id=event["event_id"]
    )
