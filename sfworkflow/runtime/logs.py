"""structlog set-up: JSON lines (orjson) or a console renderer; context bound per message via contextvars."""

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


def configure(level: str = "info", fmt: str = "json") -> None:
    lvl = _LEVELS.get(level.lower(), logging.INFO)
    renderer: structlog.typing.Processor
    logger_factory: Any
    if fmt.lower() == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    logger_factory = lambda *_args: _StderrLogger()  # noqa: E731
    factory = structlog.make_filtering_bound_logger(lvl)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=factory,
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    # aio-pika, aiormq and asyncpg log through the standard library; keep them quiet and on stderr.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
