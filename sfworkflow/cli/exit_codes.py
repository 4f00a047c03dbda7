"""The exit codes of `sfworkflow`, every command alike: the one place they are defined.

`sfworkflow --help` prints `EPILOG` (built from `MEANINGS`); the README's "Commands" section has the same table,
and tests/integration/test_cli_conventions.py checks that both list every code. Whatever the code, what went wrong
is said on stderr in one line (what happened and what to do), never as a traceback; stdout carries only results.
"""

from __future__ import annotations

import textwrap
from enum import IntEnum

from sfworkflow.runtime.supervisor import EXIT_TASK_DIED


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    NOTHING_TO_DO = 3
    SOFTWARE = EXIT_TASK_DIED  # 70, EX_SOFTWARE of sysexits.h
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done (with --dry-run: would be done)",
    ExitCode.FAILED: "the operation failed, in part or whole (the lines above say which items), a thing named "
    "does not exist, or PostgreSQL or RabbitMQ cannot be reached, logged in to, has no such database or no "
    "sfworkflow tables, or refuses the operation (a permission, a timeout)",
    ExitCode.USAGE: "a usage error: arguments, an age or SFWORKFLOW_* settings the command cannot use; "
    "nothing was done",
    ExitCode.NOTHING_TO_DO: "replay only: nothing to do (no stuck instance matches; the named one does not exist, "
    "is not stuck yet, or has nothing a replay could do)",
    ExitCode.SOFTWARE: "run: a background task died (restart the process); any command: an unexpected error, a bug "
    "(SFWORKFLOW_LOG_LEVEL=debug logs its traceback)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def _table(width: int = 100) -> str:
    return "\n".join(
        textwrap.fill(text, width, initial_indent=f"  {int(code):<5}", subsequent_indent=" " * 7)
        for code, text in MEANINGS.items()
    )


EPILOG = "exit codes:\n" + _table()
