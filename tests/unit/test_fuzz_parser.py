"""Property-based fuzzing of `EventParser.parse`: whatever arrives from RabbitMQ, it never raises.

Every input yields either an `IncomingEvent` or a `Rejection` whose reason is a `DeadReason` and whose
detail is a non-empty sentence. For the rejections decided before schema validation (size, content
type, JSON, object) the detail is also bounded and never echoes the body; schema violations are held
to the same rule by an expected failure below (their detail quotes the offending value in full).
"""

from __future__ import annotations

import copy
import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfworkflow.contract import schemas
from sfworkflow.contract.envelope import JSON_CONTENT_TYPES, EventParser, IncomingEvent
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.workflows import DEFINITIONS

MAX = 256 * 1024
KNOWN = {d.event_type(e) for d in DEFINITIONS for e in d.events}
SCHEMAS = schemas.default()
PARSER = EventParser(SCHEMAS, KNOWN, MAX)

DETAIL_MAX = 1200  # characters a rejection's detail may have
ECHO_MAX = 200  # consecutive characters of the body a detail may repeat

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

TENANT = "9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59"
EVENT_ID = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
ENROLLED = {
    "sequence_id": "seq-onboarding-7",
    "lead_id": "lead-1093",
    "recipient": {"channel": "whatsapp", "address": "+5511987654321"},
    "steps": [{"template_id": "tpl-welcome", "delay_seconds": 0}],
}
REQUIRED = ["event_id", "event_type", "spec_version", "schema_version", "tenant_id", "entity_id", "source", "timestamp"]
REQUIRED.append("data")
OPTIONAL = ["correlation_id", "causation_id", "actor_type", "trace_id"]
# Envelope fields whose schema bounds the length of a string.
LENGTH_BOUNDED = ["event_id", "tenant_id", "entity_id", "source", "correlation_id", "causation_id", "trace_id"]
LENGTH_BOUNDED_DATA = ["sequence_id", "lead_id"]


def envelope(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_type": "sequence.enrolled",
        "spec_version": "1.0",
        "schema_version": 1,
        "tenant_id": TENANT,
        "entity_id": "enrollment-42",
        "correlation_id": "corr-42",
        "causation_id": None,
        "source": "crm-api",
        "actor_type": "user",
        "timestamp": "2026-11-26T08:00:00Z",
        "trace_id": None,
        "data": copy.deepcopy(ENROLLED),
    }
    for k, v in changes.items():
        if v is ...:
            del doc[k]
        else:
            doc[k] = v
    return doc


VALID = orjson.dumps(envelope())


def _examples() -> list[tuple[str, dict[str, Any]]]:
    """(event type, data) for every example the data schemas of loaded workflows carry."""
    out = []
    for event_type in sorted(KNOWN):
        for v in SCHEMAS.versions("events", event_type):
            for ex in SCHEMAS.raw[("events", event_type, v)].get("examples", []):
                out.append((event_type, ex))
    return out


EXAMPLES = _examples()


# ---- checks ---------------------------------------------------------------------------------------
def parsed(body: bytes, content_type: str | None = None) -> IncomingEvent | Rejection:
    """Parse, and hold the result to the contract every input must meet."""
    r = PARSER.parse(body, content_type)  # must not raise
    assert isinstance(r, IncomingEvent | Rejection), type(r)
    if isinstance(r, Rejection):
        assert isinstance(r.reason, DeadReason), r
        assert isinstance(r.detail, str) and r.detail.strip(), r
    return r


def echoed(detail: str, body: bytes, limit: int = ECHO_MAX) -> str | None:
    """The first run of more than `limit` consecutive characters of `detail` found in the body, if any.

    A run of limit + 1 characters contains a window of limit // 2 + 1 characters starting at a
    multiple of limit // 2: look for those first, then check the longer windows around a hit."""
    if len(detail) <= limit:
        return None
    text = body.decode("utf-8", "replace")
    half = limit // 2
    for k in range(0, len(detail) - half, half):
        if detail[k : k + half + 1] not in text:
            continue
        for a in range(max(0, k - half), k + 1):
            window = detail[a : a + limit + 1]
            if len(window) == limit + 1 and window in text:
                return window
    return None


def assert_bounded(r: IncomingEvent | Rejection, body: bytes) -> None:
    if isinstance(r, Rejection):
        assert len(r.detail) <= DETAIL_MAX, (r.reason, len(r.detail), r.detail[:300])
        run = echoed(r.detail, body)
        assert run is None, f"{r.reason}: the detail repeats the body: {run[:80]!r}…"


def test_echo_check_finds_a_repeated_run() -> None:
    body = b"x" * 50 + b"A" * 300 + b"y"
    assert echoed("detail: " + "A" * 250, body) is not None
    assert echoed("detail: " + "A" * 200 + "z" * 100, body) is None


# ---- strategies ---------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(sorted(JSON_CONTENT_TYPES)),
    st.sampled_from(
        [
            "",
            " ",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "text/plain",
            "application/xml",
            "application/octet-stream",
            "application/json-patch+json",
            "json",
            ";",
            "application/json\x00",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=---",
            "\u202etext/json",
        ]
    ),
    st.text(max_size=300),
)
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80"]
INVALID_UTF8 += [b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
entity_ids = st.text(
    alphabet=st.characters(blacklist_categories=["Zs", "Zl", "Zp", "Cc", "Cs"], blacklist_characters="/\x00"),
    min_size=1,
    max_size=200,
)


# ---- properties -----------------------------------------------------------------------------------
@FUZZ
@given(body=st.binary(max_size=4096), content_type=content_types)
@example(body=b"", content_type=None)
@example(body=b"\x00" * 100, content_type="application/json")
@example(body=b"\xef\xbb\xbf" + VALID, content_type=None)
def test_random_bytes(body: bytes, content_type: str | None) -> None:
    r = parsed(body, content_type)
    assert_bounded(r, body)


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=len(VALID)),
    junk=st.lists(st.sampled_from(INVALID_UTF8), min_size=1, max_size=4),
)
def test_invalid_utf8_is_invalid_json(position: int, junk: list[bytes]) -> None:
    body = VALID[:position] + b"".join(junk) + VALID[position:]
    r = parsed(body)
    assert isinstance(r, Rejection) and r.reason is DeadReason.INVALID_JSON, r
    assert_bounded(r, body)


@FUZZ
@given(doc=json_values.filter(lambda v: not isinstance(v, dict)))
@example(doc=[envelope()])
@example(doc="x" * 100_000)
def test_json_that_is_not_an_object(doc: Any) -> None:
    body = orjson.dumps(doc)
    r = parsed(body)
    assert isinstance(r, Rejection) and r.reason is DeadReason.NOT_AN_OBJECT, r
    assert_bounded(r, body)


@pytest.mark.parametrize("text", [str(2**64), str(-(2**64)), "1e400", "-1e400", "NaN", "Infinity", "1" * 5000])
def test_numbers_json_cannot_hold(text: str) -> None:
    body = text.encode()
    r = parsed(body)
    # orjson reads integers beyond 64 bits as floats: a number, not an object.
    assert isinstance(r, Rejection) and r.reason in (DeadReason.INVALID_JSON, DeadReason.NOT_AN_OBJECT), r
    assert_bounded(r, body)


@FUZZ
@given(doc=st.dictionaries(st.text(max_size=20), json_values, max_size=12))
def test_random_objects(doc: dict[str, Any]) -> None:
    body = orjson.dumps(doc)
    r = parsed(body)
    assert isinstance(r, Rejection) and r.reason is DeadReason.SCHEMA_VIOLATION, r


def nested_body(depth: int, kind: str) -> bytes:
    """A body nesting `depth` levels deep (the root counts as one)."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "mixed":  # depth is rounded down to an even number
        return b'[{"a":' * (depth // 2) + b"null" + b"}]" * (depth // 2)
    if kind == "data":  # inside an otherwise valid envelope's data: root (1) + data (1) + the rest
        inner = depth - 2
        return VALID.replace(b'"data":{', b'"data":{"deep":' + b"[" * inner + b"]" * inner + b",", 1)
    inner = depth - 1  # kind == "source": root (1) + the rest
    return VALID.replace(b'"source":"crm-api"', b'"source":' + b"[" * inner + b"]" * inner, 1)


@settings(FUZZ, max_examples=150)
@given(
    depth=st.integers(min_value=1, max_value=10_000),
    kind=st.sampled_from(["array", "object", "mixed", "data", "source"]),
)
@example(depth=10_000, kind="array")
@example(depth=10_000, kind="object")
@example(depth=10_000, kind="data")
@example(depth=1024, kind="array")
@example(depth=1025, kind="array")
@example(depth=1025, kind="object")
def test_deep_nesting(depth: int, kind: str) -> None:
    """Arrays at the root at any depth, and anything deeper than the JSON parser's limit of 1,024 levels.

    (Objects nested between ~255 and 1,024 levels are the expected failure below.)"""
    if kind in ("object", "data", "source") and 200 < depth <= 1024:
        depth += 1024
    if kind in ("data", "source"):
        depth = max(depth, 3)
    body = nested_body(depth, kind)
    r = parsed(body)
    assert isinstance(r, Rejection), r
    if r.reason is not DeadReason.SCHEMA_VIOLATION:  # schema violations echo the value: the expected failure below
        assert_bounded(r, body)
    if depth - (depth % 2 if kind == "mixed" else 0) > 1024:  # the README: deeper than 1,024 levels is invalid_json
        assert r.reason is DeadReason.INVALID_JSON, (depth, r)
    elif kind in ("array", "mixed"):
        assert r.reason is DeadReason.NOT_AN_OBJECT, (depth, r)
    else:
        assert r.reason is DeadReason.SCHEMA_VIOLATION, (depth, r)


@settings(FUZZ, max_examples=30)
@given(depth=st.integers(min_value=260, max_value=1024), kind=st.sampled_from(["object", "data", "source"]))
@example(depth=300, kind="data")
def test_objects_nested_within_the_json_limit_are_rejected_not_raised(depth: int, kind: str) -> None:
    body = nested_body(depth, kind)
    r = parsed(body)
    assert isinstance(r, Rejection) and r.reason in (DeadReason.INVALID_JSON, DeadReason.SCHEMA_VIOLATION), r
    assert_bounded(r, body)


@settings(FUZZ, max_examples=150)
@given(delta=st.integers(min_value=-200, max_value=200), where=st.sampled_from(["before", "after", "inside"]))
@example(delta=0, where="after")
@example(delta=1, where="after")
def test_bodies_near_the_size_limit(delta: int, where: str) -> None:
    """Whitespace padding keeps a valid envelope valid: at the limit it is an event, one byte over it is not."""
    pad = b" " * (MAX + delta - len(VALID))
    if where == "before":
        body = pad + VALID
    elif where == "after":
        body = VALID + pad
    else:
        body = VALID.replace(b'"data":', b'"data":' + pad, 1)
    assert len(body) == MAX + delta
    r = parsed(body)
    if delta > 0:
        assert isinstance(r, Rejection) and r.reason is DeadReason.TOO_LARGE, r
        assert str(MAX) in r.detail
    else:
        assert isinstance(r, IncomingEvent), r
    assert_bounded(r, body)


@settings(FUZZ, max_examples=60)
@given(
    n=st.integers(min_value=51, max_value=40_000),
    what=st.sampled_from(["steps", "root_array", "data_string", "huge_key"]),
)
@example(n=40_000, what="steps")
def test_huge_arrays_and_strings(n: int, what: str) -> None:
    if what == "steps":
        data = {**ENROLLED, "steps": [{"template_id": f"t{i}", "delay_seconds": i} for i in range(n)]}
        body = orjson.dumps(envelope(data=data))
        expected = DeadReason.SCHEMA_VIOLATION  # maxItems 50
    elif what == "root_array":
        body = orjson.dumps(list(range(n)))
        expected = DeadReason.NOT_AN_OBJECT
    elif what == "data_string":
        body = orjson.dumps(envelope(data={**ENROLLED, "recipient": {"channel": "sms", "address": "9" * n * 7}}))
        expected = DeadReason.SCHEMA_VIOLATION  # maxLength 320
    else:
        body = orjson.dumps({"k" * n * 7: 1})
        expected = DeadReason.SCHEMA_VIOLATION
    r = parsed(body)
    assert isinstance(r, Rejection), r
    assert r.reason is (DeadReason.TOO_LARGE if len(body) > MAX else expected), (len(body), r)


@FUZZ
@given(example_index=st.integers(min_value=0, max_value=len(EXAMPLES) - 1), data=st.data())
def test_valid_envelopes_of_every_event_type_parse(example_index: int, data: st.DataObject) -> None:
    """Every loaded event type, with its schema's example data and random ids: an event, fields intact."""
    event_type, example_data = EXAMPLES[example_index]
    entity_id = data.draw(entity_ids)
    no_nul = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)
    correlation = data.draw(st.none() | no_nul)
    year = data.draw(st.integers(min_value=1, max_value=9000))  # past 9000: rejected, see the test below
    offset = data.draw(st.sampled_from(["Z", "z", "+00:00", "-03:00", "+14:00", "-12:00"]))
    doc = envelope(
        event_type=event_type,
        entity_id=entity_id,
        correlation_id=correlation,
        causation_id=data.draw(st.none() | no_nul),
        timestamp=f"{year:04d}-06-15T12:00:00{offset}",
        data=example_data,
    )
    r = parsed(orjson.dumps(doc))
    assert isinstance(r, IncomingEvent), (event_type, r)
    assert (r.event_type, r.entity_id, r.correlation_id, r.data) == (event_type, entity_id, correlation, example_data)
    assert r.timestamp.year == year


@FUZZ
@given(
    event_type=st.sampled_from(sorted(KNOWN)),
    data=st.dictionaries(st.text(max_size=15), json_values, max_size=8) | st.sampled_from([d for _t, d in EXAMPLES]),
)
def test_valid_envelopes_with_random_data(event_type: str, data: dict[str, Any]) -> None:
    body = orjson.dumps(envelope(event_type=event_type, data=data))
    r = parsed(body)
    if isinstance(r, Rejection):
        assert r.reason is DeadReason.SCHEMA_VIOLATION, r
        assert r.detail.startswith(f"data of {event_type}: "), r.detail[:200]
    else:
        assert r.event_type == event_type and r.data == data


@FUZZ
@given(
    mutation=st.sampled_from(["wrong_type", "missing", "extra", "unknown_type", "schema_version"]),
    field=st.sampled_from(REQUIRED + OPTIONAL),
    value=json_values,
    extra_key=st.text(min_size=1, max_size=30),
    event_type=st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\.[a-z][a-z0-9_]{0,20}\Z"),
    version=st.integers(min_value=-(2**63), max_value=2**63),
)
def test_wrong_types_missing_and_extra_fields(
    mutation: str, field: str, value: Any, extra_key: str, event_type: str, version: int
) -> None:
    doc = envelope()
    expected: set[DeadReason | None]
    if mutation == "wrong_type":
        doc[field] = value
        # None: the value happens to be valid (a string correlation id, say).
        expected = {DeadReason.SCHEMA_VIOLATION, DeadReason.UNKNOWN_EVENT_TYPE, DeadReason.UNSUPPORTED_SCHEMA_VERSION}
        expected.add(None)
    elif mutation == "missing":
        del doc[field]
        expected = {DeadReason.SCHEMA_VIOLATION} if field in REQUIRED else {None}
    elif mutation == "extra":
        doc[extra_key if extra_key not in doc else extra_key + "_x"] = value
        expected = {DeadReason.SCHEMA_VIOLATION}
    elif mutation == "unknown_type":
        doc["event_type"] = event_type
        expected = {None} if event_type in KNOWN else {DeadReason.UNKNOWN_EVENT_TYPE}
    else:
        doc["schema_version"] = version
        expected = (
            {None}
            if version == 1
            else {DeadReason.UNSUPPORTED_SCHEMA_VERSION}
            if version > 1
            else {DeadReason.SCHEMA_VIOLATION}
        )
    r = parsed(orjson.dumps(doc))
    got = r.reason if isinstance(r, Rejection) else None
    assert got in expected, (mutation, field, r)


@FUZZ
@given(content_type=content_types)
def test_content_types(content_type: str | None) -> None:
    r = parsed(VALID, content_type)
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if not content_type or declared in JSON_CONTENT_TYPES:
        assert isinstance(r, IncomingEvent), (content_type, r)
    else:
        assert isinstance(r, Rejection) and r.reason is DeadReason.UNSUPPORTED_CONTENT_TYPE, (content_type, r)
    assert_bounded(r, VALID)


@FUZZ
@given(
    date=st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}\Z"),
    time=st.from_regex(r"\A[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,12})?\Z"),
    zone=st.sampled_from(["Z", "z", "+00:00", "-23:59", "+23:59", "+24:00", "-99:99"]),
    sep=st.sampled_from(["T", "t"]),
)
@example(date="0001-01-01", time="00:00:00", zone="+14:00", sep="T")
@example(date="9999-12-31", time="23:59:59", zone="-12:00", sep="T")
@example(date="0000-01-01", time="00:00:00", zone="Z", sep="T")
@example(date="2016-12-31", time="23:59:60", zone="Z", sep="T")
def test_timestamps_anywhere_in_and_out_of_range(date: str, time: str, zone: str, sep: str) -> None:
    """Far past, far future, impossible dates and leap seconds: an event or a schema violation."""
    r = parsed(orjson.dumps(envelope(timestamp=f"{date}{sep}{time}{zone}")))
    if isinstance(r, Rejection):
        assert r.reason is DeadReason.SCHEMA_VIOLATION, r
        assert len(r.detail) <= DETAIL_MAX


# ---- the detail of schema violations (a bug: see the reason) --------------------------------------
long_text = st.text(alphabet=string.ascii_letters + string.digits + "-_.@", min_size=250, max_size=20_000)


@settings(FUZZ, max_examples=100)
@given(
    field=st.sampled_from(["envelope:" + f for f in LENGTH_BOUNDED] + ["data:" + f for f in LENGTH_BOUNDED_DATA]),
    text=long_text,
)
@example(field="envelope:source", text="A" * 5000)
def test_schema_violation_detail_is_bounded_and_does_not_echo_the_body(field: str, text: str) -> None:
    where, _, name = field.partition(":")
    doc = envelope()
    if where == "envelope":
        doc[name] = text
    else:
        doc["data"][name] = text
    body = orjson.dumps(doc)
    r = parsed(body)
    assert isinstance(r, Rejection) and r.reason is DeadReason.SCHEMA_VIOLATION, r
    assert_bounded(r, body)


@settings(FUZZ, max_examples=50)
@given(
    where=st.sampled_from(["entity_id", "correlation_id", "data.sequence_id", "data.lead_id", "data.address"]),
    prefix=st.text(alphabet=string.ascii_letters, max_size=10),
)
@example(where="entity_id", prefix="nul")
def test_a_nul_in_a_stored_string_is_a_schema_violation(where: str, prefix: str) -> None:
    doc = envelope()
    value = prefix + "\u0000" + prefix
    if where == "data.address":
        doc["data"]["recipient"]["address"] = value
    elif where.startswith("data."):
        doc["data"][where[5:]] = value
    else:
        doc[where] = value
    r = parsed(orjson.dumps(doc))
    assert isinstance(r, Rejection) and r.reason is DeadReason.SCHEMA_VIOLATION, r


@FUZZ
@given(year=st.integers(min_value=9001, max_value=9999), nul_in=st.sampled_from(["none", "entity", "data"]))
def test_timestamps_past_9000_and_nul_characters_are_rejected(year: int, nul_in: str) -> None:
    event_type, example_data = EXAMPLES[0]
    doc = envelope(event_type=event_type, entity_id="e-1", timestamp=f"{year:04d}-01-01T00:00:00Z", data=example_data)
    r = parsed(orjson.dumps(doc))
    assert isinstance(r, Rejection) and r.reason is DeadReason.SCHEMA_VIOLATION and "outside the years" in r.detail
    doc = envelope(
        event_type=event_type,
        entity_id="e\x00" if nul_in == "entity" else "e-1",
        correlation_id="c\x00" if nul_in == "data" else None,
        data=example_data,
    )
    r = parsed(orjson.dumps(doc))
    if nul_in == "none":
        assert isinstance(r, IncomingEvent)
    else:
        assert isinstance(r, Rejection) and "NUL" in r.detail
