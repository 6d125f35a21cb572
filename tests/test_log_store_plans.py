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


def test_a_purge_batch_walks_the_created_at_index_by_the_planners_own_choice(log_store_url):
    """The plan the database really picks (sequential scans allowed, statistics fresh) for a purge
    batch, on a store whose expired rows lie at the end of the table. Written as `WHERE created_at
    < t LIMIT n`, PostgreSQL picks a sequential scan (it expects n matching rows early on) and read
    the whole table for every batch: 1M expired rows of a 10M-row store took 138 s."""
    from sqlalchemy import text

    reader = LogReader(log_store_url)
    young = [{"request_id": f"y{i}", "created_at": 10_000.0 + i, "prompt": "p" * 200} for i in range(20_000)]
    expired = [{"request_id": f"x{i}", "created_at": 1.0 + i / 1000, "prompt": "p" * 200} for i in range(2_000)]
    with reader.engine.begin() as connection:
        connection.execute(reader.request_log.insert(), young)
        connection.execute(reader.request_log.insert(), expired)
        connection.execute(text("ANALYZE"))
    statements: list[tuple[str, object]] = []

    @event.listens_for(reader.engine, "before_cursor_execute")
    def capture(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "FROM request_log" in statement:
            statements.append((statement, parameters))

    assert reader.purge(older_than=5_000.0, batch=500, pause_s=0.0)["request_log"] == 2_000
    assert len(statements) >= 4
    with reader.engine.connect() as connection:
        raw = connection.connection.driver_connection
        for statement, parameters in statements[:2]:  # the first batch, and a later one (from where it ended)
            if reader.engine.dialect.name == "sqlite":  # SQLite takes the index either way; PostgreSQL is the guard
                plan = " | ".join(str(row[-1]) for row in raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
                assert "INDEX ix_request_log_created_at" in plan, plan
            else:
                cursor = raw.cursor()
                cursor.execute(f"EXPLAIN {statement}", parameters)
                plan = " | ".join(row[0] for row in cursor.fetchall())
                assert "Index Scan using ix_request_log_created_at" in plan and "Seq Scan" not in plan, plan
    reader.close()
    assert reader.counts()["request_log"] == 20_000
