"""The storage layer as the daemon drives it, without MQTT: decode, commit, read back.

Used by the rule table and the property test, which need thousands of exact
commits per second more than they need a broker in between; the daemon tests
cover the same path end to end.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
from sqlalchemy import select

from gateway import config
from gateway.ingest.rules import make_detector, sync_limits
from handlers.records import OpRecord
from handlers.sync import SyncHandler
from storage import conflict_store, migrate
from storage.db import create_engine
from storage.schema import conflicts, device_counters, outbox, user_counters
from storage.sync import SyncStep
from storage.writer import Committed, Writer, WriteSet

ROOT = "fg"


def settings(url: str, **conflicts_cfg: Any) -> config.Settings:
    return config.Settings(
        database=config.DatabaseConfig(url=url),
        mqtt=config.MqttConfig(topic_root=ROOT),
        conflicts=config.ConflictsConfig(**conflicts_cfg),
    )


class Store:
    """One "process": an engine, a detector and a writer on the database at `url`."""

    def __init__(self, url: str, **conflicts_cfg: Any) -> None:
        self.settings = settings(url, **conflicts_cfg)
        self.url = url
        self.handler = SyncHandler(sync_limits(self.settings))
        self.engine = create_engine(url)
        self.detector = make_detector(self.settings)
        self.writer = Writer(self.engine, [SyncStep(self.detector)])

    async def start(self, warm_at_us: int | None = None) -> Store:
        """Migrate, then warm the window cache as the daemon does at `warm_at_us` (now)."""
        await asyncio.to_thread(migrate.upgrade, self.url)
        now = time.time_ns() // 1000 if warm_at_us is None else warm_at_us
        self.warmed = await self.detector.warm(self.engine, now)
        return self

    def decode(self, device: str, ops: list[dict[str, Any]]) -> list[OpRecord]:
        payload: Any = ops[0] if len(ops) == 1 else {"batch_id": None, "ops": ops}
        decoded = self.handler.decode(
            f"{ROOT}/devices/{device}/sync", device, json.dumps(payload).encode(), 0
        )
        assert len(decoded.records) == len(ops), decoded.items
        return decoded.records

    async def commit(self, *sends: tuple[str, list[dict[str, Any]]]) -> Committed:
        """One transaction holding what several devices sent."""
        batch = WriteSet()
        for device, ops in sends:
            batch.records.extend(self.decode(device, ops))
        return await self.writer.commit(batch)

    async def conflicts(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(conflicts).order_by(conflicts.c.id))
            return [conflict_store.row_record(row) for row in rows.mappings()]

    async def notices(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(outbox).order_by(outbox.c.id))
            return [
                {
                    "channel": r["channel"],
                    "topic": r["topic"],
                    "event_type": r["event_type"],
                    "payload": msgspec.json.decode(r["payload"]),
                }
                for r in rows.mappings()
            ]

    async def counters(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        async with self.engine.connect() as conn:
            users = await conn.execute(select(user_counters))
            devices = await conn.execute(select(device_counters))
            return (
                {u: (ops, n) for u, ops, n in users},
                {d: ops for d, ops, _last in devices},
            )

    async def close(self) -> None:
        await self.writer.close()
        await self.engine.dispose()
