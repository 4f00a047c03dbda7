"""The simulated SalesFlow side of each workflow, for the demo, the benchmark and end-to-end tests.

One module per workflow (same name as in sfworkflow/workflows/), each with:

    WORKFLOW: str                 the workflow's name
    SHARE: float                  its weight in the demo's mix of instances
    def start(i, rnd) -> list[Traffic]
        the events SalesFlow publishes for demo instance i (the start event, and maybe later ones
        such as a reply, with a delay)
    def answer(cmd, profile) -> list[Answer]
        what a SalesFlow worker answers to a command of this workflow (maybe nothing)

Answers are deterministic for a command's idempotency key and attempt (`profile.roll`), so a run
can be repeated.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Traffic:
    """An event SalesFlow publishes: type, entity, data, and seconds to wait after the start event."""

    event_type: str
    entity_id: str
    data: dict[str, Any]
    delay_s: float = 0.0


@dataclass(frozen=True)
class Answer:
    """An event a worker publishes in answer to a command."""

    event_type: str
    data: dict[str, Any]
    delay_s: float = 0.0


@dataclass
class Profile:
    """How the simulated SalesFlow side behaves."""

    failure_rate: float = 0.0  # retryable failures
    fatal_rate: float = 0.0  # non-retryable failures (lead to compensation)
    consent_rate: float = 0.0  # sequence: consent_missing
    duplicate_rate: float = 0.0  # answers published twice
    reply_rate: float = 0.0  # leads that reply, requests withdrawn, runs cancelled: the "other" exits
    delay_s: float = 0.0  # seconds before answering
    silent: bool = False  # never answer (a worker that hangs)
    seed: int = 7

    def roll(self, *parts: Any) -> float:
        """A deterministic number in [0, 1) for these parts."""
        digest = hashlib.blake2b("/".join(map(str, (self.seed, *parts))).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def outcome(self, cmd: dict[str, Any]) -> str:
        """'fatal', 'retryable' or 'ok' for this command and attempt."""
        r = self.roll(cmd["idempotency_key"], cmd["attempt"])
        if r < self.fatal_rate:
            return "fatal"
        if r < self.fatal_rate + self.failure_rate:
            return "retryable"
        return "ok"


StartFn = Callable[[int, Any], list[Traffic]]
AnswerFn = Callable[[dict[str, Any], Profile], list[Answer]]


def modules() -> dict[str, ModuleType]:
    """Workflow name -> its simulation module."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        out[module.WORKFLOW] = module
    return out
