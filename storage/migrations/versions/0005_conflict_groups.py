"""conflicts v2: one record per group of colliding operations, members, window summaries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

The v1 pair records become v2 groups (storage/conflicts_v1.py says how an
operator's resolution is kept). The downgrade restores v1's empty pair table:
pairs cannot be derived back from groups without judging the log again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from alembic import op

from handlers.times import HOUR_US
from storage import conflicts_v1, sync_log

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

V1_INDEXES = {
    "ix_conflicts_status_id": ["status", "id"],
    "ix_conflicts_entity_type_entity_id_id": ["entity_type", "entity_id", "id"],
    "ix_conflicts_detected_at": ["detected_at"],
}
V2_INDEXES = {
    "ix_conflicts_status_id": ["status", "id"],
    "ix_conflicts_severity_id": ["severity", "id"],
    "ix_conflicts_entity_type_entity_id_id": ["entity_type", "entity_id", "id"],
    "ix_conflicts_detected_at": ["detected_at"],
    "ix_conflicts_merged_into": ["merged_into"],
}
MEMBER_INDEXES = {
    "ix_conflict_members_conflict_id_version": ["conflict_id", "version"],
    "ix_conflict_members_device_id_conflict_id": ["device_id", "conflict_id"],
    "ix_conflict_members_user_id": ["user_id"],
}

_encode = msgspec.json.Encoder().encode


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("prev_max_edited_at")
        batch.add_column(sa.Column("delete_max_edited_at", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("summary_from", sa.BigInteger, nullable=True))
    pairs = [
        conflicts_v1.V1Pair(
            conflict_id=row["conflict_id"],
            op_a=row["op_a"],
            op_b=row["op_b"],
            entity_type=row["entity_type"],
            entity_id=row["entity_id"],
            fields=msgspec.json.decode(row["fields"]),
            severity=row["severity"],
            strategy=row["strategy"],
            status=row["status"],
            winner_op_id=row["winner_op_id"],
            detected_at=row["detected_at"],
            resolved_at=row["resolved_at"],
            resolved_by=row["resolved_by"],
        )
        for row in bind.execute(sa.text("SELECT * FROM conflicts ORDER BY id")).mappings()
    ]
    ops = _ops(bind, {op_id for pair in pairs for op_id in (pair.op_a, pair.op_b)})
    migrated = conflicts_v1.groups(pairs, ops)
    for name in V1_INDEXES:
        op.drop_index(name, "conflicts")
    op.drop_table("conflicts")
    _create_v2()
    _fill(bind, migrated, ops)


def _ops(bind: Any, op_ids: set[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    ordered = sorted(op_ids)
    query = sa.text(
        "SELECT op_id, device_id, user_id, entity_type, entity_id, operation, changes,"
        " edited_at, version, base_version FROM sync_log WHERE op_id IN :ids"
    ).bindparams(sa.bindparam("ids", expanding=True))
    for start in range(0, len(ordered), 900):
        for row in bind.execute(query, {"ids": ordered[start : start + 900]}).mappings():
            found[row["op_id"]] = sync_log.op_view(row)
    return found


def _create_v2() -> None:
    op.create_table(
        "conflicts",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("conflict_id", sa.String(36), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("strategy", sa.String(24), nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("winners", sa.Text, nullable=False),
        sa.Column("member_count", sa.BigInteger, nullable=False),
        sa.Column("device_ids", sa.Text, nullable=False),
        sa.Column("user_ids", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("detected_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("resolved_at", sa.BigInteger, nullable=True),
        sa.Column("resolved_by", sa.String(128), nullable=True),
        sa.Column("merged_into", sa.String(36), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conflicts"),
        sa.UniqueConstraint("conflict_id", name="uq_conflicts_conflict_id"),
    )
    for name, columns in V2_INDEXES.items():
        op.create_index(name, "conflicts", columns)
    op.create_table(
        "conflict_members",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("op_id", sa.String(64), nullable=False),
        sa.Column("conflict_id", sa.String(36), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("joined_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conflict_members"),
        sa.UniqueConstraint("op_id", name="uq_conflict_members_op_id"),
    )
    for name, columns in MEMBER_INDEXES.items():
        op.create_index(name, "conflict_members", columns)
    op.create_table(
        "conflict_windows",
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", name="pk_conflict_windows"),
    )
    op.create_table(
        "conflict_totals",
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_conflict_totals"),
    )
    op.create_table(
        "op_counts",
        sa.Column("hour", sa.BigInteger, nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("ops", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("hour", "entity_type", name="pk_op_counts"),
    )


def _fill(bind: Any, migrated: list[conflicts_v1.Migrated], ops: dict[str, Any]) -> None:
    conflicts = sa.table(
        "conflicts",
        *(
            sa.column(name)
            for name in (
                "conflict_id",
                "entity_type",
                "entity_id",
                "status",
                "severity",
                "strategy",
                "fields",
                "winners",
                "member_count",
                "device_ids",
                "user_ids",
                "state",
                "detected_at",
                "updated_at",
                "resolved_at",
                "resolved_by",
                "merged_into",
                "note",
            )
        ),
    )
    members = sa.table(
        "conflict_members",
        *(
            sa.column(name)
            for name in (
                "op_id",
                "conflict_id",
                "entity_type",
                "entity_id",
                "device_id",
                "user_id",
                "version",
                "joined_at",
            )
        ),
    )
    rows = [
        {
            "conflict_id": m.conflict_id,
            "entity_type": m.entity_type,
            "entity_id": m.entity_id,
            "status": m.status,
            "severity": m.group.severity,
            "strategy": m.strategy,
            "fields": _encode(m.group.fields).decode(),
            "winners": _encode(m.winners).decode(),
            "member_count": m.group.member_count,
            "device_ids": _encode(m.group.device_ids).decode(),
            "user_ids": _encode(m.group.user_ids).decode(),
            "state": _encode(m.group).decode(),
            "detected_at": m.detected_at,
            "updated_at": m.updated_at,
            "resolved_at": m.resolved_at,
            "resolved_by": m.resolved_by,
            "merged_into": None,
            "note": m.note,
        }
        for m in migrated
    ]
    if rows:
        op.bulk_insert(conflicts, rows)
    joined = [
        {
            "op_id": op_id,
            "conflict_id": m.conflict_id,
            "entity_type": m.entity_type,
            "entity_id": m.entity_id,
            "device_id": ops[op_id].device_id,
            "user_id": ops[op_id].user_id,
            "version": ops[op_id].version,
            "joined_at": m.detected_at,
        }
        for m in migrated
        for op_id in m.members
    ]
    if joined:
        op.bulk_insert(members, joined)
    totals = conflicts_v1.severity_counts(migrated)
    totals["members"] = len(joined)
    op.bulk_insert(
        sa.table("conflict_totals", sa.column("key"), sa.column("n")),
        [{"key": key, "n": n} for key, n in sorted(totals.items())],
    )
    # The users' counters count their operations in a conflict now, not pairs.
    bind.execute(sa.text("UPDATE user_counters SET conflicts = 0"))
    per_user: dict[str, int] = {}
    for member in joined:
        per_user[member["user_id"]] = per_user.get(member["user_id"], 0) + 1
    if per_user:
        bind.execute(
            sa.text("UPDATE user_counters SET conflicts = :n WHERE user_id = :u"),
            [{"u": user, "n": n} for user, n in sorted(per_user.items())],
        )
    hour = sa.bindparam("hour", HOUR_US, type_=sa.BigInteger)
    bind.execute(
        sa.text(
            "INSERT INTO op_counts (hour, entity_type, ops)"
            " SELECT received_at / :hour * :hour, entity_type, count(*)"
            " FROM sync_log GROUP BY received_at / :hour * :hour, entity_type"
        ).bindparams(hour)
    )
    bind.execute(
        sa.text(
            "UPDATE entities SET delete_max_edited_at = (SELECT max(s.edited_at) FROM sync_log s"
            " WHERE s.entity_type = entities.entity_type AND s.entity_id = entities.entity_id"
            " AND s.operation = 'delete')"
        )
    )


def downgrade() -> None:
    for table in ("op_counts", "conflict_totals", "conflict_windows"):
        op.drop_table(table)
    for name in MEMBER_INDEXES:
        op.drop_index(name, "conflict_members")
    op.drop_table("conflict_members")
    for name in V2_INDEXES:
        op.drop_index(name, "conflicts")
    op.drop_table("conflicts")
    op.create_table(
        "conflicts",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("conflict_id", sa.String(36), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("op_a", sa.String(64), nullable=False),
        sa.Column("op_b", sa.String(64), nullable=False),
        sa.Column("device_a", sa.String(64), nullable=False),
        sa.Column("device_b", sa.String(64), nullable=False),
        sa.Column("user_a", sa.String(64), nullable=False),
        sa.Column("user_b", sa.String(64), nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("field_values", sa.Text, nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("strategy", sa.String(24), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("winner_op_id", sa.String(64), nullable=True),
        sa.Column("detected_at", sa.BigInteger, nullable=False),
        sa.Column("resolved_at", sa.BigInteger, nullable=True),
        sa.Column("resolved_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conflicts"),
        sa.UniqueConstraint("conflict_id", name="uq_conflicts_conflict_id"),
        sa.UniqueConstraint("op_a", "op_b", name="uq_conflicts_op_a_op_b"),
    )
    for name, columns in V1_INDEXES.items():
        op.create_index(name, "conflicts", columns)
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("summary_from")
        batch.drop_column("delete_max_edited_at")
        batch.add_column(sa.Column("prev_max_edited_at", sa.BigInteger, nullable=True))
