"""Simulated SalesFlow side of `follow_up`: scheduled follow-ups, replies, and a sending worker."""

from __future__ import annotations

import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "follow_up"
SHARE = 0.05
TEMPLATES = ("follow-up-24h", "follow-up-72h", "follow-up-7d")
REPLY_RATE = 0.1


def start(i: int, rnd: random.Random) -> list[Traffic]:
    """A lead's follow-ups. In production the delays are 24 h, 72 h and 7 d (real timers); the demo
    uses 0-2 s so every instance settles in seconds."""
    entity = f"lead-{i}"
    steps = [
        {"template": TEMPLATES[s], "delay_seconds": 0 if s == 0 else rnd.randint(0, 2)}
        for s in range(rnd.randint(1, len(TEMPLATES)))
    ]
    out = [Traffic("follow_up.scheduled", entity, {"owner_id": f"owner-{i % 4}", "steps": steps})]
    if rnd.random() < REPLY_RATE:
        out.append(
            Traffic("follow_up.reply_received", entity, {"channel": "email"}, delay_s=round(rnd.uniform(0.2, 1.5), 3))
        )
    return out


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """send: sent, or failed (retryable or not) as the profile says; the worker echoes step, attempt, reset."""
    if cmd["command_type"] != "follow_up.send":
        return []
    base = {"step": cmd["data"]["step"], "attempt": cmd["attempt"], "reset": cmd["data"]["reset"]}
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        return [Answer("follow_up.failed", {**base, "error_code": "template_rejected", "retryable": False})]
    if outcome == "retryable":
        return [Answer("follow_up.failed", {**base, "error_code": "provider_timeout", "retryable": True})]
    return [Answer("follow_up.sent", {**base, "provider_message_id": f"msg-{cmd['command_id'][:8]}"})]
