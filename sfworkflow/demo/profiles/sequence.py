"""Simulated SalesFlow side of `sequence`: enrollments, replies, and a sending worker."""

from __future__ import annotations

import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "sequence"
SHARE = 0.4
TEMPLATES = ("welcome", "case-study", "check-in", "last-call")


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"enrollment-{i}"
    steps = [
        {"template_id": TEMPLATES[s % len(TEMPLATES)], "delay_seconds": 0 if s == 0 else rnd.choice((0, 1))}
        for s in range(3)
    ]
    address = f"lead{i}@example.com"
    if i > 0 and rnd.random() < 0.03:  # shares a recipient with an earlier one: a send is suppressed
        address = f"lead{rnd.randrange(i)}@example.com"
    data = {
        "sequence_id": f"seq-{i % 7}",
        "lead_id": f"lead-{i}",
        "recipient": {"channel": rnd.choice(("email", "whatsapp", "sms")), "address": address},
        "steps": steps,
    }
    out = [Traffic("sequence.enrolled", entity, data)]
    if rnd.random() < 0.05:
        out.append(Traffic("sequence.replied", entity, {"channel": "email"}, delay_s=0.5))
    return out


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """send_step: sent, or failed (retryable, fatal, or consent_missing)."""
    if cmd["command_type"] != "sequence.send_step":
        return []
    base = {"step": cmd["data"]["step"], "attempt": cmd["attempt"]}
    r = profile.roll("consent", cmd["idempotency_key"])
    if r < profile.consent_rate and cmd["attempt"] == 1:
        return [Answer("sequence.step_failed", {**base, "error_code": "consent_missing", "retryable": False})]
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        return [Answer("sequence.step_failed", {**base, "error_code": "template_rejected", "retryable": False})]
    if outcome == "retryable":
        return [Answer("sequence.step_failed", {**base, "error_code": "provider_timeout", "retryable": True})]
    return [Answer("sequence.step_sent", {**base, "provider_message_id": f"pm-{cmd['command_id'][:8]}"})]
