"""Answers, built after the commit from what the writer recorded.

To devices: one ack message per device per commit batch, not one per payload:
the answers, not the reads, decide the rate (DESIGN.md); a hint per operation the
conflict model scored at or above `ml.hint_threshold`. A request that named a
v5 response topic gets its own answer there, correlation data echoed.

To admin commands that submitted a write: a `Reply`, data or a typed error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.seam import Delivery, Outbound, Reply
from handlers.alerts import AckDecoded, AlertDecoded
from handlers.conflicts import ResolutionDecoded
from handlers.errors import Code, Error
from handlers.sync import Decoded, Rejected
from handlers.times import rfc3339

_encode = msgspec.json.Encoder().encode


def _results(decoded: Decoded) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for item in decoded.items:
        if isinstance(item, Rejected):
            results.append(
                {"op_id": item.op_id, "status": "rejected", "error": item.error.as_dict()}
            )
        else:
            result: dict[str, Any] = {
                "op_id": item.op_id,
                "status": item.status,
                "version": item.version,
            }
            if item.risk is not None:
                result["risk"] = item.risk
            results.append(result)
    return results


def _hints(root: str, decoded: Decoded) -> list[Outbound]:
    """A hint to the device for each operation scored at or above the threshold (the
    scorer gave it reasons), at QoS 0: it is advice about now, sent beside the ack that
    carries the risk durably (docs/decisions/0012-hint-reasons.md)."""
    out: list[Outbound] = []
    for item in decoded.items:
        if isinstance(item, Rejected) or not item.reasons:
            continue
        body = {
            "op_id": item.op_id,
            "entity_type": item.entity_type,
            "entity_id": item.entity_id,
            "risk": item.risk,
            "reasons": list(item.reasons),
        }
        out.append(Outbound(f"{root}/devices/{item.device_id}/hints", _encode(body), qos=0))
    return out


def sync_answers(root: str, batch: Sequence[tuple[Delivery, Decoded]]) -> list[Outbound]:
    out: list[Outbound] = []
    per_device: dict[str, list[Decoded]] = {}
    for delivery, decoded in batch:
        out.extend(_hints(root, decoded))
        if delivery.response_topic:
            answer = {"batch_id": decoded.batch_id, "results": _results(decoded)}
            out.append(
                Outbound(delivery.response_topic, _encode(answer), correlation=delivery.correlation)
            )
        else:
            per_device.setdefault(delivery.params["device_id"], []).append(decoded)
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


def alert_answers(root: str, batch: Sequence[tuple[Delivery, AlertDecoded]]) -> list[Outbound]:
    """One answer per alert (alerts are few, and each is answered on its own)."""
    out: list[Outbound] = []
    for delivery, decoded in batch:
        body = _encode(alert_answer(decoded))
        if delivery.response_topic:
            out.append(Outbound(delivery.response_topic, body, correlation=delivery.correlation))
        else:
            device_id = delivery.params["device_id"]
            out.append(Outbound(f"{root}/devices/{device_id}/alerts/ack", body))
    return out


def _error(error: Error) -> Reply:
    return Reply(error=error.as_dict())


def crisis_ack_reply(decoded: AckDecoded) -> Reply:
    """`alerts/ack`: as the ack topic would have it; an unknown alert is `invalid_args`."""
    ack = decoded.record
    if ack is None:
        return _error(decoded.error or Error(Code.INVALID_ARGS, "not an acknowledgement"))
    if ack.outcome == "unknown":
        return _error(Error(Code.INVALID_ARGS, "no crisis alert with that alert_id", "alert_id"))
    return Reply(
        data={
            "alert_id": ack.alert_id,
            "status": ack.outcome,
            "acknowledged_at": rfc3339(ack.acknowledged_at_us, None),
            "acknowledged_by": ack.acknowledged_by,
        }
    )


def resolution_reply(decoded: ResolutionDecoded) -> Reply:
    """`conflicts/resolve`: the resolved conflict, or why it was not resolved."""
    record = decoded.record
    if record is None:
        return _error(decoded.error or Error(Code.INVALID_ARGS, "not a resolution"))
    if record.outcome == "resolved" and record.conflict is not None:
        return Reply(data=record.conflict)
    return _error(Error(Code.INVALID_ARGS, record.problem or "not resolved", record.problem_path))
