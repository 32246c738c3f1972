"""The engine: deliveries in, decoded on arrival, committed in groups, results out.

Deliveries are decoded as they arrive (on the event loop, between socket reads)
and queued for the commit loop, which commits whatever has gathered in one
transaction: while one batch commits in the writer's thread, the next one
gathers. Only after the commit is the `Result` handed back, with the answers to
publish and the receive ids to acknowledge. An urgent delivery (an alert) and an
admin command's write go ahead of what waits, and are committed at once instead
of waiting for a batch to gather. An admin write is answered `unavailable` at
once while the database is failing or after the drain began, rather than
waiting for a commit that may not come.

What the database refuses alone, when it refuses a batch for a value it holds
(the writer isolates it), is rejected (`schema`), quarantined and acknowledged
like any rejection; the rest is stored and answered as usual
(docs/decisions/0006-poison-batch-bisection.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import structlog

from gateway.config import WriterConfig
from gateway.ingest.following import Follower
from gateway.ingest.kinds import Decoded, Kind
from gateway.lifecycle import Part
from gateway.metrics import EngineMetrics
from gateway.seam import WAKE_OUTBOX, Delivery, Reply, Result
from handlers.errors import Code, Error, quarantine_record
from handlers.records import QuarantineRecord
from storage.writer import Committed, Writer, WriteSet

log = structlog.get_logger("fieldgate.ingest")

ARRIVALS_S = 0.001
"""How long an engine that just ran a pass waits for deliveries before the next one."""


class Pending(NamedTuple):
    delivery: Delivery
    kind: Kind
    decoded: Decoded


class Engine(Part):
    """The work on payloads, behind the seam (gateway/seam.py)."""

    name = "engine"
    critical = True
    ends_on_stop = True
    stop_timeout_s = 20.0

    def __init__(
        self,
        root: str,
        kinds: Sequence[Kind],
        writer: Writer,
        config: WriterConfig,
        metrics: EngineMetrics,
        beat_s: float = 1.0,
        follower: Follower | None = None,
    ) -> None:
        self.root = root
        self.kinds = {kind.name: kind for kind in kinds}
        self.order = list(self.kinds)
        self.writer = writer
        self.config = config
        self.metrics = metrics
        self.beat_s = beat_s
        """How often the idle loop proves it is alive (the watchdog reads `last_beat`)."""
        self.follower = follower
        """Conflict detection after the ack: its passes take the gaps between batches."""
        self.commits = 0
        """Batches committed (detection's passes are not batches)."""
        self.last_beat = time.monotonic()
        self._pending: list[Pending] = []
        self._ahead = 0
        """How many of `_pending`, at its front, went ahead (urgent or admin writes)."""
        self._arrived = asyncio.Event()
        self._urgent = asyncio.Event()
        self.ready = asyncio.Event()
        """Open (set) when what does not go ahead may be committed: closed while the
        active model loads at the engine's start (gateway/ingest/process.py), so that
        every sync operation is scored, while alerts and admin writes go on."""
        self.ready.set()
        self._closed = False
        self._callback: Callable[[Result], None] = lambda _result: None

    # -- the seam --------------------------------------------------------------------

    def on_result(self, callback: Callable[[Result], None]) -> None:
        self._callback = callback

    def submit(self, delivery: Delivery) -> None:
        kind = self.kinds[delivery.kind]
        if delivery.reply and (self._closed or not self.writer.healthy):
            why = "the gateway is stopping" if self._closed else "the database is failing"
            error = Error(Code.UNAVAILABLE, f"{why}: nothing was written; retry later")
            reply = Reply(error=error.as_dict())
            self._callback(Result(done=[delivery.receive_id], replies={delivery.receive_id: reply}))
            return
        decoded = kind.decode(delivery)
        for item_id, error in decoded.rejections():
            self.metrics.rejected.labels(error.code.value).inc()
            log.info(
                f"{kind.name} rejected",
                device_id=delivery.params.get("device_id"),
                id=item_id,
                code=error.code.value,
                path=error.path,
                reason=error.message,
            )
        pending = Pending(delivery, kind, decoded)
        if kind.urgent or delivery.reply:
            # ahead of the backlog, behind what went ahead before it
            self._pending.insert(self._ahead, pending)
            self._ahead += 1
            self._urgent.set()
        else:
            self._pending.append(pending)
        self._arrived.set()

    async def drain(self) -> None:
        """Take nothing more; the loop commits what it holds, then ends."""
        self._closed = True
        self._arrived.set()

    async def stop(self) -> None:
        await self.drain()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the commit loop -------------------------------------------------------------

    async def run(self) -> None:
        """Commit what has gathered, hand back the results; until drained and empty."""
        wait_s = self.config.max_wait_ms / 1000
        while True:
            if not self._pending:
                if self._closed:
                    return
                if self._follow_due(idle=True):
                    await self._follow()
                    await self._let_arrivals_in()
                    continue
                self._arrived.clear()
                timeout = self.beat_s
                if self.follower is not None:
                    timeout = min(timeout, self.follower.wait_s() or timeout)
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=timeout)
                except TimeoutError:
                    self.last_beat = time.monotonic()
                    continue
                # Gather a batch, unless something urgent is waiting: it goes at once.
                gather = wait_s and len(self._pending) < self.config.max_messages
                if gather and not self._urgent.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), timeout=wait_s)
            if not self._ahead and not self.ready.is_set():
                await self._until_ready_or_urgent()
                continue
            if not self._ahead and self._follow_due(idle=False):
                await self._follow()
                continue
            self._urgent.clear()
            self.last_beat = time.monotonic()
            # What went ahead (alerts, admin writes) is committed on its own: a crisis
            # behind a backlog would otherwise wait for a whole batch of sync with it.
            batch = self._pending[
                : min(self._ahead or self.config.max_messages, self.config.max_messages)
            ]
            del self._pending[: len(batch)]
            self._ahead = max(0, self._ahead - len(batch))
            await self._commit(batch)

    async def _let_arrivals_in(self) -> None:
        """After a pass: what arrived during it is still in the channel's socket, and the
        reader runs only once this loop yields; without a pause the next pass would start
        first, and batches waited through passes back to back (measured at 2,000 ops/s:
        clusters of three to five passes, 20-30 ms)."""
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout=ARRIVALS_S)

    def _follow_due(self, *, idle: bool) -> bool:
        return self.follower is not None and self.follower.due(idle=idle)

    async def _follow(self) -> None:
        """A pass of detection after the ack; its messages go out like a batch's."""
        assert self.follower is not None
        self.last_beat = time.monotonic()
        written = await self.follower.run()
        if written.outbox_rows or written.leased:
            wake = [WAKE_OUTBOX] if written.outbox_rows else []
            self._callback(Result(leased=written.leased, wake=wake))

    async def _until_ready_or_urgent(self) -> None:
        """Wait for `ready` or for something that goes ahead, a beat at most."""
        self._urgent.clear()
        waits = [
            asyncio.ensure_future(self.ready.wait()),
            asyncio.ensure_future(self._urgent.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=self.beat_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.last_beat = time.monotonic()

    async def _commit(self, batch: list[Pending]) -> None:
        started = time.perf_counter()
        written = await self._store(batch)
        result = Result(done=[p.delivery.receive_id for p in batch], leased=written.leased)
        wake: set[str] = {WAKE_OUTBOX} if written.outbox_rows else set()
        for kind, items in self._by_kind(batch):
            decoded = [p.decoded for p in items]
            if kind.observe is not None:
                wake.update(kind.observe(decoded, written.events.get(kind.step.name, [])))
            if kind.answer is not None:
                answered = [(p.delivery, p.decoded) for p in items if not p.delivery.reply]
                if answered:
                    result.answers.extend(kind.answer(self.root, answered))
            if kind.reply is not None:
                for p in items:
                    if p.delivery.reply:
                        result.replies[p.delivery.receive_id] = kind.reply(p.decoded)
        result.wake = sorted(wake)
        self.commits += 1
        if self.follower is not None:
            self.follower.committed(len(batch))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(batch))
        self._callback(result)

    def _by_kind(self, batch: list[Pending]) -> list[tuple[Kind, list[Pending]]]:
        groups: dict[str, list[Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.kind.name, []).append(pending)
        return [(self.kinds[name], groups[name]) for name in self.order if name in groups]

    async def _store(self, batch: list[Pending]) -> Committed:
        """Commit the batch; what the database refused alone is rejected and quarantined.

        The writer commits everything else (storage/writer.py). Each refused record
        becomes a rejection in its payload's answer, and its quarantine row is
        committed before anything is answered or acked, as every rejection's is.
        """
        writes = WriteSet()
        for pending in batch:
            writes.records.extend(pending.decoded.records)
            writes.quarantine.extend(pending.decoded.quarantine)
        written = await self.writer.commit(writes)
        if not written.refused:
            return written
        owner = {id(record): p for p in batch for record in p.decoded.records}
        quarantine: list[QuarantineRecord] = []
        for refusal in written.refused:
            pending = owner[id(refusal.record)]
            item_id, error = pending.decoded.refuse(refusal.record, refusal.error)
            quarantine.append(self._quarantined(pending, item_id, error))
        await self.writer.commit(WriteSet(quarantine=quarantine), refusable=False)
        return written

    def _quarantined(self, pending: Pending, item_id: str | None, error: Error) -> QuarantineRecord:
        """The quarantine row of a refused record, and its log line and count: ids and
        the error class only, never the payload."""
        self.metrics.rejected.labels(error.code.value).inc()
        delivery, kind = pending.delivery, pending.kind
        device_id = delivery.params.get("device_id")
        # An alert or a crisis ack that is not stored reaches no operator: say so louder.
        emit = log.error if kind.urgent else log.warning
        emit(
            "refused by the database",
            kind=kind.name,
            device_id=device_id,
            id=item_id,
            path=error.path,
            reason=error.message,
        )
        return quarantine_record(
            topic=delivery.topic,
            device_id=device_id,
            kind=kind.name,
            error=error,
            payload=delivery.payload,
            received_at_us=delivery.received_at_us,
        )
