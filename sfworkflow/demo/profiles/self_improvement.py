"""Simulated SalesFlow side of `self_improvement`: cycles, and the eval / patch / validation workers.

About a third of the cycles run the shared regression suite on the shared prompt, so their evals hash
alike: while one of them is live the others end `duplicate`, and once one has succeeded the later ones
end `unchanged` (they start a few seconds apart). Validation sometimes asks for one more patch (up to
three per cycle); a few cycles allow only two patches, so a third proposal rolls them back. A few
cycles are aborted by an operator (`fatal_error`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "self_improvement"
SHARE = 0.05
PREFIX = f"{WORKFLOW}."
SHARED_PROMPT = "prompt-sales-email"
SHARED_SUITE = "suite-regression"
MAX_PATCHES_PROPOSED = 3  # the simulated proposer stops asking for more after the third patch


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"cycle-{i}"
    shared = rnd.random() < 0.35
    data: dict[str, Any] = {
        "prompt_id": SHARED_PROMPT if shared else f"prompt-{i % 6}",
        "eval_suite": SHARED_SUITE if shared else f"suite-{i}",
        "max_patches": 2 if rnd.random() < 0.1 else 3,
        "requested_by": "scheduler",
    }
    delay = round(rnd.uniform(0.0, 4.0), 2) if shared else 0.0
    out = [Traffic(f"{PREFIX}cycle_started", entity, data, delay_s=delay)]
    if rnd.random() < 0.03:  # an operator aborts the cycle
        out.append(Traffic(f"{PREFIX}fatal_error", entity, {"error_code": "aborted_by_operator"}, delay_s=delay + 1.0))
    return out


def eval_hash(prompt_id: str | None, eval_suite: str | None) -> str:
    """What the simulated eval of a prompt on a suite hashes to (the same inputs, the same hash)."""
    return "sha256:" + hashlib.sha256(f"{prompt_id}|{eval_suite}".encode()).hexdigest()


def answer(cmd: dict[str, Any], profile: Profile) -> list[Answer]:
    """run_eval, propose_patch, apply_patch, validate: the answer, a retryable failure, or a fatal error."""
    name = cmd["command_type"].removeprefix(PREFIX)
    data, attempt = cmd["data"], cmd["attempt"]
    outcome = profile.outcome(cmd)
    failed: dict[str, Any] = {"command": name, "retryable": True, "attempt": attempt}
    if name == "run_eval":
        if outcome == "fatal":
            return [Answer(f"{PREFIX}fatal_error", {"error_code": "eval_crashed"})]
        if outcome == "retryable":
            return [Answer(f"{PREFIX}command_failed", {**failed, "error_code": "eval_timeout"})]
        score = round(0.5 + 0.4 * profile.roll("score", cmd["idempotency_key"]), 3)
        done = {"eval_hash": eval_hash(data["prompt_id"], data["eval_suite"]), "score": score, "attempt": attempt}
        return [Answer(f"{PREFIX}eval_completed", done)]
    if name == "propose_patch":
        if outcome == "fatal":
            return [Answer(f"{PREFIX}fatal_error", {"error_code": "no_patch_found"})]
        if outcome == "retryable":
            return [Answer(f"{PREFIX}command_failed", {**failed, "error_code": "proposer_busy"})]
        return [Answer(f"{PREFIX}patch_proposed", {"patch_id": f"patch-{cmd['entity_id']}-1"})]
    if name == "apply_patch":
        if outcome == "fatal":
            return [Answer(f"{PREFIX}fatal_error", {"error_code": "patch_conflict"})]
        if outcome == "retryable":
            failed.update(error_code="prompt_store_unavailable", patch_id=data["patch_id"])
            return [Answer(f"{PREFIX}command_failed", failed)]
        return [Answer(f"{PREFIX}patch_applied", {"patch_id": data["patch_id"], "attempt": attempt})]
    if name == "validate":
        n = data["round"]
        if outcome == "fatal":
            return [Answer(f"{PREFIX}fatal_error", {"error_code": "regression_detected"})]
        if outcome == "retryable":
            return [Answer(f"{PREFIX}command_failed", {**failed, "error_code": "validator_busy", "round": n})]
        if n < MAX_PATCHES_PROPOSED and profile.roll("more", cmd["idempotency_key"]) < 0.35:
            return [Answer(f"{PREFIX}patch_proposed", {"patch_id": f"patch-{cmd['entity_id']}-{n + 1}"})]
        score = round(0.6 + 0.35 * profile.roll("validated", cmd["idempotency_key"]), 3)
        return [Answer(f"{PREFIX}validated", {"round": n, "score": score, "attempt": attempt})]
    return []
