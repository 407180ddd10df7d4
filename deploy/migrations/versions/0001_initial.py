"""The preference store: completions and feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("text_a", sa.Text(), nullable=False),
        sa.Column("text_b", sa.Text(), nullable=True),
        sa.Column("adapter_a", sa.String(256), nullable=False),
        sa.Column("adapter_b", sa.String(256), nullable=True),
        sa.Column("finish_a", sa.String(32), nullable=True),
        sa.Column("finish_b", sa.String(32), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("completion_id", sa.String(128), sa.ForeignKey("completions.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("judge_key_id", sa.String(64), nullable=False),
        sa.Column("judge_user", sa.String(256), nullable=False),
        sa.Column("preference", sa.String(16), nullable=True),
        sa.Column("choice", sa.Integer(), nullable=True),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("edit_text", sa.Text(), nullable=True),
        sa.Column("user_written", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_completion_id", "feedback", ["completion_id"])
    op.create_index("ix_feedback_received_at", "feedback", ["received_at"])
    op.create_index(
        "uq_feedback_vote",
        "feedback",
        ["completion_id", "judge_key_id", "judge_user"],
        unique=True,
        sqlite_where=sa.text("kind = 'pairwise'"),
        postgresql_where=sa.text("kind = 'pairwise'"),
    )
    op.create_index(
        "uq_feedback_choice",
        "feedback",
        ["completion_id", "judge_key_id", "judge_user", "kind", "choice"],
        unique=True,
        sqlite_where=sa.text("kind != 'pairwise'"),
        postgresql_where=sa.text("kind != 'pairwise'"),
    )


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("completions")
