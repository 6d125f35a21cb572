"""What the server keeps of production: every answered request in the request log (sampled by
`serve.log_fraction`), and the feedback clients post on those answers (`POST /v1/feedback`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from ctloop.config import CtloopConfig
from ctloop.logstore.requests import FeedbackBody, LogReader, RequestLog, RequestRecord
from ctloop.serving.router import sampled
from ctloop.serving.schemas import ApiError

log = logging.getLogger(__name__)

RECENT_IDS = 100_000  # request ids answered here lately: feedback on them is accepted before the row is flushed
RECENT_S = 60.0  # the writer has flushed long before this
PURGE_EVERY_S = 3600.0
FIRST_PURGE_S = 600.0  # ten minutes after start


class ProductionLog:
    """The request log writer, the reader used for feedback, and their counters."""

    def __init__(self, config: CtloopConfig, store_url: str, spool_dir: Path | None = None):
        self.settings = config.serve
        self.writer = RequestLog(
            store_url,
            redact_pii=self.settings.redact,
            spool_path=None if spool_dir is None else spool_dir / "request_log.jsonl",
            spool_bytes=self.settings.log_spool_bytes,
        )
        self.reader = LogReader(store_url, redact_pii=self.settings.redact)
        self.sampled_out = 0
        self.feedback: Counter[str] = Counter()  # kind -> posts accepted: rating, correction
        self.purged: Counter[str] = Counter()  # table -> rows deleted by retention
        # ids just logged -> when: feedback may arrive before the writer's batch is in the store; past
        # RECENT_S the store is asked (a purged request must not take feedback)
        self.recent: OrderedDict[str, float] = OrderedDict()

    def record(self, record: RequestRecord) -> None:
        """Log an answered request (never blocks the request path)."""
        if not sampled(record.request_id, self.settings.log_fraction):
            self.sampled_out += 1
            return
        if self.writer.put(record):
            self.recent[self.reader.stored_id(record.request_id)] = time.monotonic()
            if len(self.recent) > RECENT_IDS:
                self.recent.popitem(last=False)

    async def add_feedback(self, body: FeedbackBody) -> dict[str, Any]:
        """Check the feedback's size and request id; store it; the API's answer. (The route checked
        the bearer token and parsed the body.)"""
        if body.correction is not None and len(body.correction) > self.settings.max_correction_chars:
            raise ApiError(
                413,
                f"the correction has {len(body.correction)} characters, more than serve.max_correction_chars="
                f"{self.settings.max_correction_chars}; send a shorter one",
                "correction",
            )
        found = None
        for candidate in body.request_id_candidates():
            logged = self.recent.get(self.reader.stored_id(candidate))
            matches = 1 if logged is not None and time.monotonic() - logged < RECENT_S else 0
            matches = matches or await asyncio.to_thread(self.reader.requests_with_id, candidate)
            if matches > 1:
                raise ApiError(
                    409,
                    f"request id {candidate!r} names {matches} logged requests (written before the server "
                    f"generated every id); feedback on it would attach to all of them, so it is refused",
                    "request_id",
                    "conflict",
                )
            if matches:
                found = candidate
                break
        if found is None:
            raise ApiError(
                404,
                f"no logged request has id {body.request_id!r}; send the X-Request-Id (or the response id) the server returned with an "
                f"answer this server logged (serve.log_fraction decides which are logged)",
                "request_id",
                "not_found",
            )
        record = body.record(found)
        from sqlalchemy.exc import SQLAlchemyError

        from ctloop.logstore.writer import store_file_problem

        broken = store_file_problem(self.reader.url)
        try:
            if not broken:
                await asyncio.to_thread(self.reader.add_feedback, [record])
        except SQLAlchemyError as exc:
            broken = f"the log store refused the write ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
        if broken:
            raise ApiError(
                503, f"feedback cannot be stored now: {broken}; send it again later", kind="service_unavailable"
            )
        for kind in ("rating", "correction"):
            if getattr(record, kind) is not None:
                self.feedback[kind] += 1
        return {
            "id": f"fb-{record.feedback_id}",
            "object": "feedback",
            "request_id": found,
            "created": int(record.created_at),
        }

    async def purge_forever(self) -> None:
        """Delete rows past `serve.log_retention_days` every hour, in small batches (`LogReader.purge`);
        never at start-up, where a replica's first minutes belong to its traffic."""
        days = self.settings.log_retention_days
        if days is None:
            return
        wait = FIRST_PURGE_S  # not at start-up, but soon: replicas restarted within the hour must still purge
        while True:
            await asyncio.sleep(wait)
            wait = PURGE_EVERY_S
            try:
                deleted = await asyncio.to_thread(self.reader.purge, time.time() - days * 86400)
                self.purged.update(deleted)
                if any(deleted.values()):
                    log.info("log retention (%s days) purged %s", days, deleted)
            except Exception as exc:  # noqa: BLE001 - retention must not stop the server; it tries again
                log.warning("purging the log store failed: %s: %s", exc.__class__.__name__, exc)

    def metrics(self) -> list[tuple[str, str, float, dict[str, str]]]:
        w = self.writer
        rows: list[tuple[str, str, float, dict[str, str]]] = [
            ("ctloop_request_log_sampled_out_total", "counter", self.sampled_out, {}),
            ("ctloop_request_log_rows_written_total", "counter", w.written, {}),
            ("ctloop_request_log_rows_dropped_total", "counter", w.dropped, {}),
            ("ctloop_request_log_write_errors_total", "counter", w.write_errors, {}),
        ]
        rows += [("ctloop_feedback_total", "counter", self.feedback[k], {"kind": k}) for k in ("rating", "correction")]
        rows += [("ctloop_log_rows_purged_total", "counter", n, {"table": t}) for t, n in sorted(self.purged.items())]
        return rows

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.reader.close()
