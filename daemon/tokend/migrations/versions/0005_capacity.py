"""Capacity: the rate budget all replicas share.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Adds the table ``rate_slots``: one row per shared limit, holding the start moment of
its next free slot (tokend.sharedlimit; used on PostgreSQL only). An addition: a tokend
of an older revision keeps working beside it, but does not take part in the shared
budget, so upgrade all replicas before relying on it.
"""

import sqlalchemy as sa
from alembic import op

TS = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rate_slots',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('next_at', TS, nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('rate_slots')
