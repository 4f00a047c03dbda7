"""Operator commands of the `sfworkflow` CLI, one module of this package each (stuck, replay, dead-letters, …).

Each module named in MODULES defines `register(subparsers) -> dict[str, handler]`: it adds its sub-command(s) to the
parser and returns the async handler of each, `async def handler(settings, args) -> int` (the exit
code).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[Any, argparse.Namespace], Awaitable[int]]

MODULES = ("compat", "dead_letters", "limits", "outbox", "parked", "replay", "schedules", "stuck", "versions", "worker")


def register_all(sub: Any) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}
    for name in MODULES:
        module = importlib.import_module(f"sfworkflow.cli.{name}")
        handlers.update(module.register(sub))
    return handlers
