"""Storing alerts, and everything they cause, in the writer's transaction.

- Idempotent by `alert_id`: a duplicate is answered with the stored classification.
- The history rule `sustained_low_mood` is computed from stored rows, after an
  upsert on the user's `alert_users` row: that row lock serializes the users'
  low-mood entries across connections and instances (on PostgreSQL, two entries
  stored at once cannot both miss "the third"), and the count that follows it
  sees every entry committed before.
- A crisis gets its escalation schedule (`next_escalation_at`) and its outbox rows
  (`<root>/alerts/crisis` and the webhook event `alert.crisis`) in the same
  transaction; escalations are claimed by compare-and-set on the escalation count
  (`escalate_due`), so a second instance or a restart neither doubles nor skips one.
- A wellness alert notifies at most once per user and reason per cooldown: an
  atomic conditional upsert on `wellness_cooldowns` decides, and only then is the
  outbox row written.

Nothing written to the outbox carries `note` or any free text of the device.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import and_, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.alerts import (
    CRISIS,
    LOW_MOOD,
    SUSTAINED_LOW_MOOD,
    WELLNESS,
    AlertNotices,
    CrisisFacts,
    notification_id,
)
from handlers.records import AlertRecord, CrisisAckRecord, OutboxRecord
from handlers.times import DAY_US, now_us
from storage import outbox
from storage.db import chunks, upsert_into
from storage.schema import alert_users, alerts, wellness_cooldowns
from storage.writer import CANARY, Step, Written

_encode = msgspec.json.Encoder().encode


class AlertPolicy(msgspec.Struct, frozen=True):
    """What the writer needs of `[alerts]`, with PROTOCOL.md's defaults."""

    low_mood_max: int = 4
    sustained_entries: int = 3
    sustained_window_us: int = 7 * DAY_US
    escalate_after_us: int = 300_000_000
    max_escalations: int = 3
    wellness_cooldown_us: int = DAY_US


class AlertStep(Step):
    """Alerts in the writer's transaction: stored, classified with their history, and
    what they cause written to the outbox. `policy` and `notices` follow reloads."""

    record_type = AlertRecord
    urgent = True
    name = "alerts"

    def __init__(self, policy: AlertPolicy, notices: AlertNotices) -> None:
        self.policy = policy
        self.notices = notices

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        return Written(await store_alerts(conn, records, now_us, self.policy, self.notices))

    def canary(self) -> AlertRecord:
        """A check-in of plain ASCII values from a device and user no one has."""
        now = now_us()
        return AlertRecord(
            alert_id=f"{CANARY}-{uuid.uuid4().hex}",
            device_id=CANARY,
            user_id=CANARY,
            kind="checkin",
            occurred_at_us=now,
            received_at_us=now,
        )

    def reset(self, records: Sequence[AlertRecord]) -> None:
        for record in records:
            record.status = "pending"
            record.classification = None
            record.reasons = []
            record.notified = None


class CrisisAckStep(Step):
    """Operators' acknowledgements of crisis alerts (from the topic or the admin command)."""

    record_type = CrisisAckRecord
    name = "crisis_acks"
    urgent = True

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        await acknowledge(conn, records, now_us)
        return Written()

    def reset(self, records: Sequence[CrisisAckRecord]) -> None:
        for ack in records:
            ack.outcome = "pending"
            ack.acknowledged_at_us = None
            ack.acknowledged_by = None


# -- intake ------------------------------------------------------------------


async def store_alerts(
    conn: AsyncConnection,
    records: Sequence[AlertRecord],
    now_us: int,
    policy: AlertPolicy,
    notices: AlertNotices,
) -> list[OutboxRecord]:
    """Store new alerts, classify them fully, and return the outbox rows they cause."""
    if not records:
        return []
    known = await _stored(conn, {r.alert_id for r in records})
    first: dict[str, AlertRecord] = {}
    new: list[AlertRecord] = []
    for record in records:
        if record.alert_id in known:
            record.status = "duplicate"
            record.classification, record.reasons = known[record.alert_id]
        elif record.alert_id in first:
            record.status = "duplicate"
        else:
            first[record.alert_id] = record
            new.append(record)
    out: list[OutboxRecord] = []
    if new:
        await _lock_users(conn, sorted({r.user_id for r in new if _history_candidate(r)}), now_us)
        for record in new:
            # One by one, in arrival order: the count of an entry includes the entries
            # of the same user stored just before it in this very batch.
            await _classify_with_history(conn, record, policy)
            notified: str | None = None
            if record.classification == CRISIS:
                facts = _crisis_facts(record, now_us)
                out.extend(notices.crisis(facts, 0, record.received_at_us))
            elif record.classification == WELLNESS:
                notified, rows = await _notify(conn, record, now_us, policy, notices)
                out.extend(rows)
            await conn.execute(alerts.insert(), [_row(record, now_us, policy, notified)])
            record.status = "stored"
    for record in records:
        if record.status == "duplicate" and record.classification is None:
            original = first[record.alert_id]
            record.classification, record.reasons = original.classification, original.reasons
    return out


def _history_candidate(record: AlertRecord) -> bool:
    return record.low_mood_journal and record.base_classification != CRISIS


async def _stored(conn: AsyncConnection, alert_ids: set[str]) -> dict[str, tuple[str, list[str]]]:
    found: dict[str, tuple[str, list[str]]] = {}
    for part in chunks(sorted(alert_ids)):
        result = await conn.execute(
            select(alerts.c.alert_id, alerts.c.classification, alerts.c.reasons).where(
                alerts.c.alert_id.in_(part)
            )
        )
        for alert_id, classification, reasons in result:
            found[alert_id] = (classification, msgspec.json.decode(reasons, type=list[str]))
    return found


async def _lock_users(conn: AsyncConnection, user_ids: list[str], now_us: int) -> None:
    """Take each user's row lock (sorted: two instances cannot deadlock) before counting."""
    for part in chunks(user_ids):
        base = upsert_into(conn.dialect.name, alert_users)
        stmt = base.on_conflict_do_update(
            index_elements=[alert_users.c.user_id],
            set_={"updated_at": base.excluded.updated_at},
        )
        await conn.execute(stmt, [{"user_id": user_id, "updated_at": now_us} for user_id in part])


async def _classify_with_history(
    conn: AsyncConnection, record: AlertRecord, policy: AlertPolicy
) -> None:
    """The base classification, raised to `sustained_low_mood` when this low-mood journal
    entry makes the user's third (or later) one within 7 days.

    Precisely: some window `(x - 7 days, x]` that contains this entry's `occurred_at`
    holds at least 3 of the user's stored low-mood journal entries, this one included.
    Devices deliver offline backlogs late and out of order; counting only the entries
    that occurred before this one would let the rule miss a pattern whose entries
    arrived newest first. With this definition the entry that completes the pattern,
    in whatever order they arrive, is the one that triggers.
    """
    record.classification = record.base_classification
    record.reasons = list(record.base_reasons)
    if not _history_candidate(record):
        return
    window = policy.sustained_window_us
    at = record.occurred_at_us
    found = await conn.execute(
        select(alerts.c.occurred_at).where(
            alerts.c.user_id == record.user_id,
            alerts.c.kind == "journal",
            alerts.c.mood <= policy.low_mood_max,
            alerts.c.occurred_at > at - window,
            alerts.c.occurred_at < at + window,
        )
    )
    if sustained([at, *(t for (t,) in found)], at, window, policy.sustained_entries):
        record.classification = WELLNESS
        record.reasons = [SUSTAINED_LOW_MOOD, *(r for r in record.reasons if r != LOW_MOOD)]


def sustained(times: list[int], at: int, window: int, entries: int) -> bool:
    """Whether a window `(x - window, x]` containing `at` holds `entries` of `times`."""
    ordered = sorted(times)
    return any(
        sum(1 for t in ordered if end - window < t <= end) >= entries
        for end in ordered
        if at <= end < at + window
    )


def _row(
    record: AlertRecord, now_us: int, policy: AlertPolicy, notification_id: str | None
) -> dict[str, Any]:
    crisis = record.classification == CRISIS
    return {
        "alert_id": record.alert_id,
        "device_id": record.device_id,
        "user_id": record.user_id,
        "kind": record.kind,
        "occurred_at": record.occurred_at_us,
        "received_at": record.received_at_us,
        "stored_at": now_us,
        "mood": record.mood,
        "stress": record.stress,
        "energy": record.energy,
        "flags": _encode(record.flags).decode(),
        "site_id": record.site_id,
        "note": record.note,
        "payload": record.payload,
        "classification": record.classification,
        "reasons": _encode(record.reasons).decode(),
        "notification_id": notification_id,
        "escalation": 0 if crisis else None,
        "next_escalation_at": (
            now_us + policy.escalate_after_us if crisis and policy.max_escalations > 0 else None
        ),
        "acknowledged_at": None,
        "acknowledged_by": None,
    }


# -- crisis --------------------------------------------------------------------


def _crisis_facts(record: AlertRecord, detected_at_us: int) -> CrisisFacts:
    return CrisisFacts(
        alert_id=record.alert_id,
        user_id=record.user_id,
        device_id=record.device_id,
        site_id=record.site_id,
        reasons=record.reasons,
        occurred_at_us=record.occurred_at_us,
        detected_at_us=detected_at_us,
    )


def _crisis_facts_of_row(row: Any) -> CrisisFacts:
    return CrisisFacts(
        alert_id=row["alert_id"],
        user_id=row["user_id"],
        device_id=row["device_id"],
        site_id=row["site_id"],
        reasons=msgspec.json.decode(row["reasons"], type=list[str]),
        occurred_at_us=row["occurred_at"],
        detected_at_us=row["stored_at"],
    )


async def acknowledge(conn: AsyncConnection, acks: Sequence[CrisisAckRecord], now_us: int) -> None:
    """Set `acknowledged_at/by` once per crisis; an unknown or repeated ack changes nothing."""
    for ack in acks:
        result = await conn.execute(
            update(alerts)
            .where(
                alerts.c.alert_id == ack.alert_id,
                alerts.c.classification == CRISIS,
                alerts.c.acknowledged_at.is_(None),
            )
            .values(acknowledged_at=now_us, acknowledged_by=ack.by, next_escalation_at=None)
        )
        if result.rowcount == 1:
            ack.outcome = "acknowledged"
            ack.acknowledged_at_us, ack.acknowledged_by = now_us, ack.by
            continue
        found = await conn.execute(
            select(alerts.c.acknowledged_at, alerts.c.acknowledged_by).where(
                alerts.c.alert_id == ack.alert_id, alerts.c.classification == CRISIS
            )
        )
        row = found.first()
        if row is None:
            ack.outcome = "unknown"
        else:
            ack.outcome = "already_acknowledged"
            ack.acknowledged_at_us, ack.acknowledged_by = row[0], row[1]


async def escalate_due(
    conn: AsyncConnection, now_us: int, policy: AlertPolicy, notices: AlertNotices
) -> tuple[list[tuple[str, int]], list[OutboxRecord]]:
    """Escalate every unacknowledged crisis that is due; returns ((alert_id, n), rows).

    The claim is one UPDATE ... RETURNING: it bumps the escalation count by one and
    moves the due time on, atomically per row. Of two instances (or a restarted one)
    that find a crisis due at once, the second waits for the first's row lock, then
    sees it no longer due: no escalation is published twice, and since the count
    only ever grows by one, none is skipped. The outbox rows are written in the same
    transaction. The next one is due `escalate_after` after this one, up to
    `max_escalations`.
    """
    limit = policy.max_escalations
    # The limit was lowered by a reload: end those schedules quietly.
    await conn.execute(
        update(alerts)
        .where(alerts.c.next_escalation_at <= now_us, alerts.c.escalation >= limit)
        .values(next_escalation_at=None)
    )
    level = alerts.c.escalation + 1
    claimed = await conn.execute(
        update(alerts)
        .where(
            alerts.c.next_escalation_at <= now_us,
            alerts.c.acknowledged_at.is_(None),
            alerts.c.escalation < limit,
        )
        .values(
            escalation=level,
            next_escalation_at=case((level < limit, now_us + policy.escalate_after_us), else_=None),
        )
        .returning(
            alerts.c.alert_id,
            alerts.c.user_id,
            alerts.c.device_id,
            alerts.c.site_id,
            alerts.c.reasons,
            alerts.c.occurred_at,
            alerts.c.stored_at,
            alerts.c.escalation,
        )
    )
    done: list[tuple[str, int]] = []
    out: list[OutboxRecord] = []
    for row in sorted(claimed.mappings(), key=lambda r: (r["stored_at"], r["alert_id"])):
        done.append((row["alert_id"], int(row["escalation"])))
        out.extend(notices.crisis(_crisis_facts_of_row(row), int(row["escalation"])))
    await outbox.add(conn, out, now_us)
    return done, out


async def next_due(conn: AsyncConnection) -> int | None:
    result = await conn.execute(
        select(func.min(alerts.c.next_escalation_at)).where(alerts.c.acknowledged_at.is_(None))
    )
    value = result.scalar_one()
    return int(value) if value is not None else None


async def open_crises(conn: AsyncConnection) -> int:
    result = await conn.execute(
        select(func.count())
        .select_from(alerts)
        .where(and_(alerts.c.classification == CRISIS, alerts.c.acknowledged_at.is_(None)))
    )
    return int(result.scalar_one())


# -- wellness ------------------------------------------------------------------


async def _notify(
    conn: AsyncConnection,
    record: AlertRecord,
    now_us: int,
    policy: AlertPolicy,
    notices: AlertNotices,
) -> tuple[str | None, list[OutboxRecord]]:
    """A wellness notification for the alert's first reason, unless in its cooldown."""
    reason = record.reasons[0]
    base = upsert_into(conn.dialect.name, wellness_cooldowns)
    stmt = base.on_conflict_do_update(
        index_elements=[wellness_cooldowns.c.user_id, wellness_cooldowns.c.reason],
        set_={"last_sent_at": base.excluded.last_sent_at},
        where=wellness_cooldowns.c.last_sent_at <= now_us - policy.wellness_cooldown_us,
    ).returning(wellness_cooldowns.c.user_id)
    granted = await conn.execute(
        stmt, {"user_id": record.user_id, "reason": reason, "last_sent_at": now_us}
    )
    if granted.first() is None:
        return None, []
    notification = notification_id(record.alert_id, reason)
    record.notified = reason
    return notification, notices.wellness(record, reason, notification, now_us)


# -- reading (the admin commands) ----------------------------------------------

SHOWN = [column for column in alerts.c if column.name not in ("note", "payload")]
"""Every column but the person's words and the raw payload that holds them."""


async def page(
    conn: AsyncConnection,
    *,
    classification: str | None,
    acknowledged: bool | None,
    user_id: str | None,
    since_us: int | None,
    below_id: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Newest first. `acknowledged=True`: acknowledged crises; `False`: open crises."""
    query = select(*SHOWN).order_by(alerts.c.id.desc()).limit(limit)
    if below_id is not None:
        query = query.where(alerts.c.id < below_id)
    if classification is not None:
        query = query.where(alerts.c.classification == classification)
    if acknowledged is True:
        query = query.where(alerts.c.acknowledged_at.is_not(None))
    elif acknowledged is False:
        query = query.where(alerts.c.classification == CRISIS, alerts.c.acknowledged_at.is_(None))
    if user_id is not None:
        query = query.where(alerts.c.user_id == user_id)
    if since_us is not None:
        query = query.where(alerts.c.received_at >= since_us)
    return [dict(row) for row in (await conn.execute(query)).mappings()]


async def get(conn: AsyncConnection, alert_id: str) -> dict[str, Any] | None:
    result = await conn.execute(select(*SHOWN).where(alerts.c.alert_id == alert_id))
    row = result.mappings().first()
    return None if row is None else dict(row)
