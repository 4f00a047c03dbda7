"""When an instance counts as stuck: the rules its definition states, applied to one instance row (pure).

An active instance is stuck when
  - it waits for a person (a state in `waits_for_operator`): from the moment it entered that state;
  - it has a pending timer: once that timer is overdue by TIMER_GRACE_S (timers are not firing);
  - otherwise: once it has been in its state longer than the state's `stuck_after_s`
    (DEFAULT_STUCK_AFTER_S unless the definition says otherwise; None: never by age),
    typically a command whose answer never came.

`stuck_rule` states that rule for one instance (and the moment it applies); `classify` applies it to a
candidate row; `Explanation` is one named instance measured against it. ops/stuck.py reads the rows.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from sfworkflow.core.definition import DEFAULT_STUCK_AFTER_S, TIMER_GRACE_S, WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.errors import UsageError


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
    # An operator's no-progress age (`--no-progress-for`): replaces every state's threshold, the definition's
    # and the default; operator waits, overdue timers and states that never count keep their own rules.
    no_progress_s: float | None = None


def check_names(engine: Engine, workflow: str | None, state: str | None) -> None:
    """UsageError when a filter names a workflow, or a state, that no loaded definition has: a filter that
    can never match is a typo, not "nothing found". The message names the known ones and the closest."""
    workflows = sorted(engine.latest)
    if workflow is not None and workflow not in engine.latest:
        raise UsageError(
            f"no workflow {workflow!r}{_did_you_mean(workflow, workflows)}; known workflows: {', '.join(workflows)}"
        )
    if state is None:
        return
    states = states_of(engine, workflow)
    if state not in states:
        where, which = (f"in workflow {workflow}", "its states") if workflow else ("in any workflow", "known states")
        raise UsageError(f"no state {state!r} {where}{_did_you_mean(state, states)}; {which}: {', '.join(states)}")


def states_of(engine: Engine, workflow: str | None = None) -> list[str]:
    """Every state of the workflow (of every workflow when None), over all its loaded versions."""
    return sorted(
        {
            str(s)
            for cw in engine.compiled.values()
            if workflow in (None, cw.definition.name)
            for s in cw.definition.states
        }
    )


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def operator_states(definitions: Iterable[WorkflowDefinition]) -> tuple[list[str], list[str]]:
    """(workflows, states) of every state where an instance waits for an operator, as parallel lists."""
    pairs = [(d.name, str(s)) for d in definitions for s in d.waits_for_operator]
    return [w for w, _ in pairs], [s for _, s in pairs]


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


def min_age_s(engine: Engine, default_after_s: float, no_progress_s: float | None = None) -> float:
    """The shortest time in a state after which any instance can count as stuck by no progress."""
    if no_progress_s is not None:
        return no_progress_s
    ages = [default_after_s]
    for cw in engine.compiled.values():
        ages += [v for v in cw.definition.stuck_after_s.values() if v is not None]
    return min(ages)


def state_ages(
    engine: Engine, default_after_s: float, no_progress_s: float | None = None
) -> tuple[list[str], list[int], list[str], list[float | None]]:
    """Each (workflow, definition version, state) loaded, with the time in it after which an instance there can count
    as stuck by no progress (None: never by age), as four parallel lists for the stuck query. The query judges a
    state of a version not loaded (stuck at once by its rule, `stuck_rule`) or not known by `min_age_s`. Final
    states are left out (an ended instance is never stuck)."""
    rows: list[tuple[str, int, str, float | None]] = []
    for (name, version), cw in sorted(engine.compiled.items()):
        d = cw.definition
        for state in (str(s) for s in d.states):
            if state in d.terminal:
                continue
            after = d.stuck_after_s.get(state, default_after_s)
            if after is not None and no_progress_s is not None:
                after = no_progress_s
            rows.append((name, version, state, after))
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


@dataclass(frozen=True)
class Rule:
    """When its definition counts an instance as stuck, for the state the instance is in."""

    why: str  # the kind of stuck: operator | timer_overdue | no_progress; or never | ended (it cannot be)
    since: datetime | None  # the moment it counts (or counted) as stuck; None: never
    detail: str  # why it is stuck, once it is (what `sfworkflow stuck` shows)
    text: str  # the rule and its moment, e.g. "counts as stuck 15m after entering sending (at 2026-...)"


def when(at: datetime) -> str:
    """A moment for operators: 2026-11-27T10:15:00Z."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stuck_rule(
    engine: Engine, row: Any, default_after_s: float = DEFAULT_STUCK_AFTER_S, no_progress_s: float | None = None
) -> Rule:
    """The rule of the instance's definition for its state, and the moment it makes the instance stuck;
    `no_progress_s` (an operator's) replaces the state's no-progress threshold."""
    state, entered = row["state"], row["state_entered_at"]
    if row.get("terminal"):
        return Rule("ended", None, f"{state} is final", f"never: {state} is a final state (the instance has ended)")
    compiled = engine.workflow(row["workflow"], row["definition_version"])
    if compiled is None:
        detail = f"definition v{row['definition_version']} is not loaded: nothing can move this instance"
        return Rule("no_progress", entered, detail, f"counts as stuck at once (since {when(entered)}): {detail}")
    d = compiled.definition
    if state in d.waits_for_operator:
        text = f"waits for an operator: counts as stuck from the moment it entered {state} (at {when(entered)})"
        return Rule("operator", entered, f"waits in {state} for an operator decision", text)
    if row["next_due"] is not None:
        due, timer = row["next_due"], row["timer_name"]
        since = due + timedelta(seconds=TIMER_GRACE_S)
        text = (
            f"its timer {timer} is due at {when(due)}: counts as stuck once it is "
            f"{format_age(TIMER_GRACE_S)} overdue (at {when(since)})"
        )
        return Rule("timer_overdue", since, f"timer {timer} was due at {due.isoformat()} and has not fired", text)
    after = d.stuck_after_s.get(state, default_after_s)
    if after is not None and no_progress_s is not None:
        after = no_progress_s
    if after is None:
        return Rule("never", None, f"{state} never counts as stuck", f"never by age: {state} waits without a deadline")
    cmd = row["command_type"]
    # When its messages last waited for a rate limit's slot: the instance's own mark, else its last command's.
    deferred = row.get("deferred_until") or row.get("command_deferred_until")
    if deferred is not None and deferred > entered:
        # Its command waited for a rate limit's slot: the clock runs from the slot, like a timer's due time.
        since = deferred + timedelta(seconds=after)
        detail = f"no progress for {after:g} s since its command {cmd} went out at {deferred.isoformat()}"
        by = row.get("command_deferred_by") or "a rate limit"
        text = (
            f"its command {cmd} was deferred by {by} until {when(deferred)}: counts as stuck "
            f"{format_age(after)} after that (at {when(since)})"
        )
        return Rule("no_progress", since, detail + "; unanswered", text)
    since = entered + timedelta(seconds=after)
    detail = f"in {state} for more than {after:g} s" + (f"; last command {cmd} unanswered" if cmd else "")
    text = f"counts as stuck {format_age(after)} after entering {state} (at {when(since)})"
    return Rule("no_progress", since, detail, text)


def classify(
    engine: Engine,
    row: Any,
    now: datetime,
    default_after_s: float = DEFAULT_STUCK_AFTER_S,
    no_progress_s: float | None = None,
) -> StuckInstance | None:
    """Whether a candidate row is stuck, by its definition's rules; None when it is not."""
    rule = stuck_rule(engine, row, default_after_s, no_progress_s)
    if rule.since is None or rule.since > now:
        return None
    return stuck_instance(row, rule.why, rule.since, rule.detail)


def stuck_instance(row: Any, why: str, since: datetime, detail: str) -> StuckInstance:
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


@dataclass(frozen=True)
class Explanation:
    """One named instance measured against its definition's stuck rule: stuck or not, and since or from when."""

    instance: StuckInstance  # as a replay acts on it: `why` is the rule's kind, `stuck_since` its moment
    terminal: bool
    entered_at: datetime
    rule: Rule
    now: datetime

    @property
    def stuck(self) -> bool:
        return self.rule.since is not None and self.rule.since <= self.now

    def summary(self) -> str:
        """`T/W/E is not stuck yet: in sending for 4m (since 2026-...)`."""
        s = self.instance
        if self.terminal:
            verdict = "has ended"
        elif self.stuck:
            verdict = "is stuck"
        else:
            verdict = "is not stuck" + (" yet" if self.rule.since is not None else "")
        age = format_age((self.now - self.entered_at).total_seconds())
        return f"{s.ref} {verdict}: in {s.state} for {age} (since {when(self.entered_at)})"

    def as_json(self) -> dict[str, Any]:
        since = self.rule.since
        return {
            "instance": self.instance.ref,
            "state": self.instance.state,
            "terminal": self.terminal,
            "entered_at": self.entered_at.isoformat(),
            "in_state_s": round((self.now - self.entered_at).total_seconds(), 3),
            "stuck": self.stuck,
            "kind": self.rule.why,
            "stuck_at": since.isoformat() if since is not None else None,
            "rule": self.rule.text,
            "summary": self.summary(),
        }
