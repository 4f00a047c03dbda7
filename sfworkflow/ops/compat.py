"""Definition-change safety for operators and CI (`sfworkflow check-definition`, `export-histories`, and
`migrate-instances --dry-run`): recorded histories replayed through a definition version (core/compat.py).

- `check_definition` reads the histories of a workflow's instances (in flight, or ended too; a sample, or all) and
  reports each whose replay through the candidate version diverges from its own version's, read-only;
- `export_histories` writes a corpus, one JSON line per instance: its recorded steps (ids, entity ids, addresses and
  free text redacted by default) and what its definition did at each (`expected`). A team commits it under
  tests/histories/; tests/unit/test_history_corpus.py replays it against the current definitions, so a change that
  would treat a recorded history differently fails CI with the diff;
- `divergences` is what `migrate-instances --dry-run` asks for the instances it would move.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from sfworkflow.core.compat import (
    Checked,
    History,
    Recorded,
    Replayed,
    align_answers,
    check,
    compare,
    from_rows,
    replay,
)
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.db import operations
from sfworkflow.errors import UsageError

CORPUS_TENANT = "00000000-0000-4000-8000-00000000c0de"  # every redacted history's tenant


@dataclass
class CheckReport:
    workflow: str
    version: int
    checked: list[Checked] = field(default_factory=list)

    @property
    def diverged(self) -> list[Checked]:
        return [c for c in self.checked if c.divergence is not None]

    def partial(self) -> list[tuple[str, int]]:
        """(why, how many instances) of the histories replayed only in part, by why."""
        return sorted(Counter(c.cut for c in self.checked if c.cut).items())

    def lines(self) -> list[str]:
        out = [c.divergence.text(c.key, c.against) for c in self.diverged if c.divergence is not None]
        out.append(
            f"{self.workflow} v{self.version}: {len(self.checked)} instance(s) replayed, "
            f"{sum(c.steps for c in self.checked)} step(s), {len(self.diverged)} diverging"
        )
        out.extend(f"  {n} replayed only up to {why}" for why, n in self.partial())
        return out


async def load(conn: asyncpg.Connection, instances: Sequence[asyncpg.Record]) -> list[History]:
    """The histories of these instance rows, in their order."""
    rows: dict[int, list[asyncpg.Record]] = defaultdict(list)
    try:
        found = await operations.histories_with_bodies(conn, [i["id"] for i in instances])
    except asyncpg.UndefinedColumnError:
        raise UsageError(
            "this database's history has no event bodies (it predates migration 0017): run `sfworkflow migrate` "
            "(or start this release), then replay what is recorded from then on"
        ) from None
    for r in found:
        rows[r["instance_id"]].append(r)
    return [
        from_rows(InstanceKey(str(i["tenant_id"]), i["workflow"], i["entity_id"]), i["definition_version"],
                  rows[i["id"]])
        for i in instances
    ]  # fmt: skip


def latest(engine: Engine, workflow: str, version: int | None) -> int:
    """The version to check against: `version` when this release has it, else the latest; UsageError otherwise."""
    loaded = sorted(v for w, v in engine.compiled if w == workflow)
    if not loaded:
        raise UsageError(f"no workflow {workflow!r}; these are loaded: {', '.join(sorted(engine.latest))}")
    if version is None:
        return loaded[-1]
    if version not in loaded:
        raise UsageError(f"{workflow} has no version {version} in this release; loaded: {loaded}")
    return version


async def check_definition(
    conn: asyncpg.Connection, engine: Engine, workflow: str, version: int | None = None, *,
    sample: int | None = 100, ended_too: bool = False, since: datetime | None = None,
) -> CheckReport:  # fmt: skip
    """Replay the recorded histories of `workflow`'s instances (in flight; `ended_too`: ended as well) through
    `version` (default: the latest loaded), `sample` of them at random (None: all). Read-only."""
    v = latest(engine, workflow, version)
    if sample is not None and sample < 1:
        raise UsageError(f"--sample {sample}: give a positive number, or --all")
    instances = await operations.compat_instances(conn, workflow, ended_too, since, sample, sample is not None)
    report = CheckReport(workflow, v)
    for chunk in _chunks(instances):  # a few hundred histories in memory at a time, whatever --all reads
        for h in await load(conn, chunk):
            report.checked.append(check(engine, h, v))
            await asyncio.sleep(0)  # run from the admin API, a long check lets the service's batches in between
    return report


CHUNK = 200  # instances whose histories are read at once


def _chunks(rows: Sequence[asyncpg.Record]) -> list[Sequence[asyncpg.Record]]:
    return [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]


async def divergences(conn: asyncpg.Connection, engine: Engine, ids: Sequence[int], version: int) -> dict[int, str]:
    """Of these instances, those whose history replays differently on `version`: instance id -> the diff."""
    rows = await operations.instances_by_ids(conn, list(ids))
    out: dict[int, str] = {}
    for chunk in _chunks(rows):
        for r, h in zip(chunk, await load(conn, chunk), strict=True):
            c = check(engine, h, version)
            if c.divergence is not None:
                out[r["id"]] = c.divergence.text(c.key, c.against)
    return out


# ---- the corpus -------------------------------------------------------------------------------------------------
SENSITIVE = re.compile(r"(recipient|email|phone|address|name|text|body|subject|message|note|url|reason|comment)", re.I)
LOOKS_PERSONAL = re.compile(r"@|^\+\d[\d\s()-]{6,}$|^https?://", re.I)  # an address, a phone number, a URL


@dataclass(frozen=True)
class Redactor:
    """Pseudonyms keyed by a secret (HMAC-SHA256): the same input, the same pseudonym within one key, so equality
    still holds in a history, while a dictionary of phone numbers or addresses cannot undo them without the key.
    The key is random per export unless given (--key): give the same one to keep pseudonyms across exports."""

    key: bytes

    def pseudonym(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]

    def uuid(self, value: str) -> str:
        return str(uuid.UUID(hmac.new(self.key, f"id:{value}".encode(), hashlib.sha256).hexdigest()[:32], version=4))

    def value(self, value: Any, key: str = "") -> Any:
        """Strings under a key that names personal or free text, or that look like an address, a phone number or
        a URL, become pseudonyms; the rest is kept."""
        if isinstance(value, dict):
            return {k: self.value(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, key) for v in value]
        if isinstance(value, str) and (SENSITIVE.search(key) or LOOKS_PERSONAL.search(value)):
            return f"redacted-{self.pseudonym('text', value)}"
        return value

    def entity(self, tenant: str, workflow: str, entity_id: str) -> str:
        return f"entity-{self.pseudonym('entity', f'{tenant}/{workflow}/{entity_id}')}"


def redact(h: History, r: Redactor) -> History:
    """A history with its tenant, entity, ids, and its events' addresses and free text replaced by pseudonyms.
    Internal events (sfworkflow's own answers) keep their keys, which the definition compares with what it asked
    (corpus_line re-aims them at the redacted replay's questions), but not another instance's entity id nor text."""
    key = InstanceKey(CORPUS_TENANT, h.key.workflow, r.entity(h.key.tenant_id, h.key.workflow, h.key.entity_id))

    def ids(x: str | None) -> str | None:
        return None if x is None else r.uuid(x)

    def internal(data: dict[str, Any]) -> dict[str, Any]:
        out = {k: (v if k in ("key", "name", "effect_key", "command_type", "command_id") else r.value(v, k))
               for k, v in data.items()}  # fmt: skip
        if isinstance(data.get("holder_entity_id"), str):
            out["holder_entity_id"] = r.entity(h.key.tenant_id, str(data.get("holder_workflow")),
                                               data["holder_entity_id"])  # fmt: skip
        return out

    steps = [
        replace(s, event_id=ids(s.event_id) or "", data=internal(s.data) if s.internal else r.value(s.data),
                correlation_id=ids(s.correlation_id), causation_id=ids(s.causation_id))
        for s in h.steps
    ]  # fmt: skip
    return replace(h, key=key, steps=steps)


def corpus_line(engine: Engine, h: History) -> dict[str, Any] | None:
    """One corpus line: the history and what its definition does at each step; None when its own version does not
    reproduce the recorded states (then it is no reference)."""
    compiled = engine.compiled.get((h.key.workflow, h.definition_version))
    if compiled is None or not h.steps:
        return None
    h = align_answers(compiled, engine, h)
    expected = replay(compiled, engine, h)
    if [(e.outcome, e.state) for e in expected] != [("applied", r.to_state) for r in h.steps]:
        return None
    return {
        "workflow": h.key.workflow, "definition_version": h.definition_version, "tenant_id": h.key.tenant_id,
        "entity_id": h.key.entity_id, "cut": h.cut, "steps": [r.as_json() for r in h.steps],
        "expected": [e.as_json() for e in expected],
    }  # fmt: skip


def corpus_history(line: dict[str, Any]) -> History:
    key = InstanceKey(line["tenant_id"], line["workflow"], line["entity_id"])
    return History(key, line["definition_version"], [Recorded.from_json(s) for s in line["steps"]], line.get("cut"))


def check_corpus_line(engine: Engine, line: dict[str, Any]) -> str | None:
    """Replay one corpus line against the current definition of its version: None when it does what it did when
    captured, else the readable diff."""
    h = corpus_history(line)
    compiled = engine.compiled.get((h.key.workflow, h.definition_version))
    if compiled is None:
        return f"{h.key}: this release has no {h.key.workflow} v{h.definition_version} (a version was removed)"
    expected = [Replayed.from_json(e) for e in line["expected"]]
    d = compare(expected, replay(compiled, engine, h), h)
    return None if d is None else d.text(h.key, f"{h.key.workflow} v{h.definition_version} now")


@dataclass
class Corpus:
    """Corpus lines per workflow (keyed by their shape: one line per distinct history), and how many instances were
    written or skipped (their own version did not reproduce their recorded states) per workflow."""

    lines: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))


async def collect_corpus(
    conn: asyncpg.Connection, engine: Engine, *, workflows: list[str] | None = None, per_state: int = 5,
    redacted: bool = True, key: str | None = None,
) -> Corpus:  # fmt: skip
    """Per workflow and state, the newest `per_state` instances' histories, as corpus lines."""
    if per_state < 1:
        raise UsageError(f"--per-state {per_state}: give a positive number")
    for w in workflows or ():
        latest(engine, w, None)
    corpus = Corpus()
    redactor = Redactor(key.encode() if key else secrets.token_bytes(32))
    for h in await load(conn, await operations.corpus_instances(conn, per_state, workflows)):
        line = corpus_line(engine, redact(h, redactor) if redacted else h)
        if line is None:
            corpus.counts[h.key.workflow]["skipped"] += 1
            continue
        corpus.lines[h.key.workflow][_shape(line)] = orjson.dumps(line, option=orjson.OPT_SORT_KEYS).decode()
        corpus.counts[h.key.workflow]["written"] += 1
    return corpus


def write_corpus(corpus: Corpus, out: Path, *, replace_files: bool = False) -> list[Path]:
    """<out>/<workflow>.jsonl, merged with what each file holds (a line per distinct history, sorted), or replacing
    it (`replace_files`: after a deliberate change, the old lines' `expected` is the old behaviour)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for workflow, lines in corpus.lines.items():
        path = out / f"{workflow}.jsonl"
        if path.exists() and not replace_files:
            for old in path.read_text().splitlines():
                if old.strip():
                    lines.setdefault(_shape(orjson.loads(old)), old)
        path.write_text("".join(f"{t}\n" for _s, t in sorted(lines.items())))
        written.append(path)
    return written


def _shape(line: dict[str, Any]) -> str:
    """What makes two corpus lines the same history for a corpus: the steps' types and states, and the data."""
    steps = [(s["event_type"], s["to_state"], s["data"]) for s in line["steps"]]
    return hashlib.sha256(orjson.dumps([line["workflow"], line["definition_version"], steps],
                                       option=orjson.OPT_SORT_KEYS)).hexdigest()  # fmt: skip
