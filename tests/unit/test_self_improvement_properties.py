"""Property-based tests of the pure `self_improvement` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey, InstanceView
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import self_improvement
from sfworkflow.workflows.self_improvement import S, claim_key, register_key
from tests.unit.enginekit import TENANT, Walk, with_optional

KEY = InstanceKey(TENANT, "self_improvement", "cycle-prop")
STATES = {str(s) for s in S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
HASHES = ["sha256:aa", "sha256:bb"]
COMMANDS = ["run_eval", "propose_patch", "apply_patch", "validate"]

patch_id = st.sampled_from(["p1", "p2", "p3", "p4"])
eval_hash = st.sampled_from(HASHES)
round_no = st.integers(1, 4)
attempt = st.integers(1, 4)


event_st = st.one_of(
    st.tuples(
        st.just("cycle_started"),
        st.builds(lambda m: with_optional({"prompt_id": "p"}, max_patches=m), st.one_of(st.none(), st.integers(1, 3))),
    ),
    st.tuples(
        st.just("eval_completed"), st.builds(lambda h, s: {"eval_hash": h, "score": s}, eval_hash, st.floats(0, 1))
    ),
    st.tuples(st.just("patch_proposed"), st.builds(lambda p: {"patch_id": p}, patch_id)),
    st.tuples(
        st.just("patch_applied"),
        st.builds(lambda p, a: with_optional({"patch_id": p}, attempt=a), patch_id, st.one_of(st.none(), attempt)),
    ),
    st.tuples(st.just("validated"), st.builds(lambda r: with_optional({}, round=r), st.one_of(st.none(), round_no))),
    st.tuples(st.just("fatal_error"), st.just({"error_code": "boom"})),
    st.tuples(
        st.just("command_failed"),
        st.builds(
            lambda c, r, a, p, n: with_optional(
                {"command": c, "error_code": "e", "retryable": r, "attempt": a}, patch_id=p, round=n
            ),
            st.sampled_from(COMMANDS),
            st.booleans(),
            attempt,
            st.one_of(st.none(), patch_id),
            st.one_of(st.none(), round_no),
        ),
    ),
    st.tuples(
        st.just("claim_refused"),
        st.builds(
            lambda h: {"key": claim_key(TENANT, h), "holder_entity_id": "other", "holder_workflow": "self_improvement"},
            eval_hash,
        ),
    ),
    st.tuples(
        st.just("lookup_result"),
        st.builds(
            lambda v: {"name": "last_success", "key": register_key(TENANT), "value": v},
            st.one_of(st.none(), eval_hash),
        ),
    ),
    st.tuples(st.just("timer_retry_due"), st.just({})),
)


def plausible(view: InstanceView | None) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """(progress, trouble): events a well-behaved SalesFlow side could send now, so that random runs get
    deep into the cycle (several patches, retries, rollbacks) instead of ending at the first failure."""
    if view is None:
        return [("cycle_started", {"max_patches": 2}), ("cycle_started", {})], []
    ctx = view.context
    progress: list[tuple[str, dict[str, Any]]] = [("timer_retry_due", {})]
    trouble: list[tuple[str, dict[str, Any]]] = [("fatal_error", {"error_code": "boom"})]
    pending = (ctx.get("pending") or {}).get("command")
    if pending:
        fail = {"command": pending, "error_code": "e", "attempt": ctx["attempt"]}
        trouble += [("command_failed", {**fail, "retryable": True}), ("command_failed", {**fail, "retryable": False})]
    if pending == "run_eval":
        progress += [("eval_completed", {"eval_hash": h, "score": 0.5}) for h in HASHES]
    if view.state == S.CHECKING:
        progress += [
            ("lookup_result", {"name": "last_success", "key": register_key(TENANT), "value": v})
            for v in (None, *HASHES)
        ]
        refused = {"key": ctx["claim"], "holder_entity_id": "other", "holder_workflow": "self_improvement"}
        trouble.append(("claim_refused", refused))
    if pending in ("propose_patch", "validate"):
        progress.append(("patch_proposed", {"patch_id": f"p{len(ctx['proposed']) + 1}"}))
    if pending == "apply_patch":
        progress.append(("patch_applied", {"patch_id": ctx["patch_id"]}))
    if pending == "validate":
        progress += [
            ("validated", {"round": ctx["round"]}),
            ("patch_proposed", {"patch_id": f"p{len(ctx['proposed']) + 1}"}),
        ]
    return progress, trouble


@settings(max_examples=600, deadline=None)
@given(st.data(), st.integers(1, 40))
def test_random_event_sequences_keep_the_engine_sound(data: st.DataObject, length: int) -> None:
    walk = Walk(self_improvement.DEFINITION, KEY, T0)
    apply_commands: list[str] = []  # patch ids of the apply_patch commands issued, in order
    applied: list[str] = []  # patch ids confirmed by an applied patch_applied, in order
    for _ in range(length):
        progress, trouble = plausible(walk.view)
        kind = data.draw(st.integers(0, 19), label="kind")
        if kind < 14 or (kind < 17 and not trouble):
            name, payload = data.draw(st.sampled_from(progress), label="progress")
        elif kind < 17:
            name, payload = data.draw(st.sampled_from(trouble), label="trouble")
        else:
            name, payload = data.draw(event_st, label="random")
        d = walk.step(name, payload, data.draw(st.integers(0, 120), label="gap"))  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == [] and not d.requests
            continue
        assert d.to_state in STATES
        if name == "patch_applied":
            applied.append(payload["patch_id"])
        commands = [m for m in d.outgoing if m.kind == "command"]
        compensations = [m for m in d.outgoing if m.kind == "compensation"]
        # A compensation only ever undoes something that was asked for before: here, applied patches.
        for c in compensations:
            assert c.routing_key == "self_improvement.rollback_prompt_patches"
            assert apply_commands, "rollback without any apply_patch command"
            assert c.body["data"]["patch_ids"] == list(reversed(applied))
            assert set(c.body["data"]["patch_ids"]) <= set(apply_commands)
        if d.to_state == S.ROLLED_BACK:
            assert len(compensations) == 1
        else:
            assert compensations == []
        if d.to_state in (S.UNCHANGED, S.DUPLICATE, S.FAILED):
            assert commands == []
        if d.to_state == S.UNCHANGED:
            assert payload["value"] == d.context["eval_hash"] and applied == []
        if d.requests.remember:
            assert d.to_state == S.IMPROVED
            assert d.requests.remember == {register_key(TENANT): d.context["eval_hash"]}
        for m in commands:
            assert m.body["attempt"] <= self_improvement.RETRY.max_attempts
            if m.routing_key == "self_improvement.apply_patch":
                apply_commands.append(m.body["data"]["patch_id"])
        assert len(d.context["applied"]) <= d.context["max_patches"]
        assert len(set(d.context["proposed"])) == len(d.context["proposed"])
        if d.terminal:
            assert d.cancel_all_timers
