"""Concurrency limits without PostgreSQL: what a definition may declare, and what the batch plan writes for a command
under one (queued behind its key's gate, with the timers that start at the grant) and for an instance that may hold
a slot (its release). The gate loop's grants run against PostgreSQL: tests/integration/test_concurrency_limits.py."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import orjson
import pytest

from sfworkflow.core.batch import GateTimer, SlotRelease
from sfworkflow.core.definition import Step, Transition
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import ConcurrencyLimit, RateLimit
from sfworkflow.core.plan import BatchPlan
from sfworkflow.errors import DefinitionError
from sfworkflow.workflows import DEFINITIONS
from tests.unit.plankit import T0, TENANT, TOY, FakeDatabase, S, delivery


def _run(step: Step) -> None:
    step.command("do", {"key": step.data["key"]}, idempotency_key=f"do/{step.data['key']}")
    step.set_timer_in("soon", 30, {"key": step.data["key"]})


LIMIT = ConcurrencyLimit(
    "do", name="per_tenant", slots=2, held_in=frozenset({S.WAITING}), timers_after_release=("soon",)
)
GATED = dataclasses.replace(
    TOY,
    limits=(LIMIT,),
    events=TOY.events | {"run"},
    transitions=(*TOY.transitions, Transition("run", S.WAITING, None, action=_run)),
)
ENGINE = Engine([GATED])


def plan() -> BatchPlan:
    return BatchPlan(ENGINE, timedelta(hours=1), now=T0)


def started(db: FakeDatabase, *entities: str) -> None:
    db.apply(plan().deliveries([delivery("start", e) for e in entities]))


def test_a_command_under_a_concurrency_limit_is_queued_behind_its_key_s_gate() -> None:
    db = FakeDatabase()
    started(db, "a", "b", "c")
    p = plan()
    ws = db.apply(p.deliveries([delivery("send", e, key=e) for e in ("a", "b", "c")]))
    commands = [row for row in ws.outbox if row.kind == "command"]
    assert [orjson.loads(row.body)["data"]["key"] for row in commands] == ["a", "b", "c"]  # none dropped
    assert {row.gate_key for row in commands} == {f"toy.do/per_tenant|{TENANT}|*"}  # all three queued, one key
    assert p.report.gated[("toy", "toy.do", "toy.do/per_tenant")] == 3


def test_the_timers_named_start_at_the_grant_not_with_the_step() -> None:
    db = FakeDatabase()
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("run", "a", key="a")]))
    (row,) = [row for row in ws.outbox if row.kind == "command"]
    assert row.gate_timers == [GateTimer("soon", 30.0, {"key": "a"})]
    assert ws.timers == []  # not armed now
    assert [(c.name) for c in ws.cancel_timers] == ["soon"]  # and one of that name set before is cancelled


def test_an_instance_that_may_hold_a_slot_is_released_as_the_batch_leaves_it() -> None:
    db = FakeDatabase()
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("send", "a", key="a"), delivery("grab", "a", key="k")]))
    (release,) = ws.slot_releases
    assert release == SlotRelease(release.instance_id, S.HOLDING, False, ("toy.do/per_tenant",))  # left WAITING


def test_a_workflow_without_concurrency_limits_releases_nothing_and_gates_nothing() -> None:
    db = FakeDatabase()
    ungated = Engine([TOY])
    db.apply(BatchPlan(ungated, timedelta(hours=1), now=T0).deliveries([delivery("start", "a")]))
    ws = db.apply(BatchPlan(ungated, timedelta(hours=1), now=T0).deliveries([delivery("send", "a", key="a")]))
    assert ws.slot_releases == []
    assert all(row.gate_key is None and row.gate_timers is None for row in ws.outbox)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ((dataclasses.replace(LIMIT, held_in=frozenset({"nowhere"})),), "held_in names unknown"),
        ((dataclasses.replace(LIMIT, held_in=frozenset({S.DONE})),), "never be released"),
        ((LIMIT, dataclasses.replace(LIMIT, name="again")), "two concurrency limits"),
        ((dataclasses.replace(LIMIT, command="undo"),), "not a command"),
        ((RateLimit("do", name="per_tenant", per_s=1), LIMIT), "declared twice"),
        ((LIMIT, RateLimit("do", name="per_second", per_s=1)), "has a rate and a concurrency limit"),
    ],
)
def test_what_a_definition_may_not_declare(limits: tuple[object, ...], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        Engine([dataclasses.replace(GATED, limits=limits)])


@pytest.mark.parametrize("slots", [0, -1, 1.5, True, 100_001])
def test_slots_must_be_a_whole_number_in_range(slots: object) -> None:
    with pytest.raises(ValueError, match="slots must be a whole number"):
        dataclasses.replace(LIMIT, slots=slots)


def test_the_shipped_agent_declares_four_runs_per_tenant() -> None:
    engine = Engine(DEFINITIONS)
    limits = engine.concurrency_limits()
    agent = limits["agent.run_task/per_tenant"]
    assert (agent.slots, sorted(agent.held_in), agent.timers_after_release) == (
        4, ["dispatched", "running"], ("run_timeout",)
    )  # fmt: skip
    assert ("agent", "agent.run_task", "agent.run_task/per_tenant") in engine.concurrency_labels()
    assert "agent.run_task/per_tenant" not in engine.limit_names()  # not a rate: SFWORKFLOW_RATE_LIMITS cannot name it


def _run_then_note(step: Step) -> None:
    _run(step)
    step.lifecycle("workflow.noted", S.WAITING, {})  # a message decided after the gated command


def test_messages_decided_after_a_queued_command_wait_behind_it() -> None:
    """Found in review: only the gated row was never due; a message behind it was written due and sat in the relay's
    polling claim (which reads due rows first) while its instance's command waited for a slot."""
    noted = Transition("run", S.WAITING, None, action=_run_then_note)
    engine = Engine([dataclasses.replace(GATED, transitions=(*TOY.transitions, noted))])
    db = FakeDatabase()
    db.apply(BatchPlan(engine, timedelta(hours=1), now=T0).deliveries([delivery("start", "a")]))
    ws = db.apply(BatchPlan(engine, timedelta(hours=1), now=T0).deliveries([delivery("run", "a", key="a")]))
    by_kind = {row.kind: row for row in ws.outbox}
    assert by_kind["command"].gate_key is not None and not by_kind["command"].behind_gate
    assert by_kind["lifecycle"].behind_gate and by_kind["lifecycle"].gate_key is None
    assert all(row.check_gate for row in ws.outbox)  # and write_batch looks for a queued row of an earlier batch


def test_a_new_command_under_a_limit_gives_up_the_slot_held_for_the_last_one() -> None:
    """Found in review: a release by the batch's final state alone kept the slot of an instance that re-issued the
    command without leaving the limit's states (it would then wait for a slot while holding one)."""
    db = FakeDatabase()
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("run", "a", key="a")]))
    (release,) = ws.slot_releases
    assert release.reissued == ("toy.do/per_tenant",)
