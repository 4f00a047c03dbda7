"""A service process for the tests: `python -m tests.integration.replica RELEASE` runs sfworkflow with
release 1 (the shipped definitions: sequence v1) or release 2 (also sequence v2, tests/unit/test_versions.py)
until SIGTERM, with its settings from the SFWORKFLOW_* environment, as `sfworkflow run` does."""

from __future__ import annotations

import asyncio
import sys

from sfworkflow.runtime import logs
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS


def main(release: str) -> int:
    definitions = DEFINITIONS
    if release == "2":
        from tests.unit.test_versions import V2

        definitions = (*DEFINITIONS, V2)
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    return asyncio.run(Service(settings, definitions=definitions).run_until_signal())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
