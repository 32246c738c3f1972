"""Delivers webhook events: fan-out from the outbox, one lane per endpoint, settled in
batches.

- **Fan-out** takes the outbox's webhook events and writes one delivery per
  subscribed endpoint (storage/webhook_deliveries.py), in one transaction.
- **A lane per endpoint** claims that endpoint's due deliveries a few pages ahead
  into a queue, and posts them, `max_in_flight` at once; an attempt's end starts
  the next queued one, with no database round trip per attempt. Lanes share
  nothing but the HTTP pool, which has no limit of its own: an endpoint that is
  slow or down fills its own slots and never delays another's. Its circuit
  breaker (handlers/webhooks.py) pauses it after `breaker_failures` failures in a
  row, then lets one probe through.
- **Settling** writes outcomes (delivered, retry at, dead) every 250 ms, together:
  the delivered ones in one statement, not a transaction per POST.
- **Yielding to a backlog**: while the intake drains one (`Intake.behind`),
  fan-out and the lanes take crisis events at once and, of the others, a page
  every YIELD_TRICKLE_S: the devices' acks go first (their commits do not wait
  for SQLite's lock behind fan-out's), the rest waits in the outbox.

Claims and the delivered ones' deletes are single statements in autocommit: on
SQLite, the one write lock is held for one driver call, never across the event
loop's turns, while the engine process waits for it (docs/benchmarks.md).

A claimed delivery is leased for LEASE_TIMEOUTS of its endpoint's timeouts and a
second: if this process dies, the lease lapses and this or another instance sends
it again. One that waited in the queue until its lease could lapse during its
attempt is given back unattempted, so that no other instance takes it while it is
being sent; a paused, disabled or stopping lane gives its queue back at once.
Receivers deduplicate by `webhook-id`, stable across attempts: delivery is at least
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import Settings, WebhookConfig
from gateway.lifecycle import Part, backoff
from gateway.metrics import Metrics
from gateway.outbound.webhook_http import WITHDRAWN, Attempt, Posting
from handlers import webhooks
from handlers.times import now_us, rfc3339
from storage import webhook_deliveries
from storage.db import autocommit_twin
from storage.webhook_deliveries import Delivery, Settled, Target

log = structlog.get_logger("fieldgate.webhooks")

FAN_OUT_PAGE = 500
FAN_OUT_EVERY_S = 0.2
"""While events flow, fan-out runs at most this often (a page at once when there is a
backlog): a transaction per commit of the engine took SQLite's lock from it as often."""
LEASE_TIMEOUTS = 4
"""A claimed delivery is leased for this many of its endpoint's timeouts (and the
margin): the longest it waits before another instance, or this one restarted, takes
it when this process dies. A fast endpoint empties its queue well within it; a slow
one's queued deliveries are given back as their leases near their end."""
LEASE_MARGIN_S = 1.0
"""Kept at the end of a lease: the settling of an outcome waits a little (batched)
and may wait behind a slow transaction."""
CLAIM_PAGES = 64
"""A lane queues up to this many times its `max_in_flight`, and claims again when
half of that is left, so that a fast endpoint's slots never wait for a claim: claims
of eight pages, made when the queue ran dry, cost the sender half its pace
(docs/benchmarks.md). A slow endpoint queues fewer (`Lane.queue_bound`), and a
queued delivery whose lease could lapse during its attempt is given back instead of
started."""
SETTLE_EVERY_S = 0.25
"""Outcomes are gathered this long before they are written, in one go: each write
takes SQLite's one lock from the engine (the drain with two endpoints measured 0.82
of without at 250 ms, 0.71 at 50 ms; docs/benchmarks.md). The lease margin covers
it."""
POLL_S = 1.0
"""How often an idle lane looks for due retries (and other instances' lapsed leases)."""
YIELD_TRICKLE_S = 1.0
"""While the intake drains a backlog, fan-out takes crisis events at once and a page
of YIELD_FAN_OUT_PAGE of the others this often, and a lane sends its crisis events
at once and one `max_in_flight` of the others this often: the devices' acks go
first, and the rest still moves (a gateway kept at its limit would otherwise never
send them)."""
YIELD_FAN_OUT_PAGE = 50
GAUGES_EVERY_S = 5.0
"""How often the gauges read from the database (waiting deliveries, spool) are read,
and removed endpoints' deliveries looked for."""


class Lane:
    """One endpoint: its queue in the database, its slots, its breaker, its record."""

    def __init__(self, config: WebhookConfig, sender: WebhookSender) -> None:
        self.sender = sender
        self.breaker = webhooks.CLOSED
        self.in_flight = 0
        self.wake = asyncio.Event()
        self.last_success_at: int | None = None
        self.last_error: str | None = None
        self.last_error_at: int | None = None
        self.attempts: set[asyncio.Task[None]] = set()
        self.leases: dict[int, int] = {}
        """Each claimed delivery's lease (until it is attempted): a release names it."""
        self.queue: deque[Delivery] = deque()
        """Claimed (leased) and not yet started: slots are filled from here, with no
        database round trip per attempt."""
        self.pace_s: float | None = None
        """How long an attempt takes here, a moving average (None before the first)."""
        self.stale: list[Delivery] = []
        """Taken off the queue unattempted, their leases too near their end: to give back."""
        self.urgent_added = False
        """Fan-out wrote a crisis event for this endpoint: claimed at once, even yielding."""
        self.trickle_at = 0.0
        """While yielding: when the next page of other events may be claimed."""
        self.configure(config)

    def configure(self, config: WebhookConfig) -> None:
        """Take a reloaded endpoint's settings; its breaker and record stay."""
        self.config = config
        self.key = webhooks.secret_key(config.secret.get_secret_value())
        self.policy = webhooks.BreakerPolicy(config.breaker_failures, config.breaker_pause_s)
        self.seconds = self.sender.metrics.webhook_seconds.labels(config.name)
        self.wake.set()

    @property
    def name(self) -> str:
        return self.config.name

    def state(self) -> str:
        if not self.config.enabled:
            return "disabled"
        if self.breaker.state == "closed" and self.sender.behind():
            return "yielding"
        return {"closed": "active", "open": "paused", "half_open": "probing"}[self.breaker.state]

    async def run(self) -> None:
        """Claim what is due into free slots; sleep until a slot frees, a poke, or a poll."""
        failures = 0
        while True:
            self.wake.clear()
            wait_s: float | None = POLL_S
            try:
                wait_s = await self._fill()
                failures = 0
            except DBAPIError as exc:
                failures += 1
                wait_s = backoff(failures, 0.2, 5.0)
                log.warning("webhook claim failed", endpoint=self.name, error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait_s)

    async def _fill(self) -> float | None:
        """Keep the queue of claimed deliveries topped up and the slots busy; the seconds
        to wait before looking again (None: until woken)."""
        config = self.config
        if not config.enabled:
            await self.release_queue()
            return None
        now_s = time.monotonic()
        admitted = webhooks.admit(self.breaker, now_s)
        if admitted is None:
            await self.release_queue()  # paused: what waits here goes back meanwhile
            if self.breaker.state == "open":
                return max(0.0, self.breaker.until_s - now_s)
            return None  # the probe is out: its outcome wakes the lane
        if admitted.state == "half_open":
            if self.in_flight:
                return None
            probe = await self._claim(1)
            if not probe:
                return POLL_S
            self.breaker = admitted
            self._start(probe[0])
            return None
        await self._give_back_stale()
        if self.sender.behind():
            return await self._fill_yielding(now_s)
        more = True
        if len(self.queue) < self.low_water():
            want = self.queue_bound() - len(self.queue)
            claimed = await self._claim(want)
            self.queue.extend(claimed)
            more = len(claimed) == want
        self._start_queued()
        if self.queue:
            return None  # attempts' ends start the queued ones, and wake the lane
        return 0 if more else POLL_S

    async def _fill_yielding(self, now_s: float) -> float | None:
        """While the intake drains a backlog: crisis events as fan-out writes them, and
        a page of the others every YIELD_TRICKLE_S (what is queued is sent)."""
        if self.urgent_added:
            self.urgent_added = False
            self.queue.extend(await self._claim(self.queue_bound(), webhooks.URGENT_EVENTS))
        if not self.queue and now_s >= self.trickle_at:
            self.trickle_at = now_s + YIELD_TRICKLE_S
            self.queue.extend(await self._claim(self.config.max_in_flight))
        self._start_queued()
        if self.queue:
            return None
        return max(0.0, self.trickle_at - now_s)

    def queue_bound(self) -> int:
        """How many the lane keeps claimed: CLAIM_PAGES of `max_in_flight`, fewer for an
        endpoint so slow that they could not all be attempted within half a lease
        (they would be given back, and claimed again, over and over). What the poster
        holds beyond what it attempts is claimed too, and counts against that."""
        pages = CLAIM_PAGES
        if self.pace_s is not None:
            half_lease_s = LEASE_TIMEOUTS * self.config.timeout_s / 2
            fits = int(half_lease_s / max(self.pace_s, 1e-3)) - (self.sender.poster.depth - 1)
            pages = max(1, min(CLAIM_PAGES, fits))
        return pages * self.config.max_in_flight

    def slots(self) -> int:
        """Attempts handed to the poster at once: `max_in_flight`, times what the
        poster holds ready beyond those it attempts (`Posting.depth`) while the last
        attempt succeeded. After a failure, no more than it attempts: what it holds
        ready would go to an endpoint that may be down, past what the breaker counts
        (each failure in a row ends one attempt, and the breaker opens on time)."""
        depth = self.sender.poster.depth if self.breaker.failures == 0 else 1
        return self.config.max_in_flight * depth

    def low_water(self) -> int:
        """Below this many queued, the lane claims more."""
        return max(1, self.queue_bound() // 2)

    async def _claim(self, count: int, only: frozenset[str] = frozenset()) -> list[Delivery]:
        lease_us = int((LEASE_TIMEOUTS * self.config.timeout_s + LEASE_MARGIN_S) * 1e6)
        now = now_us()
        claimed = await webhook_deliveries.claim(
            self.sender.database,
            self.name,
            count,
            now,
            lease_us,
            only=only,
            autocommit=self.sender.autocommit,
        )
        for delivery in claimed:
            self.leases[delivery.id] = now + lease_us
        return claimed

    def _next(self) -> Delivery | None:
        """The queued delivery a free slot sends next, if the breaker and the config let
        it; what waited there so long that its lease could lapse during its attempt is
        given back (`stale`) for a new claim."""
        wait_s = self.config.timeout_s * self.sender.poster.depth  # its turn, then its attempt
        latest_us = now_us() + int((wait_s + LEASE_MARGIN_S) * 1e6)
        while self.queue:
            if self.breaker.state != "closed" or not self.config.enabled:
                return None
            delivery = self.queue.popleft()
            if self.leases[delivery.id] >= latest_us:
                return delivery  # its lease stays known until its outcome: see `_slot`
            self.stale.append(delivery)
            self.wake.set()
        return None

    def _start_queued(self) -> None:
        """A slot for each free place while the queue has deliveries to send."""
        while self.in_flight < self.slots():
            delivery = self._next()
            if delivery is None:
                return
            self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        self.in_flight += 1
        task = asyncio.create_task(self._slot(delivery), name=f"webhook:{self.name}")
        self.attempts.add(task)
        task.add_done_callback(self._slot_done)

    async def release_queue(self) -> None:
        """Give the queued deliveries back (their leases would hold them meanwhile), and
        those the poster holds waiting their turn (they come back as withdrawn)."""
        self.sender.poster.withdraw(self.name)
        self.stale.extend(self.queue)
        self.queue.clear()
        await self._give_back_stale()

    async def _give_back_stale(self) -> None:
        if self.stale:
            leases: dict[int, list[int]] = {}
            for delivery in self.stale:
                leases.setdefault(self.leases.pop(delivery.id), []).append(delivery.id)
            self.stale.clear()
            await webhook_deliveries.release(
                self.sender.database, leases, autocommit=self.sender.autocommit
            )

    def _slot_done(self, task: asyncio.Task[None]) -> None:
        """A slot that raised is a bug: say so (the lease of the delivery it was
        sending lapses, and it is sent again)."""
        self.attempts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt failed", endpoint=self.name, exc_info=task.exception())

    async def _slot(self, first: Delivery) -> None:
        """Send deliveries one after the other while the queue has some: a task per slot,
        not per attempt (a task's start and end were a tenth of the sender's CPU)."""
        delivery: Delivery | None = first
        try:
            while delivery is not None:
                config = self.config
                attempt = await self.sender.poster.post(
                    config.url,
                    self.key,
                    delivery.event_id,
                    delivery.body,
                    config.timeout_s,
                    lane=self.name,
                    limit=config.max_in_flight,
                )
                if attempt.error == WITHDRAWN:
                    self.stale.append(delivery)  # not attempted: given back with its lease
                    self.wake.set()
                else:
                    self.leases.pop(delivery.id, None)
                    self.sender.settle(self._outcome(delivery, attempt))
                if len(self.queue) < self.low_water():
                    self.wake.set()
                if self.in_flight > self.slots():
                    return  # a reload lowered `max_in_flight`
                delivery = self._next()
        finally:
            self.in_flight -= 1
            if self.breaker.state != "closed":
                self.wake.set()

    def _outcome(self, delivery: Delivery, attempt: Attempt) -> Settled:
        """What the attempt means for the delivery, the breaker and the record."""
        at = now_us()
        outcome = attempt.outcome
        error = attempt.describe()
        if outcome == "success":
            self.last_success_at = at
        else:
            self.last_error, self.last_error_at = error, at
        self._breaker_to(webhooks.record(self.breaker, outcome, time.monotonic(), self.policy))
        self.seconds.observe(attempt.seconds)
        pace = self.pace_s
        self.pace_s = attempt.seconds if pace is None else 0.8 * pace + 0.2 * attempt.seconds
        if outcome == "success":
            return Settled(delivery=delivery, outcome="delivered", attempted_at=at)
        delay = None
        if outcome == "retry":
            delay = webhooks.next_delay_s(
                delivery.attempts + 1,
                self.config.retry_schedule_s,
                attempt.retry_after_s,
                self.sender.rng,
            )
        common: dict[str, Any] = {
            "delivery": delivery,
            "attempted_at": at,
            "status": attempt.status,
            "error": error,
            "url": webhooks.public_url(self.config.url),
        }
        if delay is None:
            log.warning(
                "webhook delivery dead",
                endpoint=self.name,
                event_type=delivery.event_type,
                attempts=delivery.attempts + 1,
                error=error,
            )
            return Settled(outcome="dead", **common)
        return Settled(outcome="retry", due_at=at + int(delay * 1e6), **common)

    def _breaker_to(self, breaker: webhooks.Breaker) -> None:
        """Take the breaker's next state; say so when the endpoint is paused or resumes
        (the operator's first clue that a receiver is down, or back)."""
        before, self.breaker = self.breaker.state, breaker
        if breaker.state == "open" and before != "open":
            log.warning(
                "webhook endpoint paused",
                endpoint=self.name,
                failures=breaker.failures,
                pause_s=breaker.pause_s,
                error=self.last_error,
            )
        elif breaker.state == "closed" and before != "closed":
            log.info("webhook endpoint resumed", endpoint=self.name)

    def snapshot(self, pending: webhook_deliveries.Counts | None) -> dict[str, Any]:
        """`webhooks/list`'s row: never the secret, never the URL's query."""
        breaker = self.breaker
        paused_until = None
        if breaker.state == "open":
            paused_until = rfc3339(now_us() + int((breaker.until_s - time.monotonic()) * 1e6), 0)
        return {
            "name": self.name,
            "url": webhooks.public_url(self.config.url),
            "events": list(self.config.events),
            "enabled": self.config.enabled,
            "state": self.state(),
            "in_flight": min(self.in_flight, self.config.max_in_flight),
            "pending": pending.pending if pending else 0,
            "retrying": pending.retrying if pending else 0,
            "last_success_at": rfc3339(self.last_success_at),
            "last_error": self.last_error,
            "last_error_at": rfc3339(self.last_error_at),
            "breaker": {
                "state": breaker.state,
                "failures": breaker.failures,
                "paused_until": paused_until,
            },
        }


class WebhookSender(Part):
    """Fans the outbox's webhook events out to the endpoints, and runs their lanes."""

    name = "webhooks"
    stop_timeout_s = 4.0

    def __init__(
        self,
        database: AsyncEngine,
        settings: Callable[[], Settings],
        poster: Posting,
        metrics: Metrics,
        *,
        on_dead: Callable[[], None],
        behind: Callable[[], bool] = lambda: False,
    ) -> None:
        self.database = database
        self.autocommit = autocommit_twin(database)
        """Claims, releases and the delivered ones' deletes: one statement each,
        committed by itself, without switching a connection's level each time."""
        self.settings = settings
        self.poster = poster
        self.metrics = metrics
        self.on_dead = on_dead
        """Dead deliveries were written: their notices (outbox) and the spool (the
        dead-letter mover) have work."""
        self.behind = behind
        """Whether the intake is draining a backlog: the lanes then yield to it."""
        self._yielding = False
        self.rng = random.Random()
        self.lanes: dict[str, Lane] = {}
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        self._fan_wake = asyncio.Event()
        self._settled: list[Settled] = []
        self._settle_wake = asyncio.Event()
        self._stopping = False
        self._reconfigured = False
        self._failed: asyncio.Future[None] | None = None
        """Set (in `run`) when a lane raised."""
        self.delivered = 0
        self.failed = 0
        self.dead = 0

    def poke(self) -> None:
        """A commit wrote outbox rows: some may be webhook events."""
        self._fan_wake.set()

    def reconfigure(self) -> None:
        """Follow the endpoints of the current settings: lanes start, change or stop."""
        if self._stopping:
            return
        endpoints = {e.name: e for e in self.settings().webhooks}
        for name in list(self.lanes):
            if name not in endpoints:
                self.lanes.pop(name)
                self._lane_tasks.pop(name).cancel()
                self.poster.withdraw(name)
        for name, config in endpoints.items():
            lane = self.lanes.get(name)
            if lane is None:
                lane = self.lanes[name] = Lane(config, self)
            else:
                lane.configure(config)
            task = self._lane_tasks.get(name)
            if task is None or task.done():
                task = asyncio.create_task(lane.run(), name=f"lane:{name}")
                task.add_done_callback(self._lane_done)
                self._lane_tasks[name] = task
        self._reconfigured = True
        self._fan_wake.set()

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        """A lane runs until cancelled; one that raised is a bug, and fails the part
        (which restarts it, lanes included, and makes `health` say so)."""
        if task.cancelled() or self._failed is None or self._failed.done():
            return
        if (exc := task.exception()) is not None:
            self._failed.set_exception(exc)

    def settle(self, settled: Settled) -> None:
        self._settled.append(settled)
        self._settle_wake.set()

    async def run(self) -> None:
        failed = self._failed = asyncio.get_running_loop().create_future()
        self.reconfigure()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_raise_from(failed), name="webhooks:lanes")
            tasks.create_task(self._fan_out_loop(), name="webhooks:fan-out")
            tasks.create_task(self._settle_loop(), name="webhooks:settle")

    async def stop(self) -> None:
        """No new attempts; those under way finish (within the stop timeout) and their
        outcomes are written. What is cut short is sent again when its lease lapses."""
        self._stopping = True
        for task in self._lane_tasks.values():
            task.cancel()
        for lane in self.lanes.values():
            with contextlib.suppress(DBAPIError):
                await lane.release_queue()
        attempts = {task for lane in self.lanes.values() for task in lane.attempts}
        if attempts:
            await asyncio.wait(attempts, timeout=self.stop_timeout_s - 1.5)
        for lane in self.lanes.values():  # what the poster held, withdrawn
            with contextlib.suppress(DBAPIError):
                await lane.release_queue()
        await self._settle_all()
        await self.autocommit.dispose()

    # -- fan-out ----------------------------------------------------------------------

    def _subscribers(self) -> dict[str, list[Target]]:
        """Event type -> the enabled endpoints that subscribe to it."""
        out: dict[str, list[Target]] = {}
        for endpoint in self.settings().webhooks:
            if not endpoint.enabled:
                continue
            events = (
                webhooks.EVENT_TYPES
                if webhooks.ALL_EVENTS in endpoint.events
                else set(endpoint.events)
            )
            first_us = int(endpoint.retry_schedule_s[0] * 1e6)
            for event in events:
                out.setdefault(event, []).append(Target(endpoint.name, endpoint.url, first_us))
        return out

    async def _fan_out_loop(self) -> None:
        failures = 0
        gauges_at = 0.0
        trickle_at = 0.0
        while True:
            if self._reconfigured:
                self._reconfigured, gauges_at = False, 0.0
            self._fan_wake.clear()
            self._say_if_yielding()
            wait_s = POLL_S
            try:
                now_s = time.monotonic()
                if now_s >= gauges_at:
                    await self._abandon_unconfigured()
                    await self.refresh_metrics()
                    gauges_at = time.monotonic() + GAUGES_EVERY_S
                page, only = FAN_OUT_PAGE, frozenset[str]()
                if self._yielding:
                    # Crisis events at once; the others a page now and then.
                    if now_s >= trickle_at:
                        page, trickle_at = YIELD_FAN_OUT_PAGE, now_s + YIELD_TRICKLE_S
                    else:
                        only = webhooks.URGENT_EVENTS
                    wait_s = min(POLL_S, max(0.0, trickle_at - now_s))
                taken, added = await webhook_deliveries.fan_out(
                    self.database, self._subscribers(), page, now_us(), only=only
                )
                for name, types in added.items():
                    lane = self.lanes.get(name)
                    if lane is not None:
                        lane.urgent_added |= not types.isdisjoint(webhooks.URGENT_EVENTS)
                        lane.wake.set()
                failures = 0
                if taken == FAN_OUT_PAGE:
                    continue
                if taken:
                    await asyncio.sleep(FAN_OUT_EVERY_S)
            except DBAPIError as exc:
                failures += 1
                wait_s = backoff(failures, 0.2, 5.0)
                log.warning("webhook fan-out failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fan_wake.wait(), timeout=wait_s)

    def _say_if_yielding(self) -> None:
        """Log when the lanes start and stop yielding to a backlog: the operator's
        answer to "why are the conflict events late?". Not without an enabled
        endpoint: nothing is late then, and the line would only puzzle."""
        yielding = self.behind() and any(e.enabled for e in self.settings().webhooks)
        if yielding != self._yielding:
            self._yielding = yielding
            if yielding:
                log.info("webhooks yield to the intake's backlog: crisis events only")
            else:
                log.info("webhooks resume: the intake's backlog is drained")

    async def _abandon_unconfigured(self) -> None:
        """Dead-letter the waiting deliveries of removed endpoints (each round: one
        that was in flight when its endpoint went is taken once it has settled)."""
        count = await webhook_deliveries.abandon(
            self.database, sorted(self.lanes), now_us(), self._dead_topic()
        )
        if count:
            log.warning("deliveries of removed endpoints dead-lettered", deliveries=count)
            self.dead += count
            self.on_dead()

    def _dead_topic(self) -> str:
        return f"{self.settings().mqtt.topic_root}/webhooks/dead"

    # -- settling ---------------------------------------------------------------------

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_wake.wait()
            await asyncio.sleep(SETTLE_EVERY_S)
            self._settle_wake.clear()
            await self._settle_all()

    async def _settle_all(self) -> None:
        """Write every outcome in hand, retrying while the database is away (the
        leases may lapse meanwhile: those deliveries are sent again)."""
        failures = 0
        while self._settled:
            batch, self._settled = self._settled, []
            try:
                await webhook_deliveries.settle(
                    self.database, batch, self._dead_topic(), autocommit=self.autocommit
                )
            except DBAPIError as exc:
                self._settled[:0] = batch
                failures += 1
                log.warning("webhook outcomes not written", error=type(exc).__name__)
                if self._stopping:
                    return
                await asyncio.sleep(backoff(failures, 0.2, 5.0))
                continue
            self._count(batch)

    def _count(self, batch: list[Settled]) -> None:
        dead = 0
        per_series: dict[tuple[str, str], int] = {}
        for s in batch:
            outcome = s.outcome
            series = (s.delivery.endpoint, outcome)
            per_series[series] = per_series.get(series, 0) + 1
            if outcome == "delivered":
                self.delivered += 1
            elif outcome == "retry":
                self.failed += 1
            else:
                self.failed += 1
                dead += 1
        for (endpoint, settled_as), n in per_series.items():
            self.metrics.webhook_deliveries.labels(endpoint, settled_as).inc(n)
        if dead:
            self.dead += dead
            self.on_dead()

    # -- what it says about itself ------------------------------------------------------

    async def snapshot(self) -> list[dict[str, Any]]:
        """Each endpoint's state, slots, waiting deliveries and last outcomes."""
        async with self.database.connect() as conn:
            counts = await webhook_deliveries.counts(conn)
        return [lane.snapshot(counts.get(name)) for name, lane in sorted(self.lanes.items())]

    async def refresh_metrics(self) -> None:
        """The gauges read from the database and the lanes."""
        async with self.database.connect() as conn:
            counts = await webhook_deliveries.counts(conn)
            spool = await webhook_deliveries.spool_size(conn)
        for name, lane in self.lanes.items():
            waiting = counts.get(name)
            self.metrics.webhook_pending.labels(name).set(waiting.pending if waiting else 0)
            self.metrics.webhook_retrying.labels(name).set(waiting.retrying if waiting else 0)
            self.metrics.webhook_breaker_open.labels(name).set(
                0 if lane.breaker.state == "closed" else 1
            )
        self.metrics.dlq_spool.set(spool)


async def _raise_from(failed: asyncio.Future[None]) -> None:
    await failed
