"""Which failures of a commit are the data's fault: the line between retrying and refusing.

The writer retries a failed batch until it commits, so that a database outage
delays acks and never loses an operation. That is wrong for a batch that holds a
value the database will never take (a string PostgreSQL cannot encode, a CHECK
that refuses a row): retried whole, it stalls ingest forever. Such a batch is
*refused*, and the writer isolates the message at fault (see `Writer.isolate`).

A wrong "transient" only stalls, as before; a wrong "permanent" rejects good data.
So only what is known to come from the values is permanent:

- `IntegrityError`, `DataError`, `NotSupportedError`, `ProgrammingError`:
  constraint violations, values out of range or not representable, a trigger's
  `RAISE` (PostgreSQL's P0001 is a `ProgrammingError` in psycopg). Not
  PostgreSQL's SQLSTATE class 42 (undefined table or column, insufficient
  privilege): a migration not run or a revoked grant fails every message alike,
  and must stall loudly, not reject everything.
- `UnicodeEncodeError`, `OverflowError` raised by the driver itself while binding
  a value, before any SQL is sent (psycopg: a character the database's encoding
  lacks; sqlite3: an integer over 64 bits). SQLAlchemy does not wrap them.

Everything else is retried: `OperationalError` (connection lost, server shutting
down; in psycopg 3 also deadlocks, serialization failures, lock timeouts, disk
full), `InterfaceError`, `InternalError` (a read-only standby after a failover,
an idle-in-transaction timeout) and the bare `DBAPIError`.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, IntegrityError, NotSupportedError, ProgrammingError

PERMANENT = (IntegrityError, DataError, NotSupportedError, ProgrammingError)
DRIVER_BIND = (UnicodeEncodeError, OverflowError)
ACCESS_RULE_CLASS = "42"
"""PostgreSQL's SQLSTATE class "syntax error or access rule violation"."""


def refusal(exc: BaseException) -> str | None:
    """The class name of `exc` if it says the database refuses the data for good, else None.

    The name is the driver's class where there is one (`CheckViolation`,
    `UntranslatableCharacter`): it says what kind of refusal without the database's
    message, which may quote the row (an alert's note).
    """
    if isinstance(exc, DRIVER_BIND):
        return type(exc).__name__
    if not isinstance(exc, PERMANENT):
        return None
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if isinstance(exc, ProgrammingError) and sqlstate.startswith(ACCESS_RULE_CLASS):
        return None
    return type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__
