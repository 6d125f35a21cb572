"""The shadow log store on real databases: SQLite in a temp folder, and PostgreSQL (started by
scripts/with_postgres.sh, which `make test` and .ci/run use). Every test runs on both: batched
writes from many threads, nothing lost on a clean shutdown, a full queue that drops and counts,
redaction, NUL stripping, and reading one champion/challenger pair back."""

from __future__ import annotations

import threading

from ctloop.logstore.shadow import ShadowStore, read_rows, redact
from shadow_helpers import shadow_record


def test_a_clean_shutdown_loses_no_row_even_from_many_threads(log_store_url):
    store = ShadowStore(log_store_url, batch_size=100)

    def produce(offset: int) -> None:
        for i in range(500):
            assert store.put(shadow_record(offset + i, challenger=str(2 + offset // 10_000 % 2)))

    threads = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    rows = read_rows(log_store_url)
    assert len(rows) == 2000 == store.written and store.dropped == 0
    assert len({r["request_id"] for r in rows}) == 2000
    pair = read_rows(log_store_url, champion_version="1", challenger_version="3")
    assert len(pair) == 1000 and pair[0]["challenger_latency_ms"] == 2.5 and pair[0]["challenger_tokens"] == 4


def test_the_database_is_the_one_asked_for(log_store_url):
    store = ShadowStore(log_store_url)
    assert store.engine.dialect.name == log_store_url.split(":")[0].split("+")[0]
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking(log_store_url):
    store = ShadowStore(log_store_url, queue_size=1, flush_seconds=5)
    results = [store.put(shadow_record(i)) for i in range(200)]
    store.close()
    assert results.count(False) == store.dropped > 0
    assert store.written == results.count(True) == len(read_rows(log_store_url))


def test_redaction_before_storage(log_store_url):
    text = "mail jane.doe@example.com or call +1 (555) 123-4567, key sk-abcdefghijklmnop1234"
    assert redact(text) == "mail [email] or call [phone], key [key]"
    store = ShadowStore(log_store_url, redact_pii=True)
    store.put(shadow_record(0, prompt=text))
    store.close()
    assert read_rows(log_store_url)[0]["prompt"] == "mail [email] or call [phone], key [key]"


def test_nul_characters_are_stripped_so_postgres_never_refuses_a_batch(log_store_url):
    store = ShadowStore(log_store_url)
    store.put(shadow_record(1, prompt="a\x00b"))
    store.close()
    assert read_rows(log_store_url)[0]["prompt"] == "ab" and store.dropped == 0


def test_replicas_starting_together_on_a_fresh_database_all_come_up(log_store_url):
    """#26 item 2: two replicas on a fresh PostgreSQL database raced in create_all, and one died at
    start-up (UniqueViolation on pg_type). Six processes open the store at once."""
    import subprocess
    import sys

    code = (
        "import sys; from ctloop.logstore.database import open_engine; open_engine(sys.argv[1]).dispose(); print('up')"
    )
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, log_store_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outcomes = [process.communicate(timeout=120) for process in starts]
    assert [p.returncode for p in starts] == [0] * 6, [err[-500:] for _, err in outcomes]
