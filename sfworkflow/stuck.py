"""Finding stuck instances: the definitions say when an instance in a state counts as stuck.

An active instance is stuck when
  - it waits for a person (a state in `waits_for_operator`): from the moment it entered that state;
  - it has a pending timer: once that timer is overdue by TIMER_GRACE_S (timers are not firing);
  - otherwise: once it has been in its state longer than the state's `stuck_after_s`
    (DEFAULT_STUCK_AFTER_S unless the definition says otherwise; None: never by age),
    typically a command whose answer never came.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from sfworkflow.definition import DEFAULT_STUCK_AFTER_S, TIMER_GRACE_S, WorkflowDefinition
from sfworkflow.engine import Engine

# Candidates: active instances that have been in their state a while, or whose timer is overdue.
_CANDIDATES = """
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context, i.version,
       i.state_entered_at, i.updated_at, i.last_event_type, i.parked_count, t.next_due, t.timer_name,
       c.routing_key AS command_type, c.body AS command_body, c.published_at AS command_published_at
FROM sfworkflow.instance i
LEFT JOIN LATERAL (
    SELECT due_at AS next_due, name AS timer_name FROM sfworkflow.timer WHERE instance_id = i.id
    ORDER BY due_at LIMIT 1) t ON true
LEFT JOIN LATERAL (
    SELECT routing_key, body, published_at FROM sfworkflow.outbox
    WHERE instance_id = i.id AND kind = 'command' ORDER BY id DESC LIMIT 1) c ON true
WHERE NOT i.terminal
  AND ($1::text IS NULL OR i.workflow = $1)
  AND ($2::uuid IS NULL OR i.tenant_id = $2)
  AND ($3::text IS NULL OR i.state = $3)
  AND ($4::text IS NULL OR i.entity_id = $4)
  AND (i.state_entered_at < now() - make_interval(secs => $5) OR t.next_due < now() - make_interval(secs => $6)
       OR (i.workflow, i.state) IN (SELECT * FROM unnest($7::text[], $8::text[])))
ORDER BY i.state_entered_at
LIMIT $9
"""


@dataclass(frozen=True)
class StuckInstance:
    instance_id: int
    tenant_id: str
    workflow: str
    entity_id: str
    definition_version: int
    state: str
    version: int
    stuck_since: datetime
    why: str  # "operator", "timer_overdue" or "no_progress"
    detail: str
    last_event_type: str | None
    last_event_at: datetime
    pending_command: str | None
    pending_command_body: dict[str, Any] | None
    attempt: int | None
    pending_timer: str | None
    parked: int

    @property
    def ref(self) -> str:
        return f"{self.tenant_id}/{self.workflow}/{self.entity_id}"

    def as_json(self) -> dict[str, Any]:
        return {
            "instance": self.ref,
            "workflow": self.workflow,
            "tenant_id": self.tenant_id,
            "entity_id": self.entity_id,
            "definition_version": self.definition_version,
            "state": self.state,
            "version": self.version,
            "stuck_since": self.stuck_since.isoformat(),
            "why": self.why,
            "detail": self.detail,
            "last_event_type": self.last_event_type,
            "last_event_at": self.last_event_at.isoformat(),
            "pending_command": self.pending_command,
            "attempt": self.attempt,
            "pending_timer": self.pending_timer,
            "parked": self.parked,
        }


@dataclass(frozen=True)
class Filters:
    workflow: str | None = None
    tenant: str | None = None
    state: str | None = None
    entity: str | None = None
    older_than_s: float = 0.0  # stuck for at least this long
    limit: int = 1000
    # No-progress threshold for states whose definition sets none (SFWORKFLOW_STUCK_AFTER_S).
    default_after_s: float = DEFAULT_STUCK_AFTER_S


def operator_states(definitions: Iterable[WorkflowDefinition]) -> tuple[list[str], list[str]]:
    """(workflows, states) of every state where an instance waits for an operator, as parallel lists."""
    pairs = [(d.name, str(s)) for d in definitions for s in d.waits_for_operator]
    return [w for w, _ in pairs], [s for _, s in pairs]


# SQL for "settled" (terminal, or waiting for an operator); $1, $2: the lists of operator_states().
SETTLED_SQL = "(terminal OR (workflow, state) IN (SELECT * FROM unnest($1::text[], $2::text[])))"


def format_age(seconds: float) -> str:
    """A short age for tables: 45s, 12m, 5h, 3d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _min_age_s(engine: Engine, default_after_s: float) -> float:
    ages = [default_after_s]
    for cw in engine.compiled.values():
        ages += [v for v in cw.definition.stuck_after_s.values() if v is not None]
    return min(ages)


def classify(
    engine: Engine, row: Any, now: datetime, default_after_s: float = DEFAULT_STUCK_AFTER_S
) -> StuckInstance | None:
    """Whether a candidate row is stuck, by its definition's rules; None when it is not."""
    compiled = engine.workflow(row["workflow"], row["definition_version"])
    if compiled is None:
        since, why = row["state_entered_at"], "no_progress"
        detail = f"definition v{row['definition_version']} is not loaded: nothing can move this instance"
    else:
        d = compiled.definition
        state = row["state"]
        if state in d.waits_for_operator:
            since, why, detail = row["state_entered_at"], "operator", f"waits in {state} for an operator decision"
        elif row["next_due"] is not None:
            since = row["next_due"] + timedelta(seconds=TIMER_GRACE_S)
            why = "timer_overdue"
            detail = f"timer {row['timer_name']} was due at {row['next_due'].isoformat()} and has not fired"
        else:
            after = d.stuck_after_s.get(state, default_after_s)
            if after is None:
                return None
            since = row["state_entered_at"] + timedelta(seconds=after)
            why = "no_progress"
            cmd = row["command_type"]
            detail = f"in {state} for more than {after:g} s" + (f"; last command {cmd} unanswered" if cmd else "")
        if since > now:
            return None
    body = orjson.loads(row["command_body"]) if row["command_body"] is not None else None
    return StuckInstance(
        instance_id=row["id"],
        tenant_id=str(row["tenant_id"]),
        workflow=row["workflow"],
        entity_id=row["entity_id"],
        definition_version=row["definition_version"],
        state=row["state"],
        version=row["version"],
        stuck_since=since,
        why=why,
        detail=detail,
        last_event_type=row["last_event_type"],
        last_event_at=row["updated_at"],
        pending_command=row["command_type"],
        pending_command_body=body,
        attempt=body.get("attempt") if body else None,
        pending_timer=row["timer_name"],
        parked=row["parked_count"],
    )


async def find_stuck(conn: asyncpg.Connection, engine: Engine, f: Filters) -> list[StuckInstance]:
    """Stuck instances matching the filters, longest stuck first."""
    ws, ss = operator_states(cw.definition for cw in engine.compiled.values())
    rows = await conn.fetch(
        _CANDIDATES, f.workflow, f.tenant, f.state, f.entity, _min_age_s(engine, f.default_after_s), TIMER_GRACE_S,
        ws, ss,
        max(f.limit * 4, f.limit),
    )  # fmt: skip
    now = datetime.now(UTC)
    out = []
    for r in rows:
        s = classify(engine, r, now, f.default_after_s)
        if s is not None and (now - s.stuck_since).total_seconds() >= f.older_than_s:
            out.append(s)
    out.sort(key=lambda s: s.stuck_since)
    return out[: f.limit]


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d' (or plain seconds) -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an age: use e.g. 90s, 30m, 12h or 7d") from exc
