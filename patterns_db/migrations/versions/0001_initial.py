"""Initial schema: searches, trials and their metrics, patterns, tags, final evaluations.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TRIAL_STATUS = "status IN ('running', 'completed', 'failed', 'early-stopped')"
SEARCH_STATUS = "status IN ('running', 'completed', 'failed', 'stopped')"


def upgrade() -> None:
    op.create_table(
        "patterns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("canonical_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patterns"),
        sa.UniqueConstraint("hash", name="uq_patterns_hash"),
    )
    op.create_table(
        "searches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("space_name", sa.String(200), nullable=False),
        sa.Column("space_yaml", sa.Text(), nullable=False),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("controller_settings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.CheckConstraint(SEARCH_STATUS, name="ck_searches_status"),
        sa.PrimaryKeyConstraint("id", name="pk_searches"),
        sa.UniqueConstraint("name", name="uq_searches_name"),
    )
    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("search_id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("pattern_id", sa.Integer(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(TRIAL_STATUS, name="ck_trials_status"),
        sa.ForeignKeyConstraint(
            ["pattern_id"], ["patterns.id"], name="fk_trials_pattern_id_patterns"
        ),
        sa.ForeignKeyConstraint(
            ["search_id"], ["searches.id"], name="fk_trials_search_id_searches"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
        sa.UniqueConstraint("search_id", "trial_id", name="uq_trials_search_id_trial_id"),
    )
    op.create_index("ix_trials_status_reward_id", "trials", ["status", "reward", "id"])
    op.create_index("ix_trials_pattern_id", "trials", ["pattern_id"])
    op.create_table(
        "trial_metrics",
        sa.Column("trial_pk", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["trial_pk"],
            ["trials.id"],
            name="fk_trial_metrics_trial_pk_trials",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trial_pk", "name", "step", name="pk_trial_metrics"),
    )
    op.create_table(
        "pattern_tags",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("pattern_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pattern_id"], ["patterns.id"], name="fk_pattern_tags_pattern_id_patterns"
        ),
        sa.PrimaryKeyConstraint("name", name="pk_pattern_tags"),
    )
    op.create_index("ix_pattern_tags_pattern_id", "pattern_tags", ["pattern_id"])
    op.create_table(
        "final_evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pattern_id", sa.Integer(), nullable=True),
        sa.Column("baseline", sa.String(200), nullable=True),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "(pattern_id IS NULL) <> (baseline IS NULL)", name="ck_final_evaluations_subject"
        ),
        sa.ForeignKeyConstraint(
            ["pattern_id"], ["patterns.id"], name="fk_final_evaluations_pattern_id_patterns"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_final_evaluations"),
    )
    op.create_index("ix_final_evaluations_pattern_id", "final_evaluations", ["pattern_id"])
    op.create_index("ix_final_evaluations_dataset_model", "final_evaluations", ["dataset", "model"])


def downgrade() -> None:
    for table in (
        "final_evaluations",
        "pattern_tags",
        "trial_metrics",
        "trials",
        "searches",
        "patterns",
    ):
        op.drop_table(table)
