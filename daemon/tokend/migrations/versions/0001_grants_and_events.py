"""Grants and the notification outbox.

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

# Frozen copies of the column types, so this revision never changes with tokend.schema:
# timestamps are aware on PostgreSQL and ISO-8601 UTC text on SQLite.
TS = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('grant_id', ID, nullable=True),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', TS, nullable=True),
    sa.Column('delivered_at', TS, nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_next_attempt_at', ['next_attempt_at'], unique=False)

    op.create_table('grants',
    sa.Column('id', ID, autoincrement=True, nullable=False),
    sa.Column('client', sa.String(length=100), nullable=False),
    sa.Column('grant_type', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=True),
    sa.Column('tenant_id', sa.String(length=255), nullable=True),
    sa.Column('access_token', sa.Text(), nullable=True),
    sa.Column('access_expires_at', TS, nullable=True),
    sa.Column('refresh_token', sa.Text(), nullable=True),
    sa.Column('refresh_expires_at', TS, nullable=True),
    sa.Column('obtained_at', TS, nullable=True),
    sa.Column('consented_at', TS, nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('failure_count', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('next_attempt_at', TS, nullable=True),
    sa.Column('lease_owner', sa.String(length=100), nullable=True),
    sa.Column('lease_expires_at', TS, nullable=True),
    sa.Column('in_doubt', sa.Boolean(), nullable=False),
    sa.Column('token_version', sa.Integer(), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('updated_at', TS, nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.create_index('ix_grants_client_access_expires', ['client', 'access_expires_at'], unique=False)
        batch_op.create_index('ix_grants_client_refresh_expires', ['client', 'refresh_expires_at'], unique=False)
        batch_op.create_index('ix_grants_client_status', ['client', 'status'], unique=False)
        batch_op.create_index('ix_grants_client_user', ['client', 'user_id'], unique=False)
        batch_op.create_index('ix_grants_next_attempt_at', ['next_attempt_at'], unique=False)
        batch_op.create_index('uq_grants_client_credentials', ['client'], unique=True, sqlite_where=sa.text("grant_type = 'client_credentials'"), postgresql_where=sa.text("grant_type = 'client_credentials'"))



def downgrade() -> None:
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.drop_index('uq_grants_client_credentials', sqlite_where=sa.text("grant_type = 'client_credentials'"), postgresql_where=sa.text("grant_type = 'client_credentials'"))
        batch_op.drop_index('ix_grants_next_attempt_at')
        batch_op.drop_index('ix_grants_client_user')
        batch_op.drop_index('ix_grants_client_status')
        batch_op.drop_index('ix_grants_client_refresh_expires')
        batch_op.drop_index('ix_grants_client_access_expires')

    op.drop_table('grants')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_next_attempt_at')

    op.drop_table('events')
