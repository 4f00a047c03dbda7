"""Simulated SalesFlow side of `partner_approval`: requests with tiny SLAs, withdrawals, and approvers."""

from __future__ import annotations

import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "partner_approval"
SHARE = 0.05
STAGE_SETS = (("manager",), ("manager", "legal"), ("manager", "legal", "executive"))
SLA_HOURS = 0.0005  # 1.8 s: escalation after 1.8 s without a decision, expiry after 3.6 s
APPROVE, REJECT = 0.7, 0.1  # answers to request_review; the rest stay silent (the stage is escalated)
APPROVE_AFTER_ESCALATION = 0.5  # answers to escalate; the rest stay silent (the request expires)
WITHDRAW_RATE = 0.05


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"request-{i}"
    stages = list(rnd.choice(STAGE_SETS))
    data = {"partner_id": f"partner-{i % 13}", "stages": stages, "sla_hours": dict.fromkeys(stages, SLA_HOURS)}
    out = [Traffic("partner_approval.requested", entity, data)]
    if rnd.random() < WITHDRAW_RATE:
        out.append(Traffic("partner_approval.withdrawn", entity, {"requested_by": "partner-portal"}, delay_s=0.3))
    return out


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """request_review: approved or rejected after a short delay, or nothing; escalate: approved, or nothing."""
    stage = cmd["data"].get("stage")
    r = profile.roll("decision", cmd["idempotency_key"])
    approved = Answer("partner_approval.approved", {"stage": stage, "approver_id": f"{stage}-approver"}, delay_s=0.2)
    if cmd["command_type"] == "partner_approval.request_review":
        if r < APPROVE:
            return [approved]
        if r < APPROVE + REJECT:
            data = {"stage": stage, "approver_id": f"{stage}-approver", "reason": "Partner does not meet the criteria."}
            return [Answer("partner_approval.rejected", data, delay_s=0.2)]
        return []
    if cmd["command_type"] == "partner_approval.escalate" and r < APPROVE_AFTER_ESCALATION:
        return [Answer(approved.event_type, approved.data, delay_s=0.3)]
    return []
