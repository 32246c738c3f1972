"""The engine's parts, made from the settings: handlers, detector, steps, writer, engine.

What the engine process runs (gateway/ingest/process.py), and what a test of the
engine alone builds. `apply` takes a config reload: the rules change at once, in
the process that uses them.
"""

from __future__ import annotations

import os
import time

from gateway.config import Settings
from gateway.ingest import rules
from gateway.ingest.engine import Engine
from gateway.ingest.following import Follower
from gateway.ingest.kinds import Steps, table
from gateway.ingest.observe import Observers
from gateway.metrics import EngineMetrics
from gateway.seam import EngineState
from handlers.alerts import AlertHandler
from handlers.ratelimit import DeviceRateLimiter
from handlers.sync import SyncHandler
from ml.scoring import Scorer
from storage.alerts import AlertStep, CrisisAckStep
from storage.conflict_store import ResolutionStep
from storage.conflicts import Detector
from storage.db import create_engine
from storage.detection import DetectionStep
from storage.sync import SyncStep
from storage.writer import Writer


def make_detector(settings: Settings) -> Detector:
    """The conflict detector the settings ask for. Built here, in the engine's own
    module, so that the MQTT process (which reads `rules` too) never imports
    detection, and numpy with it, before its first answer."""
    return Detector(
        rules.conflict_rules(settings),
        rules.conflict_notices(settings),
        enabled=settings.conflicts.enabled,
        in_commit=settings.conflicts.detect == "in_commit",
    )


class EngineSide:
    """Everything the engine needs, wired once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = EngineMetrics()
        self.database = create_engine(
            settings.database.url,
            echo=settings.database.echo,
            pool_size=settings.database.pool_size,
        )
        self.rate_limiter = DeviceRateLimiter(
            settings.limits.device_rate, settings.limits.device_burst
        )
        self.sync = SyncHandler(rules.sync_limits(settings), self.rate_limiter)
        self.alerts = AlertHandler(rules.alert_rules(settings))
        self.detector = make_detector(settings)
        self.scorer = Scorer(**rules.scoring(settings))
        self.steps = Steps(
            alerts=AlertStep(rules.alert_policy(settings), rules.alert_notices(settings)),
            crisis_acks=CrisisAckStep(),
            sync=SyncStep(self.detector, self.scorer),
            resolutions=ResolutionStep(rules.conflict_notices(settings)),
            detection=DetectionStep(self.detector),
        )
        observers = Observers(self.metrics)
        kinds = table(self.sync, self.alerts, self.steps, observers)
        self.writer = Writer(self.database, self.steps.in_lock_order())
        self.engine = Engine(
            settings.mqtt.topic_root,
            kinds,
            self.writer,
            settings.writer,
            self.metrics,
            beat_s=min(1.0, settings.health.wedged_after_s / 4),
            follower=Follower(
                self.writer, lambda: self.settings.conflicts, observers.sync, self.database
            ),
        )

    def apply(self, settings: Settings) -> None:
        """A config reload: the rules of decoding, storing, detecting and answering."""
        self.settings = settings
        self.sync.limits = rules.sync_limits(settings)
        self.alerts.rules = rules.alert_rules(settings)
        self.steps.alerts.policy = rules.alert_policy(settings)
        self.steps.alerts.notices = rules.alert_notices(settings)
        self.rate_limiter.rate = settings.limits.device_rate
        self.rate_limiter.burst = float(settings.limits.device_burst)
        self.detector.rules = rules.conflict_rules(settings)
        self.detector.notices = rules.conflict_notices(settings)
        self.detector.enabled = settings.conflicts.enabled
        self.detector.in_commit = settings.conflicts.detect == "in_commit"
        self.steps.resolutions.notices = self.detector.notices
        self.scorer.configure(**rules.scoring(settings))

    def state(self) -> EngineState:
        since = self.writer.attempt_started or self.engine.last_beat
        return EngineState(
            healthy=self.writer.healthy,
            last_error=self.writer.last_error,
            stuck_s=round(time.monotonic() - since, 3),
            pending=self.engine.pending,
            commits=self.engine.commits,
            pid=os.getpid(),
            model_id=self.scorer.model_id if self.scorer.model is not None else None,
            model_refused=self.scorer.refused,
        )

    async def close(self) -> None:
        await self.writer.close()
        await self.database.dispose()
