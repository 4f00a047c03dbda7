"""Simulated SalesFlow side of `notification`: notification requests and a provider-backed sending worker.

The simulated provider derives the external id from the message's content (channel, recipient,
template, body), as providers that dedupe identical messages do: a few requests repeat an earlier
notification's content, so their provider_accepted carries an external id another notification holds,
and they end `duplicate_suppressed`. The worker answers send with `provider_accepted` then `delivered`
(sometimes in the other order, which parks `delivered`), or `failed` (retryable or not, as the profile
says), echoing `attempt`.
"""

from __future__ import annotations

import hashlib
import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "notification"
SHARE = 0.3
CHANNELS = ("email", "sms", "whatsapp", "push")
TEMPLATES = ("tpl-demo-reminder", "tpl-welcome", "tpl-invoice-ready")
REPEAT_RATE = 0.05  # requests with an earlier notification's content: the same provider message
SWAP_RATE = 0.1  # delivered reported before provider_accepted


def _content(j: int) -> dict[str, str]:
    channel = CHANNELS[j % len(CHANNELS)]
    recipient = {
        "email": f"lead{j}@example.com",
        "sms": f"+5511{900000000 + j}",
        "whatsapp": f"+5521{900000000 + j}",
        "push": f"device-token-{j}",
    }[channel]
    return {
        "channel": channel,
        "recipient": recipient,
        "template": TEMPLATES[j % len(TEMPLATES)],
        "body": f"Hi lead {j}, a quick note from SalesFlow.",
    }


def start(i: int, rnd: random.Random) -> list[Traffic]:
    j = rnd.randrange(i) if i > 0 and rnd.random() < REPEAT_RATE else i
    return [Traffic("notification.requested", f"notification-{i}", _content(j))]


def external_id(tenant_id: str, data: dict) -> str:
    text = "|".join((tenant_id, data["channel"], data["recipient"], data["template"], data["body"]))
    return "ext-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """send: provider_accepted and delivered, or failed (retryable or not)."""
    if cmd["command_type"] != "notification.send":
        return []
    base = {"attempt": cmd["attempt"]}
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        return [Answer("notification.failed", {**base, "error_code": "invalid_recipient", "retryable": False})]
    if outcome == "retryable":
        return [Answer("notification.failed", {**base, "error_code": "provider_unavailable", "retryable": True})]
    ext = external_id(cmd["tenant_id"], cmd["data"])
    swap = profile.roll("swap", cmd["idempotency_key"], cmd["attempt"]) < SWAP_RATE
    return [
        Answer("notification.provider_accepted", {**base, "external_id": ext}, delay_s=0.15 if swap else 0.0),
        Answer("notification.delivered", {**base, "external_id": ext}, delay_s=0.0 if swap else 0.15),
    ]
