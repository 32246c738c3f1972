"""Answers to devices, built after the commit from what the writer recorded.

One ack message per device per commit batch, not one per payload: the answers,
not the reads, decide the rate (DESIGN.md). A request that named a v5 response
topic gets its own answer there, correlation data echoed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.mqtt import Inbound, Outbound
from handlers.alerts import AlertDecoded
from handlers.sync import Decoded, Rejected

_encode = msgspec.json.Encoder().encode


def _results(decoded: Decoded) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for item in decoded.items:
        if isinstance(item, Rejected):
            results.append(
                {"op_id": item.op_id, "status": "rejected", "error": item.error.as_dict()}
            )
        else:
            results.append({"op_id": item.op_id, "status": item.status, "version": item.version})
    return results


def sync_answers(root: str, batch: Sequence[tuple[Inbound, str, Decoded]]) -> list[Outbound]:
    out: list[Outbound] = []
    per_device: dict[str, list[Decoded]] = {}
    for message, device_id, decoded in batch:
        if message.response_topic:
            answer = {"batch_id": decoded.batch_id, "results": _results(decoded)}
            out.append(
                Outbound(message.response_topic, _encode(answer), correlation=message.correlation)
            )
        else:
            per_device.setdefault(device_id, []).append(decoded)
    for device_id, payloads in per_device.items():
        topic = f"{root}/devices/{device_id}/sync/ack"
        body: dict[str, Any]
        if len(payloads) == 1:
            body = {"batch_id": payloads[0].batch_id, "results": _results(payloads[0])}
        else:
            results = [result for decoded in payloads for result in _results(decoded)]
            batch_ids = [d.batch_id for d in payloads if d.batch_id is not None]
            body = {"batch_ids": batch_ids, "results": results}
        out.append(Outbound(topic, _encode(body)))
    return out


def alert_answer(decoded: AlertDecoded) -> dict[str, Any]:
    """`{"alert_id", "status", "classification", "error"?}`; a duplicate has the stored class."""
    if decoded.error is not None or decoded.record is None:
        error = decoded.error.as_dict() if decoded.error is not None else None
        return {
            "alert_id": decoded.alert_id,
            "status": "rejected",
            "classification": None,
            "error": error,
        }
    record = decoded.record
    return {
        "alert_id": record.alert_id,
        "status": record.status,
        "classification": record.classification,
    }


def alert_answers(root: str, batch: Sequence[tuple[Inbound, str, AlertDecoded]]) -> list[Outbound]:
    """One answer per alert (alerts are few, and each is answered on its own)."""
    out: list[Outbound] = []
    for message, device_id, decoded in batch:
        body = _encode(alert_answer(decoded))
        if message.response_topic:
            out.append(Outbound(message.response_topic, body, correlation=message.correlation))
        else:
            out.append(Outbound(f"{root}/devices/{device_id}/alerts/ack", body))
    return out
