"""Alembic's environment for the log store. ctloop runs the migrations itself, on the connection it
holds (`ctloop.logstore.database.migrate`), under PostgreSQL's advisory lock; this file only hands
Alembic that connection and the tables as ctloop declares them."""

from alembic import context

from ctloop.logstore.database import tables

connection = context.config.attributes["connection"]
# batch mode: SQLite alters a table by copying it, which later migrations may need
context.configure(connection=connection, target_metadata=tables()[0], render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
