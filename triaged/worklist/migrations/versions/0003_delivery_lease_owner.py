"""deliveries: who holds the claim, so a restarted serve can resend a dead process's claims

Revision ID: 0003_delivery_lease_owner
Revises: 0002
Create Date: 2026-12-01 05:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_delivery_lease_owner"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("lease_owner")
