"""input files: kind (claims or roster), version under the same name, archive path

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("input_files", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=10), server_default="claims", nullable=False)
        )
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("archived_path", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("input_files", schema=None) as batch_op:
        batch_op.drop_column("archived_path")
        batch_op.drop_column("version")
        batch_op.drop_column("kind")
