"""The config's sections as the rule objects that handlers and storage take.

Handlers and storage never read the config: the engine gives them plain, frozen
rules built here, at start and again on every reload.
"""

from __future__ import annotations

from gateway.config import DEFAULT_CRITICAL_FIELDS, Settings
from handlers import webhooks
from handlers.alerts import AlertNotices, AlertRules
from handlers.conflicts import ConflictNotices, Rules, TypeRules
from handlers.sync import Limits
from storage.alerts import AlertPolicy


def sync_limits(settings: Settings) -> Limits:
    lim = settings.limits
    return Limits(
        max_payload_bytes=lim.max_payload_bytes,
        max_ops=lim.max_ops_per_batch,
        max_clock_skew_us=int(lim.max_clock_skew_s * 1_000_000),
        max_device_meta_bytes=lim.max_device_meta_bytes,
        entity_types=frozenset(settings.sync.entity_types),
    )


def alert_rules(settings: Settings) -> AlertRules:
    cfg = settings.alerts
    return AlertRules(
        crisis_kinds=frozenset(cfg.crisis_kinds),
        crisis_flags=tuple(cfg.crisis_flags),
        crisis_mood_max=cfg.crisis_mood_max,
        crisis_stress_min=cfg.crisis_stress_min,
        wellness_mood_max=cfg.wellness_mood_max,
        wellness_stress_min=cfg.wellness_stress_min,
        max_payload_bytes=settings.limits.max_payload_bytes,
        max_note_bytes=cfg.max_note_bytes,
    )


def alert_policy(settings: Settings) -> AlertPolicy:
    cfg = settings.alerts
    return AlertPolicy(
        low_mood_max=cfg.wellness_mood_max,
        sustained_entries=cfg.sustained_low_mood_entries,
        sustained_window_us=int(cfg.sustained_low_mood_days * 86_400_000_000),
        escalate_after_us=int(cfg.escalate_after_s * 1_000_000),
        max_escalations=cfg.max_escalations,
        wellness_cooldown_us=int(cfg.wellness_cooldown_s * 1_000_000),
    )


def alert_notices(settings: Settings) -> AlertNotices:
    return AlertNotices(
        settings.mqtt.topic_root,
        settings.alerts.suggestions.model_dump(),
        webhook_events(settings),
    )


def conflict_rules(settings: Settings) -> Rules:
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


def webhook_events(settings: Settings) -> frozenset[str]:
    """The event types some enabled webhook endpoint subscribes to (`*`: all of them):
    the outbox holds a webhook row for these only, none that nothing would send."""
    events: set[str] = set()
    for endpoint in settings.webhooks:
        if endpoint.enabled:
            events.update(endpoint.events)
    if webhooks.ALL_EVENTS in events:
        return webhooks.EVENT_TYPES
    return frozenset(events)


def conflict_notices(settings: Settings) -> ConflictNotices:
    return ConflictNotices(settings.mqtt.topic_root, webhook_events(settings))


def scoring(settings: Settings) -> dict[str, float]:
    """The online scorer's settings (ml/scoring.py)."""
    return {
        "window_s": settings.conflicts.window_s,
        "first_sync_hours": settings.ml.first_sync_hours,
        "hint_threshold": settings.ml.hint_threshold,
    }
