"""The shadow log: one row per shadowed request, pairing the champion's and the challenger's answers."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ctloop.logstore.database import open_engine, tables
from ctloop.logstore.writer import BatchedWriter, clean_text, redact, stored_id

__all__ = ["ShadowRecord", "ShadowStore", "read_rows", "redact"]


@dataclass(frozen=True)
class ShadowRecord:
    request_id: str
    prompt: str
    champion_output: str
    challenger_output: str
    status: str  # completed, timed_out, errored, cancelled; skipped_breaker, dropped (never sent)
    champion_version: str = ""
    challenger_version: str = ""
    champion_latency_ms: float = 0.0
    challenger_latency_ms: float = 0.0
    champion_tokens: int = 0
    challenger_tokens: int = 0
    error: str = ""
    created_at: float = field(default_factory=time.time)


class ShadowStore(BatchedWriter):
    def __init__(self, url: str, redact_pii: bool = False, **writer: Any):
        self.redact_pii = redact_pii
        super().__init__(url, "shadow_log", self._row, **writer)

    def _row(self, record: ShadowRecord) -> dict[str, Any]:
        row = asdict(record)
        row["request_id"] = stored_id(record.request_id, self.redact_pii)
        for key in ("prompt", "champion_output", "challenger_output", "error"):
            row[key] = clean_text(row[key], self.redact_pii)
        for key, width in (("status", 32), ("champion_version", 64), ("challenger_version", 64)):
            row[key] = clean_text(row[key], self.redact_pii, width)
        return row

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.url)


def read_rows(
    url: str, champion_version: str | None = None, challenger_version: str | None = None
) -> list[dict[str, Any]]:
    """Logged pairs, oldest first, optionally for one champion/challenger pair."""
    engine = open_engine(url)
    table = tables()[1]
    try:
        query = table.select().order_by(table.c.id)
        if champion_version is not None:
            query = query.where(table.c.champion_version == champion_version)
        if challenger_version is not None:
            query = query.where(table.c.challenger_version == challenger_version)
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]
    finally:
        engine.dispose()
