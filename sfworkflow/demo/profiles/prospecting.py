"""Simulated SalesFlow side of `prospecting`: pipeline runs, approvals, cancels, and a step-running worker."""

from __future__ import annotations

import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "prospecting"
SHARE = 0.05
PIPELINES = (
    ("qualification", "whatsapp_outreach", "email_outreach", "crm_sync"),
    ("qualification", "email_outreach", "linkedin_connection", "crm_sync"),
    ("qualification", "crm_sync"),
    ("email_outreach", "crm_sync"),  # an outreach step first: the run waits for approval from the start
)
APPROVAL_RATE = 0.85  # runs with outreach steps that a person approves; the others wait in awaiting_approval
CANCEL_RATE = 0.05


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"run-{i}"
    lead = f"prospect-{i}"
    if i > 0 and rnd.random() < 0.1:  # a second run for an earlier lead: its crm_sync is suppressed
        lead = f"prospect-{rnd.randrange(i)}"
    steps = list(rnd.choice(PIPELINES))
    out = [Traffic("prospecting.started", entity, {"lead_id": lead, "steps": steps})]
    if any(s.endswith("_outreach") or s == "linkedin_connection" for s in steps) and rnd.random() < APPROVAL_RATE:
        token = f"apr-{i}-{rnd.randrange(10**6)}"
        out.append(
            Traffic(
                "prospecting.approval_granted",
                entity,
                {"approval_token": token, "granted_by": "sales-manager-1"},
                delay_s=round(rnd.uniform(0.5, 1.0), 3),
            )
        )
    if rnd.random() < CANCEL_RATE:
        out.append(Traffic("prospecting.cancel_requested", entity, {"requested_by": "sdr-4"}, delay_s=0.4))
    return out


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """run_step: completed, or failed (retryable or not) as the profile says."""
    if cmd["command_type"] != "prospecting.run_step":
        return []
    base = {"step": cmd["data"]["step"], "attempt": cmd["attempt"]}
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        return [Answer("prospecting.step_failed", {**base, "error_code": "lead_invalid", "retryable": False})]
    if outcome == "retryable":
        code = "crm_unavailable" if base["step"] == "crm_sync" else "provider_timeout"
        return [Answer("prospecting.step_failed", {**base, "error_code": code, "retryable": True})]
    return [Answer("prospecting.step_completed", base)]
