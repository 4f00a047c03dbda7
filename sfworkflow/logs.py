"""structlog set-up: JSON lines (orjson) or a console renderer; context bound per message via contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "json") -> None:
    lvl = _LEVELS.get(level.lower(), logging.INFO)
    renderer: structlog.typing.Processor
    logger_factory: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        logger_factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
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
