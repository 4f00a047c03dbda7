"""Simulated SalesFlow side of `agent`: task submissions, operator replays, and an agent worker.

The worker answers run_task with `started`, one or two `checkpointed`, then `succeeded` or `failed`
(retryable or not, as the profile says), echoing `attempt` and `run`. A few first attempts hang after
`started` (the run's durable timeout fires and the task is retried). A few tasks are "poison" on their
submitted run (a non-retryable failure: dead-lettered) and their submitter asks for a replay a little
later, which then runs from the last checkpoint. A few tasks are submitted twice: they run once.
"""

from __future__ import annotations

import random
import re

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "agent"
SHARE = 0.05
AGENT_TYPES = ("lead_researcher", "email_writer", "call_summarizer")
HANG_RATE = 0.04  # first attempts that never finish (the timeout retries them)
POISON_RATE = 0.06  # tasks whose submitted run fails for good; a replay is asked for
RESUBMIT_RATE = 0.05  # tasks submitted a second time (another event id): ignored
_STEP = re.compile(r"-s(\d+)$")


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"task-{i}"
    poison = rnd.random() < POISON_RATE
    task_input: dict[str, object] = {"lead_id": f"lead-{i}", "question": "Summarise the lead's last interactions."}
    if poison:
        task_input["poison"] = True
    data = {"agent_type": AGENT_TYPES[i % len(AGENT_TYPES)], "input": task_input, "timeout_seconds": rnd.choice((2, 3))}
    out = [Traffic("agent.task_submitted", entity, data)]
    if rnd.random() < RESUBMIT_RATE:
        out.append(Traffic("agent.task_submitted", entity, data, delay_s=0.3))
    if poison:
        replay = {"requested_by": "ops-demo", "reason": "tool fixed; replay from the last checkpoint"}
        out.append(Traffic("agent.replay_requested", entity, replay, delay_s=round(rnd.uniform(2.0, 3.0), 3)))
    return out


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """run_task: started, checkpoints, then succeeded or failed; sometimes nothing after started."""
    if cmd["command_type"] != "agent.run_task":
        return []
    data = cmd["data"]
    run, attempt = data["run"], cmd["attempt"]
    base = {"attempt": attempt, "run": run}
    out = [Answer("agent.started", base, delay_s=0.02)]
    key = cmd["idempotency_key"]
    if attempt == 1 and run == 0 and profile.roll("hang", key) < HANG_RATE:
        return out  # the worker hangs: the run's timeout fires
    m = _STEP.search(data["from_checkpoint_id"] or "")
    first = int(m[1]) + 1 if m else 1
    for n in range(1 + int(profile.roll("checkpoints", key, attempt) < 0.5)):
        step = first + n
        ckpt = {"checkpoint_id": f"ckpt-{cmd['entity_id']}-r{run}a{attempt}-s{step}", "step": step, **base}
        out.append(Answer("agent.checkpointed", ckpt, delay_s=0.05 + 0.03 * n))
    if run == 0 and isinstance(data["input"], dict) and data["input"].get("poison"):
        return [*out, Answer("agent.failed", {**base, "error_code": "tool_crashed", "retryable": False}, 0.15)]
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        return [*out, Answer("agent.failed", {**base, "error_code": "invalid_input", "retryable": False}, 0.15)]
    if outcome == "retryable":
        return [*out, Answer("agent.failed", {**base, "error_code": "model_overloaded", "retryable": True}, 0.15)]
    result = {"summary": f"{data['agent_type']} finished {cmd['entity_id']}", "steps": first + 1}
    return [*out, Answer("agent.succeeded", {**base, "output": result}, delay_s=0.15)]
