"""When the engine judges the log: conflict detection after the ack.

The engine commits a `DetectionPass` (storage/detection.py) when it has nothing
else to commit and `conflicts.pass_interval_ms` went by since the last pass (at
once after a pass that judged all it might have: more waits), so that acks and a
backlog's drain never wait for detection and a steady stream of small batches is
judged in passes of many operations (each pass costs a transaction, and one
message per conflict and topic); and, once stored operations have waited
`conflicts.max_delay_s` behind a backlog, every other commit, so that detection
catches up while the backlog drains. Between passes it knows whether anything may
wait: something was committed since the last pass that caught up, the engine just
started (leftovers of a crash), or a sweep came due (another instance's leftovers,
on PostgreSQL).

A batch that arrives during a pass waits for it. So while devices are sending (a
batch committed within the last second), a pass judges only what it can in
`conflicts.pass_budget_ms`, from the rate passes have judged at so far; then the
next one follows at the next idle moment. A pass that takes its turn behind a
backlog is as large as the batch before it (within `pass_max_ops`), and once the
devices are quiet a pass takes up to `pass_max_ops`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import ConflictsConfig
from storage.detection import DetectionPass, judged_in, waiting_entities
from storage.writer import Committed, Writer, WriteSet

log = structlog.get_logger("fieldgate.ingest")

SWEEP_S = 5.0
"""How often an idle engine looks for operations that wait without its knowing."""
ISOLATE_ENTITIES = 256
"""Waiting entities a refused pass is isolated among at a time."""
BUDGET_MIN_OPS = 50
"""The least a pass within the budget judges: below, its transaction's own cost (the
commit's fsync, a dozen statements) would outweigh what it judges."""
QUIET_S = 1.0
"""Devices count as quiet after this long without a batch: passes take their full size."""
FIRST_RATE = 20_000.0
"""Operations a second a pass is taken to judge until one has been timed."""


class Follower:
    """Decides when a pass runs, and runs it."""

    def __init__(
        self,
        writer: Writer,
        config: Callable[[], ConflictsConfig],
        observe: Callable[[Sequence[Any], Sequence[Any]], Any],
        database: AsyncEngine,
    ) -> None:
        self.writer = writer
        self.database = database
        self.isolated: tuple[str, str] | None = None
        """The last entity a refused pass was isolated up to."""
        self.config = config
        self.observe = observe
        self.waiting_since: float | None = time.monotonic()
        """When operations may have started to wait; None: the last pass caught up."""
        self.took_turn = False
        """The last commit was a pass: a backlog's next batch goes first."""
        self.last_pass = self.swept = self.last_commit = 0.0
        self.more = False
        """The last pass judged all it might have: more waits, and the next pass need not
        wait for the interval."""
        self.behind = False
        """A pass of `pass_max_ops` was full and none has caught up since (what the log
        says)."""
        self.overdue = False
        """The pass that is due takes its turn behind a backlog."""
        self.rate = FIRST_RATE
        """Operations a second that passes judge (a moving average)."""
        self.last_batch = 0
        """Messages in the last batch committed."""

    async def _isolate(self, max_ops: int) -> Committed:
        """A pass the database refused: judge the waiting entities one record each, so
        that the writer's bisection finds those it refuses alone; leave those
        unjudged (their operations join no conflict), loudly, and go on with the rest."""
        async with self.database.connect() as conn:
            keys = await waiting_entities(conn, ISOLATE_ENTITIES, self.isolated)
        # The next refusal goes on past these: what the pass took may lie further on.
        self.isolated = keys[-1] if len(keys) == ISOLATE_ENTITIES else None
        passes = [DetectionPass(max_ops, entity=key) for key in keys]
        written = await self.writer.commit(WriteSet(passes))
        refused = [r for r in written.refused if isinstance(r.record, DetectionPass)]
        for refusal in refused:
            assert refusal.record.entity is not None
            entity_type, entity_id = refusal.record.entity
            log.error(
                "conflict detection refused by the database: this entity's waiting"
                " operations stay unjudged",
                entity_type=entity_type,
                entity_id=entity_id,
                error=refusal.error,
            )
        if refused:
            skips = [DetectionPass(0, entity=r.record.entity, skip=True) for r in refused]
            written.add(await self.writer.commit(WriteSet(skips)))
        self.observe([], written.events.get("detection", []))
        return written

    def on(self) -> bool:
        config = self.config()
        return config.enabled and config.detect == "after_ack"

    def committed(self, messages: int) -> None:
        """A batch of `messages` committed: its operations (if any) wait."""
        self.took_turn = False
        self.last_commit = time.monotonic()
        self.last_batch = messages
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def wait_s(self) -> float | None:
        """How long an idle engine may wait for deliveries before a pass is due (None:
        none will be, until something is committed or a sweep comes due)."""
        if not self.on():
            return None
        now = time.monotonic()
        if self.waiting_since is None:
            return max(0.0, self.swept + SWEEP_S - now)
        return max(0.0, self.last_pass + self._interval_s() - now)

    def _interval_s(self) -> float:
        return 0.0 if self.more else self.config().pass_interval_ms / 1000

    def due(self, *, idle: bool) -> bool:
        """Whether a pass runs now: `idle`, the engine has nothing else to commit."""
        if not self.on():
            return False
        now = time.monotonic()
        if self.waiting_since is None:
            if not idle or now - self.swept < SWEEP_S:
                return False
            self.waiting_since = self.swept = now
        self.overdue = False
        if idle:
            return now - self.last_pass >= self._interval_s()
        self.overdue = now - self.waiting_since >= self.config().max_delay_s
        return self.overdue and not self.took_turn

    def _size(self) -> int:
        """The most operations the next pass judges."""
        config = self.config()
        quiet = time.monotonic() - self.last_commit >= QUIET_S
        if quiet or not config.pass_budget_ms:
            return config.pass_max_ops
        fits = max(BUDGET_MIN_OPS, int(self.rate * config.pass_budget_ms / 1000))
        if self.overdue:
            # Its turn between two batches, as large as the batch before it: behind a
            # backlog of large batches a large pass (cheaper an operation); at a steady
            # load of small ones, a pass within the budget after each.
            fits = max(fits, self.last_batch)
        return min(config.pass_max_ops, fits)

    async def run(self) -> Committed:
        """One pass, committed; caught up when it judged fewer than it might have."""
        max_ops = self._size()
        started = time.monotonic()
        written = await self.writer.commit(WriteSet([DetectionPass(max_ops)]))
        self.took_turn = True
        self.last_pass = time.monotonic()
        if written.refused:
            written.add(await self._isolate(max_ops))
            self.waiting_since = self.last_pass
            self.more = False
            return written
        events = written.events.get("detection", [])
        judged = judged_in(events)
        if judged >= BUDGET_MIN_OPS:
            self.rate = 0.8 * self.rate + 0.2 * judged / max(self.last_pass - started, 1e-6)
        self.more = judged >= max_ops
        full = judged >= self.config().pass_max_ops
        if full != self.behind and (full or not self.more):
            # Once each way: an operator reading the log after a backlog or a crash sees
            # when conflicts lagged and when they were current again.
            event = "behind the stored operations" if full else "caught up"
            log.info(f"conflict detection {event}", judged_in_pass=judged)
            self.behind = full
        if not self.more:
            self.waiting_since = None
            self.swept = self.last_pass
        self.observe([], events)
        return written
