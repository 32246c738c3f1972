"""entities: how far conflict detection has judged each entity's operations

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

Conflict detection runs after the ack, from the committed log
(docs/decisions/0018-detection-after-the-ack.md): each entity row records the
version up to which its operations were judged, and a partial index finds the
entities whose operations wait. Every operation stored before this revision was
judged in the transaction that stored it, so the column starts at the version.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNDETECTED = sa.text("version > detected_version")


def upgrade() -> None:
    op.add_column(
        "entities",
        sa.Column("detected_version", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE entities SET detected_version = version")
    op.create_index(
        "ix_entities_undetected",
        "entities",
        ["entity_type", "entity_id"],
        sqlite_where=_UNDETECTED,
        postgresql_where=_UNDETECTED,
    )


def downgrade() -> None:
    op.drop_index("ix_entities_undetected", table_name="entities")
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("detected_version")
