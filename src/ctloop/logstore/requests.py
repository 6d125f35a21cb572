"""The request log (every answered request) and the feedback on those answers.

Requests are written by a batched background writer, like shadow pairs. Feedback is written at
once (a client waits for its 201) and is keyed by request id; a second feedback on the same
request supersedes the first, and both rows are kept (the latest one counts). Request ids are
stored as the redaction leaves them, and looked up the same way, so feedback still finds its
request when an id held an e-mail address.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from ctloop.logstore.database import open_engine, tables
from ctloop.logstore.writer import BatchedWriter, clean_text, stored_id


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    model_version: str
    endpoint: str  # "completions" or "chat"
    prompt: str
    answer: str
    explicit_version: bool = False
    messages: list[dict[str, str]] | None = None
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    user: str = ""
    request_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    rating: float | None = None  # +1 / -1, or a score in [0, 1]
    correction: str | None = None
    comment: str | None = None
    user: str | None = None
    source: str = "api"
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    @property
    def score(self) -> float | None:
        """The rating on [0, 1]: thumbs up 1, thumbs down 0, a score as given."""
        if self.rating is None:
            return None
        return 0.0 if self.rating == -1 else float(self.rating)


RESPONSE_ID_PREFIXES = ("chatcmpl-", "cmpl-")


class FeedbackBody(BaseModel):
    """One feedback record, as POST /v1/feedback and `ctloop feedback import` take it."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=160)
    rating: StrictInt | StrictFloat | None = None
    correction: StrictStr | None = None
    comment: StrictStr | None = Field(None, max_length=4096)
    user: StrictStr | None = Field(None, max_length=256)

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: float | None) -> float | None:
        if value is not None and not (value in (-1, 1) or 0 <= value <= 1):
            raise ValueError("a rating is +1 or -1 (thumbs), or a score in [0, 1]")
        return value

    def request_id_candidates(self) -> list[str]:
        """The id as given (an X-Request-Id), then without the response id's prefix (`cmpl-...`)."""
        ids = [self.request_id]
        for prefix in RESPONSE_ID_PREFIXES:
            if self.request_id.startswith(prefix) and len(self.request_id) > len(prefix):
                ids.append(self.request_id.removeprefix(prefix))
        return ids

    @model_validator(mode="after")
    def _something(self) -> FeedbackBody:
        if self.rating is None and not self.correction:
            raise ValueError("feedback needs a rating, a correction or both")
        return self

    def record(self, request_id: str, source: str = "api") -> FeedbackRecord:
        """The feedback on `request_id` (the candidate that names a logged request)."""
        rating = None if self.rating is None else float(self.rating)
        return FeedbackRecord(request_id, rating, self.correction, self.comment, self.user, source)


class RequestLog(BatchedWriter):
    def __init__(self, url: str, redact_pii: bool = False, **writer: Any):
        self.redact_pii = redact_pii
        super().__init__(url, "request_log", self._row, **writer)

    def _row(self, record: RequestRecord) -> dict[str, Any]:
        row = asdict(record)
        row["request_id"] = stored_id(record.request_id, self.redact_pii)
        for key in ("prompt", "answer"):
            row[key] = clean_text(row[key], self.redact_pii)
        for key, width in (("user", 256), ("model_version", 64), ("endpoint", 32), ("finish_reason", 32)):
            row[key] = clean_text(row[key], self.redact_pii, width)
        row["messages"] = (
            None
            if record.messages is None
            else clean_text(json.dumps(record.messages, ensure_ascii=False), self.redact_pii)
        )
        row["request_metadata"] = clean_text(json.dumps(record.request_metadata, ensure_ascii=False), self.redact_pii)
        return row


class LogReader:
    """Reads and the few synchronous writes (feedback, purge) on one log store."""

    def __init__(self, url: str, redact_pii: bool = False):
        self.url = url
        self.redact_pii = redact_pii
        self.engine = open_engine(url)
        _, self.shadow_log, self.request_log, self.feedback = tables()

    def close(self) -> None:
        self.engine.dispose()

    def stored_id(self, request_id: str) -> str:
        return stored_id(request_id, self.redact_pii)

    def has_request(self, request_id: str) -> bool:
        from sqlalchemy import select

        query = select(self.request_log.c.id).where(self.request_log.c.request_id == self.stored_id(request_id))
        with self.engine.connect() as connection:
            return connection.execute(query.limit(1)).first() is not None

    def add_feedback(self, records: list[FeedbackRecord]) -> int:
        """Insert feedback rows in one transaction; return how many."""
        rows = [
            {
                "feedback_id": r.feedback_id,
                "request_id": self.stored_id(r.request_id),
                "created_at": r.created_at,
                "rating": r.rating,
                "score": r.score,
                "correction": None if r.correction is None else clean_text(r.correction, self.redact_pii),
                "comment": None if r.comment is None else clean_text(r.comment, self.redact_pii),
                "user": None if r.user is None else clean_text(r.user, self.redact_pii, 256),
                "source": r.source,
            }
            for r in records
        ]
        if rows:
            with self.engine.begin() as connection:
                connection.execute(self.feedback.insert(), rows)
        return len(rows)

    def requests(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Logged requests in [since, until), oldest first, with their latest feedback (or None) under
        `feedback`; `messages` and `request_metadata` decoded."""
        query = self.request_log.select().order_by(self.request_log.c.id)
        if since is not None:
            query = query.where(self.request_log.c.created_at >= since)
        if until is not None:
            query = query.where(self.request_log.c.created_at < until)
        with self.engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(query)]
        latest = self.latest_feedback({row["request_id"] for row in rows})
        for row in rows:
            row["messages"] = json.loads(row["messages"]) if row["messages"] else None
            row["request_metadata"] = json.loads(row["request_metadata"] or "{}")
            row["feedback"] = latest.get(row["request_id"])
        return rows

    def latest_feedback(self, request_ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """The latest feedback row per request id (all request ids when None)."""
        query = self.feedback.select().order_by(self.feedback.c.created_at, self.feedback.c.id)
        with self.engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(query)]
        latest: dict[str, dict[str, Any]] = {}
        for row in rows:
            if request_ids is None or row["request_id"] in request_ids:
                latest[row["request_id"]] = row  # later rows supersede earlier ones
        return latest

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func, select

        with self.engine.connect() as connection:
            return {
                table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (self.shadow_log, self.request_log, self.feedback)
            }

    def purge(self, older_than: float) -> dict[str, int]:
        """Delete every row (requests, feedback, shadow pairs) created before `older_than` (epoch
        seconds); return how many per table."""
        deleted = {}
        with self.engine.begin() as connection:
            for table in (self.request_log, self.feedback, self.shadow_log):
                deleted[table.name] = connection.execute(table.delete().where(table.c.created_at < older_than)).rowcount
        return deleted
