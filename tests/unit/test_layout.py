"""The package's layout rules, read from the source (ast): nothing is imported or run.

- SQL lives in sfworkflow/db/ (its .sql files, run by db/ functions): no string that looks like SQL and no call of
  the named-query lookup (`q(...)`, `db.q(...)`, `queries()`) anywhere else;
- core/ and contract/ do no I/O: they import none of asyncpg, aio_pika, aiormq, aiohttp, and nothing of
  sfworkflow.db, .runtime, .http, .ops, .cli, .demo;
- the demo is not in the image: nothing outside sfworkflow/demo/ imports it when the module is imported (a lazy
  import inside a function, which turns ImportError into a clear error, is fine);
- wire names are written once: `x-sfworkflow-*` header names in contract/headers.py, exchange and queue names in
  contract/topology.py; nowhere else as literals (SQL files may name a header: they are not Python).

Each rule is a function from (path, source) to the violations it finds; the negative cases at the end prove
each one fails on a small source text that breaks it.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sfworkflow"

# Upper-case SQL keywords, as the SQL the package runs writes them (prose says "select", not "SELECT").
SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE [a-z_.]+ SET|DELETE FROM|WITH [a-z_]+ AS)\b")
IO_LIBRARIES = {"asyncpg", "aio_pika", "aiormq", "aiohttp"}
IMPURE_PACKAGES = {f"sfworkflow.{p}" for p in ("db", "runtime", "http", "ops", "cli", "demo")}
HEADER = "x-sfworkflow-"
# A literal that is an exchange or queue name (`sfworkflow.dead`, `sfworkflow.commands.sequence`), or the part of
# an f-string that builds one (`f"sfworkflow.commands.{workflow}"`); prose that names one is not a literal of it.
EXCHANGE = r"sfworkflow\.(?:events|commands|compensations|lifecycle|dead)"
WIRE_NAME = re.compile(EXCHANGE + r"(?:\.[A-Za-z0-9_.#*-]*)?")
WIRE_NAME_PREFIX = re.compile(r"(?<![\w.])" + EXCHANGE + r"\.$")

# Modules that may break a rule for now, and why; an entry whose module keeps the rule is stale and fails.
# ops/replay.py and ops/versions.py were allowed SQL "until their writes go through the batch plan (issue 9)":
# they do now, so neither is allowed any more.
SQL_ALLOWED: dict[str, str] = {}
WIRE_NAMES_ALLOWED: dict[str, str] = {}
IO_IMPORTS_ALLOWED: dict[str, str] = {}


# ---- reading the source -------------------------------------------------------------------------------------
def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings: prose, never executed."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """Every string constant but docstrings, the literal parts of f-strings included."""
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def imported(path: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads, as absolute names (`from sfworkflow import db` loads sfworkflow.db)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module_name(path).split(".")
        if not path.endswith("__init__.py"):
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def top_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not those inside a function body."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            todo.append(child)


def _within(name: str, packages: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# ---- the rules: (path relative to the repository, source) -> violations -------------------------------------------
def sql_outside_db(path: str, source: str) -> list[str]:
    if path.startswith("sfworkflow/db/"):
        return []
    tree = ast.parse(source)
    out = [
        f"{path}:{s.lineno}: SQL in a string: {s.value.strip()[:60]!r}" for s in strings(tree) if SQL.search(s.value)
    ]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in ("q", "queries"):
                out.append(f"{path}:{node.lineno}: runs a named query itself ({name}(...)): call a db/ function")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sfworkflow.db"):
            for a in node.names:
                if a.name in ("q", "queries"):
                    out.append(f"{path}:{node.lineno}: imports {a.name} from {node.module}: call a db/ function")
    return out


def io_in_core_or_contract(path: str, source: str) -> list[str]:
    if not path.startswith(("sfworkflow/core/", "sfworkflow/contract/")):
        return []
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bad = [n for n in imported(path, node) if n.split(".")[0] in IO_LIBRARIES or _within(n, IMPURE_PACKAGES)]
            if bad:
                out.append(f"{path}:{node.lineno}: imports {bad[0]} (core/ and contract/ do no I/O)")
    return out


def demo_imported_at_module_level(path: str, source: str) -> list[str]:
    if path.startswith("sfworkflow/demo/"):
        return []
    return [
        f"{path}:{node.lineno}: imports {name} when imported (the demo is not in the image: import it lazily)"
        for node in top_level_imports(ast.parse(source))
        for name in imported(path, node)
        if _within(name, {"sfworkflow.demo"})
    ]


def wire_names_outside_contract(path: str, source: str) -> list[str]:
    if path.startswith("sfworkflow/contract/"):
        return []
    tree = ast.parse(source)
    out = []
    for s in strings(tree):
        if HEADER in s.value:
            out.append(f"{path}:{s.lineno}: header name {s.value!r}: import it from sfworkflow.contract.headers")
        elif WIRE_NAME.fullmatch(s.value):
            out.append(f"{path}:{s.lineno}: wire name {s.value!r}: use sfworkflow.contract.topology")
    for node in ast.walk(tree):  # f"sfworkflow.commands.{workflow}": a queue name built in place
        if isinstance(node, ast.JoinedStr):
            for part, after in itertools.pairwise(node.values):
                if isinstance(part, ast.Constant) and isinstance(after, ast.FormattedValue):
                    if WIRE_NAME_PREFIX.search(str(part.value)):
                        out.append(f"{path}:{node.lineno}: builds a queue name: use sfworkflow.contract.topology")
    return out


RULES: dict[str, tuple[Callable[[str, str], list[str]], dict[str, str]]] = {
    "sql": (sql_outside_db, SQL_ALLOWED),
    "io": (io_in_core_or_contract, IO_IMPORTS_ALLOWED),
    "demo": (demo_imported_at_module_level, {}),
    "wire": (wire_names_outside_contract, WIRE_NAMES_ALLOWED),
}


# ---- the package keeps them ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_package_keeps_the_rule(rule: str) -> None:
    check, allowed = RULES[rule]
    found = {rel(p): check(rel(p), p.read_text()) for p in modules()}
    broken = [v for path, violations in found.items() if path not in allowed for v in violations]
    assert not broken, "\n".join(broken)
    stale = [path for path in allowed if not found.get(path)]
    assert not stale, f"{rule}: these modules keep the rule now, remove them from its allow-list: {stale}"


def test_the_rules_read_every_module() -> None:
    paths = {rel(p) for p in modules()}
    assert {"sfworkflow/db/operations.py", "sfworkflow/core/engine.py", "sfworkflow/contract/headers.py"} <= paths
    assert len(paths) > 50


def test_every_header_name_is_defined_once_with_the_prefix() -> None:
    from sfworkflow.contract import headers

    names = {n: getattr(headers, n) for n in headers.__all__}
    assert all(v.startswith(headers.PREFIX) for v in names.values())
    values = [v for n, v in names.items() if n != "PREFIX"]
    assert len(values) == len(set(values)), "two constants name the same header"
    source = (PACKAGE / "contract" / "headers.py").read_text()
    for n in names:  # each has its one-line comment
        assert re.search(rf"^{n} = \"[^\"]+\"  # \S", source, re.M), f"{n} has no comment on its line"


# ---- each rule fails when broken ----------------------------------------------------------------------------
BROKEN = [
    ("sql", "sfworkflow/ops/x.py", 'ROWS = "SELECT id FROM sfworkflow.instance"\n'),
    ("sql", "sfworkflow/http/x.py", 'async def f(c):\n    await c.execute(f"DELETE FROM t WHERE {w}")\n'),
    ("sql", "sfworkflow/cli/x.py", 'X = """\nWITH ins AS (INSERT INTO t VALUES (1)) SELECT 1\n"""\n'),
    ("sql", "sfworkflow/ops/x.py", 'def f():\n    return "UPDATE sfworkflow.timer SET due_at = now()"\n'),
    ("sql", "sfworkflow/runtime/x.py", 'from sfworkflow import db\nasync def f(c):\n    await c.fetch(db.q("n"))\n'),
    ("sql", "sfworkflow/runtime/x.py", "from sfworkflow.db.pool import q as sql\n"),
    ("sql", "sfworkflow/demo/x.py", "def f():\n    return q('parked_count')\n"),
    ("io", "sfworkflow/core/x.py", "import asyncpg\n"),
    ("io", "sfworkflow/contract/x.py", "from aio_pika.abc import AbstractChannel\n"),
    ("io", "sfworkflow/core/x.py", "def f():\n    import aiohttp.web\n"),
    ("io", "sfworkflow/core/x.py", "import aiormq.exceptions\n"),
    ("io", "sfworkflow/core/x.py", "from sfworkflow import db\n"),
    ("io", "sfworkflow/contract/x.py", "from sfworkflow.runtime.metrics import Metrics\n"),
    ("io", "sfworkflow/core/x.py", "from ..ops import stuck\n"),
    ("io", "sfworkflow/core/x.py", "import sfworkflow.http.admin\n"),
    ("demo", "sfworkflow/cli/x.py", "from sfworkflow.demo import faults\n"),
    ("demo", "sfworkflow/runtime/x.py", "import sfworkflow.demo.worker\n"),
    ("demo", "sfworkflow/cli/x.py", "try:\n    from sfworkflow import demo\nexcept ImportError:\n    demo = None\n"),
    ("demo", "sfworkflow/cli/x.py", "class C:\n    from sfworkflow.demo.run import run_demo\n"),
    ("wire", "sfworkflow/runtime/x.py", 'H = {"x-sfworkflow-reason": "r"}\n'),
    ("wire", "sfworkflow/cli/x.py", 'print(f"no x-sfworkflow-detail header in {m}")\n'),
    ("wire", "sfworkflow/ops/x.py", 'QUEUE = "sfworkflow.dead"\n'),
    ("wire", "sfworkflow/core/x.py", 'async def f(ch):\n    await ch.publish("sfworkflow.events")\n'),
    ("wire", "sfworkflow/demo/x.py", 'def queue(w):\n    return f"sfworkflow.commands.{w}"\n'),
    ("wire", "sfworkflow/db/x.py", 'Q = "sfworkflow.compensations.sequence"\n'),
]  # fmt: skip

KEPT = [
    ("sql", "sfworkflow/db/operations.py", 'X = "SELECT 1"\n'),  # db/ is where SQL lives
    ("sql", "sfworkflow/ops/x.py", '"""Reads rows with SELECT ... FOR UPDATE (prose)."""\n'),
    ("sql", "sfworkflow/ops/x.py", 'print("select a state")\nfrom sfworkflow.db import operations\n'),
    ("io", "sfworkflow/runtime/x.py", "import asyncpg\nimport aio_pika\n"),
    ("io", "sfworkflow/core/x.py", "import orjson\nfrom sfworkflow.contract import headers\n"),
    ("io", "sfworkflow/core/x.py", "from sfworkflow.core.engine import Engine\nimport dbm\n"),
    ("demo", "sfworkflow/cli/x.py", "def f():\n    from sfworkflow.demo import run\n"),
    ("demo", "sfworkflow/demo/x.py", "from sfworkflow.demo import profiles\n"),
    ("demo", "sfworkflow/cli/x.py", "import sfworkflow.demonstration\n"),
    ("wire", "sfworkflow/contract/x.py", 'REASON = "x-sfworkflow-reason"\n'),
    ("wire", "sfworkflow/ops/x.py", '"""Reads x-sfworkflow-reason from sfworkflow.dead."""\n'),
    ("wire", "sfworkflow/ops/x.py", 'log = get_logger("sfworkflow.relay")\n'),
    ("wire", "sfworkflow/ops/x.py", 'HELP = "Messages dead-lettered to sfworkflow.dead."\n'),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "path", "source"), BROKEN)
def test_a_broken_rule_is_found(rule: str, path: str, source: str) -> None:
    check, _ = RULES[rule]
    assert check(path, source), f"{rule} found nothing wrong in {path}:\n{source}"


@pytest.mark.parametrize(("rule", "path", "source"), KEPT)
def test_a_kept_rule_finds_nothing(rule: str, path: str, source: str) -> None:
    check, _ = RULES[rule]
    assert check(path, source) == []
