"""The named SQL blocks (sfworkflow/db/sql/*.sql, read by db.pool.read_queries): unique names across the files,
each described, and every name the db/ modules run exists. Pure: reads files, runs no SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sfworkflow.db.pool import SQL_DIR, queries, read_queries

DB = Path(__file__).resolve().parents[2] / "sfworkflow" / "db"


def test_every_file_is_read_and_no_name_is_defined_twice() -> None:
    names = queries()
    texts = [p.read_text() for p in sorted(SQL_DIR.glob("*.sql"))]
    assert len(texts) >= 2  # queries.sql and operations.sql
    headers = [m for t in texts for m in re.findall(r"^-- ([a-z_]+) --$", t, re.M)]
    assert sorted(headers) == sorted(names)


def test_every_block_says_what_it_does() -> None:
    for name, body in queries().items():
        first = body.splitlines()[0]
        assert first.startswith("-- ") and len(first) > 10, f"{name} has no line saying what it does"


def test_every_name_a_db_module_runs_exists() -> None:
    names = queries()
    used = set()
    for path in sorted(DB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "q" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    assert arg.value in names, f"{path.name}:{node.lineno}: no query named {arg.value!r}"
                    used.add(arg.value)
    assert {"stuck_candidates", "list_parked", "claim_outbox", "ping"} <= used


def test_a_name_defined_in_two_files_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- one --\n-- The first.\nSELECT 1\n")
    (tmp_path / "b.sql").write_text("-- two --\n-- The second.\nSELECT 2\n\n-- one --\n-- Again.\nSELECT 3\n")
    with pytest.raises(RuntimeError, match=r"'one' is defined twice, in a.sql and in b.sql"):
        read_queries(tmp_path)


def test_a_file_without_blocks_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- one --\n-- The first.\nSELECT 1\n")
    (tmp_path / "stray.sql").write_text("SELECT 2\n")
    with pytest.raises(RuntimeError, match=r"no `-- name --` query blocks in .*stray\.sql"):
        read_queries(tmp_path)


def test_blocks_of_several_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- Header.\n\n-- one --\n-- The first.\nSELECT 1\n")
    (tmp_path / "b.sql").write_text("-- two --\n-- The second.\nSELECT 2\n")
    assert read_queries(tmp_path) == {"one": "-- The first.\nSELECT 1", "two": "-- The second.\nSELECT 2"}
