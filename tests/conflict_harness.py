"""A conflict detector on a real database, without the daemon around it.

`Store` is one "process": a writer with the sync step and a detector built from
a config as the daemon builds them, on the database at `url`. Tests commit
operations as devices would have sent them and read back the records, the
members, the outbox and the counters, exactly as stored.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
from sqlalchemy import select

from gateway import config
from gateway.ingest.assembly import make_detector
from gateway.ingest.rules import sync_limits
from handlers.records import OpRecord
from handlers.sync import SyncHandler
from storage import conflict_store, migrate
from storage.db import create_engine
from storage.detection import DetectionPass, DetectionStep, judged_in
from storage.outbox import topics as outbox_topics
from storage.schema import conflict_members, conflicts, device_counters, outbox, user_counters
from storage.sync import SyncStep
from storage.writer import Committed, Writer, WriteSet

ROOT = "fgtest"
PASS_MAX_OPS = 5000


def settings(url: str, **conflicts_cfg: Any) -> config.Settings:
    return config.Settings(
        mqtt=config.MqttConfig(topic_root=ROOT),
        database=config.DatabaseConfig(url=url),
        conflicts=config.ConflictsConfig(**conflicts_cfg),
    )


class Store:
    """One "process": a detector and a writer on the database at `url`; `windows`
    False takes the slow path for every operation."""

    def __init__(self, url: str, *, windows: bool = True, **conflicts_cfg: Any) -> None:
        self.settings = settings(url, **conflicts_cfg)
        self.url = url
        self.handler = SyncHandler(sync_limits(self.settings))
        self.engine = create_engine(url)
        self.detector = make_detector(self.settings)
        self.detector.windows = windows
        self.writer = Writer(self.engine, [SyncStep(self.detector), DetectionStep(self.detector)])

    async def start(self) -> Store:
        await asyncio.to_thread(migrate.upgrade, self.url)
        return self

    def decode(self, device: str, ops: list[dict[str, Any]]) -> list[OpRecord]:
        payload: Any = ops[0] if len(ops) == 1 else {"batch_id": None, "ops": ops}
        decoded = self.handler.decode(
            f"{ROOT}/devices/{device}/sync", device, json.dumps(payload).encode(), 0
        )
        assert len(decoded.records) == len(ops), decoded.items
        return decoded.records

    async def commit(self, *sends: tuple[str, list[dict[str, Any]]]) -> Committed:
        """One transaction holding what several devices sent, then (detection after the
        ack, the default) the passes that judge it, as an idle engine runs them: what
        both wrote."""
        batch = WriteSet()
        for device, ops in sends:
            batch.records.extend(self.decode(device, ops))
        written = await self.writer.commit(batch)
        written.add(await self.detect())
        return written

    async def detect(self) -> Committed:
        """Passes of detection after the ack until nothing waits (none in the commit's
        mode): what they wrote."""
        written = Committed()
        while not self.detector.in_commit:
            part = await self.writer.commit(WriteSet([DetectionPass(PASS_MAX_OPS)]))
            written.add(part)
            if judged_in(part.events.get("detection", [])) < PASS_MAX_OPS:
                break
        return written

    async def conflicts(self, *, merged: bool = False) -> list[dict[str, Any]]:
        """Every conflict's record with all its members' op_ids (`member_ids`), the
        merged ones only when asked."""
        async with self.engine.connect() as conn:
            rows = list((await conn.execute(select(conflicts).order_by(conflicts.c.id))).mappings())
            found = await conn.execute(
                select(conflict_members.c.conflict_id, conflict_members.c.op_id)
            )
            members: dict[str, list[str]] = {}
            for conflict_id, op_id in found:
                members.setdefault(conflict_id, []).append(op_id)
        out = []
        for row in rows:
            if row["status"] == "merged" and not merged:
                continue
            record = conflict_store.record(row)
            record["member_ids"] = sorted(members.get(row["conflict_id"], []))
            out.append(record)
        return out

    async def record(self, conflict_id: str) -> dict[str, Any]:
        """The record as messages carry it: the latest 50 members."""
        async with self.engine.connect() as conn:
            found = await conflict_store.get(conn, conflict_id)
        assert found is not None
        return found

    async def notices(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(outbox).order_by(outbox.c.id))
            # one notice per topic a row goes to (a conflict's row is copied to devices)
            return [
                {
                    "channel": r["channel"],
                    "topic": topic,
                    "event_type": r["event_type"],
                    "payload": msgspec.json.decode(r["payload"]),
                }
                for r in rows.mappings()
                for topic in outbox_topics(r)
            ]

    async def counters(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        async with self.engine.connect() as conn:
            users = await conn.execute(select(user_counters))
            devices = await conn.execute(select(device_counters.c.device_id, device_counters.c.ops))
            return ({u: (ops, n) for u, ops, n in users}, {d: ops for d, ops in devices})

    async def close(self) -> None:
        await self.writer.close()
        await self.engine.dispose()
