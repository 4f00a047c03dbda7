"""runtime/logs.py: every line the process logs is one JSON object, the standard library's too (aio-pika's
reconnect warnings, asyncpg's errors with a traceback, Python's warnings), or a console line for a human."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

from sfworkflow.runtime import logs


@pytest.fixture
def restored() -> Iterator[None]:
    """configure() changes the process's logging: put it back for the tests after this one."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]  # raises on a line that is not JSON


def test_every_line_is_one_json_object_the_standard_library_s_too(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    structlog.get_logger("sfworkflow.consumer").warning("batch not applied; retrying", error="ConnectionResetError")
    logging.getLogger("aio_pika.robust_connection").warning("Connection attempt to %s failed", "amqp://…")
    try:
        raise ConnectionRefusedError("connect call failed ('127.0.0.1', 5432)")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").exception("error while reconnecting")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # pytest swaps showwarning per test: capture again inside this block
        logging.captureWarnings(True)
        warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
    logging.getLogger("aiormq.connection").info("an info line of a library")  # below warning: not written
    lines = _lines(capsys.readouterr().err)
    assert [(x["level"], x.get("logger")) for x in lines] == [
        ("warning", None),
        ("warning", "aio_pika.robust_connection"),
        ("error", "asyncpg.pool"),
        ("warning", "py.warnings"),
    ]
    assert all("timestamp" in x and "event" in x for x in lines)
    assert lines[1]["event"] == "Connection attempt to amqp://… failed"
    (exc,) = lines[2]["exception"]  # structured, not a multi-line traceback
    assert exc["exc_type"] == "ConnectionRefusedError" and exc["frames"]


def test_structlog_s_own_exceptions_are_structured_too(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    try:
        raise KeyError("missing")
    except KeyError:
        structlog.get_logger("sfworkflow.relay").exception("relay round failed")
    (line,) = _lines(capsys.readouterr().err)
    assert line["exception"][0]["exc_type"] == "KeyError"


def test_bound_context_is_on_the_standard_library_s_lines(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    with structlog.contextvars.bound_contextvars(correlation_id="corr-1", trace_id="4bf9"):
        logging.getLogger("asyncpg").warning("connection lost")
    (line,) = _lines(capsys.readouterr().err)
    assert (line["correlation_id"], line["trace_id"]) == ("corr-1", "4bf9")


class _Tty:
    def isatty(self) -> bool:
        return True


def test_auto_is_console_on_a_terminal_and_json_otherwise(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert logs.use_console("auto", _Tty()) and not logs.use_console("auto", object())
    assert logs.use_console("console") and not logs.use_console("json", _Tty())
    logs.configure("info", "auto")  # capsys's stderr is no terminal: JSON
    structlog.get_logger().info("started")
    assert _lines(capsys.readouterr().err)[0]["event"] == "started"
    logs.configure("info", "console")
    structlog.get_logger().info("started")
    logging.getLogger("aio_pika").warning("reconnecting")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(not line.startswith("{") for line in err)
    assert "reconnecting" in err[1] and "warning" in err[1]
