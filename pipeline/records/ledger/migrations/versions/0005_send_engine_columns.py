"""send engine: provider, send day, retry schedule and try count on messages

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('provider', sa.String(length=20), nullable=True))
        batch.add_column(sa.Column('send_day', sa.Date(), nullable=True))
        batch.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('tries', sa.Integer(), server_default='0', nullable=False))
        batch.create_index('ix_messages_send_day', ['send_day'])


def downgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.drop_index('ix_messages_send_day')
        batch.drop_column('tries')
        batch.drop_column('next_attempt_at')
        batch.drop_column('send_day')
        batch.drop_column('provider')
