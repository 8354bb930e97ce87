"""Structured logs for the API, the worker and the scheduler: one JSON object per line with time, level, logger,
message, the request id when one is known, and any `extra=` fields. Item texts are never passed to a logger."""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The id of the HTTP request being handled, or of the request that sent the Celery task being run.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has (and uvicorn's terminal-coloured copy of the message); any other attribute came
# from `extra=` and becomes a field of its own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (current := request_id.get()) is not None:
            line["request_id"] = current
        line.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_"))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig sending every logger (uvicorn's and Celery's included) through one JSON handler on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.core.logging.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def configure_logging(level: str) -> None:
    logging.config.dictConfig(logging_config(level))
