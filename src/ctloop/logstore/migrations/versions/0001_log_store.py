"""The log store as ctloop made it before migrations: shadow pairs, the request log, feedback and
the harvest ledger.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _indexes(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(f"ix_{table}_{column}", table, [column])


def upgrade() -> None:
    op.create_table(
        "shadow_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("prompt", sa.Text),
        sa.Column("champion_output", sa.Text),
        sa.Column("challenger_output", sa.Text),
        sa.Column("status", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("champion_version", sa.String(64)),
        sa.Column("challenger_version", sa.String(64)),
        sa.Column("champion_latency_ms", sa.Float),
        sa.Column("challenger_latency_ms", sa.Float),
        sa.Column("champion_tokens", sa.Integer),
        sa.Column("challenger_tokens", sa.Integer),
        sa.Column("created_at", sa.Float),
    )
    _indexes("shadow_log", "request_id", "status", "champion_version", "challenger_version", "created_at")
    op.create_table(
        "request_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("client_request_id", sa.String(128)),
        sa.Column("created_at", sa.Float),
        sa.Column("model_version", sa.String(64)),
        sa.Column("explicit_version", sa.Boolean),
        sa.Column("endpoint", sa.String(32)),
        sa.Column("prompt", sa.Text),
        sa.Column("messages", sa.Text),
        sa.Column("answer", sa.Text),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("latency_ms", sa.Float),
        sa.Column("user", sa.String(256)),
        sa.Column("request_metadata", sa.Text),
    )
    _indexes("request_log", "client_request_id", "created_at", "model_version")
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("feedback_id", sa.String(64), nullable=False, unique=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float),
        sa.Column("rating", sa.Float),
        sa.Column("score", sa.Float),
        sa.Column("correction", sa.Text),
        sa.Column("comment", sa.Text),
        sa.Column("user", sa.String(256)),
        sa.Column("source", sa.Text),
    )
    _indexes("feedback", "request_id", "created_at")
    op.create_table(
        "harvest_ledger",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("harvest", sa.String(200)),
        sa.Column("committed_at", sa.Float),
    )


def downgrade() -> None:
    for table in ("harvest_ledger", "feedback", "request_log", "shadow_log"):
        op.drop_table(table)
