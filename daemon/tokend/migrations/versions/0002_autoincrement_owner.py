"""Grant ids are never reused on SQLite; the lease owner column is wider.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

SQLite: the grants table is rebuilt with AUTOINCREMENT, so an id, once used, is never
given to another grant (before, a deleted newest grant's id went to the next import,
and a refresh of the deleted grant still in flight could be saved into the new one).
PostgreSQL ids come from a sequence and were never reused; there only the column of
``lease_owner`` is widened.

Upgrading replicas: this revision is compatible with a running tokend of revision 0001
(a wider column, the same columns otherwise); on SQLite there is a single process
anyway. Stop tokend, run ``tokend db upgrade``, start the new version. A tokend of
revision 0001 that is (re)started after the upgrade refuses to run (it wants revision
0001 exactly, and says so with the misleading advice "run `tokend db upgrade`"); from
this version on, a tokend that meets a schema newer than it knows says "upgrade tokend
on this host" and exits 78.
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # recreate="always" copies the rows (ids included) into a new table created
        # with AUTOINCREMENT; SQLite then starts sqlite_sequence at the highest id.
        with op.batch_alter_table('grants', recreate="always",
                                  table_kwargs={"sqlite_autoincrement": True}) as batch_op:
            batch_op.alter_column('lease_owner', existing_type=sa.String(length=100),
                                  type_=sa.String(length=255), existing_nullable=True)
    else:
        op.alter_column('grants', 'lease_owner', existing_type=sa.String(length=100),
                        type_=sa.String(length=255), existing_nullable=True)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table('grants', recreate="always") as batch_op:
            batch_op.alter_column('lease_owner', existing_type=sa.String(length=255),
                                  type_=sa.String(length=100), existing_nullable=True)
    else:
        op.alter_column('grants', 'lease_owner', existing_type=sa.String(length=255),
                        type_=sa.String(length=100), existing_nullable=True)
