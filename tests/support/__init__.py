"""Everything the tests share, in one place: `from tests.support import ...`.

Modules by job: processes (Mosquitto, Redis, PostgreSQL, the daemon), mqtt (the
test client, SUBACK and fences), database (fresh databases, reading rows), sync
and alerts (payloads, answers, fences through the daemon), admin (the admin
client), times (expected times, computed apart from the gateway's), requirements
(skip locally, fail in CI), conflicts (records for the conflict oracle), faults
(SQLite's write lock held by another process, a small disk to fill).
"""

from tests.support.admin import HEALTHY, STATS_KEYS, Admin
from tests.support.alerts import Watch, alert, stored_reasons
from tests.support.conflicts import stored_conflicts
from tests.support.database import (
    db_rows,
    judged,
    outbox_sent,
    pg_admin_url,
    pg_available,
    pg_database,
    plain_url,
    plain_writer,
    sqlite_path,
)
from tests.support.faults import SmallDisk, SqliteLock
from tests.support.mqtt import Client, PersistentClient, Received
from tests.support.processes import (
    ROOT,
    Daemon,
    Mosquitto,
    NotifySocket,
    PostgresServer,
    RedisServer,
    compile_project,
    daemon_env,
    end_process,
    fieldgate,
    free_port,
    in_a_terminal,
    memory_mib,
    wait_for,
    wait_port,
)
from tests.support.requirements import in_ci, require
from tests.support.settings import CONFIG_DEFAULTS
from tests.support.sync import (
    SPINE_ONLY,
    AckRecorder,
    OpStream,
    ack_topic,
    counter_ops,
    expect_results,
    kill_marks,
    queue_for,
    results_of,
    results_on,
    send_one,
    stored,
    sync_fence,
    sync_op,
    sync_topic,
)
from tests.support.times import EPOCH, NOW, T0, at, days_ago, from_us, iso, shortest, us

__all__ = [
    "CONFIG_DEFAULTS",
    "EPOCH",
    "HEALTHY",
    "NOW",
    "ROOT",
    "SPINE_ONLY",
    "STATS_KEYS",
    "T0",
    "AckRecorder",
    "Admin",
    "Client",
    "Daemon",
    "Mosquitto",
    "NotifySocket",
    "OpStream",
    "PersistentClient",
    "PostgresServer",
    "Received",
    "RedisServer",
    "SmallDisk",
    "SqliteLock",
    "Watch",
    "ack_topic",
    "alert",
    "at",
    "compile_project",
    "counter_ops",
    "daemon_env",
    "days_ago",
    "db_rows",
    "end_process",
    "expect_results",
    "fieldgate",
    "free_port",
    "from_us",
    "in_a_terminal",
    "in_ci",
    "iso",
    "judged",
    "kill_marks",
    "memory_mib",
    "outbox_sent",
    "pg_admin_url",
    "pg_available",
    "pg_database",
    "plain_url",
    "plain_writer",
    "queue_for",
    "require",
    "results_of",
    "results_on",
    "send_one",
    "shortest",
    "sqlite_path",
    "stored",
    "stored_conflicts",
    "stored_reasons",
    "sync_fence",
    "sync_op",
    "sync_topic",
    "us",
    "wait_for",
    "wait_port",
]
