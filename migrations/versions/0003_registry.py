"""registry: predictor status and data snapshot, training tasks, active onboarding

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 11:44:05.342075
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

PENDING_READAPT = sa.text("status = 'queued' AND kind = 'adapt' AND onboarding_id IS NULL")


def upgrade() -> None:
    op.create_table('training_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('pretrain', 'adapt', name='taskkind', native_enum=False, length=16), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='taskstatus', native_enum=False, length=16), nullable=False),
    sa.Column('space_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=True),
    sa.Column('onboarding_id', sa.Integer(), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('worker', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('predictor_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ),
    sa.ForeignKeyConstraint(['onboarding_id'], ['onboardings.id'], ),
    sa.ForeignKeyConstraint(['predictor_id'], ['predictors.id'], ),
    sa.ForeignKeyConstraint(['space_id'], ['search_spaces.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('training_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_training_tasks_claim', ['status', 'not_before', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_tasks_onboarding_id'), ['onboarding_id'], unique=False)
        batch_op.create_index('uq_training_tasks_pending_adapt', ['space_id', 'device_id'], unique=True, postgresql_where=PENDING_READAPT, sqlite_where=PENDING_READAPT)

    with op.batch_alter_table('onboardings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('preset', sa.String(length=16), nullable=False, server_default='standard'))
        batch_op.add_column(sa.Column('budget', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('target_uncertainty', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('rounds', sa.JSON(), nullable=False, server_default='[]'))

    with op.batch_alter_table('predictors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.Enum('ready', 'stale', name='predictorstatus', native_enum=False, length=16), nullable=False, server_default='ready'))
        batch_op.add_column(sa.Column('data_snapshot', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.create_index('ix_predictors_device_space', ['device_id', 'space_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('predictors', schema=None) as batch_op:
        batch_op.drop_index('ix_predictors_device_space')
        batch_op.drop_column('data_snapshot')
        batch_op.drop_column('status')

    with op.batch_alter_table('onboardings', schema=None) as batch_op:
        batch_op.drop_column('rounds')
        batch_op.drop_column('target_uncertainty')
        batch_op.drop_column('budget')
        batch_op.drop_column('preset')

    with op.batch_alter_table('training_tasks', schema=None) as batch_op:
        batch_op.drop_index('uq_training_tasks_pending_adapt', postgresql_where=PENDING_READAPT, sqlite_where=PENDING_READAPT)
        batch_op.drop_index(batch_op.f('ix_training_tasks_onboarding_id'))
        batch_op.drop_index('ix_training_tasks_claim')

    op.drop_table('training_tasks')
