"""Moving in-flight instances from one loaded definition version to another (`sfworkflow migrate-instances`).

Without a migration an instance finishes on the definition version it started on (the store steps each
row with the machine of its `definition_version`); new instances start on the latest loaded version.
A migration moves the non-terminal instances of one workflow from version A to version B:

- each instance's state is mapped: an explicit `--map OLD=NEW` entry first, else the same state when it
  exists in B; an instance whose state has no mapping is refused (left on A) and reported;
- context, parked events and pending timers are kept as they are. Timers keep their names, so the
  mapped state of B must accept the trigger `timer_<name>` of every pending timer: if it does not, the
  instance is refused (a timer that would fire into a state that ignores it would strand the instance);
- a mapped state must be a non-terminal state of B other than its initial state (ending an instance is
  what `cancelled` events are for; the initial state means "not started");
- instances are taken in batches, one transaction per batch, rows locked FOR UPDATE SKIP LOCKED (a row
  the service is working on right now is skipped, and picked up by running the command again) and their
  version re-checked under the lock; each migrated instance gets a history row (outcome `migrated`,
  event_type `<workflow>.migrated`) and its instance version is incremented.

The pure part (`check_versions`, `parse_map`, `check_map`, `decide`) is core/versions.py; `migrate_instances`
does the database work on one asyncpg connection with sfworkflow's codecs (`db.init_connection`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.core.plan import BatchPlan
from sfworkflow.core.versions import check_map, check_versions, decide
from sfworkflow.db import repository
from sfworkflow.errors import VersionMigrationError
from sfworkflow.ops import compat

DEFAULT_BATCH_SIZE = 100


@dataclass(slots=True)
class InstanceResult:
    instance_id: int
    tenant_id: str
    entity_id: str
    outcome: str  # "migrated" (or would be, in a dry run) | "refused" | "skipped"
    from_state: str
    to_state: str | None = None
    reason: str | None = None
    replay: str | None = None  # a dry run: how its recorded history replays differently on the target version


@dataclass(slots=True)
class MigrationReport:
    workflow: str
    from_version: int
    to_version: int
    dry_run: bool
    results: list[InstanceResult] = field(default_factory=list)

    def of(self, outcome: str) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome == outcome]

    @property
    def migrated(self) -> list[InstanceResult]:
        return self.of("migrated")

    @property
    def refused(self) -> list[InstanceResult]:
        return self.of("refused")

    @property
    def skipped(self) -> list[InstanceResult]:
        return self.of("skipped")

    def lines(self) -> list[str]:
        """What was done (or would be), one line per instance, then the summary."""
        return [self.line(r) for r in self.results] + self.summary()

    def line(self, r: InstanceResult) -> str:
        """What was done (or would be) for one instance."""
        w, a, b = self.workflow, self.from_version, self.to_version
        ref = f"{r.tenant_id}/{w}/{r.entity_id}"
        if r.outcome == "migrated":
            line = f"{'would migrate' if self.dry_run else 'migrated'} {ref}: v{a} {r.from_state} -> v{b} {r.to_state}"
            return line if r.replay is None else f"{line}, but its history replays differently on v{b}:\n{r.replay}"
        if r.outcome == "refused":
            return f"{'would refuse' if self.dry_run else 'refused'} {ref} ({r.from_state}): {r.reason}"
        return f"skipped {ref} ({r.from_state}): {r.reason}"

    @property
    def broken(self) -> list[InstanceResult]:
        """A dry run: instances it would move whose recorded histories the target version treats differently."""
        return [r for r in self.results if r.replay is not None]

    def summary(self) -> list[str]:
        """The counts per outcome, and what to do about skipped instances."""
        verb = "would migrate" if self.dry_run else "migrated"
        out = [
            f"{self.workflow} v{self.from_version} -> v{self.to_version}"
            f"{' (dry run: nothing changed)' if self.dry_run else ''}: "
            f"{verb} {len(self.migrated)}, refused {len(self.refused)}, skipped {len(self.skipped)}"
            + (f", would break {len(self.broken)} (their histories replay differently)" if self.dry_run else "")
        ]
        if self.skipped:
            out.append("skipped instances were busy or changed meanwhile: run the command again to take them")
        return out


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without passwd entry)
        return f"uid:{os.getuid()}"


async def migrate_instances(
    conn: asyncpg.Connection,
    engine: Engine,
    workflow: str,
    from_version: int,
    to_version: int,
    mapping: Mapping[str, str] | None = None,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    reason: str | None = None,
    by: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[MigrationReport, list[InstanceResult]], None] | None = None,
) -> MigrationReport:
    """Migrate (or, with dry_run, only decide) the non-terminal instances of `workflow` on `from_version`.
    `progress` is called with the report and each batch's results once the batch committed."""
    source, target = check_versions(engine, workflow, from_version, to_version)
    mapping = dict(mapping or {})
    check_map(source, target, mapping)
    if limit is not None and limit < 1:
        raise VersionMigrationError(f"--limit {limit}: give a positive number")
    detail = {"from_version": from_version, "to_version": to_version, "reason": reason, "by": by or os_user()}
    report = MigrationReport(workflow, from_version, to_version, dry_run)
    last_id = 0
    while limit is None or len(report.results) < limit:
        n = batch_size if limit is None else min(batch_size, limit - len(report.results))
        candidates = await repository.migration_candidates(conn, workflow, from_version, last_id, n)
        if not candidates:
            break
        last_id = candidates[-1]["id"]
        async with conn.transaction():
            done = await _batch(conn, engine, source, target, mapping, candidates, dry_run, detail)
        report.results.extend(done)
        if progress is not None:
            progress(report, done)
    return report


async def count_candidates(conn: asyncpg.Connection, workflow: str, from_version: int) -> int:
    """How many instances a migration of `workflow` from `from_version` would consider now (its progress total)."""
    return await repository.count_migration_candidates(conn, workflow, from_version)


async def _batch(
    conn: asyncpg.Connection,
    engine: Engine,
    source: CompiledWorkflow,
    target: CompiledWorkflow,
    mapping: Mapping[str, str],
    candidates: Sequence[asyncpg.Record],
    dry_run: bool,
    detail: dict[str, Any],
) -> list[InstanceResult]:
    # A dry run takes no lock: it must not hold up the service, and it changes nothing.
    ids = [c["id"] for c in candidates]
    rows = await repository.instances_for_migration(conn, ids, lock=not dry_run)
    by_id = {r["id"]: r for r in rows}
    timers = await repository.timer_names(conn, list(by_id))
    from_version = source.definition.version
    results: list[InstanceResult] = []
    moving: list[InstanceResult] = []
    for c in candidates:
        iid = c["id"]
        r = by_id.get(iid)
        if r is None:  # locked by the service (or another migration) right now, or pruned
            results.append(
                InstanceResult(iid, c["tenant_id"], c["entity_id"], "skipped", c["state"], reason="busy (row locked)")
            )
            continue
        res = InstanceResult(iid, r["tenant_id"], r["entity_id"], "skipped", r["state"])
        results.append(res)
        if r["definition_version"] != from_version:
            res.reason = f"now on definition version {r['definition_version']}"
            continue
        if r["terminal"]:
            res.reason = "ended meanwhile"
            continue
        verdict = decide(source, target, mapping, r["state"], timers.get(iid, ()))
        res.to_state = verdict.to_state
        if verdict.to_state is None:
            res.outcome, res.reason = "refused", verdict.reason
            continue
        res.outcome = "migrated"
        moving.append(res)
    if moving and dry_run:  # replay what each would-be-moved instance did through the target version
        broken = await compat.divergences(conn, engine, [m.instance_id for m in moving], target.definition.version)
        for m in moving:
            m.replay = broken.get(m.instance_id)
    if moving and not dry_run:  # the rows are locked and were re-checked: the plan writes, as for events
        moves = [(by_id[m.instance_id], m.to_state) for m in moving if m.to_state is not None]
        plan = BatchPlan(engine, timedelta(0))
        await repository.write(conn, plan.migrated(moves, target.definition.version, {**detail}))
    return results
