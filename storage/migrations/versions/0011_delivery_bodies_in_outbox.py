"""webhook_deliveries.outbox_id: a delivery names its event's outbox row, not a copy of it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A delivery carried its own copy of the event's body (~3.3 KB for a conflict), one
per endpoint, written at fan-out and rewritten whole by every claim that only set
its lease: measured on the delivery benchmark, a claim of 64 such rows took 3.4 ms
against 1.0 with small rows (docs/benchmarks.md). The event's outbox row already
holds its payload; a delivery now names that row, and the outbox's cleanup keeps a
row while a delivery names it.

The upgrade gives each event that deliveries wait for an outbox row again (the one
it was fanned out from may have been cleaned up since): its payload is the `data`
of the stored body, byte for byte. It is set-based, with a temporary index: 50,000
waiting events of two deliveries each took 6 s on SQLite (a statement per event,
matched by a scan, had not finished in ten minutes).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_deliveries = sa.table(
    "webhook_deliveries",
    sa.column("id", sa.BigInteger),
    sa.column("outbox_id", sa.BigInteger),
    sa.column("event_id", sa.String),
    sa.column("event_type", sa.String),
    sa.column("body", sa.LargeBinary),
    sa.column("created_at", sa.BigInteger),
)
_outbox = sa.table(
    "outbox",
    sa.column("id", sa.BigInteger),
    sa.column("channel", sa.String),
    sa.column("topic", sa.String),
    sa.column("event_type", sa.String),
    sa.column("payload", sa.LargeBinary),
    sa.column("qos", sa.Integer),
    sa.column("retain", sa.Integer),
    sa.column("created_at", sa.BigInteger),
    sa.column("attempts", sa.Integer),
    sa.column("sent_at", sa.BigInteger),
)


def upgrade() -> None:
    op.add_column("webhook_deliveries", sa.Column("outbox_id", sa.BigInteger, nullable=True))
    conn = op.get_bind()
    # Set-based, for a database with many deliveries waiting (an endpoint down for
    # hours): each event's row is written with its event id in `topic` (a webhook row
    # has none), the deliveries find theirs through it, and the marks go again.
    op.create_index("ix_tmp_0011_outbox_topic", "outbox", ["channel", "topic"])
    first = (
        sa.select(sa.func.min(_deliveries.c.id)).group_by(_deliveries.c.event_id).scalar_subquery()
    )
    events = conn.execute(
        sa.select(
            _deliveries.c.event_id,
            _deliveries.c.event_type,
            _deliveries.c.body,
            _deliveries.c.created_at,
        ).where(_deliveries.c.id.in_(first))
    )
    while page := events.fetchmany(1000):
        conn.execute(
            sa.insert(_outbox),
            [
                {
                    "channel": "webhook",
                    "topic": event_id,
                    "event_type": event_type,
                    # the stored body's `data`, as its bytes: the payload it was made from
                    "payload": bytes(
                        msgspec.json.decode(body, type=dict[str, msgspec.Raw])["data"]
                    ),
                    "qos": 1,
                    "retain": 0,
                    "created_at": created_at,
                    "attempts": 0,
                    "sent_at": created_at,
                }
                for event_id, event_type, body, created_at in page
            ],
        )
    conn.execute(
        sa.update(_deliveries).values(
            outbox_id=sa.select(_outbox.c.id)
            .where(_outbox.c.channel == "webhook", _outbox.c.topic == _deliveries.c.event_id)
            .scalar_subquery()
        )
    )
    conn.execute(
        sa.update(_outbox)
        .where(_outbox.c.channel == "webhook", _outbox.c.topic.is_not(None))
        .values(topic=None)
    )
    op.drop_index("ix_tmp_0011_outbox_topic", "outbox")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.alter_column("outbox_id", existing_type=sa.BigInteger, nullable=False)
        batch.drop_column("body")
        batch.drop_column("event_type")
        batch.drop_column("created_at")
        batch.create_index("ix_webhook_deliveries_outbox_id", ["outbox_id"])


def downgrade() -> None:
    from handlers.webhooks import body  # the body as the sender makes it

    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("event_type", sa.String(64), nullable=True))
        batch.add_column(sa.Column("body", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("created_at", sa.BigInteger, nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(
            _outbox.c.id, _outbox.c.event_type, _outbox.c.payload, _outbox.c.created_at
        ).where(_outbox.c.id.in_(sa.select(_deliveries.c.outbox_id).distinct()))
    ).all()
    for outbox_id, event_type, payload, created_at in rows:
        conn.execute(
            sa.update(_deliveries)
            .where(_deliveries.c.outbox_id == outbox_id)
            .values(
                event_type=event_type,
                body=body(event_type, created_at, payload),
                created_at=created_at,
            )
        )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_outbox_id")
        batch.alter_column("event_type", existing_type=sa.String(64), nullable=False)
        batch.alter_column("body", existing_type=sa.LargeBinary, nullable=False)
        batch.alter_column("created_at", existing_type=sa.BigInteger, nullable=False)
        batch.drop_column("outbox_id")
