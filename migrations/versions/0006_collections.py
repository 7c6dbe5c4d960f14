"""collections: named sets of uploaded ONNX models; onboardings of a collection

Revision ID: 0006_collections
Revises: 0005
Create Date: 2026-12-01 21:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0006_collections'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('collections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('collection_members',
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['artifact_sha256'], ['artifacts.sha256'], ),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('collection_id', 'artifact_sha256')
    )
    with op.batch_alter_table('onboardings') as batch:
        batch.add_column(sa.Column('collection_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_onboardings_collection_id', 'collections', ['collection_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('onboardings') as batch:
        batch.drop_constraint('fk_onboardings_collection_id', type_='foreignkey')
        batch.drop_column('collection_id')
    op.drop_table('collection_members')
    op.drop_table('collections')
