"""The configuration's defaults as docs/configuration.md states them, written out here
(not read from gateway/config.py) so that a changed default fails a test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr

CONFIG_DEFAULTS: dict[str, Any] = {
    "instance": "fieldgate-1",
    "mqtt": {
        "host": "127.0.0.1",
        "port": 1883,
        "topic_root": "fieldgate",
        "client_id": "fieldgate-1",
        "username": None,
        "password": None,
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
        "keepalive_s": 30,
        "session_expiry_s": 604800,
        "receive_maximum": 10000,
        "max_outgoing_inflight": 1000,
        "shared_group": None,
        "reconnect_min_s": 0.5,
        "reconnect_max_s": 30.0,
    },
    "database": {
        "url": "sqlite+aiosqlite:///var/fieldgate.db",
        "auto_upgrade": True,
        "echo": False,
        "pool_size": 5,
    },
    "redis": {"url": SecretStr("redis://127.0.0.1:6379/0")},
    "admin": {"token": None},
    "limits": {
        "max_payload_bytes": 262144,
        "max_ops_per_batch": 500,
        "max_clock_skew_s": 300.0,
        "max_device_meta_bytes": 4096,
        "device_rate": 0.0,
        "device_burst": 1000,
    },
    "writer": {"max_messages": 4000, "max_wait_ms": 5.0, "max_in_process": 20000},
    "engine": {"max_channel_bytes": 67108864, "restart_max_s": 10.0},
    "sync": {"entity_types": ["work_order", "task", "asset", "attendance"]},
    "alerts": {
        "crisis_kinds": ["panic"],
        "crisis_flags": ["self_harm_risk", "suicidal_ideation", "violence", "injury"],
        "crisis_mood_max": 2,
        "crisis_stress_min": 5,
        "wellness_mood_max": 4,
        "wellness_stress_min": 4,
        "sustained_low_mood_entries": 3,
        "sustained_low_mood_days": 7.0,
        "escalate_after_s": 300.0,
        "max_escalations": 3,
        "escalation_poll_s": 1.0,
        "wellness_cooldown_s": 86400.0,
        "max_note_bytes": 8192,
        "suggestions": {
            "sustained_low_mood": (
                "Several low days in a row: consider talking to your supervisor"
                " or the support line."
            ),
            "low_mood": "Take a short break, get some water, and check in with a colleague.",
            "high_stress": "Pause for a few slow breaths; ask for help with what can wait.",
        },
    },
    "conflicts": {
        "enabled": True,
        "detect": "after_ack",
        "max_delay_s": 10.0,
        "pass_interval_ms": 200.0,
        "pass_max_ops": 5000,
        "pass_budget_ms": 3.0,
        "window_s": 300.0,
        "manual_at_or_above": "critical",
        "types": {},
        "cache_max_ops": None,
    },
    "outbox": {"retention_s": 604800.0},
    "quarantine": {"retention_s": 2592000.0, "max_rows": 1_000_000},
    "dlq": {"ttl_s": 1209600, "replay_concurrency": 8},
    "ml": {
        "models_dir": Path("var/models"),
        "min_rows": 1000,
        "first_sync_hours": 168.0,
        "algorithm": "random_forest",
        "retrain_interval_s": 0.0,
        "hint_threshold": 0.7,
    },
    "health": {"interval_s": 60.0, "wedged_after_s": 30.0},
    "metrics": {"listen": ""},
    "log": {"level": "info", "format": "auto"},
    "webhooks": [],
}
"""`Settings().model_dump()`: every key, every default."""
