"""The replay tool's logic: what to do for a stuck instance, and doing it once, safely.

For each stuck instance the plan follows from why it is stuck (the definition decides that):
  timer_overdue  -> fire the timer now (its due time becomes now; the timer loop fires it)
  parked events  -> re-drive them (apply those that the current state now allows)
  no_progress    -> re-issue the pending command: same idempotency key, attempt + 1, a new command id
  operator       -> nothing automatic: a person must send one of the events the state accepts

A named instance that is not stuck (yet) is not replayed: `select_instance` says where it stands against
its definition's stuck rule and what a replay would do; with `force` it is replayed now all the same
(recorded as forced). A state that never counts as stuck, or an ended instance, has nothing to replay.

Safe while the service runs and when two replays run at once: each replay locks the instance row,
checks that its version is still the one that was selected (else: skipped, someone else moved it),
and bumps the version and the state's entry time, so one stuck episode is replayed once. Every
replay is a history row (outcome "replayed") saying who, when, why and what.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from sfworkflow.core.definition import InstanceKey, derive_id
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Explanation, Filters, StuckInstance, format_age
from sfworkflow.db.repository import CHANGED, Store
from sfworkflow.ops.stuck import explain

ACTIONS = frozenset({"fire_timer", "redrive_parked", "reissue_command"})  # the plans that change something


@dataclass(frozen=True)
class Plan:
    stuck: StuckInstance
    action: str  # fire_timer | redrive_parked | reissue_command | needs_operator | nothing
    detail: str
    forced: bool = False  # replayed although not stuck (yet): recorded as forced

    @property
    def acts(self) -> bool:
        return self.action in ACTIONS


@dataclass(frozen=True)
class Result:
    plan: Plan
    status: str  # done | skipped | failed
    message: str


def plan_for(s: StuckInstance, engine: Engine) -> Plan:
    """What a replay does for an instance, from why it is (or, for a named instance, would be) stuck."""
    if s.why == "ended":
        return Plan(s, "nothing", f"it has ended in {s.state}: nothing to replay")
    if s.why == "timer_overdue" and s.pending_timer:
        return Plan(s, "fire_timer", f"fire timer {s.pending_timer} now")
    if s.parked:
        return Plan(s, "redrive_parked", f"re-drive {s.parked} parked event(s)")
    if s.why == "operator":
        return Plan(s, "needs_operator", "a person decides: publish one of " + _accepted(s, engine))
    if s.why == "never":
        return Plan(s, "nothing", f"nothing automatic: {s.state} waits for one of " + _accepted(s, engine))
    if s.why == "no_progress" and s.pending_command and s.pending_command_body:
        b = s.pending_command_body
        return Plan(
            s, "reissue_command",
            f"re-issue {s.pending_command} (idempotency key {b['idempotency_key']}, attempt {b['attempt'] + 1})",
        )  # fmt: skip
    return Plan(s, "nothing", "no timer, parked event or pending command to act on")


def _accepted(s: StuckInstance, engine: Engine) -> str:
    """The external events the instance's state accepts, e.g. `sequence.resumed, sequence.cancelled`."""
    compiled = engine.workflow(s.workflow, s.definition_version)
    accepted = sorted(compiled.triggers_by_state.get(s.state, ())) if compiled else []
    events = [f"{s.workflow}.{t}" for t in accepted if compiled and t in compiled.definition.events]
    return ", ".join(events) or "(none)"


@dataclass(frozen=True)
class Named:
    """A replay of one named instance: where it stands against its stuck rule, and what replay does for it."""

    explanation: Explanation
    plan: Plan  # what a replay does for it (forced when it is not stuck)
    why_not: str  # why this replay does nothing; "" when it does the plan
    forceable: bool  # nothing is done, and forcing would do the plan

    @property
    def plans(self) -> list[Plan]:
        return [] if self.why_not else [self.plan]


async def select_instance(
    conn: asyncpg.Connection | asyncpg.Pool, engine: Engine, key: InstanceKey, f: Filters, force: bool = False
) -> Named | None:
    """One instance to replay: done when stuck (matching `f.state`, `f.older_than_s`), or when `force` says
    so although it is not stuck (yet). None when there is no such instance."""
    e = await explain(conn, engine, key, f.default_after_s, f.no_progress_s)
    if e is None:
        return None
    plan = replace(plan_for(e.instance, engine), forced=not e.stuck)
    why_not = _why_not(e, plan, f, force)
    in_state = f.state is None or f.state == e.instance.state
    return Named(e, plan, why_not, bool(why_not) and plan.acts and in_state)


def _why_not(e: Explanation, plan: Plan, f: Filters, force: bool) -> str:
    s = e.instance
    if f.state is not None and s.state != f.state:
        return f"it is in {s.state}, not in {f.state}"
    if not plan.acts:
        return plan.detail
    if force:
        return ""
    if not e.stuck:
        return "it is not stuck yet"
    stuck_for = (e.now - s.stuck_since).total_seconds()
    if stuck_for < f.older_than_s:
        return f"it is stuck for {format_age(stuck_for)}, less than the {format_age(f.older_than_s)} asked for"
    return ""


def operator() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


async def execute(pool: asyncpg.Pool, store: Store, p: Plan, reason: str, by: str) -> Result:
    """Carry out one plan in its own transaction, through the store (the one writer of instance state);
    skipped when the instance changed since it was selected."""
    s = p.stuck
    if p.action in ("needs_operator", "nothing"):
        return Result(p, "skipped", p.detail)
    detail: dict[str, Any] = {"action": p.action, "by": by, "reason": reason, "forced": p.forced}
    if p.action == "redrive_parked":
        key = InstanceKey(s.tenant_id, s.workflow, s.entity_id)
        applied = await store.redrive_parked(key, expect_version=s.version, replayed=detail)
        if applied is None:
            return Result(p, "skipped", CHANGED)
        if applied == 0:
            return Result(p, "done", "parked events re-driven; none is allowed yet (they wait for their deadline)")
        return Result(p, "done", f"{applied} parked event(s) applied")
    if p.action == "fire_timer":
        why_not = await store.replay(s.instance_id, s.version, detail, timer=s.pending_timer)
    else:  # reissue_command: the pending command again, with a new command id and the next attempt
        body = dict(s.pending_command_body or {})
        body.update(
            command_id=derive_id(f"{s.ref}/{s.version + 1}/replay/{body['command_type']}"),
            attempt=int(body["attempt"]) + 1,
            issued_at=datetime.now(UTC).isoformat(),
        )
        why_not = await store.replay(s.instance_id, s.version, detail, command=body)
    if why_not is not None:
        return Result(p, "skipped", why_not)
    return Result(p, "done", p.detail)


async def replay_all(
    pool: asyncpg.Pool,
    store: Store,
    plans: Iterable[Plan],
    reason: str,
    by: str,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Carry out each plan in turn (`execute`), for `sfworkflow replay` and the admin API alike: one instance
    failing does not stop the others; its Result says failed, with the error's type and the start of its text.
    `progress` is called with each Result as soon as it is known (the CLI's progress line)."""
    results = []
    for p in plans:
        try:
            result = await execute(pool, store, p, reason, by)
        except Exception as exc:
            result = Result(p, "failed", f"{type(exc).__name__}: {str(exc)[:200]}")
        results.append(result)
        if progress is not None:
            progress(result)
    return results
