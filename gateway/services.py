"""What admin commands and periodic tasks may reach: the daemon's parts, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import Settings
from gateway.escalation import Escalator
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.mqtt import MqttSession
from gateway.outbox import OutboxPublisher
from storage.writer import Writer


@dataclass
class Services:
    settings: Settings
    config_path: Path | None
    started_at: datetime
    engine: AsyncEngine
    metrics: Metrics
    session: MqttSession
    writer: Writer
    ingest: Ingest
    outbox: OutboxPublisher
    escalator: Escalator
    redis: Redis
    reload: Callable[[], list[str]]
