"""JSON Schemas of the message contract, loaded once from `schemas/` and compiled (jsonschema-rs).

Layout: envelope/<name>.v<N>.json, events/<event_type>.v<N>.json, commands/<command_type>.v<N>.json,
lifecycle/<event_type>.v<N>.json. An event is valid when its envelope validates against
envelope/event.v1.json and its data against events/<event_type>.v<schema_version>.json.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from sfworkflow.errors import ConfigurationError

_FILE = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.json$")


def schema_dir() -> Path:
    """Where the schemas are: SFWORKFLOW_SCHEMA_DIR, inside the installed package, or the repository."""
    env = os.environ.get("SFWORKFLOW_SCHEMA_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "_schemas", here.parent.parent / "schemas"]
    for c in candidates:
        if (c / "envelope" / "event.v1.json").is_file():
            return c
    raise ConfigurationError(
        f"JSON Schemas not found (looked in {', '.join(map(str, candidates))}); set SFWORKFLOW_SCHEMA_DIR"
    )


@dataclass
class SchemaSet:
    """Compiled validators by kind ("envelope", "events", "commands", "lifecycle"), name and version."""

    root: Path
    raw: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    validators: dict[tuple[str, str, int], Any] = field(default_factory=dict)

    def validator(self, kind: str, name: str, version: int = 1) -> Any | None:
        return self.validators.get((kind, name, version))

    def names(self, kind: str) -> set[str]:
        return {n for (k, n, _v) in self.raw if k == kind}

    def versions(self, kind: str, name: str) -> list[int]:
        return sorted(v for (k, n, v) in self.raw if k == kind and n == name)

    def errors(self, kind: str, name: str, instance: Any, version: int = 1, limit: int = 3) -> list[str]:
        """Readable messages for why `instance` fails its schema (empty when valid)."""
        v = self.validator(kind, name, version)
        if v is None:
            return [f"no schema {kind}/{name}.v{version}.json"]
        out = []
        try:
            for err in v.iter_errors(instance):
                path = "/".join(str(p) for p in err.instance_path)[:100]
                message = err.message if len(err.message) <= 150 else err.message[:147] + "..."
                out.append(f"{path or '<root>'}: {message}")  # bounded: a detail never echoes a payload
                if len(out) >= limit:
                    break
        except ValueError:  # the validator's recursion limit
            out.append("<root>: nested too deeply to describe")
        return out


def load(root: Path | None = None) -> SchemaSet:
    root = root or schema_dir()
    out = SchemaSet(root=root)
    for kind in ("envelope", "events", "commands", "lifecycle"):
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            m = _FILE.match(path.name)
            if not m:
                raise ConfigurationError(f"{path}: schema files are named <name>.v<N>.json")
            schema = orjson.loads(path.read_bytes())
            key = (kind, m["name"], int(m["version"]))
            out.raw[key] = schema
            out.validators[key] = jsonschema_rs.validator_for(schema, validate_formats=True)
    return out


@lru_cache(maxsize=1)
def default() -> SchemaSet:
    """The schema set of this installation, loaded once per process."""
    return load()
