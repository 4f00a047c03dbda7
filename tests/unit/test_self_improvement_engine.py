"""`Engine.step` on the `self_improvement` definition: the full state x trigger table, every path of the
cycle (eval, unchanged, duplicate, patches, validation), retries, rollback and failure, stale reports."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, OutgoingMessage, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.self_improvement import (
    DEFAULT_MAX_PATCHES,
    DEFINITION,
    RETRY,
    S,
    claim_key,
    register_key,
)
from tests.unit import enginekit
from tests.unit.enginekit import (
    ENGINE,
    T0,
    TENANT,
    A,
    I,
    P,
    check_table_cell,
    check_table_covers,
    lifecycle_types,
    of_kind,
    schema_errors,
)

SI = enginekit.workflow(DEFINITION)

ENTITY = "cycle-42"
KEY = InstanceKey(TENANT, "self_improvement", ENTITY)
CORRELATION = "corr-cycle-42"
H1 = "sha256:" + "a1" * 32
H0 = "sha256:" + "0f" * 32
REGISTER = register_key(TENANT)
CLAIM = claim_key(TENANT, H1)
PREFIX = f"{TENANT}:self_improvement:{ENTITY}"

EXTERNAL = (
    "cycle_started",
    "eval_completed",
    "patch_proposed",
    "patch_applied",
    "validated",
    "fatal_error",
    "command_failed",
)
INTERNAL = ("claim_refused", "lookup_result", "timer_retry_due")
TRIGGERS = EXTERNAL + INTERNAL


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `self_improvement` instance (`KEY`) driven event by event; `decisions` are the applied ones."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION)
        self.decisions: list[Decision] = []

    def step(self, name: str, data: dict[str, Any] | None = None, **kw: Any) -> Decision:
        d = super().step(name, data, **kw)
        if d.outcome is A:
            self.decisions.append(d)
        return d


# ---- event data ------------------------------------------------------------------------------------
def started(**kw: Any) -> dict[str, Any]:
    return {"prompt_id": "prompt-sales-email", "eval_suite": "suite-outreach-v3", **kw}


def completed(eval_hash: str = H1, score: float = 0.82) -> dict[str, Any]:
    return {"eval_hash": eval_hash, "score": score}


def looked_up(value: Any = None, key: str = REGISTER, name: str = "last_success") -> dict[str, Any]:
    return {"name": name, "key": key, "value": value}


def refused(key: str = CLAIM) -> dict[str, Any]:
    return {"key": key, "holder_entity_id": "cycle-7", "holder_workflow": "self_improvement"}


def proposed(patch_id: str) -> dict[str, Any]:
    return {"patch_id": patch_id}


def applied(patch_id: str, attempt: int | None = None) -> dict[str, Any]:
    return {"patch_id": patch_id} | ({} if attempt is None else {"attempt": attempt})


def failed(command: str, attempt: int = 1, retryable: bool = True, code: str = "busy", **kw: Any) -> dict[str, Any]:
    return {"command": command, "error_code": code, "retryable": retryable, "attempt": attempt, **kw}


# ---- runs in each state, built by driving the engine from `cycle_started` --------------------------
def in_new() -> Run:
    return Run()


def in_evaluating(**kw: Any) -> Run:
    r = Run()
    r.do("cycle_started", started(**kw))
    return r


def in_checking(**kw: Any) -> Run:
    r = in_evaluating(**kw)
    r.do("eval_completed", completed())
    return r


def in_proposing(**kw: Any) -> Run:
    r = in_checking(**kw)
    r.do("lookup_result", looked_up(H0))
    return r


def in_applying(**kw: Any) -> Run:
    r = in_proposing(**kw)
    r.do("patch_proposed", proposed("patch-1"))
    return r


def in_validating(patches: int = 1, **kw: Any) -> Run:
    r = in_applying(**kw)
    r.do("patch_applied", applied("patch-1"))
    for n in range(2, patches + 1):
        r.do("patch_proposed", proposed(f"patch-{n}"))
        r.do("patch_applied", applied(f"patch-{n}"))
    return r


def in_retry_wait() -> Run:
    r = in_applying()
    r.do("command_failed", failed("apply_patch", patch_id="patch-1"))
    return r


def in_improved() -> Run:
    r = in_validating()
    r.do("validated", {"round": 1})
    return r


def in_unchanged() -> Run:
    r = in_checking()
    r.do("lookup_result", looked_up(H1))
    return r


def in_duplicate() -> Run:
    r = in_checking()
    r.do("claim_refused", refused())
    return r


def in_failed() -> Run:
    r = in_evaluating()
    r.do("fatal_error", {"error_code": "eval_crashed"})
    return r


def in_rolled_back() -> Run:
    r = in_validating()
    r.do("fatal_error", {"error_code": "regression_detected"})
    return r


BUILDERS = {
    S.NEW: in_new,
    S.EVALUATING: in_evaluating,
    S.CHECKING: in_checking,
    S.PROPOSING: in_proposing,
    S.APPLYING: in_applying,
    S.VALIDATING: in_validating,
    S.RETRY_WAIT: in_retry_wait,
    S.IMPROVED: in_improved,
    S.UNCHANGED: in_unchanged,
    S.DUPLICATE: in_duplicate,
    S.FAILED: in_failed,
    S.ROLLED_BACK: in_rolled_back,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    """Data for `name` that refers to the run's pending command, patch, round and attempt."""
    ctx = run.ctx
    pending = (ctx.get("pending") or {}).get("command", "run_eval")
    fail = failed(pending, max(ctx.get("attempt", 0), 1))
    if pending == "apply_patch":
        fail["patch_id"] = ctx["patch_id"]
    if pending == "validate":
        fail["round"] = ctx["round"]
    return {
        "cycle_started": started(),
        "eval_completed": completed(),
        "patch_proposed": proposed(f"patch-{len(ctx.get('proposed', [])) + 1}"),
        "patch_applied": applied(ctx.get("patch_id") or "patch-1"),
        "validated": {"round": max(ctx.get("round", 0), 1)},
        "fatal_error": {"error_code": "boom"},
        "command_failed": fail,
        "claim_refused": refused(),
        "lookup_result": looked_up(),
        "timer_retry_due": {},
    }[name]


# ---- message checks --------------------------------------------------------------------------------
def only_command(d: Decision) -> OutgoingMessage:
    (m,) = of_kind(d, "command")
    assert schema_errors(m) == []
    return m


# ---- the state x trigger table ---------------------------------------------------------------------
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"cycle_started": (A, S.EVALUATING), **{t: (P, None) for t in TRIGGERS if t != "cycle_started"}},
    S.EVALUATING: {
        "cycle_started": (I, None),
        "eval_completed": (A, S.CHECKING),
        "patch_proposed": (P, None),
        "patch_applied": (P, None),
        "validated": (P, None),
        "fatal_error": (A, S.FAILED),
        "command_failed": (A, S.RETRY_WAIT),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "timer_retry_due": (I, None),
    },
    S.CHECKING: {
        "cycle_started": (I, None),
        "eval_completed": (I, None),  # stale: the eval completed already
        "patch_proposed": (P, None),
        "patch_applied": (P, None),
        "validated": (P, None),
        "fatal_error": (P, None),  # waits for the claim and lookup answers of the same transaction
        "command_failed": (I, None),  # stale: nothing is pending
        "claim_refused": (A, S.DUPLICATE),
        "lookup_result": (A, S.PROPOSING),
        "timer_retry_due": (I, None),
    },
    S.PROPOSING: {
        "cycle_started": (I, None),
        "eval_completed": (I, None),
        "patch_proposed": (A, S.APPLYING),
        "patch_applied": (P, None),
        "validated": (P, None),
        "fatal_error": (A, S.FAILED),
        "command_failed": (A, S.RETRY_WAIT),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "timer_retry_due": (I, None),
    },
    S.APPLYING: {
        "cycle_started": (I, None),
        "eval_completed": (I, None),
        "patch_proposed": (P, None),  # one more patch waits until this one is applied
        "patch_applied": (A, S.VALIDATING),
        "validated": (P, None),
        "fatal_error": (A, S.FAILED),
        "command_failed": (A, S.RETRY_WAIT),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "timer_retry_due": (I, None),
    },
    S.VALIDATING: {
        "cycle_started": (I, None),
        "eval_completed": (I, None),
        "patch_proposed": (A, S.APPLYING),
        "patch_applied": (I, None),  # stale: patch-1 is applied already
        "validated": (A, S.IMPROVED),
        "fatal_error": (A, S.ROLLED_BACK),
        "command_failed": (A, S.RETRY_WAIT),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "timer_retry_due": (I, None),
    },
    S.RETRY_WAIT: {  # apply_patch of patch-1 failed once
        "cycle_started": (I, None),
        "eval_completed": (I, None),
        "patch_proposed": (P, None),
        "patch_applied": (A, S.VALIDATING),  # a late success of the pending command
        "validated": (P, None),
        "fatal_error": (A, S.FAILED),
        "command_failed": (I, None),  # stale: attempt 1 failed already
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "timer_retry_due": (A, S.APPLYING),
    },
    S.IMPROVED: ALL_IGNORED,
    S.UNCHANGED: ALL_IGNORED,
    S.DUPLICATE: ALL_IGNORED,
    S.FAILED: ALL_IGNORED,
    S.ROLLED_BACK: ALL_IGNORED,
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert set(BUILDERS) == set(S)
    assert DEFINITION.commands == {"run_eval", "propose_patch", "apply_patch", "validate"}
    assert DEFINITION.compensations == {"rollback_prompt_patches"}
    assert DEFINITION.waits_for_operator == frozenset()
    assert (RETRY.max_attempts, RETRY.base_s, RETRY.cap_s) == (3, 1.0, 60.0)


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(minutes=1))
    assert d.trigger == trigger
    assert d.from_state == (run.state or (S.NEW if d.outcome is A else ""))
    if d.outcome is not A:
        assert d.timers_cancelled == []
        assert not d.cancel_all_timers and not d.requests


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything_with_a_reason(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.to_state, d.reason) == (I, state, f"instance is {state}")


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "cycle_started"])
def test_non_start_event_without_instance_is_parked(trigger: str) -> None:
    d = ENGINE.step(SI, KEY, None, event(trigger, realistic(trigger, Run())), T0)
    assert (d.outcome, d.version, d.reason) == (P, 0, "instance does not exist yet")


@pytest.mark.parametrize("state", [S.EVALUATING, S.CHECKING, S.PROPOSING, S.APPLYING, S.VALIDATING, S.RETRY_WAIT])
def test_second_cycle_started_is_ignored(state: S) -> None:
    d = BUILDERS[state]().step("cycle_started", started(max_patches=1))
    assert (d.outcome, d.reason) == (I, "instance already started")


# ---- start and eval --------------------------------------------------------------------------------
def test_cycle_started_asks_for_the_eval() -> None:
    run = Run()
    d = run.do("cycle_started", started(max_patches=3, requested_by="scheduler"))
    assert (d.from_state, d.to_state, d.version) == (S.NEW, S.EVALUATING, 1)
    m = only_command(d)
    assert m.routing_key == "self_improvement.run_eval"
    assert m.body["data"] == {"prompt_id": "prompt-sales-email", "eval_suite": "suite-outreach-v3"}
    assert (m.body["idempotency_key"], m.body["attempt"], m.effect_key) == (f"{PREFIX}:run_eval", 1, None)
    assert m.body["correlation_id"] == CORRELATION
    assert m.body["causation_id"] == event("cycle_started", started(max_patches=3, requested_by="scheduler")).event_id
    assert lifecycle_types(d) == ["workflow.started"]
    ctx = d.context
    assert (ctx["max_patches"], ctx["proposed"], ctx["applied"], ctx["round"], ctx["attempt"]) == (3, [], [], 0, 1)
    assert ctx["pending"] == {"command": "run_eval", "data": m.body["data"], "key": f"{PREFIX}:run_eval"}
    assert d.notes == {"requested_by": "scheduler"}


def test_cycle_started_without_data_uses_defaults() -> None:
    d = Run().do("cycle_started", {})
    assert only_command(d).body["data"] == {"prompt_id": None, "eval_suite": None}
    assert d.context["max_patches"] == DEFAULT_MAX_PATCHES


def test_eval_completed_claims_the_hash_and_reads_the_last_success() -> None:
    run = in_evaluating()
    d = run.do("eval_completed", completed(H1, 0.82))
    assert (d.to_state, d.outgoing, d.timers_set) == (S.CHECKING, [], [])
    assert d.requests.claims == [CLAIM]
    assert d.requests.lookups == [("last_success", REGISTER)]
    assert (d.requests.releases, d.requests.remember) == ([], {})
    assert (d.context["eval_hash"], d.context["score"], d.context["claim"], d.context["pending"]) == (
        H1,
        0.82,
        CLAIM,
        None,
    )
    assert d.notes == {"eval_hash": H1, "score": 0.82}


def test_register_and_claim_keys_are_per_tenant() -> None:
    assert REGISTER == f"self_improvement.last_eval:{TENANT}"
    assert CLAIM == f"self_improvement.eval:{TENANT}:{H1}"
    assert register_key("other") != REGISTER


# ---- unchanged / duplicate / proposing ---------------------------------------------------------------
def test_same_hash_as_the_last_successful_eval_ends_unchanged_with_no_patch() -> None:
    run = in_checking()
    d = run.do("lookup_result", looked_up(H1))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.UNCHANGED, True, True)
    assert of_kind(d, "command") == [] and of_kind(d, "compensation") == []
    assert lifecycle_types(d) == ["workflow.completed"]
    assert of_kind(d, "lifecycle")[0].body["data"] == {"final_state": "unchanged"}
    assert d.requests.releases == [CLAIM] and d.requests.remember == {}
    assert d.notes == {"unchanged": True, "last_success": H1}
    issued = [m for dd in run.decisions for m in dd.outgoing if m.kind == "command"]
    assert [m.routing_key for m in issued] == ["self_improvement.run_eval"]


@pytest.mark.parametrize("last", [None, H0, 17])
def test_another_or_no_last_success_asks_for_a_patch(last: Any) -> None:
    d = in_checking().do("lookup_result", looked_up(last))
    assert d.to_state == S.PROPOSING
    m = only_command(d)
    assert m.routing_key == "self_improvement.propose_patch"
    assert m.body["data"] == {"eval_hash": H1, "score": 0.82, "prompt_id": "prompt-sales-email"}
    assert m.body["idempotency_key"] == f"{PREFIX}:{H1}:propose_patch"
    assert H1 in m.body["idempotency_key"]
    assert not d.requests


@pytest.mark.parametrize(
    "data", [looked_up(H1, key=register_key("other-tenant")), looked_up(H1, name="something_else")]
)
def test_a_lookup_answer_for_another_register_is_ignored(data: dict[str, Any]) -> None:
    d = in_checking().step("lookup_result", data)
    assert (d.outcome, d.to_state) == (I, S.CHECKING)


def test_claim_refused_ends_duplicate_and_releases_nothing() -> None:
    run = in_checking()
    d = run.do("claim_refused", refused())
    assert (d.to_state, d.terminal) == (S.DUPLICATE, True)
    assert of_kind(d, "command") == [] and of_kind(d, "compensation") == []
    assert lifecycle_types(d) == ["workflow.completed"]
    assert not d.requests  # it never held the claim
    assert d.context["claim"] is None
    assert d.notes == {"held_by": "cycle-7", "claim": CLAIM}
    # the lookup answer that follows in the same transaction is ignored
    assert run.step("lookup_result", looked_up()).outcome is I


def test_claim_refused_for_another_key_is_ignored() -> None:
    d = in_checking().step("claim_refused", refused(claim_key(TENANT, H0)))
    assert (d.outcome, d.to_state) == (I, S.CHECKING)


# ---- patches and validation --------------------------------------------------------------------------
def test_happy_path_eval_patch_validate_improved() -> None:
    run = in_proposing()
    d = run.do("patch_proposed", proposed("patch-1"))
    m = only_command(d)
    assert (d.to_state, m.routing_key) == (S.APPLYING, "self_improvement.apply_patch")
    assert m.body["data"] == {"patch_id": "patch-1", "eval_hash": H1}
    assert m.body["idempotency_key"] == f"{PREFIX}:{H1}:apply_patch:patch-1"
    d = run.do("patch_applied", applied("patch-1", 1))
    m = only_command(d)
    assert (d.to_state, m.routing_key) == (S.VALIDATING, "self_improvement.validate")
    assert m.body["data"] == {"eval_hash": H1, "patch_ids": ["patch-1"], "round": 1}
    assert m.body["idempotency_key"] == f"{PREFIX}:{H1}:validate:1"
    assert (d.context["applied"], d.context["patch_id"], d.context["round"]) == (["patch-1"], None, 1)
    d = run.do("validated", {"round": 1, "score": 0.9})
    assert (d.to_state, d.terminal) == (S.IMPROVED, True)
    assert of_kind(d, "command") == [] and of_kind(d, "compensation") == []
    assert lifecycle_types(d) == ["workflow.completed"]
    assert d.requests.remember == {REGISTER: H1}
    assert d.requests.releases == [CLAIM]
    assert d.notes == {"patches": ["patch-1"], "validation_score": 0.9}
    for dd in run.decisions:
        assert all(schema_errors(x) == [] for x in dd.outgoing)


def test_validated_without_round_is_taken_for_the_current_round() -> None:
    d = in_validating().do("validated", {})
    assert d.to_state == S.IMPROVED


def test_a_patch_proposed_while_validating_adds_a_patch_and_a_new_round() -> None:
    run = in_validating()
    d = run.do("patch_proposed", proposed("patch-2"))
    assert d.to_state == S.APPLYING
    assert d.notes == {"superseded_round": 1}
    assert only_command(d).body["data"] == {"patch_id": "patch-2", "eval_hash": H1}
    d = run.do("patch_applied", applied("patch-2"))
    m = only_command(d)
    assert m.body["data"] == {"eval_hash": H1, "patch_ids": ["patch-1", "patch-2"], "round": 2}
    assert m.body["idempotency_key"] == f"{PREFIX}:{H1}:validate:2"
    # the answer to the superseded round 1 is ignored; round 2's ends the cycle
    assert run.step("validated", {"round": 1}).outcome is I
    d = run.do("validated", {"round": 2})
    assert d.to_state == S.IMPROVED
    assert d.notes["patches"] == ["patch-1", "patch-2"]


def test_the_superseded_round_answer_arriving_while_applying_is_ignored() -> None:
    run = in_validating()
    run.do("patch_proposed", proposed("patch-2"))
    d = run.step("validated", {"round": 1})
    assert (d.outcome, d.reason) == (I, "validation round 1 was superseded (current round 1)")


def test_a_future_round_is_parked() -> None:
    d = in_validating().step("validated", {"round": 2})
    assert d.outcome is P


def test_a_proposal_while_applying_waits_for_the_patch_in_flight() -> None:
    run = in_applying()
    assert run.step("patch_proposed", proposed("patch-2")).outcome is P
    run.do("patch_applied", applied("patch-1"))
    assert run.do("patch_proposed", proposed("patch-2")).to_state == S.APPLYING


def test_patch_applied_for_another_patch_is_parked() -> None:
    assert in_applying().step("patch_applied", applied("patch-9")).outcome is P


def test_one_patch_too_many_rolls_back_the_applied_ones() -> None:
    run = in_validating(patches=2, max_patches=2)
    d = run.do("patch_proposed", proposed("patch-3"))
    assert (d.to_state, d.terminal) == (S.ROLLED_BACK, True)
    assert of_kind(d, "command") == []
    (c,) = of_kind(d, "compensation")
    assert c.body["data"] == {
        "patch_ids": ["patch-2", "patch-1"],
        "eval_hash": H1,
        "error_code": "too_many_patches",
        "unconfirmed_patch_id": None,
    }
    assert lifecycle_types(d) == ["workflow.failed", "workflow.compensated", "workflow.completed"]
    assert d.notes["rejected_patch_id"] == "patch-3"
    assert "limit of 2 patches" in of_kind(d, "lifecycle")[0].body["data"]["reason"]


# ---- rollback and failure ----------------------------------------------------------------------------
def _rollback(d: Decision) -> OutgoingMessage:
    (c,) = of_kind(d, "compensation")
    assert c.kind == c.body["kind"] == "compensation"
    assert c.routing_key == "self_improvement.rollback_prompt_patches"
    assert c.body["idempotency_key"] == f"{PREFIX}:{H1}:rollback_prompt_patches"
    assert schema_errors(c) == []
    return c


@pytest.mark.parametrize("patches", [1, 2, 3])
def test_fatal_error_after_patches_rolls_them_back_newest_first(patches: int) -> None:
    run = in_validating(patches=patches)
    d = run.do("fatal_error", {"error_code": "regression_detected", "message": "worse"})
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.ROLLED_BACK, True, True)
    assert of_kind(d, "command") == []
    c = _rollback(d)
    expected = [f"patch-{n}" for n in range(patches, 0, -1)]
    assert c.body["data"] == {
        "patch_ids": expected,
        "eval_hash": H1,
        "error_code": "regression_detected",
        "unconfirmed_patch_id": None,
    }
    assert [(m.kind, m.routing_key) for m in d.outgoing] == [
        ("compensation", "self_improvement.rollback_prompt_patches"),
        ("lifecycle", "workflow.failed.self_improvement"),
        ("lifecycle", "workflow.compensated.self_improvement"),
        ("lifecycle", "workflow.completed.self_improvement"),
    ]
    failed_ev, compensated, _completed = of_kind(d, "lifecycle")
    assert failed_ev.body["data"] == {"reason": "fatal error: regression_detected", "error_code": "regression_detected"}
    assert compensated.body["data"] == {"compensations": ["self_improvement.rollback_prompt_patches"]}
    assert failed_ev.body["state"] == compensated.body["state"] == "rolled_back"
    assert d.requests.releases == [CLAIM] and d.requests.remember == {}
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_fatal_error_while_a_second_patch_is_in_flight_names_it_unconfirmed() -> None:
    run = in_validating()
    run.do("patch_proposed", proposed("patch-2"))
    d = run.do("fatal_error", {"error_code": "patch_conflict"})
    assert d.to_state == S.ROLLED_BACK
    assert _rollback(d).body["data"]["patch_ids"] == ["patch-1"]
    assert _rollback(d).body["data"]["unconfirmed_patch_id"] == "patch-2"


@pytest.mark.parametrize("builder", [in_evaluating, in_proposing, in_applying, in_retry_wait])
def test_fatal_error_before_any_patch_was_applied_fails_without_compensation(builder: Any) -> None:
    run = builder()
    d = run.do("fatal_error", {"error_code": "eval_crashed"})
    assert (d.to_state, d.terminal) == (S.FAILED, True)
    assert of_kind(d, "compensation") == [] and of_kind(d, "command") == []
    assert lifecycle_types(d) == ["workflow.failed", "workflow.completed"]
    assert of_kind(d, "lifecycle")[0].body["data"] == {
        "reason": "fatal error: eval_crashed",
        "error_code": "eval_crashed",
    }
    assert of_kind(d, "lifecycle")[1].body["data"] == {"final_state": "failed"}
    assert d.requests.releases == ([] if builder is in_evaluating else [CLAIM])
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_fatal_error_while_checking_is_parked_then_applied() -> None:
    run = in_checking()
    assert run.step("fatal_error", {"error_code": "boom"}).outcome is P
    run.do("lookup_result", looked_up())
    d = run.do("fatal_error", {"error_code": "boom"})
    assert d.to_state == S.FAILED and d.requests.releases == [CLAIM]


def test_a_final_command_failure_after_patches_rolls_back() -> None:
    run = in_validating()
    d = run.do("command_failed", failed("validate", retryable=False, code="holdout_missing", round=1))
    assert d.to_state == S.ROLLED_BACK
    assert _rollback(d).body["data"]["patch_ids"] == ["patch-1"]
    assert of_kind(d, "lifecycle")[0].body["data"]["reason"] == "validate failed: holdout_missing"


def test_a_final_apply_failure_is_not_unconfirmed() -> None:
    run = in_validating()
    run.do("patch_proposed", proposed("patch-2"))
    d = run.do("command_failed", failed("apply_patch", retryable=False, code="bad_patch", patch_id="patch-2"))
    assert d.to_state == S.ROLLED_BACK
    assert _rollback(d).body["data"] == {
        "patch_ids": ["patch-1"],
        "eval_hash": H1,
        "error_code": "bad_patch",
        "unconfirmed_patch_id": None,
    }


@pytest.mark.parametrize(("builder", "command"), [(in_evaluating, "run_eval"), (in_proposing, "propose_patch")])
def test_a_final_command_failure_before_patches_fails(builder: Any, command: str) -> None:
    d = builder().do("command_failed", failed(command, retryable=False, code="bad_input"))
    assert d.to_state == S.FAILED and of_kind(d, "compensation") == []


# ---- retries -----------------------------------------------------------------------------------------
RETRIED = [
    (in_evaluating, "run_eval", {}, S.EVALUATING, f"{PREFIX}:run_eval"),
    (in_proposing, "propose_patch", {}, S.PROPOSING, f"{PREFIX}:{H1}:propose_patch"),
    (in_applying, "apply_patch", {"patch_id": "patch-1"}, S.APPLYING, f"{PREFIX}:{H1}:apply_patch:patch-1"),
    (in_validating, "validate", {"round": 1}, S.VALIDATING, f"{PREFIX}:{H1}:validate:1"),
]


@pytest.mark.parametrize(("builder", "command", "extra", "state", "key"), RETRIED, ids=[r[1] for r in RETRIED])
def test_retryable_failure_retries_the_same_command_with_backoff(
    builder: Any, command: str, extra: dict[str, Any], state: S, key: str
) -> None:
    run = builder()
    first = next(m for m in run.decisions[-1].outgoing if m.kind == "command")
    assert first.body["idempotency_key"] == key
    now = T0 + timedelta(seconds=5)
    d = run.do("command_failed", failed(command, 1, **extra), now=now)
    assert (d.to_state, d.outgoing) == (S.RETRY_WAIT, [])
    delay = RETRY.delay_s(1, key)
    assert 0.8 <= delay <= 1.2
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    assert d.notes == {"command": command, "error_code": "busy", "retry_in_s": round(delay, 3)}
    d = run.do("timer_retry_due", now=now + timedelta(seconds=delay))
    assert d.to_state == state
    m = only_command(d)
    assert m.routing_key == f"self_improvement.{command}"
    assert (m.body["idempotency_key"], m.body["attempt"], m.body["data"]) == (key, 2, first.body["data"])
    assert m.message_id != first.message_id
    assert (d.context["attempt"], d.context["retries"]) == (2, 1)
    assert d.notes == {"retry_attempt": 2, "command": command}
    # attempt 2 fails too: the backoff grows
    d = run.do("command_failed", failed(command, 2, **extra), now=now)
    delay2 = RETRY.delay_s(2, key)
    assert 1.6 <= delay2 <= 2.4
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay2), {})]


@pytest.mark.parametrize(("builder", "command", "extra", "state", "key"), RETRIED, ids=[r[1] for r in RETRIED])
def test_retries_exhausted_end_the_cycle(builder: Any, command: str, extra: dict[str, Any], state: S, key: str) -> None:
    run = builder()
    commands = [m for m in run.decisions[-1].outgoing if m.kind == "command"]
    for attempt in (1, 2):
        assert run.do("command_failed", failed(command, attempt, **extra)).to_state == S.RETRY_WAIT
        commands += run.do("timer_retry_due").outgoing
    assert [c.body["attempt"] for c in commands] == [1, 2, 3]
    assert {c.body["idempotency_key"] for c in commands} == {key}
    assert len({c.message_id for c in commands}) == 3
    d = run.do("command_failed", failed(command, 3, **extra))
    reason = f"{command} failed after 3 attempts (busy)"
    if command == "validate":
        assert d.to_state == S.ROLLED_BACK
        assert _rollback(d).body["data"]["patch_ids"] == ["patch-1"]
    else:
        assert d.to_state == S.FAILED
        assert of_kind(d, "compensation") == []
    assert of_kind(d, "lifecycle")[0].body["data"] == {"reason": reason, "error_code": "busy"}


def test_a_late_success_while_waiting_to_retry_cancels_the_retry() -> None:
    run = in_retry_wait()
    d = run.do("patch_applied", applied("patch-1", 1))
    assert d.to_state == S.VALIDATING
    assert d.timers_cancelled == ["retry_due"]
    assert only_command(d).body["data"]["patch_ids"] == ["patch-1"]
    assert (d.context["attempt"], d.context["pending"]["command"]) == (1, "validate")


def test_a_late_eval_while_waiting_to_retry_run_eval_is_taken() -> None:
    run = in_evaluating()
    run.do("command_failed", failed("run_eval"))
    d = run.do("eval_completed", completed())
    assert (d.to_state, d.timers_cancelled, d.requests.claims) == (S.CHECKING, ["retry_due"], [CLAIM])


def test_a_proposal_while_waiting_to_retry_validate_supersedes_it() -> None:
    run = in_validating()
    run.do("command_failed", failed("validate", round=1))
    d = run.do("patch_proposed", proposed("patch-2"))
    assert (d.to_state, d.timers_cancelled) == (S.APPLYING, ["retry_due"])


def test_fatal_error_while_waiting_to_retry_after_patches_rolls_back() -> None:
    run = in_validating()
    run.do("command_failed", failed("validate", round=1))
    d = run.do("fatal_error", {"error_code": "boom"})
    assert (d.to_state, d.cancel_all_timers) == (S.ROLLED_BACK, True)
    assert _rollback(d).body["data"]["patch_ids"] == ["patch-1"]


# ---- stale reports -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "name", "data", "reason"),
    [
        (in_proposing, "eval_completed", completed(H0), f"the cycle's eval completed already ({H1})"),
        (in_validating, "patch_proposed", proposed("patch-1"), "patch patch-1 was proposed already"),
        (in_applying, "patch_proposed", proposed("patch-1"), "patch patch-1 was proposed already"),
        (in_validating, "patch_applied", applied("patch-1"), "patch patch-1 is applied already"),
        (
            in_applying,
            "command_failed",
            failed("run_eval"),
            "run_eval is not the pending command (apply_patch)",
        ),
        (
            in_applying,
            "command_failed",
            failed("apply_patch", patch_id="patch-0"),
            "patch patch-0 is not the patch being applied (patch-1)",
        ),
        (
            in_retry_wait,
            "command_failed",
            failed("apply_patch", patch_id="patch-1"),
            "attempt 1 of apply_patch failed already; its retry is pending",
        ),
        (in_checking, "command_failed", failed("run_eval"), "run_eval is not the pending command (None)"),
    ],
)
def test_reports_about_the_past_are_ignored(builder: Any, name: str, data: dict[str, Any], reason: str) -> None:
    d = builder().step(name, data)
    assert (d.outcome, d.reason) == (I, reason)


def test_a_failure_of_an_older_attempt_is_ignored() -> None:
    run = in_retry_wait()
    run.do("timer_retry_due")
    d = run.step("command_failed", failed("apply_patch", 1, patch_id="patch-1"))
    assert (d.outcome, d.reason) == (I, "attempt 1 of apply_patch was superseded by attempt 2")


def test_a_failure_of_a_superseded_validation_round_is_ignored() -> None:
    run = in_validating(patches=2)
    d = run.step("command_failed", failed("validate", round=1))
    assert (d.outcome, d.reason) == (I, "validation round 1 was superseded (current round 2)")


def test_a_failure_of_a_future_attempt_is_parked() -> None:
    d = in_applying().step("command_failed", failed("apply_patch", 2, patch_id="patch-1"))
    assert d.outcome is P


def test_every_command_key_after_the_eval_names_the_eval_hash() -> None:
    run = in_validating(patches=2)
    run.do("fatal_error", {"error_code": "boom"})
    messages = [m for d in run.decisions for m in d.outgoing if m.kind != "lifecycle"]
    assert [m.routing_key.removeprefix("self_improvement.") for m in messages] == [
        "run_eval",
        "propose_patch",
        "apply_patch",
        "validate",
        "apply_patch",
        "validate",
        "rollback_prompt_patches",
    ]
    for m in messages[1:]:
        assert m.body["idempotency_key"].startswith(f"{PREFIX}:{H1}:")
    assert len({m.body["idempotency_key"] for m in messages}) == len(messages)
    assert all(schema_errors(m) == [] for d in run.decisions for m in d.outgoing)
