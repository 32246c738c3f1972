"""A daemon's conflict records as the conflict oracle (tests/conflict_oracle.py) reads them."""

from __future__ import annotations

import json
from typing import Any

from tests.conflict_oracle import Expected, as_expected

CONFLICT_ROWS = "select op_a, op_b, fields, severity, status, winner_op_id from conflicts"
"""A daemon's conflict records, as `records_from_rows` reads them."""


def records_from_rows(rows: list[tuple[Any, ...]]) -> list[Expected]:
    """`CONFLICT_ROWS` rows as the oracle's `Expected` records, to compare with it."""
    return [
        as_expected(
            {
                "op_ids": [a, b],
                "fields": json.loads(fields),
                "severity": severity,
                "status": status,
                "winner_op_id": winner,
            }
        )
        for a, b, fields, severity, status, winner in rows
    ]
