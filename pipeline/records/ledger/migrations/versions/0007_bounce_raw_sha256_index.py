"""index bounces by the raw report's sha256: the bounces stage asks whether a report is known

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = '0007'
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('bounces') as batch:
        batch.create_index('ix_bounces_raw_sha256', ['raw_sha256'])


def downgrade() -> None:
    with op.batch_alter_table('bounces') as batch:
        batch.drop_index('ix_bounces_raw_sha256')
