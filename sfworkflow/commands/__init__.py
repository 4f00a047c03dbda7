"""Operator commands of the `sfworkflow` CLI, one module each (stuck, replay, dead-letters, …).

Each module defines `register(subparsers) -> dict[str, handler]`: it adds its sub-command(s) to the
parser and returns the async handler of each, `async def handler(settings, args) -> int` (the exit
code). Modules whose name starts with "_" are not loaded.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[Any, argparse.Namespace], Awaitable[int]]


def register_all(sub: Any) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        handlers.update(module.register(sub))
    return handlers
