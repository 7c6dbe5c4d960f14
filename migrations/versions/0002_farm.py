"""farm: client tokens, many agents per device, canary health, job kinds, deadlines, dedup

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 05:16:20.828542
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table('client_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('agent_devices',
    sa.Column('agent_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['agent_id'], ['agents.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('agent_id', 'device_id')
    )
    op.create_index('ix_agent_devices_device_id', 'agent_devices', ['device_id'], unique=False)
    op.execute("INSERT INTO agent_devices (agent_id, device_id) "
               "SELECT agent_id, id FROM devices WHERE agent_id IS NOT NULL")

    if not sqlite:  # SQLite's batch mode rebuilds the table without it
        op.drop_constraint('devices_agent_id_fkey', 'devices', type_='foreignkey')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('canary_baseline_ms', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('canary_last_ms', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('jobs_since_canary', sa.Integer(), nullable=False, server_default='0'))
        batch_op.drop_column('agent_id')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.Enum('measure', 'canary', name='jobkind', native_enum=False, length=16), nullable=False, server_default='measure'))
        batch_op.add_column(sa.Column('selector', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('force', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('run_timeout_s', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('measurement_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))
        batch_op.add_column(sa.Column('reused', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.alter_column('device_id', existing_type=sa.INTEGER(), nullable=True)
        batch_op.create_index('uq_jobs_running_device', ['device_id'], unique=True, postgresql_where=RUNNING, sqlite_where=RUNNING)
        batch_op.create_foreign_key('fk_jobs_measurement_id', 'measurements', ['measurement_id'], ['id'])

    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('valid', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column('preset', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('protocol_version', sa.Integer(), nullable=True))
        batch_op.create_index('ix_measurements_device_artifact', ['device_id', 'artifact_sha256'], unique=False)

    # measurements taken before this revision: protocol 1, their job's preset, valid unless flagged
    op.execute("UPDATE jobs SET measurement_id = (SELECT m.id FROM measurements m WHERE m.job_id = jobs.id)")
    op.execute("UPDATE measurements SET protocol_version = 1, "
               "preset = (SELECT j.preset FROM jobs j WHERE j.id = measurements.job_id) WHERE job_id IS NOT NULL")
    flags = "flags" if sqlite else "CAST(flags AS TEXT)"
    op.execute(f"UPDATE measurements SET valid = {'0' if sqlite else 'false'} "
               f"WHERE flags IS NOT NULL AND {flags} NOT IN ('[]', 'null')")


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.drop_index('ix_measurements_device_artifact')
        batch_op.drop_column('protocol_version')
        batch_op.drop_column('preset')
        batch_op.drop_column('valid')

    op.execute("DELETE FROM jobs WHERE device_id IS NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_measurement_id', type_='foreignkey')
        batch_op.drop_index('uq_jobs_running_device', postgresql_where=RUNNING, sqlite_where=RUNNING)
        batch_op.alter_column('device_id', existing_type=sa.INTEGER(), nullable=False)
        batch_op.drop_column('reused')
        batch_op.drop_column('measurement_id')
        batch_op.drop_column('run_timeout_s')
        batch_op.drop_column('deadline_at')
        batch_op.drop_column('force')
        batch_op.drop_column('selector')
        batch_op.drop_column('kind')

    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_id', sa.INTEGER(), nullable=True))
        batch_op.create_foreign_key('fk_devices_agent_id' if sqlite else 'devices_agent_id_fkey', 'agents', ['agent_id'], ['id'])
        batch_op.drop_column('jobs_since_canary')
        batch_op.drop_column('canary_last_ms')
        batch_op.drop_column('canary_baseline_ms')
        batch_op.drop_column('state_reason')
    op.execute("UPDATE devices SET agent_id = (SELECT MAX(ad.agent_id) FROM agent_devices ad WHERE ad.device_id = devices.id)")

    op.drop_index('ix_agent_devices_device_id', table_name='agent_devices')
    op.drop_table('agent_devices')
    op.drop_table('client_tokens')
