"""Logging for the edges (CLI, server): events go through `logging`; this sets where they show.

On a terminal a rich handler prints warnings and errors readably (the console already tells the
story; `CTLOOP_LOG_LEVEL=info` adds every stage start and the like); with `CTLOOP_LOG_FORMAT=json`
every record from INFO up is one JSON object per line on stderr, for log shippers. Library modules only call
`logging.getLogger(__name__)`; nothing is configured at import.
"""

from __future__ import annotations

import json
import logging
import os
import time

LOG_FORMAT_ENV = "CTLOOP_LOG_FORMAT"
LOG_LEVEL_ENV = "CTLOOP_LOG_LEVEL"
# Chatter from libraries ctloop drives that is not news to a ctloop user (schema migrations on a new
# SQLite file, per-request access lines).
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def apply_process_defaults() -> None:
    """What an edge (the CLI, an Airflow task) sets for the libraries ctloop drives, in a process
    that is ctloop's: MLflow telemetry and artifact progress bars off unless the environment says
    otherwise, and their schema-migration chatter quiet. Library code never calls this."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(level: int | None = None, log_format: str | None = None) -> None:
    """Route ctloop's log records to stderr: rich text, or JSON lines when the format (argument, else
    the CTLOOP_LOG_FORMAT environment variable) is `json`. Safe to call more than once."""
    chosen = (log_format or os.environ.get(LOG_FORMAT_ENV, "text")).lower()
    if level is None:
        named = os.environ.get(LOG_LEVEL_ENV, "info" if chosen == "json" else "warning").upper()
        level = logging.getLevelNamesMapping().get(named, logging.INFO)
    if chosen == "json":
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        from rich.logging import RichHandler

        from ctloop.console import console

        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.set_name("ctloop")
    ctloop_logger = logging.getLogger("ctloop")
    ctloop_logger.handlers = [h for h in ctloop_logger.handlers if h.get_name() != "ctloop"] + [handler]
    ctloop_logger.setLevel(level)
    ctloop_logger.propagate = False
