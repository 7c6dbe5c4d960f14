"""short measurements are valid: `short` marks the fastest models, not a doubtful median

Measurements flagged `short` alone, with at least their preset's minimum of runs, are trained on
and reused from now on (`agent.quality.trusted`); those stored before were marked invalid. The
presets' minimum runs are written out here as they were at this revision.

Revision ID: 0007_short_valid
Revises: 0006_collections
Create Date: 2026-12-07 03:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0007_short_valid'
down_revision = '0006_collections'
branch_labels = None
depends_on = None

MIN_RUNS = {"quick": 15, "standard": 30, "rigorous": 200}
measurements = sa.table("measurements", sa.column("id", sa.BigInteger), sa.column("flags", sa.JSON),
                        sa.column("stats", sa.JSON), sa.column("preset", sa.String), sa.column("valid", sa.Boolean))


def _short_only(valid: bool) -> list[int]:
    rows = op.get_bind().execute(sa.select(measurements.c.id, measurements.c.flags, measurements.c.stats,
                                           measurements.c.preset).where(measurements.c.valid == valid))
    return [id_ for id_, flags, stats, preset in rows
            if flags == ["short"] and (stats or {}).get("n", 0) >= MIN_RUNS.get(preset or "", float("inf"))]


def _set_valid(ids: list[int], valid: bool) -> None:
    for start in range(0, len(ids), 1000):
        op.execute(measurements.update().where(measurements.c.id.in_(ids[start:start + 1000])).values(valid=valid))


def upgrade() -> None:
    _set_valid(_short_only(valid=False), True)


def downgrade() -> None:
    _set_valid(_short_only(valid=True), False)
