"""Every reason code a dead letter can carry is in the README's tables (the service's and the worker SDK's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfworkflow.client.worker import WorkerDeadReason
from sfworkflow.errors import DeadReason

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("reason", [*DeadReason, *WorkerDeadReason], ids=str)
def test_every_reason_code_has_a_row_in_the_readme(reason: str) -> None:
    assert f"| `{reason}` |" in README
