"""The shadow log store on a real SQLite database: batched background writes, no row lost on a
clean shutdown, WAL mode, redaction."""

from __future__ import annotations

import threading

from ctloop.serving.store import ShadowStore, redact
from shadow_helpers import shadow_record


def test_a_clean_shutdown_loses_no_row_even_from_many_threads(tmp_path):
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}", batch_size=50)

    def produce(offset: int) -> None:
        for i in range(500):
            assert store.put(shadow_record(offset + i))

    threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    rows = store.rows()
    assert len(rows) == 2000 == store.written and store.dropped == 0
    assert len({r["request_id"] for r in rows}) == 2000
    assert rows[0]["challenger_version"] == "2" and rows[0]["challenger_tokens"] == 4


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}", queue_size=1, flush_seconds=5)
    results = [store.put(shadow_record(i)) for i in range(200)]
    store.close()
    assert results.count(False) == store.dropped > 0
    assert store.written == results.count(True)


def test_redaction_before_storage(tmp_path):
    text = "mail jane.doe@example.com or call +1 (555) 123-4567, key sk-abcdefghijklmnop1234"
    assert redact(text) == "mail [email] or call [phone], key [key]"
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}", redact_pii=True)
    store.put(shadow_record(0, prompt=text))
    store.close()
    assert store.rows()[0]["prompt"] == "mail [email] or call [phone], key [key]"


def test_nul_characters_are_stripped_so_postgres_never_refuses_a_batch(tmp_path):
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}")
    store.put(shadow_record(1, prompt="a\x00b"))
    store.close()
    assert store.rows()[0]["prompt"] == "ab"
