"""Generated hostile input for the integration tests: bad messages of every category, each with the
outcome the service owes it, and good `sequence.enrolled` events to interleave with them."""

from __future__ import annotations

import hashlib
import random
import subprocess
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from tests.support import TENANT, enrolled_data, event

MAX_BYTES = 256 * 1024  # the default SFWORKFLOW_MAX_MESSAGE_BYTES
APPLIED = "applied"
DUPLICATE = "duplicate"
# Valid per the schema but not storable (NUL in a text column, a due time past year 9999): the engine or
# PostgreSQL raises and the message is dead-lettered `internal_error`; a parser that rejected them
# up front would say `schema_violation`. Either keeps the promise; the xfail tests pin the better one.
UNSTORABLE = frozenset({"schema_violation"})


@dataclass
class Case:
    """One message to publish and what must become of it."""

    category: str
    body: bytes
    expected: frozenset[str]  # dead-letter reasons accepted, or {APPLIED} / {DUPLICATE}
    routing_key: str = "sequence.enrolled"
    content_type: str | None = "application/json"
    headers: dict[str, Any] | None = None
    message_id: str | None = None
    entity_id: str | None = None  # good events: the instance they create
    event_id: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def bad(self) -> bool:
        return not self.expected & {APPLIED, DUPLICATE}


def _reason(*reasons: str) -> frozenset[str]:
    return frozenset(reasons)


class Generator:
    """Builds the cases from one seed; `scale` multiplies every category's count."""

    def __init__(self, seed: int, scale: int = 1, tenant: str = TENANT) -> None:
        self.rng = random.Random(seed)
        self.scale = scale
        self.tenant = tenant
        self.n = 0

    # ---- building blocks ---------------------------------------------------------------------------
    def _uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def envelope(self, **changes: Any) -> dict[str, Any]:
        """A valid sequence.enrolled envelope with fresh ids (a timer an hour away), changed as asked
        (a value of `...` removes the field)."""
        self.n += 1
        data = enrolled_data(steps=1, delay_s=3600)
        ev = event("sequence.enrolled", f"fz-{self.n}-{self.rng.getrandbits(32):08x}", data, tenant=self.tenant)
        ev["event_id"] = self._uid()
        for k, v in changes.items():
            if v is ...:
                ev.pop(k, None)
            else:
                ev[k] = v
        return ev

    def _bad(self, category: str, body: bytes, *reasons: str, **kw: Any) -> Case:
        kw.setdefault("message_id", self._uid() if self.rng.random() < 0.7 else None)
        return Case(category, body, _reason(*reasons), **kw)

    def good(self, category: str = "good", ev: dict[str, Any] | None = None, **kw: Any) -> Case:
        ev = ev or self.envelope()
        body = kw.pop("body", None) or orjson.dumps(ev)
        return Case(
            category,
            body,
            _reason(APPLIED),
            routing_key=ev["event_type"],
            message_id=ev["event_id"],
            entity_id=ev["entity_id"],
            event_id=ev["event_id"],
            **kw,
        )

    def times(self, n: int) -> range:
        return range(n * self.scale)

    # ---- bad categories ----------------------------------------------------------------------------
    def random_bytes(self) -> list[Case]:
        out = []
        for _ in self.times(20):
            raw = bytearray(self.rng.randbytes(self.rng.randint(1, 3000)))
            raw.insert(self.rng.randint(0, len(raw)), 0xFF)  # never UTF-8, so never JSON
            out.append(self._bad("random_bytes", bytes(raw), "invalid_json"))
        return out

    def invalid_utf8(self) -> list[Case]:
        seqs = [b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80"]
        out = []
        for i in self.times(15):
            body = orjson.dumps(self.envelope())
            if i % 5 == 0:
                body = b"\xef\xbb\xbf" + body  # a byte order mark
            else:
                at = body.index(b'"source":"') + 10  # inside a string value
                body = body[:at] + self.rng.choice(seqs) + body[at:]
            out.append(self._bad("invalid_utf8", body, "invalid_json"))
        return out

    def non_object_json(self) -> list[Case]:
        makers: list[Callable[[int], Any]] = [
            lambda i: [i],
            lambda i: i,
            lambda i: f"string {i}",
            lambda i: [self.envelope()],
            lambda i: [None, True, False, i * 1.5],
            lambda i: [[[[i]]]],
            lambda i: -i - 0.25,
        ]
        out = [
            self._bad("non_object_json", orjson.dumps(makers[i % len(makers)](i)), "not_an_object")
            for i in self.times(12)
        ]
        out += [self._bad("non_object_json", b, "not_an_object") for b in (b"null", b"true", b"  false  ")]
        return out

    def deep_nesting(self) -> list[Case]:
        def inside(member: bytes, field: bytes = b'"data":{') -> bytes:
            body = orjson.dumps(self.envelope())
            return body.replace(field, field + b'"deep":' + member + b",", 1)

        out = [
            self._bad("deep_nesting", b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
            self._bad("deep_nesting", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_json"),
            self._bad("deep_nesting", b'[{"a":' * 5_000 + b"0" + b"}]" * 5_000, "invalid_json"),
            self._bad("deep_nesting", b"[" * 10_000, "invalid_json"),  # never closed
            self._bad("deep_nesting", inside(b"[" * 1100 + b"]" * 1100), "invalid_json"),
            self._bad("deep_nesting", inside(b'{"x":' * 2000 + b"1" + b"}" * 2000), "invalid_json"),
            self._bad("deep_nesting", b"[" * 1024 + b"]" * 1024, "not_an_object"),  # at the limit: JSON
            self._bad("deep_nesting", b"[" * 1000 + b"7" + b"]" * 1000, "not_an_object"),
            # Objects nested up to ~250 levels are validated (deeper ones: see the xfail test).
            self._bad("deep_nesting", inside(b"[" * 200 + b"]" * 200), "schema_violation"),
            self._bad("deep_nesting", inside(b'{"y":' * 100 + b"1" + b"}" * 100), "schema_violation"),
        ]
        return out

    def too_large(self) -> list[Case]:
        out = []
        for i in self.times(6):
            valid = orjson.dumps(self.envelope())
            over = [1, 2, 1000, MAX_BYTES, 3 * MAX_BYTES, 1][i % 6]
            out.append(self._bad("too_large", valid + b" " * (MAX_BYTES + over - len(valid)), "too_large"))
        out.append(self._bad("too_large", self.rng.randbytes(MAX_BYTES + 1), "too_large"))
        out.append(self._bad("too_large", orjson.dumps(list(range(60_000))), "too_large"))
        return out

    def huge_under_limit(self) -> list[Case]:
        """Big, but under the limit: the schema's bounds reject them."""
        steps = [{"template_id": f"t-{i}", "delay_seconds": i} for i in range(4_000)]
        data = {**enrolled_data(), "steps": steps}
        out = [
            self._bad("huge_under_limit", orjson.dumps(self.envelope(data=data)), "schema_violation"),
            self._bad("huge_under_limit", orjson.dumps(list(range(30_000))), "not_an_object"),
        ]
        lead = "L" * 200_000
        out.append(
            self._bad(
                "huge_under_limit",
                orjson.dumps(self.envelope(data={**enrolled_data(), "lead_id": lead})),
                "schema_violation",
            )
        )
        out.append(self._bad("huge_under_limit", orjson.dumps(self.envelope(source="S" * 250_000)), "schema_violation"))
        body = orjson.dumps(self.envelope(entity_id="E" * 100_000))
        out.append(self._bad("huge_under_limit", body, "schema_violation"))
        return out

    def wrong_types(self) -> list[Case]:
        variants: list[tuple[str, Any, str]] = [
            ("event_id", 12345, "schema_violation"),
            ("event_id", "not-a-uuid", "schema_violation"),
            ("event_id", None, "schema_violation"),
            ("event_type", ["sequence.enrolled"], "schema_violation"),
            ("event_type", "Sequence.Enrolled", "schema_violation"),
            ("event_type", "sequence", "schema_violation"),
            ("spec_version", 1.0, "schema_violation"),
            ("spec_version", "2.0", "schema_violation"),
            ("schema_version", "1", "schema_violation"),
            ("schema_version", 0, "schema_violation"),
            ("schema_version", -1, "schema_violation"),
            ("schema_version", 1.5, "schema_violation"),
            ("tenant_id", "tenant-a", "schema_violation"),
            ("tenant_id", {"id": TENANT}, "schema_violation"),
            ("entity_id", "", "schema_violation"),
            ("entity_id", "has space", "schema_violation"),
            ("entity_id", "a/b", "schema_violation"),
            ("entity_id", 42, "schema_violation"),
            ("source", "", "schema_violation"),
            ("actor_type", "robot", "schema_violation"),
            ("correlation_id", 7, "schema_violation"),
            ("timestamp", 1764144000, "schema_violation"),
            ("timestamp", "yesterday", "schema_violation"),
            ("data", [], "schema_violation"),
            ("data", "{}", "schema_violation"),
        ]
        out = []
        for i in self.times(25):
            name, value, reason = variants[i % len(variants)]
            out.append(self._bad("wrong_types", orjson.dumps(self.envelope(**{name: value})), reason))
        return out

    def missing_fields(self) -> list[Case]:
        required = ["event_id", "event_type", "spec_version", "schema_version", "tenant_id", "entity_id"]
        required += ["source", "timestamp", "data"]
        out = [
            self._bad("missing_fields", orjson.dumps(self.envelope(**{f: ...})), "schema_violation") for f in required
        ]
        for f in ("sequence_id", "recipient", "steps"):
            ev = self.envelope()
            del ev["data"][f]
            out.append(self._bad("missing_fields", orjson.dumps(ev), "schema_violation"))
        out.append(self._bad("missing_fields", b"{}", "schema_violation"))
        return out

    def extra_fields(self) -> list[Case]:
        out = []
        for i in self.times(10):
            ev = self.envelope()
            if i % 2:
                ev["data"][f"extra_{i}"] = {"nested": [i]}
            else:
                ev[["__proto__", "constructor", "$where", "priority", "x" * 300][i % 5]] = i
            out.append(self._bad("extra_fields", orjson.dumps(ev), "schema_violation"))
        return out

    def unknown_event_types(self) -> list[Case]:
        names = ["sequence.exploded", "nosuch.thing", "sequence.enrolled_v2", "billing.charged", "a.b", "x" * 50 + ".y"]
        out = []
        for i in self.times(12):
            name = names[i % len(names)]
            key = name if i % 3 else "sequence.enrolled"  # routing key and event type need not agree
            body = orjson.dumps(self.envelope(event_type=name))
            out.append(self._bad("unknown_event_type", body, "unknown_event_type", routing_key=key))
        return out

    def unsupported_schema_versions(self) -> list[Case]:
        out = []
        for v in (2, 3, 99, 2**31, 2**53, 2**63 - 1):
            out.append(
                self._bad(
                    "unsupported_schema_version",
                    orjson.dumps(self.envelope(schema_version=v)),
                    "unsupported_schema_version",
                )
            )
        return out

    def invalid_data(self) -> list[Case]:
        def enrolled(**change: Any) -> dict[str, Any]:
            d = enrolled_data(steps=1, delay_s=60)
            d.update(change)
            return d

        variants: list[tuple[str, dict[str, Any]]] = [
            ("sequence.enrolled", enrolled(steps=[])),
            ("sequence.enrolled", enrolled(steps=[{"template_id": "t", "delay_seconds": -1}])),
            ("sequence.enrolled", enrolled(steps=[{"template_id": "t", "delay_seconds": 31536001}])),
            ("sequence.enrolled", enrolled(steps=[{"template_id": "", "delay_seconds": 0}])),
            ("sequence.enrolled", enrolled(steps=[{"template_id": "t", "delay_seconds": 0}] * 51)),
            ("sequence.enrolled", enrolled(recipient={"channel": "pigeon", "address": "coop"})),
            ("sequence.enrolled", enrolled(recipient={"channel": "email"})),
            ("sequence.enrolled", enrolled(recipient="lead@example.com")),
            ("sequence.enrolled", enrolled(sequence_id="")),
            ("sequence.enrolled", enrolled(lead_id=None)),
            ("sequence.enrolled", {}),
            ("sequence.step_sent", {"step": "zero", "provider_message_id": "p"}),
            ("sequence.step_sent", {"step": 0}),
            ("sequence.step_failed", {"step": 0, "error_code": "x"}),
            ("sequence.step_failed", {"step": 0, "error_code": "x", "retryable": "yes"}),
        ]
        out = []
        for i in self.times(25):
            event_type, data = variants[i % len(variants)]
            body = orjson.dumps(self.envelope(event_type=event_type, data=data))
            out.append(self._bad("invalid_data", body, "schema_violation", routing_key=event_type))
        return out

    def content_types(self) -> list[Case]:
        types = [
            "text/plain",
            "application/xml",
            "application/octet-stream",
            "application/json-patch+json",
            "json",
            "text/html; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            " ",
            "application/jsonx",
            "\u00e1pplication/json",
            "x" * 200,
            "application/x-protobuf",
            "text/csv",
            "application/avro",
        ]
        out = []
        for i in self.times(15):
            body = orjson.dumps(self.envelope())
            out.append(self._bad("content_type", body, "unsupported_content_type", content_type=types[i % len(types)]))
        return out

    def garbage_headers(self) -> list[Case]:
        out = []
        for i in self.times(20):
            if i % 2:
                body = b"{garbage " + str(i).encode()
                reason = "invalid_json"
            else:
                body = orjson.dumps([i, "garbage"])
                reason = "not_an_object"
            headers = self.header_mix(i)
            out.append(
                self._bad("garbage_headers", body, reason, headers=headers, tags={"headers": i % len(HEADER_MIXES)})
            )
        return out

    def bad_timestamps(self) -> list[Case]:
        stamps = [
            "0000-01-01T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2016-12-31T23:59:60Z",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T00:00:00",
            "2026-01-01 00:00:00Z",
            "+10000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00Z",
        ]
        return [
            self._bad("bad_timestamps", orjson.dumps(self.envelope(timestamp=s)), "schema_violation") for s in stamps
        ]

    def unstorable(self) -> list[Case]:
        nul_seq = self.envelope()
        nul_seq["data"]["sequence_id"] = "seq\u0000one"
        far = self.envelope(timestamp="9999-12-31T23:59:59Z")
        far["data"]["steps"][0]["delay_seconds"] = 86400
        beyond = self.envelope(timestamp="9999-12-31T23:59:59-12:00")
        beyond["data"]["steps"][0]["delay_seconds"] = 0
        docs = [
            self.envelope(entity_id="nul\u0000entity"),
            nul_seq,
            self.envelope(correlation_id="c\u0000"),
            far,
            beyond,
        ]
        return [self._bad("unstorable", orjson.dumps(d), *UNSTORABLE) for d in docs]

    def bad(self) -> list[Case]:
        return [
            *self.random_bytes(),
            *self.invalid_utf8(),
            *self.non_object_json(),
            *self.deep_nesting(),
            *self.too_large(),
            *self.huge_under_limit(),
            *self.wrong_types(),
            *self.missing_fields(),
            *self.extra_fields(),
            *self.unknown_event_types(),
            *self.unsupported_schema_versions(),
            *self.invalid_data(),
            *self.content_types(),
            *self.garbage_headers(),
            *self.bad_timestamps(),
            *self.unstorable_but_valid_json(),
            *self.unstorable(),
        ]

    # ---- good ones ---------------------------------------------------------------------------------
    def good_mix(self, plain: int) -> list[Case]:
        """`plain` ordinary enrollments, then good events that look odd: each must be applied."""
        out = [self.good() for _ in range(plain * self.scale)]
        # At the size limit, padded with whitespace: still an event.
        for where in ("after", "before"):
            ev = self.envelope()
            raw = orjson.dumps(ev)
            pad = b" " * (MAX_BYTES - len(raw))
            out.append(self.good("good_odd", ev, body=raw + pad if where == "after" else pad + raw))
        for ct in (
            None,
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "text/json",
            "application/cloudevents+json",
        ):
            out.append(self.good("good_odd", content_type=ct))
        for i in range(len(HEADER_MIXES)):
            out.append(self.good("good_odd", headers=self.header_mix(i)))
        for stamp, delay in (
            ("0001-01-01T00:00:00Z", 0),
            ("9000-12-31T23:59:59Z", 0),
            ("1970-01-01T00:00:00.000000001z", 60),
            ("2026-11-26t08:00:00-03:00", 60),
        ):
            ev = self.envelope(timestamp=stamp)
            ev["data"]["steps"][0]["delay_seconds"] = delay
            out.append(self.good("good_odd", ev))
        out.append(self.good("good_odd", self.envelope(entity_id="\u202e\U0001f600-" + "é" * 150)))
        return out

    def unstorable_but_valid_json(self) -> list[Case]:
        """Times sfworkflow cannot compute with (UTC before year 1, after 9000) and NUL characters, even
        in fields it does not store: rejected up front as schema_violation, never failing a batch."""
        return [
            self._bad("unstorable", orjson.dumps(self.envelope(timestamp=stamp)), "schema_violation")
            for stamp in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59Z")
        ] + [
            self._bad(
                "unstorable",
                orjson.dumps(self.envelope(source="src\u0000", trace_id="t\u0000", causation_id="\u0000")),
                "schema_violation",
            )
        ]

    def header_mix(self, i: int) -> dict[str, Any]:
        h = HEADER_MIXES[i % len(HEADER_MIXES)](self.rng)
        h["x-fuzz-index"] = i
        return h


def _deep_table(depth: int) -> dict[str, Any]:
    t: dict[str, Any] = {"leaf": "bottom"}
    for i in range(depth):
        t = {f"level{i}": t}
    return t


HEADER_MIXES: list[Callable[[random.Random], dict[str, Any]]] = [
    lambda r: {"x-nul\x00key": "va\x00lue", "nested": {"k": "a\x00b"}},
    lambda r: {"x-huge": "h" * 60_000},
    lambda r: {"x-deep": _deep_table(30)},
    lambda r: {"x-list": [1, "a", [2, [3, [4, [5]]]], {"k": None}, True, 1.5, Decimal("-0.001")]},
    lambda r: {"x-bytes": bytearray(b"\xff\xfe\x00binary"), "x-utf8-bytes": bytearray("ação".encode())},
    lambda r: {"x-decimal": Decimal("3.14159"), "x-when": datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)},
    # (NaN and infinities cannot be sent: RabbitMQ closes the connection with INTERNAL_ERROR.)
    lambda r: {"x-none": None, "x-big": 2**63 - 1, "x-neg": -(2**63), "x-tiny": 5e-324, "x-zero": -0.0},
    lambda r: {"": "empty key", "x-rtl": "\u202e\ufeff\U0001f600", "x-ctl": "\x01\x02\x1b[31m"},
    lambda r: {f"x-many-{j}": "v" * 500 for j in range(150)},
    lambda r: {"x-sfworkflow-reason": "transition_not_allowed", "x-sfworkflow-detail": "forged", "x-death": [{"q": 1}]},
    lambda r: {"x-random": r.randbytes(64).decode("latin-1"), "x-bool": False, "x-int": r.randint(-(2**31), 2**31)},
]


def interleave(rng: random.Random, bad: list[Case], good: list[Case]) -> list[Case]:
    """Bad and good in one random order (the relative order of the good ones kept)."""
    slots = [True] * len(bad) + [False] * len(good)
    rng.shuffle(slots)
    b, g = iter(rng.sample(bad, len(bad))), iter(good)
    return [next(b) if s else next(g) for s in slots]


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def queue_counts(vhost: str, queues: Collection[str]) -> tuple[int, int]:
    """(ready, unacknowledged) messages summed over `queues`, from rabbitmqctl (each must be listed)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = {
        p[0]: (int(p[1]), int(p[2]))
        for p in (line.split("\t") for line in out.splitlines())
        if len(p) == 3 and p[1].isdigit() and p[2].isdigit()  # not the header line
    }
    missing = set(queues) - set(rows)
    assert not missing, f"queues {sorted(missing)} not listed in vhost {vhost}: {out!r}"
    return sum(rows[q][0] for q in queues), sum(rows[q][1] for q in queues)


def metric_total(metric: Any, **labels: str) -> float:
    """The sum of a prometheus_client counter's samples whose labels match."""
    total = 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
