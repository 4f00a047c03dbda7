"""structlog set-up: every line the process logs as one JSON object (or a console line for a human), context bound
per message via contextvars.

Two paths, one renderer. sfworkflow's own lines go through structlog straight to stderr (orjson, no standard
library logging on the way: the hot path logs at debug). Everything else that logs through the standard library
(aio-pika's reconnect warnings, aiormq, asyncpg, asyncio's "exception was never retrieved", `warnings`) goes
through structlog's ProcessorFormatter on the root logger, into the same format: an outage's lines parse as JSON
like the rest. In JSON, an exception is a structured field (`exception`: a list of {exc_type, exc_value, frames}),
never a multi-line traceback.

`fmt`: "json", "console", or "auto" (console when stderr is a terminal, JSON otherwise: a container's logs are
JSON, a developer's terminal is readable).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_MAX_FRAMES = 20  # of a traceback in JSON: the outermost and innermost ten


class _StderrLogger:
    """Writes each line to the sys.stderr of the moment (tests swap it; a closed stream is skipped)."""

    def msg(self, message: str | bytes) -> None:
        stream = sys.stderr
        try:
            if isinstance(message, bytes):
                getattr(stream, "buffer", None) and stream.buffer.write(message + b"\n")
                if not hasattr(stream, "buffer"):
                    stream.write(message.decode() + "\n")
            else:
                stream.write(message + "\n")
            stream.flush()
        except ValueError:  # closed
            pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrStream:
    """The standard library handler's stream: the sys.stderr of the moment."""

    def write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
        except ValueError:  # closed
            pass

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except ValueError:
            pass


def _json_bytes(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=repr)


def _json_text(obj: Any, **kw: Any) -> str:  # the standard library's handler writes text
    return _json_bytes(obj, **kw).decode()


def use_console(fmt: str, stream: Any = None) -> bool:
    """Whether `fmt` means the console renderer here ("auto": when the stream, stderr by default, is a terminal)."""
    fmt = fmt.lower()
    if fmt == "auto":
        s = stream if stream is not None else sys.stderr
        return bool(getattr(s, "isatty", lambda: False)())
    return fmt == "console"


def configure(level: str = "info", fmt: str = "auto") -> None:
    lvl = _LEVELS.get(level.lower(), logging.INFO)
    console = use_console(fmt)
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exceptions: list[structlog.typing.Processor]
    if console:  # the console renderer prints exc_info as a readable traceback itself
        exceptions = []
        own_renderer: structlog.typing.Processor = structlog.dev.ConsoleRenderer(colors=False)
        std_renderer: structlog.typing.Processor = own_renderer
    else:
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=_MAX_FRAMES)
        exceptions = [structlog.processors.ExceptionRenderer(transformer)]
        own_renderer = structlog.processors.JSONRenderer(serializer=_json_bytes)
        std_renderer = structlog.processors.JSONRenderer(serializer=_json_text)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, *exceptions, own_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_args: _StderrLogger(),
        cache_logger_on_first_use=True,
    )
    # The standard library's loggers (aio-pika, aiormq, asyncpg, asyncio, warnings): the same format, at warning and
    # above whatever sfworkflow's own level (their info lines are noise to an operator).
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exceptions, std_renderer],
    )
    handler = logging.StreamHandler(_StderrStream())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
