"""Re-consent at the web endpoint: consent states, and the reminders sent per grant.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Adds the table ``consent_states`` (a consent started from a link, consumed by the
provider's redirect on any replica; it keeps the flow's PKCE verifier, encrypted) and
two nullable columns of ``grants`` (``reminder_deadline``, ``reminder_point``). Both are additions: a running tokend of
revision 0002 keeps working beside it, so replicas can be upgraded one by one after
``tokend db upgrade``.
"""

import sqlalchemy as sa
from alembic import op

TS = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('consent_states',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('grant_id', ID, nullable=False),
    sa.Column('mark', sa.String(length=64), nullable=False),
    sa.Column('redirect_uri', sa.String(length=500), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('expires_at', TS, nullable=False),
    sa.Column('used_at', TS, nullable=True),
    sa.Column('code_verifier', sa.String(length=400), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_consent_states_expires_at', 'consent_states', ['expires_at'])
    # Plain ALTER TABLE ADD COLUMN on both backends (SQLite keeps its AUTOINCREMENT table).
    op.add_column('grants', sa.Column('reminder_deadline', TS, nullable=True))
    op.add_column('grants', sa.Column('reminder_point', TS, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.drop_column('reminder_point')
        batch_op.drop_column('reminder_deadline')
    op.drop_index('ix_consent_states_expires_at', table_name='consent_states')
    op.drop_table('consent_states')
