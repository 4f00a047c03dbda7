"""`self_improvement`: one eval -> prompt patch -> validation cycle of a tenant's prompts (entity = cycle id).

    new ──cycle_started──> evaluating (run_eval) ──eval_completed──> checking (claim + register lookup)
    checking ──claim_refused──> duplicate                  (another live cycle works on the same eval hash)
    checking ──lookup_result [same hash as the last successful eval]──> unchanged   (no patch)
    checking ──lookup_result [otherwise]──> proposing (propose_patch)
    proposing ──patch_proposed──> applying (apply_patch) ──patch_applied──> validating (validate, round n)
    validating ──validated──> improved                     (the eval hash becomes the tenant's last success)
    validating ──patch_proposed──> applying                (one more patch on top; round n is superseded)
    validating ──patch_proposed [max_patches reached]──> rolled_back
    evaluating|proposing|applying|validating ──command_failed (retryable, attempt < 3)──> retry_wait
        retry_wait ──timer_retry_due──> back to the state of the pending command (same key, attempt + 1)
        retry_wait also takes the late success of the pending command (the timer is cancelled)
    any active state but checking ──fatal_error | command_failed (final)──> rolled_back  if a patch was applied
                                                                         └─> failed       otherwise

Events (external, `self_improvement.<name>`): from the issue `cycle_started` {prompt_id?, eval_suite?,
max_patches?, requested_by?}, `eval_completed` {eval_hash, score}, `patch_proposed` {patch_id},
`patch_applied` {patch_id, attempt?}, `validated` {round?, score?, attempt?}, `fatal_error` {error_code,
message?}. Added: `command_failed` {command, error_code, retryable, attempt, patch_id?, round?} — a worker
reports that one of the cycle's commands failed; retryable failures are retried with RETRY (3 attempts,
backoff timer `retry_due`, same idempotency key, attempt + 1), others end the cycle like `fatal_error`.
Workers echo `attempt` (and `round` for validate) so reports about an older attempt or round are ignored.

Commands (sfworkflow.commands.self_improvement), idempotency keys `<tenant>:self_improvement:<cycle>:...`:
    run_eval {prompt_id, eval_suite}                      key ...:run_eval          (added: asks for the eval)
    propose_patch {eval_hash, score, prompt_id}           key ...:<hash>:propose_patch   (added: asks for a patch)
    apply_patch {patch_id, eval_hash}                     key ...:<hash>:apply_patch:<patch_id>
    validate {eval_hash, patch_ids, round}                key ...:<hash>:validate:<round>
Compensation (sfworkflow.compensations.self_improvement):
    rollback_prompt_patches {patch_ids (applied ones, newest first), eval_hash, error_code,
    unconfirmed_patch_id (an apply_patch in flight when the fatal error came, or null)}
    key ...:<hash>:rollback_prompt_patches; with workflow.failed and workflow.compensated.
A failure before any patch was applied ends `failed` (workflow.failed, no compensation).

Dedupe: the hash of the tenant's last successful eval is the idempotency key of the cycle. Register
`self_improvement.last_eval:<tenant>` holds it (written when a cycle ends `improved`); `eval_completed`
reads it (`lookup_result`) and a cycle whose eval has that hash ends `unchanged` with no patch. The claim
`self_improvement.eval:<tenant>:<hash>` keeps two live cycles from patching for the same eval at once (the
second ends `duplicate`); it is released when the cycle ends, so a failed eval hash may be tried again.
Other events are parked (stale ones ignored) while `checking`, which only lasts within one transaction.

Context: prompt_id, eval_suite, max_patches, eval_hash, score, claim, proposed (patch ids, in order),
applied (confirmed patch ids, in order of application), patch_id (being applied), round (validations
issued), pending {command, data, key} (the command awaiting its answer), attempt, retries.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import RetryPolicy, Step, Transition, WorkflowDefinition

NAME = "self_improvement"
LOOKUP = "last_success"
DEFAULT_MAX_PATCHES = 5
TOO_MANY_PATCHES = "too_many_patches"


class S(StrEnum):
    NEW = "new"
    EVALUATING = "evaluating"  # run_eval was issued; waiting for eval_completed
    CHECKING = "checking"  # the eval hash is being claimed and compared with the last success (one transaction)
    PROPOSING = "proposing"  # propose_patch was issued; waiting for patch_proposed
    APPLYING = "applying"  # apply_patch was issued; waiting for patch_applied
    VALIDATING = "validating"  # validate was issued; validated ends the cycle, patch_proposed continues it
    RETRY_WAIT = "retry_wait"  # the pending command failed retryably; the retry timer is pending
    IMPROVED = "improved"  # validated: the eval hash is the tenant's last successful eval
    UNCHANGED = "unchanged"  # same eval hash as the tenant's last successful eval: no patch
    DUPLICATE = "duplicate"  # another live cycle of the tenant holds this eval hash
    FAILED = "failed"  # failed before any patch was applied: nothing to undo
    ROLLED_BACK = "rolled_back"  # failed after patches were applied: rollback_prompt_patches was published


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)


def register_key(tenant_id: str) -> str:
    """The register holding the hash of the tenant's last successful eval."""
    return f"{NAME}.last_eval:{tenant_id}"


def claim_key(tenant_id: str, eval_hash: str) -> str:
    """Held by the one live cycle of a tenant working on this eval hash."""
    return f"{NAME}.eval:{tenant_id}:{eval_hash}"


def _prefix(step: Step) -> str:
    k = step.key
    return f"{k.tenant_id}:{NAME}:{k.entity_id}"


def _hash_prefix(step: Step) -> str:
    return f"{_prefix(step)}:{step.context['eval_hash']}"


def _pending_command(step: Step) -> str | None:
    pending = step.context.get("pending")
    return pending["command"] if pending else None


# ---- conditions -------------------------------------------------------------------------------
def awaiting_eval(step: Step) -> bool:
    return _pending_command(step) == "run_eval"


def is_our_claim(step: Step) -> bool:
    return step.data.get("key") == step.context.get("claim")


def is_our_lookup(step: Step) -> bool:
    return step.data.get("name") == LOOKUP and step.data.get("key") == register_key(step.key.tenant_id)


def same_as_last_success(step: Step) -> bool:
    value = step.data.get("value")
    return value is not None and value == step.context.get("eval_hash")


def awaiting_proposal(step: Step) -> bool:
    """A patch may be proposed when propose_patch is pending, or on top of a patch being validated."""
    return _pending_command(step) in ("propose_patch", "validate")


def patch_limit_reached(step: Step) -> bool:
    max_patches: int = step.context["max_patches"]
    return len(step.context["proposed"]) >= max_patches


def is_current_patch(step: Step) -> bool:
    return _pending_command(step) == "apply_patch" and step.data.get("patch_id") == step.context["patch_id"]


def awaiting_validation(step: Step) -> bool:
    return (
        _pending_command(step) == "validate"
        and step.data.get("round", step.context["round"]) == (step.context["round"])
    )


def about_pending(step: Step) -> bool:
    """The failure report is about the pending command, its current patch or round, and its current attempt."""
    data, ctx = step.data, step.context
    command = _pending_command(step)
    if command is None or data.get("command") != command or data.get("attempt") != ctx["attempt"]:
        return False
    if command == "apply_patch" and data.get("patch_id", ctx["patch_id"]) != ctx["patch_id"]:
        return False
    return not (command == "validate" and data.get("round", ctx["round"]) != ctx["round"])


def may_retry(step: Step) -> bool:
    return about_pending(step) and bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def has_applied(step: Step) -> bool:
    return bool(step.context.get("applied"))


def about_pending_has_applied(step: Step) -> bool:
    return about_pending(step) and has_applied(step)


def retrying_run_eval(step: Step) -> bool:
    return _pending_command(step) == "run_eval"


def retrying_propose_patch(step: Step) -> bool:
    return _pending_command(step) == "propose_patch"


def retrying_apply_patch(step: Step) -> bool:
    return _pending_command(step) == "apply_patch"


def retrying_validate(step: Step) -> bool:
    return _pending_command(step) == "validate"


# ---- actions ----------------------------------------------------------------------------------
def _issue(step: Step, command: str, data: dict[str, Any], key: str) -> None:
    """Publish the cycle's next command (attempt 1) and remember it as pending, for retries."""
    step.context["pending"] = {"command": command, "data": data, "key": key}
    step.context["attempt"] = 1
    step.command(command, data, idempotency_key=key, attempt=1)


def _answered(step: Step) -> None:
    """The pending command was answered: nothing pending; a retry timer (if any) is no longer needed."""
    step.context["pending"] = None
    step.context["attempt"] = 0
    if step.from_state == S.RETRY_WAIT:
        step.cancel_timer("retry_due")


def _release_claim(step: Step) -> None:
    claim = step.context.get("claim")
    if claim:
        step.release(claim)
        step.context["claim"] = None


def start(step: Step) -> None:
    d = step.data
    step.context.update(
        prompt_id=d.get("prompt_id"),
        eval_suite=d.get("eval_suite"),
        max_patches=d.get("max_patches", DEFAULT_MAX_PATCHES),
        eval_hash=None,
        score=None,
        claim=None,
        proposed=[],
        applied=[],
        patch_id=None,
        round=0,
        pending=None,
        attempt=0,
        retries=0,
    )
    if d.get("requested_by"):
        step.note(requested_by=d["requested_by"])
    data = {"prompt_id": d.get("prompt_id"), "eval_suite": d.get("eval_suite")}
    _issue(step, "run_eval", data, f"{_prefix(step)}:run_eval")


def check_eval(step: Step) -> None:
    """Claim the eval hash and read the tenant's last successful one; the store answers in this transaction."""
    ctx = step.context
    _answered(step)
    ctx["eval_hash"] = step.data["eval_hash"]
    ctx["score"] = step.data["score"]
    ctx["claim"] = claim_key(step.key.tenant_id, ctx["eval_hash"])
    step.claim(ctx["claim"])
    step.lookup(LOOKUP, register_key(step.key.tenant_id))
    step.note(eval_hash=ctx["eval_hash"], score=ctx["score"])


def duplicate(step: Step) -> None:
    """Another live cycle holds this eval hash: this one does nothing (it never held the claim)."""
    step.context["claim"] = None
    step.note(held_by=step.data.get("holder_entity_id"), claim=step.data.get("key"))


def unchanged(step: Step) -> None:
    _release_claim(step)
    step.note(unchanged=True, last_success=step.data.get("value"))


def ask_for_patch(step: Step) -> None:
    ctx = step.context
    data = {"eval_hash": ctx["eval_hash"], "score": ctx["score"], "prompt_id": ctx["prompt_id"]}
    _issue(step, "propose_patch", data, f"{_hash_prefix(step)}:propose_patch")
    step.note(last_success=step.data.get("value"))


def apply_patch(step: Step) -> None:
    ctx = step.context
    if _pending_command(step) == "validate":
        step.note(superseded_round=ctx["round"])
    _answered(step)
    patch_id = step.data["patch_id"]
    ctx["proposed"] = [*ctx["proposed"], patch_id]
    ctx["patch_id"] = patch_id
    data = {"patch_id": patch_id, "eval_hash": ctx["eval_hash"]}
    _issue(step, "apply_patch", data, f"{_hash_prefix(step)}:apply_patch:{patch_id}")


def validate(step: Step) -> None:
    ctx = step.context
    _answered(step)
    ctx["applied"] = [*ctx["applied"], ctx["patch_id"]]
    ctx["patch_id"] = None
    ctx["round"] = ctx["round"] + 1
    data = {"eval_hash": ctx["eval_hash"], "patch_ids": list(ctx["applied"]), "round": ctx["round"]}
    _issue(step, "validate", data, f"{_hash_prefix(step)}:validate:{ctx['round']}")


def improved(step: Step) -> None:
    """Validated: the eval hash becomes the tenant's last successful eval."""
    ctx = step.context
    _answered(step)
    step.remember(register_key(step.key.tenant_id), ctx["eval_hash"])
    _release_claim(step)
    step.note(patches=list(ctx["applied"]), validation_score=step.data.get("score"))


def schedule_retry(step: Step) -> None:
    ctx = step.context
    delay = RETRY.delay_s(ctx["attempt"], ctx["pending"]["key"])
    step.set_timer_in("retry_due", delay)
    step.note(command=ctx["pending"]["command"], error_code=step.data.get("error_code"), retry_in_s=round(delay, 3))


def reissue(step: Step) -> None:
    """Retry timer fired: the same command again, same idempotency key, attempt + 1."""
    ctx = step.context
    pending = ctx["pending"]
    ctx["attempt"] = ctx["attempt"] + 1
    ctx["retries"] = ctx["retries"] + 1
    step.command(pending["command"], pending["data"], idempotency_key=pending["key"], attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"], command=pending["command"])


def _failure(step: Step) -> tuple[str, str]:
    """(error_code, reason) of the event that ends the cycle."""
    ctx, data = step.context, step.data
    code = str(data.get("error_code", "unknown"))
    if step.event.name == "command_failed":
        command = data.get("command")
        if data.get("retryable"):
            return code, f"{command} failed after {ctx['attempt']} attempts ({code})"
        return code, f"{command} failed: {code}"
    return code, f"fatal error: {code}"


def _in_flight_patch(step: Step) -> str | None:
    """An apply_patch whose outcome is unknown (not a failure the worker reported for it)."""
    if _pending_command(step) != "apply_patch" or step.event.name == "command_failed":
        return None
    patch_id: str | None = step.context["patch_id"]
    return patch_id


def _roll_back(step: Step, code: str, reason: str) -> None:
    ctx = step.context
    patch_ids = list(reversed(ctx["applied"]))
    step.compensate(
        "rollback_prompt_patches",
        {
            "patch_ids": patch_ids,
            "eval_hash": ctx["eval_hash"],
            "error_code": code,
            "unconfirmed_patch_id": _in_flight_patch(step),
        },
        idempotency_key=f"{_hash_prefix(step)}:rollback_prompt_patches",
    )
    step.lifecycle("workflow.failed", S.ROLLED_BACK, {"reason": reason, "error_code": code})
    step.lifecycle("workflow.compensated", S.ROLLED_BACK, {"compensations": [f"{NAME}.rollback_prompt_patches"]})
    _release_claim(step)
    ctx["pending"] = None
    step.note(failure=reason, rolled_back=patch_ids)


def roll_back(step: Step) -> None:
    """A failure after patches were applied: roll them back, newest first."""
    code, reason = _failure(step)
    _roll_back(step, code, reason)


def reject_patch(step: Step) -> None:
    """One patch too many for this cycle: it is not applied, and the applied ones are rolled back."""
    ctx = step.context
    reason = f"patch {step.data['patch_id']} exceeds the cycle's limit of {ctx['max_patches']} patches"
    step.note(rejected_patch_id=step.data["patch_id"])
    _roll_back(step, TOO_MANY_PATCHES, reason)


def fail(step: Step) -> None:
    """A failure before any patch was applied: nothing to undo."""
    code, reason = _failure(step)
    unconfirmed = _in_flight_patch(step)
    if unconfirmed:
        step.note(unconfirmed_patch_id=unconfirmed)
    step.lifecycle("workflow.failed", S.FAILED, {"reason": reason, "error_code": code})
    _release_claim(step)
    step.context["pending"] = None
    step.note(failure=reason)


def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked: a second eval, a patch proposed or applied before,
    a validation round that was superseded, a failure of a command that is no longer pending (or of an
    older attempt, or of an attempt whose failure was already handled)."""
    data, ctx, name = step.data, step.context, step.event.name
    if name == "eval_completed" and ctx.get("eval_hash") is not None:
        return f"the cycle's eval completed already ({ctx['eval_hash']})"
    if name == "patch_proposed" and data.get("patch_id") in ctx.get("proposed", ()):
        return f"patch {data.get('patch_id')} was proposed already"
    if name == "patch_applied" and data.get("patch_id") in ctx.get("applied", ()):
        return f"patch {data.get('patch_id')} is applied already"
    if name == "validated" and data.get("round") is not None:
        r, current = data["round"], ctx.get("round", 0)
        if r < current or (r == current and _pending_command(step) != "validate"):
            return f"validation round {r} was superseded (current round {current})"
    if name == "command_failed":
        return _stale_failure(step)
    return None


def _stale_failure(step: Step) -> str | None:
    data, ctx = step.data, step.context
    command, pending = data.get("command"), _pending_command(step)
    if command != pending:
        return f"{command} is not the pending command ({pending})"
    if command == "apply_patch" and data.get("patch_id", ctx["patch_id"]) != ctx["patch_id"]:
        return f"patch {data.get('patch_id')} is not the patch being applied ({ctx['patch_id']})"
    if command == "validate" and data.get("round", ctx["round"]) < ctx["round"]:
        return f"validation round {data.get('round')} was superseded (current round {ctx['round']})"
    attempt = data.get("attempt", 0)
    if attempt < ctx["attempt"]:
        return f"attempt {attempt} of {command} was superseded by attempt {ctx['attempt']}"
    if attempt == ctx["attempt"] and step.from_state == S.RETRY_WAIT:
        return f"attempt {attempt} of {command} failed already; its retry is pending"
    return None


E, C, P, A, V, R = S.EVALUATING, S.CHECKING, S.PROPOSING, S.APPLYING, S.VALIDATING, S.RETRY_WAIT
# Not CHECKING: a failure reported there waits (parked) until the claim and the lookup are answered,
# which happens in the same transaction. VALIDATING always has an applied patch, EVALUATING and
# PROPOSING never have one.

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.IMPROVED, S.UNCHANGED, S.DUPLICATE, S.FAILED, S.ROLLED_BACK}),
    start_events=frozenset({"cycle_started"}),
    events=frozenset(
        {
            "cycle_started",
            "eval_completed",
            "patch_proposed",
            "patch_applied",
            "validated",
            "fatal_error",
            "command_failed",
        }
    ),
    internal_events=frozenset({"claim_refused", "lookup_result", "timer_retry_due"}),
    commands=frozenset({"run_eval", "propose_patch", "apply_patch", "validate"}),
    compensations=frozenset({"rollback_prompt_patches"}),
    retry=RETRY,
    stale=stale,
    description="One eval -> prompt patch -> validation cycle of a tenant's prompts; a repeated eval hash is a no-op.",
    # When an instance counts as stuck (seconds in the state with no pending timer): evals and validations
    # take minutes; the register lookup resolves in the event's transaction.
    stuck_after_s={
        S.EVALUATING: 1800.0,
        S.CHECKING: 60.0,
        S.PROPOSING: 1800.0,
        S.APPLYING: 900.0,
        S.VALIDATING: 1800.0,
        S.RETRY_WAIT: 900.0,
    },
    transitions=(
        Transition("cycle_started", S.NEW, E, action=start),
        Transition("eval_completed", [E, R], C, [awaiting_eval], action=check_eval),
        Transition("claim_refused", C, S.DUPLICATE, [is_our_claim], action=duplicate),
        Transition("lookup_result", C, S.UNCHANGED, [is_our_lookup, same_as_last_success], action=unchanged),
        Transition("lookup_result", C, P, [is_our_lookup], action=ask_for_patch),
        Transition("patch_proposed", [V, R], S.ROLLED_BACK, [awaiting_proposal, patch_limit_reached], reject_patch),
        Transition("patch_proposed", [P, V, R], A, [awaiting_proposal], action=apply_patch),
        Transition("patch_applied", [A, R], V, [is_current_patch], action=validate),
        Transition("validated", [V, R], S.IMPROVED, [awaiting_validation], action=improved),
        Transition("command_failed", [E, P, A, V], R, [may_retry], action=schedule_retry),
        Transition("command_failed", [A, V], S.ROLLED_BACK, [about_pending_has_applied], action=roll_back),
        Transition("command_failed", [E, P, A], S.FAILED, [about_pending], action=fail),
        Transition("timer_retry_due", R, E, [retrying_run_eval], action=reissue),
        Transition("timer_retry_due", R, P, [retrying_propose_patch], action=reissue),
        Transition("timer_retry_due", R, A, [retrying_apply_patch], action=reissue),
        Transition("timer_retry_due", R, V, [retrying_validate], action=reissue),
        Transition("fatal_error", [A, V, R], S.ROLLED_BACK, [has_applied], action=roll_back),
        Transition("fatal_error", [E, P, A, R], S.FAILED, action=fail),
    ),
)
