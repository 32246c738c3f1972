"""Sync logs for conflict prediction, stored as the daemon stores them, without MQTT.

Training and extraction need logs of 10^3 to 10^6 operations whose conflicts are the
ones production would have found. Publishing them through a broker and a daemon
costs minutes per 10^5; here each payload is decoded by the sync handler and
committed by the daemon's writer and sync step (detection included, from the
default config), a few hundred operations a commit as group commit makes them. The
receipt time of each payload is the generator's simulated clock, so an outage of
hours shows in `hours_since_last_sync` as it would in the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

from gateway import config
from gateway.ingest.assembly import make_detector
from gateway.ingest.rules import sync_limits
from handlers.sync import SyncHandler
from loadgen.causal import CausalGenerator, Causes
from loadgen.generator import GeneratorOptions, Payload
from storage import migrate
from storage.db import create_engine
from storage.sync import Scoring, SyncStep
from storage.writer import Writer, WriteSet


def causal_payloads(
    options: GeneratorOptions, causes: Causes | None = None
) -> Iterator[tuple[Payload, int]]:
    """The causal scenario's payloads, each with the simulated time it is sent at."""
    generator = CausalGenerator(options, causes=causes)
    while step := generator.next_payloads():
        for payload in step:
            yield payload, generator.clock_us


class LogWriter:
    """Commits payloads as the daemon would: its sync handler decodes each one as
    received at the given time, its writer and sync step (detection on, in the commit,
    the default rules but `window_s`; `scoring` as the engine's scorer would) commit
    them."""

    def __init__(
        self, url: str, *, window_s: float = 300.0, scoring: Scoring | None = None
    ) -> None:
        self.url = url
        self.settings = config.Settings(
            database=config.DatabaseConfig(url=url),
            # in the commit: what an operation is scored from is then exactly what was
            # committed before it, which the extraction for training counts
            conflicts=config.ConflictsConfig(window_s=window_s, detect="in_commit"),
        )
        self.handler = SyncHandler(sync_limits(self.settings))
        self.engine = create_engine(url)
        self.writer = Writer(self.engine, [SyncStep(make_detector(self.settings), scoring)])

    async def __aenter__(self) -> LogWriter:
        await asyncio.to_thread(migrate.upgrade, self.url)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.writer.close()
        await self.engine.dispose()

    async def commit(self, payloads: Iterable[tuple[Payload, int]]) -> int:
        """One transaction; returns how many operations it stored."""
        batch = WriteSet()
        root = self.settings.mqtt.topic_root
        for payload, received_at in payloads:
            decoded = self.handler.decode(
                payload.topic(root), payload.device_id, payload.body, received_at
            )
            batch.records.extend(decoded.records)
        committed = await self.writer.commit(batch)
        assert not committed.refused, committed.refused
        return sum(1 for record in batch.records if record.status == "stored")


async def store_payloads(
    url: str,
    payloads: Iterable[tuple[Payload, int]],
    *,
    ops_per_commit: int = 200,
    window_s: float = 300.0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Store `payloads` (each with its receipt time) at `url`, about `ops_per_commit`
    operations a commit; returns how many operations were stored."""
    stored = 0
    async with LogWriter(url, window_s=window_s) as log:
        pending: list[tuple[Payload, int]] = []
        ops = 0
        for item in payloads:
            pending.append(item)
            ops += item[0].n_ops
            if ops >= ops_per_commit:
                stored += await log.commit(pending)
                pending, ops = [], 0
                if progress is not None:
                    progress(stored)
        if pending:
            stored += await log.commit(pending)
    return stored


async def store_causal(
    url: str,
    options: GeneratorOptions,
    *,
    causes: Causes | None = None,
    ops_per_commit: int = 200,
    progress: Callable[[int], None] | None = None,
) -> int:
    """The causal scenario for `options`, stored at `url`."""
    return await store_payloads(
        url, causal_payloads(options, causes), ops_per_commit=ops_per_commit, progress=progress
    )
