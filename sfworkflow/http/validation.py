"""Requests to the admin API checked against its own OpenAPI document (sfworkflow.http.openapi).

The document is the one source of the rules. `Checks.from_document` compiles them once, when the app is
built: per operation, a JSON Schema validator (jsonschema-rs, draft 2020-12 as OpenAPI 3.1 says) for each
path and query parameter, and one for each branch (`oneOf`) of its request body. A request that does not
pass is an `Invalid`, whose message names the field and says, in words, what it must be.

Query and path values are text: the value of an integer or a boolean parameter is converted first, and one
that cannot be converted stays text, so its schema refuses it by its type. A query parameter given twice is
refused (the document describes each once). A body with `oneOf` branches is checked against the branch its
distinguishing required field picks (`instance` or `all_stuck` for a replay), so an error names the field
at fault instead of "valid under none of the schemas"; when the body has the fields of several branches, the one
branch it is valid under (a limit override's `per_s` with a `daily_cap`). What a parameter or field leaves out gets the
schema's `default`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import jsonschema_rs
import orjson
from multidict import MultiMapping

from sfworkflow.http import openapi

DIALECT = "https://json-schema.org/draft/2020-12/schema"  # OpenAPI 3.1's default schema dialect
MAX_ERRORS = 3  # field errors said in one answer, at most
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_WHOLE_TYPES = {"string": "a string", "object": "a JSON object", "array": "a JSON array", "null": "null"}


class Invalid(Exception):
    """The request does not match the OpenAPI document; the message names the field and what it must be."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" or "path"
    schema: dict[str, Any]  # with its $ref resolved
    validator: Any
    required: bool = False


@dataclass(frozen=True)
class Branch:
    key: str | None  # the required field that picks this branch (None: the body has one branch)
    schema: dict[str, Any]
    validator: Any


@dataclass(frozen=True)
class Body:
    schema: dict[str, Any]
    branches: list[Branch]


@dataclass(frozen=True)
class Operation:
    params: list[Param] = field(default_factory=list)
    body: Body | None = None


@dataclass(frozen=True)
class Checks:
    """The compiled checks of every operation of the document, by operationId."""

    operations: dict[str, Operation]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Checks:
        ops: dict[str, Operation] = {}
        for path, item in doc["paths"].items():
            for method, op in item.items():
                at = f"#/paths/{_escape(path)}/{method}"
                params = [
                    _param(doc, p, f"{at}/parameters/{i}")
                    for i, p in enumerate(op.get("parameters", []))
                    if p["in"] in ("query", "path")
                ]
                body = None
                if "requestBody" in op:
                    body = _body(doc, f"{at}/requestBody/content/application~1json/schema")
                ops[op["operationId"]] = Operation(params, body)
        return cls(ops)

    def params(self, operation_id: str, query: MultiMapping[str], path: Mapping[str, str]) -> dict[str, Any]:
        """The operation's path and query parameters, converted, checked and with their defaults."""
        out: dict[str, Any] = {}
        errors: list[str] = []
        for p in self.operations[operation_id].params:
            given = [path[p.name]] if p.where == "path" and p.name in path else query.getall(p.name, [])
            if len(given) > 1:
                raise Invalid(f"{p.name} is given {len(given)} times: give it once")
            if not given:
                if p.required:
                    errors.append(f"{p.name} is required: {in_words(p.schema)}")
                elif "default" in p.schema:
                    out[p.name] = p.schema["default"]
                continue
            value = _convert(given[0], p.schema)
            if _first_error(p.validator, value) is not None:
                errors.append(f"{p.name}={_show(given[0])} is not valid: {in_words(p.schema)}")
            out[p.name] = value
        if errors:
            raise Invalid("; ".join(errors[:MAX_ERRORS]))
        return out

    def body(self, operation_id: str, raw: bytes) -> dict[str, Any]:
        """The operation's JSON request body, checked against its schema, with the defaults of its branch."""
        body_rules = self.operations[operation_id].body
        assert body_rules is not None, f"{operation_id} takes no request body"
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Invalid(f"the body is not JSON ({exc}): send a JSON object") from None
        schema = body_rules.schema
        if schema.get("type") == "object" and not isinstance(body, dict):
            raise Invalid(f"the body must be a JSON object: {schema.get('description', '')}".rstrip(": "))
        branch = _pick(body_rules, body)
        messages = _messages(branch, body)
        if messages:
            raise Invalid("; ".join(messages))
        defaults = {k: s["default"] for k, s in branch.schema.get("properties", {}).items() if "default" in s}
        return {**defaults, **body}


def in_words(schema: Mapping[str, Any]) -> str:
    """What a value of `schema` must be, in words (the rules of sfworkflow.http.openapi, said in `IN_WORDS`)."""
    if "const" in schema:
        return orjson.dumps(schema["const"]).decode()
    if "enum" in schema:
        return "one of " + ", ".join(orjson.dumps(v).decode() for v in schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return "true or false"
    if kind in ("integer", "number"):
        what = "an integer" if kind == "integer" else "a number"
        if "minimum" in schema and "maximum" in schema:
            return f"{what} from {schema['minimum']} to {schema['maximum']}"
        return what
    if kind == "string" and schema.get("pattern") in openapi.IN_WORDS:
        return str(openapi.IN_WORDS[schema["pattern"]]).format_map(schema)
    if kind == "string" and "maxLength" in schema:
        return f"a string of {schema.get('minLength', 0)} to {schema['maxLength']} characters"
    return _WHOLE_TYPES.get(str(kind), "a JSON value")


# ---- building -------------------------------------------------------------------------------------------------
def _escape(token: str) -> str:
    """A JSON pointer token (RFC 6901), as a URI fragment writes it (percent-encoded: `{` in a path)."""
    return quote(token.replace("~", "~0").replace("/", "~1"), safe="~")


def _resolve(doc: dict[str, Any], schema: dict[str, Any], at: str) -> tuple[dict[str, Any], str]:
    """The schema a `$ref` (local to the document) points to, and where it is; other schemas as they are."""
    while "$ref" in schema:
        at = schema["$ref"]
        assert at.startswith("#/"), f"only local references are followed, not {at}"
        node: Any = doc
        for token in at[2:].split("/"):
            node = node[unquote(token).replace("~1", "/").replace("~0", "~")]
        schema = node
    return schema, at


def _validator(doc: dict[str, Any], at: str) -> Any:
    """A validator of the schema at pointer `at`, resolving its references in the whole document."""
    return jsonschema_rs.validator_for({**doc, "$schema": DIALECT, "$ref": at}, validate_formats=True)


def _param(doc: dict[str, Any], param: dict[str, Any], at: str) -> Param:
    param, at = _resolve(doc, param, at)
    schema, schema_at = _resolve(doc, param["schema"], at + "/schema")
    return Param(param["name"], param["in"], schema, _validator(doc, schema_at), bool(param.get("required")))


def _body(doc: dict[str, Any], at: str) -> Body:
    schema, at = _resolve(doc, {"$ref": at}, at)
    if "oneOf" not in schema:
        return Body(schema, [Branch(None, schema, _validator(doc, at))])
    resolved = [_resolve(doc, s, f"{at}/oneOf/{i}") for i, s in enumerate(schema["oneOf"])]
    common = set.intersection(*(set(s.get("required", ())) for s, _ in resolved))
    branches = []
    for s, s_at in resolved:
        own = [k for k in s.get("required", ()) if k not in common]
        assert len(own) == 1, f"{s_at}: each oneOf branch needs one required field of its own, has {own}"
        branches.append(Branch(own[0], s, _validator(doc, s_at)))
    return Body(schema, branches)


# ---- checking -------------------------------------------------------------------------------------------------
def _show(value: str) -> str:
    return repr(value[:60] + ("..." if len(value) > 60 else ""))


def _convert(text: str, schema: Mapping[str, Any]) -> Any:
    """A query or path value as the schema's type, when it reads as one; else the text (refused by type)."""
    kind = schema.get("type")
    if kind == "integer" and _INTEGER.fullmatch(text):
        return int(text)
    if kind == "number" and _NUMBER.fullmatch(text):
        return float(text)
    if kind == "boolean" and text in ("true", "false"):
        return text == "true"
    return text


def _errors(validator: Any, instance: Any) -> list[Any]:
    try:
        return list(validator.iter_errors(instance))[:MAX_ERRORS]
    except ValueError:  # the validator's recursion limit
        raise Invalid("the body is nested too deeply: a replay request is a small JSON object") from None


def _first_error(validator: Any, instance: Any) -> Any | None:
    errors = _errors(validator, instance)
    return errors[0] if errors else None


def _pick(body_rules: Body, body: dict[str, Any]) -> Branch:
    branches = body_rules.branches
    if len(branches) == 1:
        return branches[0]
    given = [b for b in branches if b.key in body]
    if len(given) > 1:  # one branch's own field may be an optional one of another (a rate with a daily cap)
        fitting = [b for b in given if not _errors(b.validator, body)]
        if len(fitting) == 1:
            return fitting[0]
        # Valid under none: the branch that has every field given, so its errors name the value at fault.
        holding = [b for b in given if set(body) <= set(b.schema.get("properties", {}))]
        if len(holding) == 1:
            return holding[0]
    if len(given) != 1:
        keys = " and ".join(f'"{b.key}"' for b in branches)
        why = body_rules.schema.get("description", "")
        raise Invalid(f"give exactly one of {keys}" + (f": {why}" if why else ""))
    return given[0]


def _messages(branch: Branch, body: dict[str, Any]) -> list[str]:
    properties = branch.schema.get("properties", {})
    out = []
    for err in _errors(branch.validator, body):
        kind = type(err.kind).__name__
        if kind == "Required":
            name = str(err.kind.property)
            why = properties.get(name, {}).get("description")
            out.append(f'"{name}" is required' + (f": {why}" if why else ""))
        elif kind == "AdditionalProperties":
            unknown = ", ".join(sorted(str(k) for k in err.kind.unexpected))
            with_key = f" with {branch.key!r}" if branch.key else ""
            out.append(f"unknown field(s){with_key}: {unknown}; allowed: {', '.join(sorted(properties))}")
        elif err.instance_path:
            name = str(err.instance_path[0])
            out.append(f'"{name}" must be {in_words(properties.get(name, {}))}')
        else:
            out.append(f"the body must be {in_words(branch.schema)}")
    return list(dict.fromkeys(out))  # one message per field, in the order found
