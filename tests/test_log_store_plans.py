"""#26: every query the production loop sends is backed by an index: no full scan of request_log
for a window, a sample, a feedback lookup or the ledger, on SQLite and PostgreSQL. The statements
are the ones LogReader really sends (captured as they run), explained with their own parameters.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event

from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord


def _fill(url: str, n: int = 300) -> None:
    writer = RequestLog(url)
    for i in range(n):
        writer.put(
            RequestRecord(
                request_id=f"r{i}",
                model_version="1",
                endpoint="completions",
                prompt=f"p{i}",
                answer="a",
                created_at=1000.0 + i,
            )
        )
    writer.close()
    reader = LogReader(url)
    reader.add_feedback([FeedbackRecord(f"r{i}", rating=1, created_at=2000.0 + i) for i in range(0, n, 10)])
    reader.close()


def _captured(reader: LogReader) -> list[tuple[str, object]]:
    statements: list[tuple[str, object]] = []

    @event.listens_for(reader.engine, "before_cursor_execute")
    def capture(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "request_log" in statement:
            statements.append((statement, parameters))

    reader.count_requests(1100.0, 1200.0)
    for _ in reader.rated_requests(1100.0, 1200.0):
        pass
    for _ in reader.unrated_requests(1100.0, 1200.0):
        pass
    reader.sample_requests(1000.0, 1300.0, 20, seed=0)
    reader.requests_with_ids(["r5", "r7"])
    reader.requests_with_id("r5")
    return statements


def test_the_production_queries_never_scan_the_whole_request_log(log_store_url):
    _fill(log_store_url)
    reader = LogReader(log_store_url)
    statements = _captured(reader)
    assert len(statements) >= 6
    full_scans = []
    with reader.engine.connect() as connection:
        raw = connection.connection.driver_connection
        for statement, parameters in statements:
            if reader.engine.dialect.name == "sqlite":
                plan = " | ".join(str(row[-1]) for row in raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
                scanned = any(
                    part.strip() == "SCAN request_log"
                    or part.strip().startswith("SCAN request_log ")
                    and "USING" not in part
                    for part in plan.split("|")
                )
            else:
                cursor = raw.cursor()
                cursor.execute("SET enable_seqscan = off")  # so a plan without an index shows as a Seq Scan
                cursor.execute(f"EXPLAIN {statement}", parameters)
                plan = " | ".join(row[0] for row in cursor.fetchall())
                cursor.execute("SET enable_seqscan = on")
                scanned = "Seq Scan on request_log" in plan
            if scanned:
                full_scans.append((statement[:160], plan))
    reader.close()
    assert not full_scans, full_scans


@pytest.mark.parametrize(
    ("size", "since", "until"), [(300, 1000.0, 1300.0), (3000, 1500.0, 2500.0)], ids=["all", "part"]
)
def test_a_sample_is_seeded_distinct_and_inside_its_window(tmp_path, size, since, until):
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    _fill(url, size)
    reader = LogReader(url)
    rows, total = reader.sample_requests(since, until, 50, seed=1)
    again, _ = reader.sample_requests(since, until, 50, seed=1)
    other, _ = reader.sample_requests(since, until, 50, seed=2)
    reader.close()
    assert total == min(size, int(until - since)) and len(rows) == 50 == len({r["request_id"] for r in rows})
    assert all(since <= r["created_at"] < until for r in rows)
    assert [r["request_id"] for r in again] == [r["request_id"] for r in rows]
    assert {r["request_id"] for r in other} != {r["request_id"] for r in rows}
