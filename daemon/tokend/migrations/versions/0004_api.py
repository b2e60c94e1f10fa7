"""Replica heartbeats for ``tokend status``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Adds the table ``replicas``: one row per running (or stopped) tokend process, written
after each of its passes and when it stops (last pass, held outcomes, open circuits),
so that ``tokend status`` can show every replica from the database alone. An addition:
a tokend of revision 0003 keeps working beside it.
"""

import sqlalchemy as sa
from alembic import op

TS = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('replicas',
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('started_at', TS, nullable=False),
    sa.Column('last_pass_at', TS, nullable=True),
    sa.Column('last_pass', sa.Text(), nullable=True),
    sa.Column('held_outcomes', sa.Integer(), nullable=False),
    sa.Column('open_circuits', sa.Text(), nullable=True),
    sa.Column('updated_at', TS, nullable=False),
    sa.Column('stopped_at', TS, nullable=True),
    sa.PrimaryKeyConstraint('owner')
    )


def downgrade() -> None:
    op.drop_table('replicas')
