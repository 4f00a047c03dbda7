"""Prometheus metrics of one sfworkflow process. Labels are bounded: workflow, outcome, kind, reason, state.

Tenant, entity and event ids never appear in labels (cardinality); they are in the logs. Besides sfworkflow's
own series, the registry carries prometheus_client's standard process (`process_*`: CPU, memory, open file
descriptors, start time), platform (`python_info`) and garbage-collector (`python_gc_*`) collectors, and
`sfworkflow_build_info` names what runs (so `count(sfworkflow_build_info)` is the replicas up, by version).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from datetime import UTC, datetime

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from sfworkflow import __version__
from sfworkflow.core.batch import OUTBOX_KINDS, BatchReport
from sfworkflow.db import migrate
from sfworkflow.errors import DeadReason

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

OUTCOMES = ("applied", "duplicate", "parked", "ignored", "dead_lettered", "awaiting_version")
KINDS = OUTBOX_KINDS
# runtime/supervisor.py kinds
BACKGROUND_TASKS = ("consumer", "relay", "relay-listen", "timers", "gates", "schedules", "retention", "stats")
# End-to-end lag: fine steps up to 150 ms (the service's target is tens of ms), then coarse ones up to an hour,
# so a backlog of minutes reads as minutes on a dashboard instead of one +Inf bucket.
# Schedule lateness (seconds past a tick and its jitter when fired): the loop's poll is a fraction of a second; a
# replica down for minutes, or an `all` catch-up, shows in the coarse buckets.
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
DEFERRAL_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
EVENT_AGE_BUCKETS = (
    *(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)


def build_labels() -> dict[str, str]:
    """The labels of sfworkflow_build_info: sfworkflow's version, the Python running it, and the schema version
    this code migrates to (the highest migration it ships)."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "schema": str(max((v for v, _ in migrate.available()), default=0)),
    }


class Metrics:
    def __init__(
        self,
        workflows: Iterable[str] = (),
        limits: Iterable[tuple[str, str, str]] = (),
        concurrency: Iterable[tuple[str, str, str]] = (),
        schedules: Iterable[str] = (),
    ) -> None:
        """`limits`, `concurrency`: (workflow, command type, limit name) of every rate and concurrency limit declared,
        `schedules`: the names of the code-declared schedules, for their series at 0."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # the standard ones; they keep no state, so every registry may share them
        build = build_labels()
        self.build = Gauge(
            "sfworkflow_build_info",
            "Always 1; its labels say what runs: sfworkflow version, Python version, the schema version (highest "
            "migration) this code migrates to.",
            list(build),
            registry=r,
        )
        self.build.labels(**build).set(1)
        self.ready = Gauge(
            "sfworkflow_ready",
            "1 when this replica is ready (what GET /readyz answers 200 for), 0 otherwise; checked at every scrape.",
            registry=r,
        )
        self.events = Counter(
            "sfworkflow_events",
            "Events received, by outcome: applied, duplicate, parked, ignored, dead_lettered.",
            ["workflow", "outcome"],
            registry=r,
        )
        self.events_buffered = Gauge(
            "sfworkflow_events_buffered",
            "Deliveries this replica holds, not yet in a batch, per event queue (a shard at the prefetch limit while "
            "others are near 0 is one tenant's burst: fair admission keeps the others moving); set at every scrape.",
            ["queue"],
            registry=r,
        )
        self.transitions = Counter(
            "sfworkflow_transitions",
            "State transitions applied (external, timer and internal events).",
            ["workflow"],
            registry=r,
        )
        self.queued = Counter(
            "sfworkflow_outbox_queued",
            "Messages written to the outbox, by kind: command, compensation, lifecycle.",
            ["workflow", "kind"],
            registry=r,
        )
        self.published = Counter(
            "sfworkflow_published",
            "Messages the broker confirmed, by kind: command, compensation, lifecycle, dead_letter.",
            ["kind"],
            registry=r,
        )
        self.publish_failures = Counter(
            "sfworkflow_publish_failures",
            "Publish attempts that failed (unroutable, nacked, connection lost).",
            ["kind"],
            registry=r,
        )
        self.publish_given_up = Counter(
            "sfworkflow_outbox_given_up",
            "Outbox rows the relay gave up after SFWORKFLOW_RELAY_MAX_ATTEMPTS refused publishes (republish them "
            "with `sfworkflow outbox republish`).",
            ["kind"],
            registry=r,
        )
        self.suppressed = Counter(
            "sfworkflow_effects_suppressed",
            "Commands not published because their effect key was already claimed.",
            ["workflow"],
            registry=r,
        )
        self.dead = Counter(
            "sfworkflow_dead_letters",
            "Messages dead-lettered to sfworkflow.dead, by reason code.",
            ["reason"],
            registry=r,
        )
        self.unparked = Counter(
            "sfworkflow_unparked",
            "Parked events applied after a later transition of their instance.",
            ["workflow"],
            registry=r,
        )
        self.deferred = Counter(
            "sfworkflow_commands_deferred",
            "Commands a rate limit deferred: written due at their slot, published then, never dropped.",
            ["workflow", "command", "limit"],
            registry=r,
        )
        self.capped = Counter(
            "sfworkflow_commands_capped",
            "Commands a daily cap deferred to a later UTC day (counted in sfworkflow_commands_deferred_total too).",
            ["workflow", "command", "limit"],
            registry=r,
        )
        self.deferral = Histogram(
            "sfworkflow_command_deferral_seconds",
            "How far a rate limit deferred a command: from the batch that queued it to its slot.",
            ["workflow", "limit"],
            buckets=DEFERRAL_BUCKETS,
            registry=r,
        )
        self.gated = Counter(
            "sfworkflow_commands_queued_for_slot",
            "Commands a concurrency limit queued behind its gate: published once a slot is granted, never dropped.",
            ["workflow", "command", "limit"],
            registry=r,
        )
        self.slots_granted = Counter(
            "sfworkflow_slots_granted", "Concurrency slots this replica's gate loop granted.", ["limit"], registry=r
        )
        self.slots_swept = Counter(
            "sfworkflow_slots_swept",
            "Concurrency slots the gate loop's sweep released (their instance ended or moved on outside a batch).",
            registry=r,
        )
        self.schedule_ticks = Counter(
            "sfworkflow_schedule_ticks",
            "Schedule ticks by outcome: fired (queued in the outbox, once whatever the replicas), missed (passed over "
            "after downtime under the schedule's catch-up policy). Label schedule: a code-declared schedule's name, "
            "(tenant) for every run-time one.",
            ["schedule", "outcome"],
            registry=r,
        )
        self.schedule_lateness = Histogram(
            "sfworkflow_schedule_lateness_seconds",
            "How late a schedule's latest due tick fired: seconds past its instant and its jitter.",
            ["schedule"],
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.schedules_paused_broken = Counter(
            "sfworkflow_schedules_paused_broken",
            "Schedules the loop paused because their row describes no schedule (e.g. a time zone unknown here).",
            registry=r,
        )
        self.timers_fired = Counter("sfworkflow_timers_fired", "Durable timers fired by the timer loop.", registry=r)
        self.timer_failures = Counter(
            "sfworkflow_timer_failures",
            "Timers put back (RETRY_FAILED_TIMER later) because firing them failed; the instance's history says why.",
            registry=r,
        )
        self.task_exits = Counter(
            "sfworkflow_background_task_exits",
            "Background tasks that died (raised, or ended without being stopped); the process then stops and "
            "exits 70 to be restarted. By task: consumer, relay, relay-listen, timers, retention, stats.",
            ["task"],
            registry=r,
        )
        self.retention_deleted = Counter(
            "sfworkflow_retention_deleted_rows",
            "Rows the retention sweep deleted, by table: outbox, inbox, instances (each with what it owns).",
            ["table"],
            registry=r,
        )
        self.timers_unfireable = Gauge(
            "sfworkflow_timers_unfireable",
            "Due timers of instances on definition versions this replica has not loaded (a rolling deploy).",
            registry=r,
        )
        self.batch_retries = Counter(
            "sfworkflow_batch_retries", "Batch transactions retried after a transient database error.", registry=r
        )
        self.batch_seconds = Histogram(
            "sfworkflow_batch_processing_seconds",
            "Time to apply one micro-batch: parse, validate, transaction, commit, ack.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "sfworkflow_batch_size",
            "Deliveries per micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.event_age = Histogram(
            "sfworkflow_event_age_at_commit_seconds",
            "From an event's envelope timestamp (set by its producer) to the commit that applied it, observed once "
            "per event: when first applied (not for its duplicates, nor when a dead letter is redriven).",
            buckets=EVENT_AGE_BUCKETS,
            registry=r,
        )
        # The cluster gauges: database-wide, computed and exported by one replica at a time (runtime/stats.py),
        # so they live in a registry of their own that render() includes only on that replica.
        c = self.cluster = CollectorRegistry(auto_describe=True)
        self.cluster_exported = False
        self.cluster_leader = Gauge(
            "sfworkflow_cluster_stats_leader",
            "1 on the one replica that exports the cluster gauges (outbox backlog and age, instances, parked, "
            "stuck); the other replicas export none of them, so a max() over replicas counts each once.",
            registry=r,
        )
        self.slots_held = Gauge(
            "sfworkflow_slots_held", "Concurrency slots held, per limit (every key of every tenant).", ["limit"],
            registry=c,
        )  # fmt: skip
        self.slots_waiting = Gauge(
            "sfworkflow_slots_waiting", "Commands queued for a concurrency slot, per limit.", ["limit"], registry=c
        )
        self.outbox_backlog = Gauge(
            "sfworkflow_outbox_backlog", "Outbox rows due and not yet published (deferred commands not counted).",
            registry=c,
        )  # fmt: skip
        self.outbox_oldest = Gauge(
            "sfworkflow_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row, counted from when it was due (a deferred command: its slot).",
            registry=c,
        )
        self.outbox_deferred = Gauge(
            "sfworkflow_outbox_deferred",
            "Commands a rate limit deferred to a time still ahead (not in the backlog: they are not late).",
            registry=c,
        )
        self.outbox_deferred_until = Gauge(
            "sfworkflow_outbox_deferred_until_seconds",
            "Seconds until the last deferred command falls due (0 when none): how far behind a throttled key is.",
            registry=c,
        )
        self.instances = Gauge(
            "sfworkflow_instances",
            "Active (not ended) workflow instances by workflow and state.",
            ["workflow", "state"],
            registry=c,
        )
        self.outbox_failed = Gauge(
            "sfworkflow_outbox_failed",
            "Outbox rows given up by the relay, waiting for `sfworkflow outbox republish`.",
            registry=c,
        )
        self.parked = Gauge("sfworkflow_parked_events", "Events parked, waiting for their transition.", registry=c)
        self.parked_deadline = Gauge(
            "sfworkflow_parked_nearest_deadline_seconds",
            "Seconds until the nearest deadline of a parked event (then it is dead-lettered: transition_not_allowed, "
            "or unknown_definition_version when it waited for a version); negative once past, +Inf when none.",
            registry=c,
        )
        self.stuck = Gauge(
            "sfworkflow_stuck_instances",
            "Instances stuck by their definition's rules (see `sfworkflow stuck`), refreshed every 30 s.",
            ["workflow"],
            registry=c,
        )
        self.up = Gauge(
            "sfworkflow_dependency_up",
            "1 when the dependency answered this replica's last readiness check (at every scrape): postgres, rabbitmq.",
            ["dependency"],
            registry=r,
        )

        # Every known series exists from the start (at 0), so rates and alerts work before the first event.
        for w in workflows:
            self.stuck.labels(w)
            for o in OUTCOMES:
                self.events.labels(w, o)
            self.transitions.labels(w)
            self.suppressed.labels(w)
            self.unparked.labels(w)
            for k in KINDS[:3]:
                self.queued.labels(w, k)
        for workflow, command, limit in limits:
            self.deferred.labels(workflow, command, limit)
            self.capped.labels(workflow, command, limit)
            self.deferral.labels(workflow, limit)
        for workflow, command, limit in concurrency:
            self.gated.labels(workflow, command, limit)
            self.slots_granted.labels(limit)
            self.slots_held.labels(limit)
            self.slots_waiting.labels(limit)
        for k in KINDS:
            self.published.labels(k)
            self.publish_failures.labels(k)
            self.publish_given_up.labels(k)
        for reason in DeadReason:
            self.dead.labels(str(reason))
        for dep in ("postgres", "rabbitmq"):
            self.up.labels(dep)
        for task in BACKGROUND_TASKS:
            self.task_exits.labels(task)
        for name in schedules:
            for outcome in ("fired", "missed"):
                self.schedule_ticks.labels(name, outcome)

    def record(self, report: BatchReport) -> None:
        for (workflow, outcome), n in report.events.items():
            self.events.labels(workflow, outcome).inc(n)
        for workflow, n in report.transitions.items():
            self.transitions.labels(workflow).inc(n)
        for (workflow, kind), n in report.queued.items():
            self.queued.labels(workflow, kind).inc(n)
        for workflow, n in report.suppressed.items():
            self.suppressed.labels(workflow).inc(n)
        for reason, n in report.dead.items():
            self.dead.labels(reason).inc(n)
        for workflow, n in report.unparked.items():
            self.unparked.labels(workflow).inc(n)
        if report.timers_fired:
            self.timers_fired.inc(report.timers_fired)
        if report.timer_failures:
            self.timer_failures.inc(report.timer_failures)
        for (workflow, command, limit), n in report.deferred.items():
            self.deferred.labels(workflow, command, limit).inc(n)
        for (workflow, command, limit), n in report.capped.items():
            self.capped.labels(workflow, command, limit).inc(n)
        for (workflow, command, limit), n in report.gated.items():
            self.gated.labels(workflow, command, limit).inc(n)
        for workflow, limit, seconds in report.deferral_s:
            self.deferral.labels(workflow, limit).observe(seconds)
        if report.first_seen:  # record() runs once the batch committed: now is its commit time
            committed = datetime.now(UTC)
            for timestamp in report.first_seen:
                self.event_age.observe(max(0.0, (committed - timestamp).total_seconds()))

    def export_cluster(self, on: bool) -> None:
        """This replica exports the cluster gauges (it holds the lead of runtime/stats.py) or stops exporting."""
        self.cluster_exported = on
        self.cluster_leader.set(1 if on else 0)

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        return text + generate_latest(self.cluster) if self.cluster_exported else text
