"""The outbox relay: publishes committed outbox rows with publisher confirms, then marks them.

Two ways in. Rows this process commits are handed over in memory after the commit (`hand`, the store's
on_commit): a round locks them by id (claim_handed) and publishes them from memory, so no query searches the
outbox for them; a handed row an earlier row of its instance holds back while another round is out is claimed
again by id when a round ends (HANDED_TRIES times). Rows anyone else queued (an operator's command: NOTIFY
sfworkflow_outbox), rows backing off after a failed publish, rows left by a process that stopped, and handed
rows a round could not take are found by polling the outbox (claim_due) on a NOTIFY, once every
SFWORKFLOW_RELAY_POLL_MS (one deadline for all the relay's rounds), when a rate limit's slot falls due, and
after a full round.

Rounds. A round holds its rows until the broker confirmed them, then marks them in the same transaction.
Rows handed over while a round is out gather for the next one, so a relay under load publishes in big
rounds; up to SFWORKFLOW_RELAY_ROUNDS rounds are out at once when a full batch is waiting (or a NOTIFY or a
poll finds rows), each on a connection of its own; a wake-up starts one waiting round (`Doorbell`). Rows are
locked with FOR UPDATE SKIP LOCKED, so rounds, like replicas, never take the same row. Publishes are queued
for the connection's writer at once (client/amqp.py), so a round's latency is the broker's confirms.

A crash after publishing and before marking republishes the same rows with the same message ids, which
consumers dedupe on. Unroutable (mandatory) and nacked messages stay in the outbox and are retried with
back-off; `last_error` says why; after SFWORKFLOW_RELAY_MAX_ATTEMPTS such refusals a row is given up
(failed_at set, sfworkflow_outbox_given_up_total, the cluster gauge sfworkflow_outbox_failed) until
`sfworkflow outbox republish` makes it due again.

Order: an instance's rows reach the broker in the order they were committed (outbox id order). A row is
not claimed while an earlier row of its instance is unpublished (backing off, or held by another relay),
and a round publishes an instance's rows one after the other, each confirmed before the next, so a failed
publish never lets a later row overtake it. Rows of different instances carry no order. A row given up
no longer holds back its instance's later rows: once it is republished it arrives after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiormq.abc
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic

from sfworkflow.client import amqp, tracing
from sfworkflow.contract.headers import ORIGINAL_CONTENT_TYPE
from sfworkflow.contract.topology import DEAD_QUEUE
from sfworkflow.contract.tracing import TRACEPARENT, TRACESTATE
from sfworkflow.db import outbox
from sfworkflow.db.outbox import Queued
from sfworkflow.db.pool import init_connection, is_transient
from sfworkflow.runtime import hooks
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.supervisor import Supervisor
from sfworkflow.settings import Settings

log = structlog.get_logger("sfworkflow.relay")

NOTIFY_CHANNEL = "sfworkflow_outbox"
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
DEFERRED_WAKE_CAP = 4096  # slots of deferred rows a relay wakes for; later ones wait for a polling round
HANDED_TRIES = 3  # claims of a handed row that another row holds back before it is left to the polling claim


class Doorbell:
    """Wakes one waiting round per ring; a ring while no round waits is kept for the next one that would wait,
    so a commit made during a round is never missed. A ring says whether the round should poll the outbox
    (`poll`: rows it was not handed) or only take the rows handed over. Synchronous: rung after a commit."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._kept: bool | None = None  # a ring no round took yet: whether it asked for a poll

    def ring(self, poll: bool = True) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(poll)
                return
        self._kept = poll or bool(self._kept)

    def ring_all(self) -> None:
        self._kept = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout: float) -> bool | None:
        """Until a ring (or one kept from before): whether to poll; or `timeout` seconds: None."""
        if self._kept is not None:
            poll, self._kept = self._kept, None
            return poll
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


# Publishes waiting this long for RabbitMQ's confirms make /readyz fail (Relay.confirms_stalled): the broker is
# connected but takes nothing in, as a cluster that lost the majority of its nodes (its quorum queues have no
# leader) or a broker under a memory or disk alarm does. Normal confirms take milliseconds, a few seconds under load.
CONFIRM_STALL_S = 10.0
# A publish RabbitMQ has neither confirmed nor refused after this long goes back to the outbox (ConfirmTimeout, with
# a back-off, never given up for it) and the relay opens a fresh channel for the next round: a quorum queue whose
# leader was lost may never answer a publish made meanwhile, and a round waiting for it would hold its rows forever.
# Publishing again may deliver a message twice: workers dedupe on command_id (README: Writing a worker).
CONFIRM_TIMEOUT_S = 30.0


class Relay:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        connection: AbstractRobustConnection,
        metrics: Metrics,
        supervisor: Supervisor | None = None,
        *,
        tracer: Any = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer  # OpenTelemetry's (client/tracing.py); None: no spans
        self.supervisor = supervisor or Supervisor()  # the service's, which stops it when a relay task dies
        self.pool = pool
        self.connection = connection
        self.metrics = metrics
        self.doorbell = Doorbell()
        # Rows handed over after this process's commits, as claim_due returns rows; bounded: past the bound the
        # rest is left to the polling claim.
        self._handed: deque[dict[str, Any]] = deque()
        self._handed_cap = settings.relay_batch * settings.relay_rounds * 4
        self._rounds_out = 0  # rounds between their claim and their commit
        self._round_seq = 0  # rounds started so far
        # Handed rows a round could not claim (an earlier row of their instance unpublished, in a round still out),
        # with the round that set each aside: handed again when another round ends (or this one, none being out).
        self._aside: list[tuple[int, dict[str, Any]]] = []
        # Loop time of the relay's next poll of the outbox when nothing rings: one deadline for all its rounds, taken
        # by the first round to time out (each round timing out on its own polled SFWORKFLOW_RELAY_ROUNDS times an
        # interval) and moved on by every poll.
        self._next_poll = 0.0
        # A poll some round decided on (the deadline, a ring asking for one, a deferred row due) that no round has made
        # yet: a round taking handed rows does not search the outbox, so the poll stays owed until one does.
        self._poll_owed = False
        self._publishing: dict[int, float] = {}  # round -> loop time its publishes went out, until confirmed
        self._confirmed_at: float | None = None  # loop time of the last round with a publish confirmed
        self._timed_out_at: float | None = None  # loop time of the last round with a ConfirmTimeout
        self._channel_stale = False  # a confirm timed out on it: open another before the next round
        self._closing: set[asyncio.Task[None]] = set()
        self._deferred: list[float] = []  # heap: loop times at which rows a rate limit deferred fall due
        self._deferred_set: set[float] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listen_task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        await self.start_channel()
        self._tasks = [self.supervisor.spawn("relay", self._run(), index=i) for i in range(self.settings.relay_rounds)]
        self._listen_task = self.supervisor.spawn("relay-listen", self._listen())

    async def start_channel(self) -> None:
        """Open the publishing channel (start() does, then runs the loops; tests call publish_round)."""
        self._channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)

    async def stop(self, timeout: float) -> None:
        """Flush what is committed (within `timeout`), then stop. A publish loop that died before (the
        supervisor reported it) flushes nothing: its rows stay in the outbox for the next relay."""
        for task in [*self._tasks, self._listen_task]:
            if task is not None:
                self.supervisor.stopping(task)  # before any loop can see the stop and return
        self._stop.set()
        self.doorbell.ring_all()
        deadline = asyncio.get_running_loop().time() + timeout
        for task in self._tasks:
            await self.supervisor.stop(task, max(0.1, deadline - asyncio.get_running_loop().time()))
        if self._listen_task:
            self.supervisor.cancel(self._listen_task)
            await self.supervisor.stop(self._listen_task, timeout)
        if self._channel and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def _listen(self) -> None:
        """Keep one connection LISTENing; reconnect when it drops (polling covers the gap)."""
        while not self._stop.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self.settings.database_url)
                await init_connection(conn)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.doorbell.ring())
                while not conn.is_closed():  # checked each second: asyncpg does not signal a dropped LISTEN
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 1.0)
                    if self._stop.is_set():
                        return
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close()

    def hand(self, queued: Sequence[Queued]) -> None:
        """Rows a transaction of this process committed: published from memory by the next round that takes them.
        A row a rate limit deferred is not handed: a polling round claims it once due, woken at its slot; nor is a
        row queued for a concurrency slot: the gate loop rings when it grants one."""
        deferred = [x.row.deferred_until for x in queued if x.row.deferred_until is not None and x.row.gate_key is None]
        if deferred:
            self._wake_at(deferred)
        queued = [
            x for x in queued if x.row.deferred_until is None and x.row.gate_key is None and not x.row.behind_gate
        ]
        room = self._handed_cap - len(self._handed)
        for x in queued[:room]:
            r = x.row
            self._handed.append(
                {"id": x.id, "message_id": r.message_id, "kind": r.kind, "exchange": r.exchange,
                 "routing_key": r.routing_key, "body": r.body, "headers": r.headers, "mandatory": r.mandatory,
                 "publish_attempts": 0, "instance_id": r.instance_id}
            )  # fmt: skip
        overflow = len(queued) > room  # what did not fit is found by polling
        # While a round is out, rows gather for the next: another round starts only for a full batch, so a
        # relay under load publishes in big rounds, and in parallel only when it is behind.
        if overflow or self._rounds_out == 0 or len(self._handed) >= self.settings.relay_batch:
            self.doorbell.ring(poll=overflow)

    def _wake_at(self, times: Sequence[datetime]) -> None:
        """Remember when deferred rows fall due (as loop times, rounded up to 10 ms: a wake-up before the slot would
        find nothing and the row would wait for the next poll; bounded: past the bound the polling interval finds
        them)."""
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        for t in times:
            at = math.ceil((loop.time() + (t - now).total_seconds()) * 100) / 100
            if at not in self._deferred_set and len(self._deferred) < DEFERRED_WAKE_CAP:
                heapq.heappush(self._deferred, at)
                self._deferred_set.add(at)

    def _until_deferred(self) -> float | None:
        """Seconds until the next deferred row this relay knows of falls due (0: one has), or None."""
        if not self._deferred:
            return None
        now = asyncio.get_running_loop().time()
        if self._deferred[0] > now:
            return self._deferred[0] - now
        while self._deferred and self._deferred[0] <= now:
            self._deferred_set.discard(heapq.heappop(self._deferred))
        return 0.0

    def _take_handed(self) -> list[dict[str, Any]]:
        n = min(len(self._handed), self.settings.relay_batch)
        return sorted((self._handed.popleft() for _ in range(n)), key=lambda r: int(r["id"]))

    async def _run(self) -> None:
        """One of the relay's rounds, again and again: at once while there is more, else after a wake-up."""
        backoff = 0.2
        poll = True  # the first round looks for rows committed before this relay started
        while True:
            try:
                n = await self.publish_round(poll)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_transient(exc):
                    log.warning("relay round failed; retrying", error=type(exc).__name__)
                else:
                    log.error("relay round failed; retrying", error=repr(exc)[:300])
                if self._stop.is_set():
                    return
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                poll = True
                continue
            if self._handed:
                poll = False  # handed over meanwhile: take them now
                continue
            if self._stop.is_set():
                if n == 0 and poll:
                    return
                poll = True  # stopping: flush until a polling round finds nothing
                continue
            if n >= self.settings.relay_batch and poll:
                continue  # a full polling round: more is waiting
            until = self._until_deferred()
            if until == 0.0 or self._poll_owed:
                # a deferred row fell due during the round (its slot is off the list now), or a poll is owed
                poll = True
                continue
            wait_s = max(0.0, self._next_poll - asyncio.get_running_loop().time())
            rung = await self.doorbell.wait(wait_s if until is None else min(wait_s, until))
            poll = rung if rung is not None else self._poll_is_due() or self._until_deferred() == 0.0

    def _poll_is_due(self) -> bool:
        """Whether the relay's polling interval has passed since its last poll (then this round takes the poll)."""
        if asyncio.get_running_loop().time() < self._next_poll:
            return False  # another round polled meanwhile
        self._push_poll_deadline()
        return True

    def _push_poll_deadline(self) -> None:
        self._next_poll = asyncio.get_running_loop().time() + self.settings.relay_poll_ms / 1000.0

    def unconfirmed_s(self) -> float:
        """Seconds the oldest publish still waiting for its confirm has waited (0: none waits): since its round's
        current wave went out (a round of long instance chains confirms wave after wave, each a round trip)."""
        if not self._publishing:
            return 0.0
        return asyncio.get_running_loop().time() - min(self._publishing.values())

    def confirms_stalled(self) -> str | None:
        """Why /readyz fails when RabbitMQ has held a publish unconfirmed past CONFIRM_STALL_S, or the last round's
        publishes timed out with none confirmed since; else None."""
        waited = self.unconfirmed_s()
        timed_out = self._timed_out_at is not None and (
            self._confirmed_at is None or self._confirmed_at < self._timed_out_at
        )
        if waited < CONFIRM_STALL_S and not timed_out:
            return None
        what = f"no confirm for {waited:.0f} s" if waited >= CONFIRM_STALL_S else (
            f"no confirm within {CONFIRM_TIMEOUT_S:g} s at the last attempt"
        )  # fmt: skip
        return (
            f"connected, but {what}: RabbitMQ takes no message in (a cluster that lost "
            "the majority of its nodes, runbook: RabbitMQ node lost; or a memory or disk alarm: "
            "rabbitmq-diagnostics alarms)"
        )

    async def publish_round(self, poll: bool = True) -> int:
        """Publish a batch concurrently with confirms and mark the outcome; how many rows it took. The batch is
        the rows handed over in memory when there are any, else (with `poll`) due rows claimed from the outbox."""
        handed = self._take_handed()
        if handed:
            self._poll_owed = self._poll_owed or poll  # the next round without handed rows makes it
        else:
            poll, self._poll_owed = poll or self._poll_owed, False
            if not poll:
                return 0
        self._rounds_out += 1
        self._round_seq += 1
        seq = self._round_seq
        try:
            return await self._round(handed, seq)
        finally:
            self._rounds_out -= 1
            self._hand_aside_again(seq)

    def _set_aside(self, rows: list[dict[str, Any]], seq: int) -> None:
        """Handed rows round `seq` could not claim while other rounds were out (one may hold an earlier row of their
        instance): tried again after another round, HANDED_TRIES times at most, then left to the polling claim (held
        by another relay, deferred, or behind a row backing off). With no other round out, left to it at once."""
        if self._rounds_out <= 1:
            self.doorbell.ring(poll=True)
            return
        poll = False
        for r in rows:
            r["handed_tries"] = r.get("handed_tries", 0) + 1
            if r["handed_tries"] > HANDED_TRIES:
                poll = True
            else:
                self._aside.append((seq, r))
        if poll:
            self.doorbell.ring(poll=True)

    def _hand_aside_again(self, seq: int) -> None:
        """Round `seq` ended: the rows other rounds set aside (and its own, when no round is out) are handed again;
        the loop that ran it takes them next."""
        if not self._aside:
            return
        again = [r for s, r in self._aside if s != seq or self._rounds_out == 0]
        self._aside = [(s, r) for s, r in self._aside if s == seq and self._rounds_out > 0]
        self._handed.extend(again)

    async def _fresh_channel(self) -> None:
        """Replace a channel a confirm timed out on (outside any transaction); the old one is closed in the
        background (a broker that holds confirms may hold its close too)."""
        old = self._channel
        self._channel = await asyncio.wait_for(
            self.connection.channel(publisher_confirms=True, on_return_raises=True), CONFIRM_TIMEOUT_S
        )
        self._channel_stale = False
        if old is not None and not old.is_closed:
            task = asyncio.create_task(_close_quietly(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _round(self, handed: list[dict[str, Any]], seq: int) -> int:
        if self._channel_stale:  # failing here, the handed rows are left to the polling claim, as on any failure
            await self._fresh_channel()
        async with self.pool.acquire() as conn, conn.transaction():
            if handed:
                claimed = await outbox.claim_handed(conn, [r["id"] for r in handed])
                rows: list[Any] = [r for r in handed if r["id"] in claimed]
                for r in rows:  # a row handed again may have been refused meanwhile by a polling round
                    r["publish_attempts"] = claimed[r["id"]]
                if len(rows) < len(handed):  # behind an earlier row of their instance, or another relay's
                    self._set_aside([r for r in handed if r["id"] not in claimed], seq)
            else:
                self._push_poll_deadline()
                rows = await outbox.claim_due(conn, self.settings.relay_batch)
            if not rows:
                return len(handed)
            if self._channel is None or self._channel.is_closed:
                raise ConnectionError("relay channel is closed")
            # The aiormq channel under the (robust) aio-pika channel: publishing on it directly skips
            # building an aio_pika.Message per row, which was a tenth of the service's CPU.
            underlay = await self._channel.get_underlay_channel()
            spans = self._start_spans(rows) if self.tracer is not None else {}
            key = id(rows)
            loop = asyncio.get_running_loop()
            self._publishing[key] = loop.time()

            def confirmed() -> None:  # a wave confirmed: the round's wait starts again with the next one
                self._publishing[key] = loop.time()

            try:
                results = await _publish_in_instance_order(
                    underlay,
                    rows,
                    {i: h for i, (_s, h) in spans.items()},
                    on_wave=confirmed,
                    timeout=CONFIRM_TIMEOUT_S,
                )
            except BaseException as exc:
                for span, _h in spans.values():
                    _end_span(span, exc)
                raise
            finally:
                del self._publishing[key]
            for row_id, (span, _h) in spans.items():
                _end_span(span, results.get(row_id))
            hooks.fault_point("after_publish_before_mark")
            ok: list[int] = []
            failed: list[tuple[int, str, float, bool]] = []
            for r in rows:
                if r["id"] not in results:
                    continue  # an earlier row of its instance failed this round: it waits for that one
                res = results[r["id"]]
                if isinstance(res, BaseException):
                    failed.append(self._failure(r, res))
                else:
                    ok.append(r["id"])
                    self.metrics.published.labels(r["kind"]).inc()
            if any(isinstance(res, amqp.ConfirmTimeout) for res in results.values()):
                self._timed_out_at, self._channel_stale = loop.time(), True
            if ok:
                self._confirmed_at = loop.time()
                await outbox.mark_published(conn, ok)
            if failed:
                log.warning("messages not published; will retry", count=len(failed), first_error=failed[0][1])
                await outbox.mark_publish_failed(conn, failed)
            return len(rows)

    def _start_spans(self, rows: Sequence[Mapping[str, Any]]) -> dict[int, tuple[Any, dict[str, Any]]]:
        """A PRODUCER span per row, child of the trace context the row was queued with (the event that caused it);
        a row queued with one is published with the span as its parent instead: row id -> (span, headers to
        publish). A row without trace context (a trace id that is not W3C) is published as it was queued: a
        span of a new trace must not become its trace."""
        out: dict[int, tuple[Any, dict[str, Any]]] = {}
        kind = tracing.span_kind("PRODUCER")
        for r in rows:
            headers = dict(r["headers"] or {})
            parent = tracing.parent_context(headers.get(TRACEPARENT), headers.get(TRACESTATE))
            span = self.tracer.start_span(
                f"publish {r['exchange'] or DEAD_QUEUE}",
                context=tracing.start_context(parent),
                kind=kind,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "publish",
                    "messaging.destination.name": r["exchange"],  # "" for the default exchange (dead letters)
                    "messaging.rabbitmq.destination.routing_key": r["routing_key"],
                    "messaging.message.id": str(r["message_id"]),
                    "sfworkflow.outbox.kind": r["kind"],
                },
            )
            if parent is not None and r["kind"] != "dead_letter":  # a dead letter keeps the original's headers
                headers.update(tracing.headers_of(span))
            out[r["id"]] = (span, headers)
        return out

    def _failure(self, r: asyncpg.Record, exc: BaseException) -> tuple[int, str, float, bool]:
        """(id, error, back-off, give up) of a row whose publish failed. Only a refusal by the broker (returned
        as unroutable, or nacked: the message's own fault, or the broker's state) counts towards giving up; a
        connection lost mid-round never gives a row up."""
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(r["publish_attempts"], 6))
        give_up = isinstance(exc, DeliveryError) and r["publish_attempts"] + 1 >= self.settings.relay_max_attempts
        self.metrics.publish_failures.labels(r["kind"]).inc()
        if give_up:
            self.metrics.publish_given_up.labels(r["kind"]).inc()
            log.error(
                "gave up publishing a message; republish it with `sfworkflow outbox republish --id` once the "
                "cause is fixed",
                outbox_id=r["id"],
                message_id=r["message_id"],
                kind=r["kind"],
                exchange=r["exchange"],
                routing_key=r["routing_key"],
                attempts=r["publish_attempts"] + 1,
                error=error,
            )
        return r["id"], error, delay, give_up


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        await asyncio.wait_for(channel.close(), CONFIRM_TIMEOUT_S)
    except Exception as exc:  # the broker that held its confirms, or a connection already gone
        log.debug("closing the relay's abandoned channel failed", error=repr(exc)[:200])


def _end_span(span: Any, outcome: object) -> None:
    if outcome is None:
        span.set_attribute("sfworkflow.outbox.held_back", True)  # behind an earlier row of its instance that failed
    elif isinstance(outcome, BaseException):
        span.set_attribute("error.type", type(outcome).__name__)
        span.set_status(tracing.error_status(f"{type(outcome).__name__}: {outcome}"))
    span.end()


async def _publish_in_instance_order(
    channel: aiormq.abc.AbstractChannel,
    rows: Sequence[Mapping[str, Any]],
    headers: Mapping[int, dict[str, Any]] | None = None,
    on_wave: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> dict[int, object]:
    """Publish every row, an instance's rows one after the other (each confirmed before the next; a failure
    leaves its later rows unattempted), different instances' rows together: in waves, each the next row of every
    instance still going, published as one batch (client/amqp.py publish_many). Returns id -> confirmation or
    exception; rows held back behind a failure are absent. `headers`: row id -> the headers to publish it with,
    instead of the row's (its trace context, when spans are on). `on_wave` is called as each wave is answered."""
    headers = headers or {}
    chains: dict[object, deque[Mapping[str, Any]]] = {}
    for r in rows:  # in id order
        key = r["instance_id"] if r["instance_id"] is not None else ("row", r["id"])
        chains.setdefault(key, deque()).append(r)
    results: dict[int, object] = {}
    going = list(chains.values())
    while going:
        wave = [c.popleft() for c in going]
        outcomes = await amqp.publish_many(channel, [_outgoing(r, headers.get(r["id"])) for r in wave], timeout=timeout)
        for r, outcome in zip(wave, outcomes, strict=True):
            results[r["id"]] = outcome
        if on_wave is not None:
            on_wave()
        going = [c for c, outcome in zip(going, outcomes, strict=True) if c and not isinstance(outcome, BaseException)]
    return results


def _outgoing(r: Mapping[str, Any], headers: dict[str, Any] | None = None) -> amqp.Outgoing:
    """One outbox row as published: persistent, message_id = the row's; confirms and returns raise."""
    if headers is None:
        headers = r["headers"] or {}
    kind = r["kind"]
    if kind == "dead_letter":
        content_type = headers.get(ORIGINAL_CONTENT_TYPE) or "application/octet-stream"
    else:
        content_type = "application/json"
    properties = Basic.Properties(
        content_type=content_type,
        delivery_mode=amqp.PERSISTENT,
        message_id=r["message_id"],
        message_type=r["routing_key"] if kind != "dead_letter" else None,
        headers=headers or None,
        app_id="sfworkflow",
    )
    return amqp.Outgoing(r["body"], r["exchange"], r["routing_key"], r["mandatory"], properties)
