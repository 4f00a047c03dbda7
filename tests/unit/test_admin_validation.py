"""The admin API's request checks (sfworkflow.http.validation), compiled from its OpenAPI document."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from multidict import MultiDict

from sfworkflow.http import openapi
from sfworkflow.http.validation import Checks, Invalid

TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
CHECKS = Checks.from_document(openapi.document())


def _param_schema(doc: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    [param] = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == name]
    return param["schema"]  # type: ignore[no-any-return]


def test_the_checks_are_the_documents_rules() -> None:
    doc = openapi.document()
    _param_schema(doc, "/v1/instances", "limit")["maximum"] = 7
    checks = Checks.from_document(doc)
    assert checks.params("listInstances", MultiDict(limit="7"), {})["limit"] == 7
    with pytest.raises(Invalid, match=r"^limit='8' is not valid: an integer from 1 to 7$"):
        checks.params("listInstances", MultiDict(limit="8"), {})
    assert CHECKS.params("listInstances", MultiDict(limit="8"), {})["limit"] == 8


def test_parameters_are_converted_and_get_the_documents_defaults() -> None:
    got = CHECKS.params("listInstances", MultiDict(terminal="false", after="12", tenant=TENANT.upper()), {})
    assert got == {"terminal": False, "after": 12, "tenant": TENANT.upper(), "limit": openapi.DEFAULT_LIMIT}
    assert CHECKS.params("listStuck", MultiDict(), {}) == {"older_than": "0s", "limit": openapi.DEFAULT_LIMIT}
    path = {"tenant": TENANT, "workflow": "sequence", "entity": "e-1"}
    assert CHECKS.params("getInstance", MultiDict(), path) == path


def test_every_bad_parameter_is_named_with_what_it_must_be() -> None:
    with pytest.raises(Invalid) as err:
        CHECKS.params("getInstance", MultiDict(), {"tenant": "x", "workflow": "a b", "entity": "e"})
    assert err.value.message == (
        "tenant='x' is not valid: a UUID such as 3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00; "
        "workflow='a b' is not valid: a name of letters, digits and '_', at most 64 characters"
    )
    with pytest.raises(Invalid, match=r"^limit is given 2 times: give it once$"):
        CHECKS.params("listStuck", MultiDict([("limit", "1"), ("limit", "2")]), {})


def _body(value: Any) -> dict[str, Any]:
    return CHECKS.body("replay", orjson.dumps(value))


def test_a_replay_body_gets_the_defaults_of_its_branch() -> None:
    ref = f"{TENANT}/sequence/e-1"
    assert _body({"instance": ref, "reason": "r"}) == {
        "instance": ref, "reason": "r", "force": False, "dry_run": False, "by": "admin-api",
    }  # fmt: skip
    assert _body({"all_stuck": True, "reason": "r", "older_than": "2w"}) == {
        "all_stuck": True, "reason": "r", "older_than": "2w", "limit": openapi.DEFAULT_LIMIT, "dry_run": False,
        "by": "admin-api",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, 'give exactly one of "instance" and "all_stuck": Either one instance'),
        ({"all_stuck": True}, '"reason" is required: Why (recorded'),
        ({"all_stuck": True, "reason": "x", "limit": 0, "tenant": "t"},
         '"limit" must be an integer from 1 to 500; "tenant" must be a UUID'),
        ({"all_stuck": True, "reason": "x", "force": True}, "unknown field(s) with 'all_stuck': force; allowed: "),
        ({"all_stuck": True, "reason": " "}, '"reason" must be text of 1 to 500 characters, without control'),
        ({"all_stuck": False, "reason": "x"}, '"all_stuck" must be true'),
    ],
)  # fmt: skip
def test_a_bad_replay_body_names_the_field_at_fault(body: dict[str, Any], message: str) -> None:
    with pytest.raises(Invalid) as err:
        _body(body)
    assert err.value.message.startswith(message), err.value.message
