"""bounce reconciliation, verify-before-resend cases, incidents, alerts, console users

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('bounces') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=20), nullable=False, server_default='dsn'))
        batch.add_column(sa.Column('matched_by', sa.String(length=20), nullable=False, server_default='none'))
        batch.add_column(sa.Column('raw_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('resend_cases') as batch:
        batch.add_column(sa.Column('verified_channel', sa.String(length=20), nullable=True))
        batch.add_column(sa.Column('verified_evidence', sa.Text(), nullable=True))
        batch.add_column(sa.Column('verified_by', sa.String(length=100), nullable=True))
        batch.add_column(sa.Column('verified_at', TZ, nullable=True))
        batch.add_column(sa.Column('verified_address', sa.Text(), nullable=True))
        batch.add_column(sa.Column('approved_by', sa.String(length=100), nullable=True))
        batch.add_column(sa.Column('approved_at', TZ, nullable=True))
        batch.add_column(sa.Column('failures', sa.Integer(), nullable=False, server_default='1'))
    op.create_table('incidents',
    sa.Column('incident_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('case_id', sa.String(length=40), nullable=True),
    sa.Column('message_id', sa.String(length=40), nullable=False),
    sa.Column('opened_at', TZ, nullable=False),
    sa.Column('due_at', TZ, nullable=False),
    sa.Column('opened_by', sa.String(length=100), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('closed_at', TZ, nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['resend_cases.case_id'], ),
    sa.ForeignKeyConstraint(['message_id'], ['messages.message_id'], ),
    sa.PrimaryKeyConstraint('incident_id')
    )
    op.create_table('deliverability_alerts',
    sa.Column('alert_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=30), nullable=False),
    sa.Column('source_ip', sa.String(length=45), nullable=False),
    sa.Column('provider', sa.String(length=255), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('rate', sa.Float(), nullable=True),
    sa.Column('opened_at', TZ, nullable=False),
    sa.Column('acknowledged_by', sa.String(length=100), nullable=True),
    sa.Column('acknowledged_at', TZ, nullable=True),
    sa.PrimaryKeyConstraint('alert_id'),
    sa.UniqueConstraint('kind', 'source_ip', 'provider', 'opened_at')
    )
    op.create_table('console_users',
    sa.Column('username', sa.String(length=100), nullable=False),
    sa.Column('password_hash', sa.Text(), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('created_at', TZ, nullable=False),
    sa.PrimaryKeyConstraint('username')
    )


def downgrade() -> None:
    op.drop_table('console_users')
    op.drop_table('deliverability_alerts')
    op.drop_table('incidents')
    with op.batch_alter_table('resend_cases') as batch:
        for name in ('failures', 'approved_at', 'approved_by', 'verified_address', 'verified_at',
                     'verified_by', 'verified_evidence', 'verified_channel'):
            batch.drop_column(name)
    with op.batch_alter_table('bounces') as batch:
        for name in ('raw_sha256', 'matched_by', 'kind'):
            batch.drop_column(name)
