"""Simulated SalesFlow side of `affiliate_payout`: payout batches, a ledger worker and a payment worker."""

from __future__ import annotations

import random

from sfworkflow.demo.profiles import Answer, Profile, Traffic

WORKFLOW = "affiliate_payout"
SHARE = 0.05
CURRENCIES = ("USD", "EUR", "BRL")
SHARED_COMMISSION_RATE = 0.08  # batches listing a commission of an earlier batch: rejected while that one is open


def start(i: int, rnd: random.Random) -> list[Traffic]:
    entity = f"batch-{i}"
    commissions = [f"com-{i}-{k}" for k in range(rnd.randint(1, 4))]
    if i > 0 and rnd.random() < SHARED_COMMISSION_RATE:
        commissions.append(f"com-{rnd.randrange(i)}-0")
    cents = rnd.randint(1_000, 500_000)
    data = {
        "affiliate_id": f"aff-{i % 9}",
        "commission_ids": commissions,
        "amount": f"{cents // 100}.{cents % 100:02d}",  # money is a decimal string, never a float
        "currency": rnd.choice(CURRENCIES),
    }
    return [Traffic("affiliate_payout.batch_opened", entity, data)]


def answer(cmd: dict, profile: Profile) -> list[Answer]:
    """post_ledger_entry: ledger_posted or failed; send_payout: payout_sent then settled (now and then the
    payout is returned instead: failed after payout_sent), or failed."""
    command = cmd["command_type"].partition(".")[2]
    if command not in ("post_ledger_entry", "send_payout"):
        return []
    attempt = cmd["attempt"]
    outcome = profile.outcome(cmd)
    if outcome == "fatal":
        code = "ledger_rejected" if command == "post_ledger_entry" else "account_closed"
        data = {"error_code": code, "retryable": False, "command": command, "attempt": attempt}
        return [Answer("affiliate_payout.failed", data)]
    if outcome == "retryable":
        code = "ledger_unavailable" if command == "post_ledger_entry" else "provider_timeout"
        data = {"error_code": code, "retryable": True, "command": command, "attempt": attempt}
        return [Answer("affiliate_payout.failed", data)]
    if command == "post_ledger_entry":
        return [Answer("affiliate_payout.ledger_posted", {"entry_id": f"le-{cmd['entity_id']}", "attempt": attempt})]
    reference = f"po-{cmd['command_id'][:8]}"
    sent = Answer("affiliate_payout.payout_sent", {"payment_reference": reference, "attempt": attempt})
    if profile.roll("returned", cmd["idempotency_key"]) < profile.fatal_rate:
        returned = {"error_code": "payout_returned", "retryable": False, "command": command, "attempt": attempt}
        return [sent, Answer("affiliate_payout.failed", returned, delay_s=0.3)]
    return [sent, Answer("affiliate_payout.settled", {"payment_reference": reference}, delay_s=0.3)]
