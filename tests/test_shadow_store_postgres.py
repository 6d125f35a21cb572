"""The shadow log store on a real PostgreSQL server (started by scripts/with_postgres.sh, which
`make test` and .ci/run use): batched writes from many threads, nothing lost on a clean
shutdown, redaction, and reading one champion/challenger pair back."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from ctloop.serving.store import ShadowStore, read_rows
from shadow_helpers import shadow_record

URL = os.environ.get("CTLOOP_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(URL is None, reason="no PostgreSQL: run the tests through `make test` "
                                                    "(scripts/with_postgres.sh starts one)")


@pytest.fixture()
def url():
    """A fresh schema-less table per test: the table lives in a new database."""
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_postgres_store_loses_no_row_on_a_clean_shutdown(url):
    store = ShadowStore(url, batch_size=100)
    assert store.engine.dialect.name == "postgresql"

    def produce(offset: int) -> None:
        for i in range(1000):
            assert store.put(shadow_record(offset + i, challenger=str(2 + offset // 10_000 % 2)))

    threads = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert store.written == 4000 and store.dropped == 0
    assert len(read_rows(url)) == 4000
    pair = read_rows(url, champion_version="1", challenger_version="3")
    assert len(pair) == 2000 and pair[0]["challenger_latency_ms"] == 2.5


def test_postgres_store_redacts_before_storing(url):
    store = ShadowStore(url, redact_pii=True)
    store.put(shadow_record(1, prompt="mail jane.doe@example.com or call +1 415 555 0100"))
    store.close()
    prompt = read_rows(url)[0]["prompt"]
    assert "example.com" not in prompt and "555" not in prompt and "[email]" in prompt
