"""A daemon's conflict records as the conflict oracle (tests/conflict_oracle.py) reads them."""

from __future__ import annotations

import json

from tests.conflict_oracle import Expected, as_expected
from tests.support.database import db_rows


def stored_conflicts(url: str) -> list[Expected]:
    """A daemon's conflicts (not merged), read from its database in the oracle's terms."""
    members: dict[str, list[str]] = {}
    for conflict_id, op_id in db_rows(url, "select conflict_id, op_id from conflict_members"):
        members.setdefault(conflict_id, []).append(op_id)
    rows = db_rows(
        url,
        "select conflict_id, fields, severity, status, winners, member_count from conflicts"
        " where status != 'merged'",
    )
    return [
        as_expected(
            {
                "fields": json.loads(fields),
                "severity": severity,
                "status": status,
                "winners": json.loads(winners),
                "member_count": count,
            },
            members.get(conflict_id, []),
        )
        for conflict_id, fields, severity, status, winners, count in rows
    ]
