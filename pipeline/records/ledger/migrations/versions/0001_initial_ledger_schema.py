"""initial ledger schema

Revision ID: 0001
Revises: 
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    
    op.create_table('audit_events',
    sa.Column('event_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('action', sa.String(length=60), nullable=False),
    sa.Column('entity_kind', sa.String(length=20), nullable=False),
    sa.Column('entity_id', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    op.create_table('runs',
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('drop', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('run_id')
    )
    op.create_table('state_transitions',
    sa.Column('transition_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('entity_kind', sa.String(length=10), nullable=False),
    sa.Column('entity_id', sa.String(length=40), nullable=False),
    sa.Column('from_state', sa.String(length=30), nullable=False),
    sa.Column('to_state', sa.String(length=30), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('transition_id')
    )
    with op.batch_alter_table('state_transitions', schema=None) as batch_op:
        batch_op.create_index('ix_state_transitions_entity', ['entity_kind', 'entity_id'], unique=False)

    op.create_table('input_files',
    sa.Column('file_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('file_name', sa.Text(), nullable=False),
    sa.Column('insurer', sa.String(length=100), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('rows_in', sa.Integer(), nullable=True),
    sa.Column('rows_accepted', sa.Integer(), nullable=True),
    sa.Column('rows_quarantined', sa.Integer(), nullable=True),
    sa.Column('rejection_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ),
    sa.PrimaryKeyConstraint('file_id'),
    sa.UniqueConstraint('sha256')
    )
    op.create_table('statements',
    sa.Column('statement_id', sa.String(length=40), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('file_id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.String(length=100), nullable=False),
    sa.Column('channel', sa.String(length=10), nullable=False),
    sa.Column('email', sa.Text(), nullable=True),
    sa.Column('claim_lines', sa.Integer(), nullable=False),
    sa.Column('member_owes', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('pdf_path', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['file_id'], ['input_files.file_id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ),
    sa.PrimaryKeyConstraint('statement_id')
    )
    with op.batch_alter_table('statements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_statements_run_id'), ['run_id'], unique=False)

    op.create_table('resend_cases',
    sa.Column('case_id', sa.String(length=40), nullable=False),
    sa.Column('message_id', sa.String(length=40), nullable=False),
    sa.Column('statement_id', sa.String(length=40), nullable=False),
    sa.Column('state', sa.String(length=30), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['statement_id'], ['statements.statement_id'], ),
    sa.PrimaryKeyConstraint('case_id'),
    sa.UniqueConstraint('message_id')
    )
    with op.batch_alter_table('resend_cases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_resend_cases_state'), ['state'], unique=False)

    op.create_table('messages',
    sa.Column('message_id', sa.String(length=40), nullable=False),
    sa.Column('statement_id', sa.String(length=40), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.String(length=40), nullable=True),
    sa.Column('recipient', sa.Text(), nullable=False),
    sa.Column('source_ip', sa.String(length=45), nullable=False),
    sa.Column('ehlo_name', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('smtp_code', sa.Integer(), nullable=True),
    sa.Column('smtp_reply', sa.Text(), nullable=True),
    sa.Column('possible_duplicate', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['resend_cases.case_id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ),
    sa.ForeignKeyConstraint(['statement_id'], ['statements.statement_id'], ),
    sa.PrimaryKeyConstraint('message_id'),
    sa.UniqueConstraint('statement_id', 'attempt')
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_state'), ['state'], unique=False)

    # resend_cases and messages refer to each other: this key is added once both exist.
    with op.batch_alter_table('resend_cases', schema=None) as batch_op:
        batch_op.create_foreign_key(
            'fk_resend_cases_message_id', 'messages', ['message_id'], ['message_id']
        )

    op.create_table('bounces',
    sa.Column('bounce_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('dedupe_key', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=40), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('bounce_class', sa.String(length=20), nullable=False),
    sa.Column('status_code', sa.String(length=16), nullable=True),
    sa.Column('diagnostic', sa.Text(), nullable=True),
    sa.Column('recipient', sa.Text(), nullable=True),
    sa.Column('reconciled', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.message_id'], ),
    sa.PrimaryKeyConstraint('bounce_id'),
    sa.UniqueConstraint('dedupe_key')
    )
    with op.batch_alter_table('bounces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bounces_message_id'), ['message_id'], unique=False)

    op.create_table('suppressions',
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('reason', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('bounce_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['bounce_id'], ['bounces.bounce_id'], ),
    sa.PrimaryKeyConstraint('address')
    )
    


def downgrade() -> None:
    
    op.drop_table('suppressions')
    with op.batch_alter_table('bounces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bounces_message_id'))

    op.drop_table('bounces')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_state'))
        batch_op.drop_index(batch_op.f('ix_messages_run_id'))

    with op.batch_alter_table('resend_cases', schema=None) as batch_op:
        batch_op.drop_constraint('fk_resend_cases_message_id', type_='foreignkey')
    op.drop_table('messages')
    with op.batch_alter_table('resend_cases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_resend_cases_state'))

    op.drop_table('resend_cases')
    with op.batch_alter_table('statements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_statements_run_id'))

    op.drop_table('statements')
    op.drop_table('input_files')
    with op.batch_alter_table('state_transitions', schema=None) as batch_op:
        batch_op.drop_index('ix_state_transitions_entity')

    op.drop_table('state_transitions')
    op.drop_table('runs')
    op.drop_table('audit_events')
    
