"""From the `[conflicts]` config to the detector that the writer runs."""

from __future__ import annotations

from gateway.config import DEFAULT_CRITICAL_FIELDS, Settings
from handlers.conflicts import Rules, TypeRules
from storage.conflicts import Detector
from storage.db import is_sqlite
from storage.window import WindowCache


def rules_from(settings: Settings) -> Rules:
    cfg = settings.conflicts
    types: dict[str, TypeRules] = {}
    for name in {*settings.sync.entity_types, *cfg.types}:
        given = cfg.types.get(name)
        critical = given.critical_fields if given is not None else None
        if critical is None:
            critical = DEFAULT_CRITICAL_FIELDS.get(name, [])
        strategy = given.strategy if given is not None else "last_writer_wins"
        types[name] = TypeRules(strategy, frozenset(critical))
    return Rules(
        window_us=round(cfg.window_s * 1_000_000),
        manual_at_or_above=cfg.manual_at_or_above,
        types=types,
    )


def cache_allowed(settings: Settings) -> bool:
    """Only the database's one writer may trust memory: SQLite, no shared subscription."""
    return (
        settings.conflicts.enabled
        and settings.conflicts.cache_max_ops > 0
        and settings.mqtt.shared_group is None
        and is_sqlite(settings.database.url)
    )


def make_detector(settings: Settings) -> Detector:
    rules = rules_from(settings)
    cache = None
    if cache_allowed(settings):
        cache = WindowCache(settings.conflicts.cache_max_ops, keep_us=2 * rules.window_us)
    return Detector(
        rules, settings.mqtt.topic_root, enabled=settings.conflicts.enabled, cache=cache
    )
