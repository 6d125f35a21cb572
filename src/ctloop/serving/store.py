"""The shadow log store: one row per shadowed request pairing both answers, through SQLAlchemy.

SQLite in WAL mode by default (a file in the workspace), PostgreSQL or any SQLAlchemy URL
otherwise. Writes go through a bounded queue to one background writer that inserts in batches,
so the request path never waits on the database; `close()` drains the queue, so a clean
shutdown loses no row. Optional redaction replaces e-mail addresses, phone numbers and API keys
before anything is stored.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDACTIONS = (
    (re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "[email]"),
    (re.compile(r"\b(sk|pk|api|key|token)[-_][A-Za-z0-9_-]{12,}\b", re.IGNORECASE), "[key]"),
    (re.compile(r"(?<!\w)\+?\d[\d ().-]{7,}\d(?!\w)"), "[phone]"),
)


def redact(text: str) -> str:
    for pattern, replacement in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


@dataclass(frozen=True)
class ShadowRecord:
    request_id: str
    prompt: str
    champion_output: str
    challenger_output: str
    status: str  # completed, timed_out, errored, cancelled
    champion_version: str = ""
    challenger_version: str = ""
    champion_latency_ms: float = 0.0
    challenger_latency_ms: float = 0.0
    champion_tokens: int = 0
    challenger_tokens: int = 0
    error: str = ""
    created_at: float = field(default_factory=time.time)


def open_engine(url: str) -> Any:
    """A SQLAlchemy engine; SQLite gets WAL mode (readers never block the writer)."""
    from sqlalchemy import create_engine, event

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(connection, _record):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")

    return engine


def shadow_table(metadata: Any) -> Any:
    from sqlalchemy import Column, Float, Integer, String, Table, Text

    return Table(
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


def read_rows(
    url: str, champion_version: str | None = None, challenger_version: str | None = None
) -> list[dict[str, Any]]:
    """Logged pairs, oldest first, optionally for one champion/challenger pair."""
    from sqlalchemy import MetaData, inspect

    engine = open_engine(url)
    try:
        if not inspect(engine).has_table("shadow_log"):
            return []
        table = shadow_table(MetaData())
        query = table.select().order_by(table.c.id)
        if champion_version is not None:
            query = query.where(table.c.champion_version == champion_version)
        if challenger_version is not None:
            query = query.where(table.c.challenger_version == challenger_version)
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]
    finally:
        engine.dispose()


class ShadowStore:
    def __init__(
        self,
        url: str,
        redact_pii: bool = False,
        batch_size: int = 200,
        queue_size: int = 10_000,
        flush_seconds: float = 0.2,
    ):
        from sqlalchemy import MetaData

        self.url = url
        self.engine = open_engine(url)
        metadata = MetaData()
        self.table = shadow_table(metadata)
        metadata.create_all(self.engine)
        self.redact_pii = redact_pii
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.queue: queue.Queue[ShadowRecord | None] = queue.Queue(maxsize=queue_size)
        self.written = 0
        self.dropped = 0
        self.last_error = ""
        self.write_errors = 0
        self._writer = threading.Thread(target=self._run, name="ctloop-shadow-writer", daemon=True)
        self._writer.start()

    def put(self, record: ShadowRecord) -> bool:
        """Queue a row for the writer; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        batch: list[ShadowRecord] = []
        stopping = False
        while not stopping:
            try:
                item = self.queue.get(timeout=self.flush_seconds)
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                    while len(batch) < self.batch_size:  # take what is already waiting
                        item = self.queue.get_nowait()
                        if item is None:
                            stopping = True
                            break
                        batch.append(item)
            except queue.Empty:
                pass
            if batch:
                self._insert(batch)
                batch = []

    def _insert(self, batch: list[ShadowRecord], attempts: int = 3) -> None:
        """Insert one batch in one transaction; a database that stays down costs the batch (counted in
        `dropped`, the cause in `last_error`), never the writer thread."""
        from sqlalchemy.exc import SQLAlchemyError

        rows = [self._row(record) for record in batch]
        for attempt in range(attempts):
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert(), rows)
                self.written += len(rows)
                return
            except SQLAlchemyError as exc:
                self.write_errors += 1
                self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
                log.warning(
                    "writing %d log rows failed (attempt %d of %d): %s",
                    len(rows),
                    attempt + 1,
                    attempts,
                    self.last_error,
                )
                time.sleep(0.5 * 2**attempt)
        self.dropped += len(rows)
        log.error("dropped %d log rows after %d failed attempts: %s", len(rows), attempts, self.last_error)

    def _row(self, record: ShadowRecord) -> dict[str, Any]:
        row = asdict(record)
        for key in ("prompt", "champion_output", "challenger_output", "error"):
            row[key] = row[key].replace("\x00", "")  # PostgreSQL text refuses NUL (it would cost the batch)
            if self.redact_pii:
                row[key] = redact(row[key])
        return row

    def close(self, timeout: float = 30.0) -> None:
        """Stop after writing every queued row."""
        self.queue.put(None)
        self._writer.join(timeout)
        if self._writer.is_alive():
            raise TimeoutError(
                f"the shadow log writer did not finish within {timeout} s; {self.queue.qsize()} rows still queued"
            )
        self.engine.dispose()

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.url)
