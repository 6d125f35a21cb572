"""The log store's schema is migrated with Alembic (#26 item 2), under PostgreSQL's advisory lock, so
it can change later without losing a deployed store: a fresh store is built by the migrations and
matches the tables the code declares; a store made before migrations is brought up to date and
stamped, its rows kept."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from ctloop.logstore.database import HEAD, open_engine, schema_revision, tables
from ctloop.logstore.requests import LogReader


def test_a_fresh_store_is_built_by_the_migrations_as_the_code_declares_it(log_store_url):
    engine = open_engine(log_store_url)
    assert schema_revision(engine) == HEAD
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), tables()[0]) == []
    engine.dispose()


def test_a_store_from_before_migrations_is_upgraded_in_place_and_stamped(log_store_url):
    """The shape ctloop 0.1 wrote with create_all: no client_request_id, no unique request ids, no
    harvest ledger, and no alembic_version."""
    old = create_engine(log_store_url)
    with old.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE request_log (id INTEGER PRIMARY KEY, request_id VARCHAR(128) NOT NULL, "
                "created_at FLOAT, model_version VARCHAR(64), explicit_version BOOLEAN, endpoint VARCHAR(32), "
                "prompt TEXT, messages TEXT, answer TEXT, finish_reason VARCHAR(32), prompt_tokens INTEGER, "
                'completion_tokens INTEGER, latency_ms FLOAT, "user" VARCHAR(256), request_metadata TEXT)'
            )
        )
        connection.execute(
            text(
                "INSERT INTO request_log (id, request_id, created_at, prompt, answer) VALUES (1, 'old-1', 1.0, 'q', 'a')"
            )
        )
    old.dispose()
    engine = open_engine(log_store_url)
    assert schema_revision(engine) == HEAD
    inspector = inspect(engine)
    assert "client_request_id" in {c["name"] for c in inspector.get_columns("request_log")}
    assert "ix_request_log_client_request_id" in {i["name"] for i in inspector.get_indexes("request_log")}
    assert {"shadow_log", "feedback", "harvest_ledger", "alembic_version"} <= set(inspector.get_table_names())
    engine.dispose()
    reader = LogReader(log_store_url)
    assert [r["request_id"] for r in reader.requests()] == ["old-1"]  # nothing lost
    reader.close()
