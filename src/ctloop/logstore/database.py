"""The log store's database: the engine and the three tables, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_engine(url: str) -> Any:
    """A SQLAlchemy engine with the log tables created; SQLite gets WAL mode (readers never block
    the writer)."""
    from sqlalchemy import create_engine, event

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(connection, _record):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")

    _create_once(engine)
    return engine


SCHEMA_LOCK = 0x6374_6C6F_6F70  # "ctloop": the advisory lock that serialises schema changes
HEAD = "0001"  # the newest migration in migrations/versions/; a store at it needs no work
MIGRATIONS = Path(__file__).parent / "migrations"


def _create_once(engine: Any) -> None:
    """Migrate the store to HEAD with one process at a time: on PostgreSQL under an advisory lock
    (two replicas starting on a fresh database raced in create_all, and one died on a
    UniqueViolation in pg_type); on a SQLite file under a lock file next to it."""
    from sqlalchemy import text

    if schema_revision(engine) == HEAD:
        return  # the usual case: nothing to lock, nothing to write
    if engine.dialect.name != "postgresql":
        database = engine.url.database
        if not database or database == ":memory:":
            migrate(engine)
            return
        import fcntl

        with open(f"{database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            migrate(engine)
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
        try:
            connection.commit()
            migrate(engine)
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
            connection.commit()


def schema_revision(engine: Any) -> str | None:
    """The store's migration revision (Alembic's `alembic_version`); None before migrations."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Any) -> None:
    """Bring the store to HEAD with Alembic (migrations/versions/). A store ctloop made before it had
    migrations (tables, no `alembic_version`) first gets the shape of the first revision from the
    code that made it then (`create_all` of missing tables, `_upgrade`), and is stamped at it. One
    difference stays on such a store, for later migrations to know: its request ids are unique by
    an index (`uq_request_log_request_id`), where a store built by 0001 has a unique constraint."""
    import logging

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    current = schema_revision(engine)
    if current == HEAD:
        return
    legacy = current is None and any(inspect(engine).has_table(t) for t in ("request_log", "shadow_log", "feedback"))
    if legacy:
        tables()[0].create_all(engine)
        _upgrade(engine)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every start say nothing
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        if legacy:
            command.stamp(config, "0001")
        command.upgrade(config, "head")


def _upgrade(engine: Any) -> None:
    """Bring a store made by an older ctloop up to date: the `client_request_id` column, and a
    unique index on request ids (until then a client chose the id, and two requests could share
    one). A store that already holds such duplicates keeps them: the index is skipped (logged),
    and feedback and the harvest refuse an id that names more than one request."""
    import logging

    from sqlalchemy import func, inspect, text
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    inspector = inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("request_log")}
    with engine.begin() as connection:
        if "client_request_id" not in columns:
            connection.execute(text("ALTER TABLE request_log ADD COLUMN client_request_id VARCHAR(128)"))
    if not any(i["name"] == "ix_request_log_client_request_id" for i in inspect(engine).get_indexes("request_log")):
        with engine.begin() as connection:  # as revision 0001 has it
            connection.execute(text("CREATE INDEX ix_request_log_client_request_id ON request_log (client_request_id)"))
    unique = any(i.get("unique") and i["column_names"] == ["request_id"] for i in inspector.get_indexes("request_log"))
    unique = unique or any(c["column_names"] == ["request_id"] for c in inspector.get_unique_constraints("request_log"))
    if not unique:
        from sqlalchemy import select as _select

        request_log = tables()[2]
        shared = _select(request_log.c.request_id).group_by(request_log.c.request_id).having(func.count() > 1).limit(1)
        with engine.connect() as connection:
            if connection.execute(shared).first() is not None:
                return  # duplicates from an older ctloop: no unique index (feedback and the harvest refuse them)
        try:
            with engine.begin() as connection:
                connection.execute(text("CREATE UNIQUE INDEX uq_request_log_request_id ON request_log (request_id)"))
        except (IntegrityError, OperationalError, ProgrammingError) as exc:
            logging.getLogger(__name__).warning(
                "the request log holds duplicate request ids from before ids were generated by the server; "
                "they stay, and feedback or a harvest on such an id is refused (%s)",
                exc.__class__.__name__,
            )


def tables() -> tuple[Any, Any, Any, Any, Any]:
    """(metadata, shadow_log, request_log, feedback, harvest_ledger)."""
    from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    shadow_log = Table(
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
    request_log = Table(
        "request_log",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        # Generated by the server, never by a client: unique, so feedback names exactly one answer.
        Column("request_id", String(128), nullable=False, unique=True),
        Column("client_request_id", String(128), index=True),  # the client's X-Request-Id: correlation only
        Column("created_at", Float, index=True),
        Column("model_version", String(64), index=True),
        Column("explicit_version", Boolean),
        Column("endpoint", String(32)),
        Column("prompt", Text),
        Column("messages", Text),  # JSON, chat requests only
        Column("answer", Text),
        Column("finish_reason", String(32)),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("latency_ms", Float),
        Column("user", String(256)),
        Column("request_metadata", Text),  # JSON object
    )
    feedback = Table(
        "feedback",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("feedback_id", String(64), nullable=False, unique=True),
        Column("request_id", String(128), nullable=False, index=True),
        Column("created_at", Float, index=True),
        Column("rating", Float),  # as given: +1 / -1, or a score in [0, 1]
        Column("score", Float),  # in [0, 1]: +1 -> 1, -1 -> 0
        Column("correction", Text),
        Column("comment", Text),
        Column("user", String(256)),
        Column("source", Text),  # "api", or the file it was imported from
    )
    # What cycles have trained on: request ids ("r:<id>") and content keys ("c:<key>") of committed
    # harvests, so a later harvest skips them; looked up by key, never read whole.
    harvest_ledger = Table(
        "harvest_ledger",
        metadata,
        Column("key", String(200), primary_key=True),
        Column("harvest", String(200)),
        Column("committed_at", Float),
    )
    return metadata, shadow_log, request_log, feedback, harvest_ledger
