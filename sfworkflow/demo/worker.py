"""A simulated SalesFlow worker, written on the worker SDK (sfworkflow/client/worker.py) as a SalesFlow team would
write theirs: one handler per command type, which asks the workflow's module in sfworkflow/demo/profiles/ what
to answer. Used by the demo, the chaos suite, the end-to-end tests and the benchmark, so all of them run the SDK.

What the SDK does not do, and a real SalesFlow side does, it adds:
- answers that come later (a delivery receipt, a payout settling, an approver deciding: `Answer.delay_s`) are
  published after that delay with the producer, as SalesFlow's webhook receivers would;
- some answers are published a second time (`duplicate_rate`), as a webhook delivered twice, to exercise dedupe.

It counts what it saw (WorkerStats): commands by type, compensations, answers, and every send it carried out by
(tenant, command type, template, recipient, day) to prove no send happened twice. Dedupe on `command_id` is the
SDK's: the demo and the chaos suite give it a PostgresDedupe in their database, the benchmark a MemoryDedupe
(its worker is load, and PostgreSQL's CPU is what the benchmark measures).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from sfworkflow.client.dedupe import DedupeStore, MemoryDedupe
from sfworkflow.client.producer import EventPublisher
from sfworkflow.client.worker import Answer, Command, CommandWorker
from sfworkflow.contract import schemas
from sfworkflow.demo import profiles as simulation
from sfworkflow.demo.profiles import Profile

log = structlog.get_logger("sfworkflow.demo.worker")

WorkerProfile = Profile  # the name the benchmark and tests use
SOURCE = "salesflow.worker"


@dataclass
class WorkerStats:
    commands: Counter[str] = field(default_factory=Counter)
    hung: int = 0  # commands taken and never answered (a hung worker)
    answers: Counter[str] = field(default_factory=Counter)  # events published; "duplicate": second copies
    compensations: Counter[str] = field(default_factory=Counter)
    # (tenant, command type, template, recipient address, UTC day) -> idempotency keys of the sends the
    # worker carried out for it: more than one means the same send happened twice. (A send that failed
    # for good frees its effect key, so a later decision may send the same thing: that is not a twice.)
    sends: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    duplicate_commands: int = 0  # commands delivered again and answered from the dedupe store
    published_ids: set[str] = field(default_factory=set)

    def published(self, event: dict[str, Any]) -> None:
        """Count an event the broker confirmed: a second copy of an id published before (an answer published
        again for a redelivered command, a handler run again after a failure midway, a webhook twice) is a
        duplicate, as sfworkflow counts it."""
        if event["event_id"] in self.published_ids:
            self.answers["duplicate"] += 1
        else:
            self.published_ids.add(event["event_id"])
            self.answers[event["event_type"]] += 1

    def sends_twice(self) -> int:
        return sum(1 for keys in self.sends.values() if len(keys) > 1)


class _CountingWorker(CommandWorker):
    """The SDK's worker, counting each answer it publishes (WorkerStats.published)."""

    def __init__(self, stats: WorkerStats, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats

    async def _publish(self, answers: Sequence[Answer], trace_headers: Mapping[str, str]) -> None:
        await super()._publish(answers, trace_headers)
        for a in answers:
            self.stats.published(a)

    def _count(self, command_type: str, outcome: str) -> None:
        super()._count(command_type, outcome)
        if outcome == "repeated":
            self.stats.duplicate_commands += 1


class SimulatedWorker:
    def __init__(
        self,
        amqp_url: str,
        profile: Profile,
        workflows: Iterable[str] | None = None,
        hang: Iterable[tuple[str, str]] = (),
        record: list[dict[str, Any]] | None = None,
        store: DedupeStore | None = None,
    ) -> None:
        self.record = record  # when a list: every event this worker publishes is appended to it
        self.amqp_url = amqp_url
        self.hang = set(hang)  # (workflow, entity) whose commands this worker takes and never answers
        self.profile = profile
        self.modules = simulation.modules()
        self.workflows = tuple(workflows) if workflows is not None else tuple(self.modules)
        self.stats = WorkerStats()
        self.sdk = _CountingWorker(
            self.stats, amqp_url, store=store or MemoryDedupe(), source=SOURCE, prefetch=256, concurrency=256
        )
        for command_type in sorted(schemas.default().names("commands")):
            if command_type.split(".", 1)[0] in self.workflows:
                self.sdk.handler(command_type)(self._handle)
        self._publisher: EventPublisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._publisher = await EventPublisher.connect(self.amqp_url)
        await self.sdk.start()

    async def stop(self) -> None:
        await self.sdk.stop(timeout_s=5.0)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._publisher:
            await self._publisher.close()

    async def _handle(self, cmd: Command) -> list[Answer]:
        """Count, and answer as the workflow's module says: at once (returned to the SDK, which publishes them
        before the ack), later, or (a hung worker) never."""
        s = self.stats
        if cmd.kind == "compensation":
            s.compensations[cmd.command_type] += 1
            return []
        s.commands[cmd.command_type] += 1
        if self.profile.silent or (cmd.workflow, cmd.entity_id) in self.hang:
            s.hung += 1
            return []
        module = self.modules.get(cmd.workflow)
        if module is None:
            return []
        answers = module.answer(cmd.envelope, self.profile)
        data = cmd.data
        sent = any("fail" not in a.event_type.rpartition(".")[2] for a in answers)
        if sent and "template_id" in data and "recipient" in data:
            effect = (
                cmd.tenant_id,
                cmd.command_type,
                str(data["template_id"]),
                str(data["recipient"].get("address")),
                str(cmd.envelope["issued_at"])[:10],
            )
            s.sends.setdefault(effect, set()).add(cmd.idempotency_key)
        now: list[Answer] = []
        for n, a in enumerate(answers):
            event = cmd.answer(a.event_type, a.data, n=n)
            if self.record is not None:
                self.record.append(event)
            delay = a.delay_s + self.profile.delay_s
            if delay:
                self._spawn(self._publish_later(event, delay))
            else:
                now.append(event)
            if self.profile.roll("dup", event["event_id"]) < self.profile.duplicate_rate:
                self._spawn(self._publish_later(event, delay + 0.05))
        return now

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_later(self, event: dict[str, Any], delay_s: float) -> None:
        """Publish with confirms after `delay_s`; while RabbitMQ is away, retry (as a real sender must) for up to a
        minute."""
        await asyncio.sleep(delay_s)
        assert self._publisher is not None
        pause = 0.2
        for _ in range(40):
            try:
                await self._publisher.publish(event, validate=False)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
        else:
            raise RuntimeError(f"could not publish {event['event_type']} for a minute")
        self.stats.published(event)
