"""The log store's database: the engine and the three tables, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_engine(url: str) -> Any:
    """A SQLAlchemy engine with the log tables created; SQLite gets WAL mode (readers never block
    the writer)."""
    from sqlalchemy import create_engine, event

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(connection, _record):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")

    tables()[0].create_all(engine)
    return engine


def tables() -> tuple[Any, Any, Any, Any]:
    """(metadata, shadow_log, request_log, feedback)."""
    from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    shadow_log = Table(
        "shadow_log",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(128), nullable=False, index=True),
        Column("prompt", Text),
        Column("champion_output", Text),
        Column("challenger_output", Text),
        Column("status", String(32), index=True),
        Column("error", Text),
        Column("champion_version", String(64), index=True),
        Column("challenger_version", String(64), index=True),
        Column("champion_latency_ms", Float),
        Column("challenger_latency_ms", Float),
        Column("champion_tokens", Integer),
        Column("challenger_tokens", Integer),
        Column("created_at", Float, index=True),
    )
    request_log = Table(
        "request_log",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(128), nullable=False, index=True),
        Column("created_at", Float, index=True),
        Column("model_version", String(64), index=True),
        Column("explicit_version", Boolean),
        Column("endpoint", String(32)),
        Column("prompt", Text),
        Column("messages", Text),  # JSON, chat requests only
        Column("answer", Text),
        Column("finish_reason", String(32)),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("latency_ms", Float),
        Column("user", String(256)),
        Column("request_metadata", Text),  # JSON object
    )
    feedback = Table(
        "feedback",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("feedback_id", String(64), nullable=False, unique=True),
        Column("request_id", String(128), nullable=False, index=True),
        Column("created_at", Float, index=True),
        Column("rating", Float),  # as given: +1 / -1, or a score in [0, 1]
        Column("score", Float),  # in [0, 1]: +1 -> 1, -1 -> 0
        Column("correction", Text),
        Column("comment", Text),
        Column("user", String(256)),
        Column("source", Text),  # "api", or the file it was imported from
    )
    return metadata, shadow_log, request_log, feedback
