"""The views of `dlq/*` and `webhooks/list` (gateway/cli/dlq_views.py), as an operator
sees them on a terminal of 100 columns (and a narrower one): the chosen columns,
cells cut with an ellipsis rather than wrapped, the line to the next page, the payload
pretty-printed, the replay's summary and its failures.

The views are rendered from answers' data, as `fieldgate admin` renders them (the
VIEWS table of gateway/cli/render.py), to a rich Console of a fixed width without
colours; the answers' shape is PROTOCOL.md's, made here.
"""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console

from gateway.cli.render import VIEWS

PAYLOAD = {
    "type": "alert.crisis.escalated",
    "timestamp": "2026-11-29T12:00:00.123456Z",
    "data": {"alert_id": "al-1", "reasons": ["panic"]},
}


def seen(command: str, data: dict[str, Any], width: int = 100) -> list[str]:
    """The view's lines as printed `width` columns wide, trailing blanks dropped."""
    output = io.StringIO()
    console = Console(width=width, file=output, color_system=None)
    for part in VIEWS[command](data, width):
        console.print(part)
    return [line.rstrip() for line in output.getvalue().splitlines()]


def cells(line: str) -> list[str]:
    """A table line's cells: columns are two or more spaces apart."""
    return re.split(r"\s{2,}", line.strip())


def table(lines: list[str], width: int) -> list[list[str]]:
    """A one-line-per-row table's header and rows as cells, after checking that it fits
    in `width` and that the header's rule is where it belongs."""
    assert max(len(line) for line in lines) <= width, lines
    assert set(lines[1]) == {"─"}, lines
    return [cells(line) for line in (lines[0], *lines[2:])]


def item(
    entry_id: str, webhook: str, event: str, error: str | None, status: int | None
) -> dict[str, Any]:
    return {
        "id": entry_id,
        "webhook": webhook,
        "url": "https://ops.example/hook",
        "event_type": event,
        "payload": PAYLOAD,
        "attempts": 6,
        "first_attempt_at": "2026-12-06T03:17:00.000000Z",
        "failed_at": "2026-12-06T04:00:00.007000Z",
        "last_status": status,
        "last_error": error,
        "webhook_id": "msg_9f2c",
    }


ITEMS = [
    item("dlq_a1b2c3d4e5f60718293a4b5c6d7e8f90", "ops-console", "alert.crisis.escalated",
         "no answer within 15 s", None),
    item("dlq_5e6f00000000000000000000000000aa", "warehouse", "conflict.detected",
         "HTTP 503", 503),
    item("dlq_7000000000000000000000000000000b", "warehouse", "conflict.resolved",
         "cannot connect: Connection refused by the receiver, at a length that cannot fit",
         None),
    item("foreign-1", "erp", "alert.wellness", None, 410),
]  # fmt: skip


def test_the_list_is_one_line_per_entry_within_100_columns() -> None:
    """Checked against: the generic table (a column per field, the payload folded in),
    the whole id (the row past 100 columns), a status without its error shown as `-`."""
    lines = seen("dlq/list", {"items": ITEMS, "next_cursor": "WzE3OTY1Mjk2MDAwMDcsImUiXQ"})
    assert len(lines[0]) == 98
    assert table(lines[:-2], 100) == [
        ["id", "webhook", "event", "attempts", "last status / error", "failed (UTC)"],
        [
            "dlq_a1b2c3d4…",
            "ops-console",
            "alert.crisis.escalated",
            "6",
            "no answer within 15 s",
            "12-06 04:00:00",
        ],
        ["dlq_5e6f0000…", "warehouse", "conflict.detected", "6", "HTTP 503", "12-06 04:00:00"],
        [
            "dlq_70000000…",
            "warehouse",
            "conflict.resolved",
            "6",
            "cannot connect: Conne…",
            "12-06 04:00:00",
        ],
        ["foreign-1", "erp", "alert.wellness", "6", "HTTP 410", "12-06 04:00:00"],
    ]
    assert lines[-2:] == [
        "more: --arg cursor=WzE3OTY1Mjk2MDAwMDcsImUiXQ",
        "ids cut to fit: a wider terminal or --json-output shows them whole",
    ]


def test_a_wide_terminal_shows_the_whole_ids() -> None:
    lines = seen("dlq/list", {"items": ITEMS[:2], "next_cursor": None}, width=140)
    assert table(lines, 140) == [
        ["id", "webhook", "event", "attempts", "last status / error", "failed (UTC)"],
        [
            "dlq_a1b2c3d4e5f60718293a4b5c6d7e8f90",
            "ops-console",
            "alert.crisis.escalated",
            "6",
            "no answer within 15 s",
            "12-06 04:00:00",
        ],
        [
            "dlq_5e6f00000000000000000000000000aa",
            "warehouse",
            "conflict.detected",
            "6",
            "HTTP 503",
            "12-06 04:00:00",
        ],
    ]


def test_on_a_narrow_terminal_the_error_gives_way_first() -> None:
    lines = seen("dlq/list", {"items": ITEMS[:2], "next_cursor": None}, width=80)
    assert lines[-1] == "ids cut to fit: a wider terminal or --json-output shows them whole"
    assert table(lines[:-1], 80) == [
        ["id", "webhook", "event", "attempts", "last status…", "failed (UTC)"],
        ["dlq_a1b2c3d4…", "ops-con…", "alert.crisis.e…", "6", "no answer w…", "12-06 04:00:00"],
        ["dlq_5e6f0000…", "warehou…", "conflict.detec…", "6", "HTTP 503", "12-06 04:00:00"],
    ]


def test_an_empty_queue_says_so() -> None:
    lines = seen("dlq/list", {"items": [], "next_cursor": None})
    assert lines[-1].strip() == "the dead-letter queue is empty"
    assert "more:" not in "\n".join(lines)


def test_get_shows_the_facts_and_the_payload_pretty_printed() -> None:
    """Checked against: the payload on one line, a missing id passed over in silence."""
    lines = seen("dlq/get", {"items": [ITEMS[1]], "missing": ["dlq_nope"]})
    assert lines == [
        "entry          dlq_5e6f00000000000000000000000000aa",
        "webhook        warehouse",
        "url            https://ops.example/hook",
        "event          conflict.detected",
        "attempts       6",
        "first attempt  2026-12-06T03:17:00.000000Z",
        "failed         2026-12-06T04:00:00.007000Z",
        "last status    503",
        "last error     HTTP 503",
        "webhook-id     msg_9f2c",
        "payload",
        "{",
        '  "type": "alert.crisis.escalated",',
        '  "timestamp": "2026-11-29T12:00:00.123456Z",',
        '  "data": {',
        '    "alert_id": "al-1",',
        '    "reasons": [',
        '      "panic"',
        "    ]",
        "  }",
        "}",
        "not in the dead-letter queue: dlq_nope",
    ]


def test_the_replay_is_its_summary_and_the_failures_it_names() -> None:
    data = {
        "total": 1000,
        "replayed": 975,
        "failed": 25,
        "failures": [
            {"id": ITEMS[0]["id"], "error": "endpoint gone is not configured"},
            {"id": ITEMS[1]["id"], "error": "HTTP 410"},
        ],
    }
    assert seen("dlq/replay", data) == [
        "replayed 975 of 1000 entries, 25 failed",
        "id                                     error",
        "──────────────────────────────────────────────────────────────────────",
        "dlq_a1b2c3d4e5f60718293a4b5c6d7e8f90   endpoint gone is not configured",
        "dlq_5e6f00000000000000000000000000aa   HTTP 410",
        "                      the first 2 of 25 failures",
    ]
    clean = {"total": 1, "replayed": 1, "failed": 0, "failures": []}
    assert seen("dlq/replay", clean) == ["replayed 1 of 1 entry"]


def test_purge_and_reindex_are_one_line() -> None:
    assert seen("dlq/purge", {"purged": 1}) == ["purged 1 entry"]
    assert seen("dlq/purge", {"purged": 0}) == ["purged 0 entries"]
    assert seen("dlq/reindex", {"adopted": 12}) == ["adopted 12 entries into the index"]


def test_webhooks_list_is_one_line_per_endpoint() -> None:
    """A paused endpoint says until when; the last error comes before its time (a cut
    cell keeps what failed)."""

    def endpoint(name: str, state: str, **facts: Any) -> dict[str, Any]:
        row = {
            "name": name,
            "url": "https://example.org/hook",
            "enabled": state != "disabled",
            "state": state,
            "in_flight": 0,
            "pending": 0,
            "retrying": 0,
            "last_success_at": None,
            "last_error": None,
            "last_error_at": None,
            "breaker": {"state": "closed", "failures": 0, "paused_until": None},
        }
        return {**row, **facts}

    items = [
        endpoint(
            "ops-console",
            "active",
            in_flight=2,
            pending=14,
            last_success_at="2026-12-06T04:01:02.345678Z",
        ),
        endpoint(
            "warehouse",
            "paused",
            pending=230,
            retrying=17,
            last_success_at="2026-12-06T03:40:00Z",
            last_error="HTTP 503",
            last_error_at="2026-12-06T04:00:59.100000Z",
            breaker={"state": "open", "failures": 5, "paused_until": "2026-12-06T04:02:59Z"},
        ),
        endpoint("old-erp", "disabled"),
    ]
    assert table(seen("webhooks/list", {"items": items}, width=120), 120) == [
        [
            "name",
            "state",
            "in flight",
            "pending",
            "retrying",
            "last success",
            "last error",
        ],
        ["ops-console", "active", "2", "14", "0", "12-06 04:01:02", "-"],
        [
            "warehouse",
            "paused till 04:02:59",
            "0",
            "230",
            "17",
            "12-06 03:40:00",
            "HTTP 503 (12-06 04:00:59)",
        ],
        ["old-erp", "disabled", "0", "0", "0", "-", "-"],
    ]
    narrow = seen("webhooks/list", {"items": items}, width=100)
    assert max(len(line) for line in narrow) <= 100
    assert narrow[3].endswith("HTTP 503 (12-06 04…")
    assert seen("webhooks/list", {"items": []})[-1].strip() == "no endpoints configured"
