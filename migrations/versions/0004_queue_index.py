"""queue index: each device's queued jobs in claim order

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 15:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.create_index('ix_jobs_queue', 'jobs', ['device_id', sa.text('priority DESC'), 'id'], unique=False,
                    postgresql_where=QUEUED, sqlite_where=QUEUED)


def downgrade() -> None:
    op.drop_index('ix_jobs_queue', table_name='jobs', postgresql_where=QUEUED, sqlite_where=QUEUED)
