"""Bounded rounds: each feedback row's place in the hold-out split and the round that took it, with indexes, so
that the trainer's check and selection read the new rows, a replay sample and evaluation rows by index instead of
the whole store.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 5000


def _split(completion_id: str) -> float:
    # feedback.store.split_of as of this revision (a migration keeps its own copy: the app's may change)
    return int.from_bytes(hashlib.sha256(completion_id.encode()).digest()[:8], "big") / 2**64


def upgrade() -> None:
    op.add_column("feedback", sa.Column("split", sa.Float(), nullable=True))
    op.add_column("feedback", sa.Column("round_id", sa.Integer(), nullable=True))
    conn = op.get_bind()
    feedback = sa.table("feedback", sa.column("completion_id", sa.String), sa.column("split", sa.Float))
    ids = [row[0] for row in conn.execute(sa.text("SELECT DISTINCT completion_id FROM feedback"))]
    for i in range(0, len(ids), BATCH):
        conn.execute(
            feedback.update().where(feedback.c.completion_id == sa.bindparam("cid")).values(split=sa.bindparam("s")),
            [{"cid": cid, "s": _split(cid)} for cid in ids[i : i + BATCH]],
        )
    # What earlier rounds were offered (everything up to their newest data_until) counts as taken by the latest.
    latest = conn.execute(
        sa.text(
            "SELECT id, data_until FROM training_rounds WHERE status != 'running' AND data_until IS NOT NULL "
            "ORDER BY data_until DESC, id DESC LIMIT 1"
        )
    ).first()
    if latest is not None:
        conn.execute(
            sa.text("UPDATE feedback SET round_id = :r WHERE received_at <= :t"), {"r": latest[0], "t": latest[1]}
        )
    with op.batch_alter_table("feedback") as batch:
        batch.alter_column("split", existing_type=sa.Float(), nullable=False)
    op.create_index("ix_feedback_split", "feedback", ["split"])
    op.create_index("ix_feedback_round_id", "feedback", ["round_id"])
    op.create_index(
        "ix_feedback_pending",
        "feedback",
        ["received_at"],
        sqlite_where=sa.text("round_id IS NULL"),
        postgresql_where=sa.text("round_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_feedback_pending", "feedback")
    op.drop_index("ix_feedback_round_id", "feedback")
    op.drop_index("ix_feedback_split", "feedback")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("round_id")
        batch.drop_column("split")
