"""Flood control (issue 15, item 2): the others' ack latency with and without a flooder.

The issue's target: with `limits.device_rate` / `limits.device_burst` set, one
device publishing at ten times its budget while 20 others publish normally, the
others' ack p99 stays within twice its value without the flood; none of their
operations is lost; the flooder's excess is answered `rate_limited`.

    .venv/bin/python -m benchmarks.flood
        [--devices 20] [--rate-per-device 20] [--device-rate 40] [--device-burst 40]
        [--flood-factor 10] [--duration 20] [--warmup 3] [--repeat 3]
        [--publishers 2] [--settle 10] [--json] [--keep]

A short check: `--duration 5 --repeat 1`. Run it with the virtualenv's python
from the repository's root.

The machinery is benchmarks.ack_latency's (its docstring tells the details):
one test-owned Mosquitto for the whole run; for each run a fresh daemon of this
checkout on a fresh SQLite database, with the shipped config plus
`limits.device_rate` and `limits.device_burst`; `--publishers` processes
publishing the normal devices' operations (`dev-00` .. `dev-19`), one a message,
QoS 1, evenly spaced at `devices x rate-per-device` a second; latency is the
time the answer reaches a subscriber on `<root>/devices/+/sync/ack` minus the
time the operation was handed to paho (one monotonic clock).

Two variants, alternating (quiet, flood, quiet, flood, ...) so that a machine
that gets busier weighs on both alike, each with the limits set:

- `quiet`: the normal devices alone.
- `flood`: the same, plus one more publisher process for the flooder
  (`flood-00`) at `flood-factor x device-rate` operations a second, on the same
  schedule (same t0, warm-up and duration).

Measured, per run: the normal devices' latency p50/p90/p99/max over the
operations after the warm-up; their answers by status (every one is expected
`stored`) and those never answered within `--settle` s of the last publish
(lost, as far as a device can tell); the flooder's answers: `stored` (its burst,
then its rate), `rejected:rate_limited`, anything else, none; the rows the
daemon holds afterwards (the normal devices' rows must be all of their ops, the
flooder's its stored ones, the quarantine its rate_limited ones); the CPU of
the gateway and its engine over the measured window (cores used). Summary: the
median over the repetitions of each variant's percentiles, the ratio
p99(flood) / p99(quiet) against the target (<= 2), and the counts.

The flooder's answers reach the benchmark's subscriber too (a real flooder's go
to it alone): the measuring process handles twice the messages in `flood`.
Figures are only as good as the machine is quiet: the load average at the start
of each run is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.ack_latency import (
    Acks,
    Gateway,
    Load,
    Publishers,
    describe,
    op_id,
    summary_ms,
    tree_cpu,
)
from benchmarks.drain import machine, scrape
from tests.support import ROOT, Mosquitto, wait_for

TARGET_RATIO = 2.0
RATE_LIMITED = "rejected:rate_limited"
VARIANTS = ("quiet", "flood")


def log(message: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rows_by_device(db: Path, flooder: str) -> dict[str, int]:
    """Rows the daemon holds afterwards: the normal devices' and the flooder's in the
    sync log, the flooder's quarantined as rate_limited, any other quarantine row."""
    queries = {
        "normal_rows": ("select count(*) from sync_log where device_id != ?", (flooder,)),
        "flooder_rows": ("select count(*) from sync_log where device_id = ?", (flooder,)),
        "flooder_quarantined": (
            "select count(*) from quarantine where device_id = ? and code = 'rate_limited'",
            (flooder,),
        ),
        "other_quarantined": (
            "select count(*) from quarantine where device_id != ? or code != 'rate_limited'",
            (flooder,),
        ),
    }
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return {
            name: int(conn.execute(sql, args).fetchone()[0])
            for name, (sql, args) in queries.items()
        }


def flood_budget(limits: dict[str, str], span_s: float) -> float:
    """What the flooder may have stored: its burst, then the rate while it sent."""
    return float(limits["LIMITS__DEVICE_BURST"]) + float(limits["LIMITS__DEVICE_RATE"]) * span_s


def run_once(
    variant: str,
    index: int,
    normal: Load,
    flood: Load,
    limits: dict[str, str],
    broker: Mosquitto,
    base: Path,
    settle_s: float,
) -> dict[str, Any]:
    tag = f"{variant}{index}-{uuid.uuid4().hex[:6]}"
    flood_tag = f"{tag}f"
    workdir = base / tag
    workdir.mkdir(parents=True)
    loadavg = os.getloadavg()[0]
    gateway = Gateway(ROOT, workdir, broker.port, **limits)
    acks: Acks | None = None
    publishers: list[Publishers] = []
    flood_sent: list[float] = []
    try:
        gateway.start()
        assert gateway.proc is not None
        pid = gateway.proc.pid
        acks = Acks(broker.port, gateway.root).start()
        publishers.append(Publishers(broker.port, gateway.root, tag, normal))
        if variant == "flood":
            publishers.append(Publishers(broker.port, gateway.root, flood_tag, flood))
        for group in publishers:
            group.launch()
        t0 = time.monotonic() + 0.5
        for group in publishers:
            group.go(t0)
        measured_from = t0 + normal.warmup_s
        measured_to = measured_from + normal.duration_s
        time.sleep(max(0.0, measured_from - time.monotonic()))
        cpu_before = tree_cpu(pid)
        time.sleep(max(0.0, measured_to - time.monotonic()))
        cpu_after = tree_cpu(pid)
        sent, errors, _pubacks, _cpu = publishers[0].results(timeout_s=120)
        if variant == "flood":
            flood_sent, flood_errors, _, _ = publishers[1].results(timeout_s=120)
            errors += flood_errors
        answers = acks.answers
        ids = [op_id(tag, i) for i in range(normal.total)]
        flood_ids = [op_id(flood_tag, i) for i in range(len(flood_sent))]
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: all(i in answers for i in ids) and all(i in answers for i in flood_ids),
                timeout=settle_s,
                interval=0.05,
            )
        series = scrape(gateway.metrics_port)
    finally:
        for group in publishers:
            group.stop()
        if acks is not None:
            acks.close()
        gateway.stop()
    exit_code = gateway.proc.returncode if gateway.proc is not None else None
    held = rows_by_device(gateway.db, flood.device_id(0))

    measured = range(normal.warmup_ops, normal.total)
    latencies = [
        (answers[ids[i]][0] - sent[i]) * 1000
        for i in measured
        if ids[i] in answers and not math.isnan(sent[i])
    ]
    normal_statuses = Counter(answers[i][1] for i in ids if i in answers)
    flood_statuses = Counter(answers[i][1] if i in answers else "unanswered" for i in flood_ids)
    lateness = [
        (sent[i] - (t0 + i / normal.rate)) * 1000 for i in measured if not math.isnan(sent[i])
    ]
    flood_span = flood_sent[-1] - flood_sent[0] if len(flood_sent) > 1 else 0.0
    gw_s = sum(t - cpu_before.get(p, 0.0) for p, t in cpu_after.items())
    commits = series.get("fieldgate_commit_seconds_count", 0.0)
    result: dict[str, Any] = {
        "variant": variant,
        "run": index + 1,
        "loadavg_1m_at_start": round(loadavg, 2),
        "latency_ms": summary_ms(latencies),
        "normal": {
            "sent": normal.total,
            "statuses": dict(normal_statuses),
            "lost": sum(1 for i in ids if i not in answers),
            "not_stored": sum(n for s, n in normal_statuses.items() if s != "stored"),
            "rows": held["normal_rows"],
        },
        "flooder": {
            "sent": len(flood_sent),
            "achieved_rate": round((len(flood_sent) - 1) / flood_span, 1) if flood_span else None,
            "statuses": dict(flood_statuses),
            "budget": round(flood_budget(limits, flood_span)) if flood_sent else 0,
            "stored": flood_statuses.get("stored", 0),
            "rate_limited": flood_statuses.get(RATE_LIMITED, 0),
            "rows": held["flooder_rows"],
            "quarantined": held["flooder_quarantined"],
        },
        "other_quarantined": held["other_quarantined"],
        "lateness_ms": summary_ms(lateness),
        "publish_errors": errors,
        "gateway_cores": round(gw_s / normal.duration_s, 2),
        "commits": int(commits),
        "commit_ms_mean": round(series.get("fieldgate_commit_seconds_sum", 0.0) / commits * 1e3, 2)
        if commits
        else None,
        "exit_code": exit_code,
        "log_lines": len(gateway.complaints()),
        "log_first": gateway.complaints()[:3],
    }
    result["lost"] = result["normal"]["lost"] + result["normal"]["not_stored"]
    result["consistent"] = (
        result["normal"]["rows"] == normal.total
        and result["flooder"]["rows"] == result["flooder"]["stored"]
        and result["flooder"]["quarantined"] == result["flooder"]["rate_limited"]
        and result["other_quarantined"] == 0
    )
    lat = result["latency_ms"]
    log(
        f"{variant} #{index + 1}: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; "
        f"normal lost {result['lost']}; flooder {result['flooder']['stored']} stored, "
        f"{result['flooder']['rate_limited']} rate_limited of {len(flood_sent)}"
    )
    return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    for variant, results in runs.items():
        answered = [r for r in results if r["latency_ms"].get("count")]
        if answered:
            medians[variant] = {
                key: round(statistics.median(r["latency_ms"][key] for r in answered), 2)
                for key in ("p50", "p90", "p99", "max")
            }
    lost = sum(r["lost"] for rs in runs.values() for r in rs)
    consistent = all(r["consistent"] for rs in runs.values() for r in rs)
    flood_runs = runs.get("flood", [])
    out: dict[str, Any] = {
        "median": medians,
        "lost": lost,
        "consistent": consistent,
        "flooder": {
            key: sum(r["flooder"][key] for r in flood_runs)
            for key in ("sent", "budget", "stored", "rate_limited")
        },
    }
    if "quiet" in medians and "flood" in medians and medians["quiet"]["p99"]:
        ratio = round(medians["flood"]["p99"] / medians["quiet"]["p99"], 3)
        out["p99_flood_over_quiet"] = ratio
        out["target"] = {
            "ratio_at_most": TARGET_RATIO,
            "met": ratio <= TARGET_RATIO and lost == 0 and consistent,
        }
    return out


def _ms(summary: dict[str, float], key: str, width: int) -> str:
    value = summary.get(key)
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def text(report: dict[str, Any]) -> str:
    normal, flood, limits = report["normal"], report["flood"], report["limits"]
    lines = [
        f"flood control: {normal['devices']} devices x "
        f"{normal['rate'] / normal['devices']:g} ops/s ({normal['rate']:g} ops/s), limits "
        f"device_rate {limits['LIMITS__DEVICE_RATE']}, device_burst "
        f"{limits['LIMITS__DEVICE_BURST']}; flooder at {flood['rate']:g} ops/s; "
        f"{normal['duration_s']:g} s measured after {normal['warmup_s']:g} s warm-up, "
        f"{report['repeat']} run(s) each; {report['machine']['nproc']} CPUs; "
        f"{report['checkout']['commit'][:12]}"
        + (" + uncommitted changes" if report["checkout"]["dirty"] else ""),
        "",
        f"{'variant':<8}{'run':>4}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}{'count':>7}"
        f"{'lost':>6}{'fl.sent':>8}{'fl.ops/s':>9}{'stored':>7}{'limited':>8}"
        f"{'budget':>7}{'rows ok':>8}{'late p99':>9}{'cores':>6}{'commit':>7}{'load':>6}",
    ]
    for results in report["runs"].values():
        for r in results:
            lat, fl = r["latency_ms"], r["flooder"]
            lines.append(
                f"{r['variant']:<8}{r['run']:>4}{_ms(lat, 'p50', 8)}{_ms(lat, 'p90', 8)}"
                f"{_ms(lat, 'p99', 8)}{_ms(lat, 'max', 9)}{lat.get('count', 0):>7}"
                f"{r['lost']:>6}{fl['sent']:>8}{fl['achieved_rate'] or 0:>9.0f}"
                f"{fl['stored']:>7}{fl['rate_limited']:>8}{fl['budget']:>7}"
                f"{'yes' if r['consistent'] else 'NO':>8}{r['lateness_ms'].get('p99', 0):>9.2f}"
                f"{r['gateway_cores']:>6.2f}{r['commit_ms_mean'] or 0:>7.1f}"
                f"{r['loadavg_1m_at_start']:>6.2f}"
            )
    lines += [
        "(the normal devices' latencies in ms; 'lost': their ops unanswered or not stored;",
        " 'fl.': the flooder's ops sent and its achieved rate, 'stored' and 'limited' its",
        " answers, 'budget' its burst + rate x its sending time; 'rows ok': the database",
        " holds every normal op, the flooder's stored ones, a quarantine row per",
        " rate_limited one and nothing else; 'late p99': publishers",
        " behind schedule, ms; 'cores': gateway + engine CPU over the measured window;",
        " 'commit': ms per commit, mean; 'load': the load average at the start)",
        "",
    ]
    summary = report["summary"]
    for variant, m in summary["median"].items():
        lines.append(
            f"median {variant:<6} p50 {m['p50']:>7.2f}  p90 {m['p90']:>7.2f}  "
            f"p99 {m['p99']:>7.2f}  max {m['max']:>8.2f} ms"
        )
    fl = summary["flooder"]
    lines.append(
        f"normal ops lost: {summary['lost']}; flooder: {fl['sent']} sent, {fl['stored']} stored"
        f" (its budget: {fl['budget']}), {fl['rate_limited']} rate_limited; rows consistent: "
        f"{'yes' if summary['consistent'] else 'NO'}"
    )
    if "target" in summary:
        lines.append(
            f"p99 flood / quiet: {summary['p99_flood_over_quiet']} (target <= "
            f"{summary['target']['ratio_at_most']:g}, nothing lost): "
            f"{'met' if summary['target']['met'] else 'NOT met'}"
        )
    for results in report["runs"].values():
        for r in results:
            if r["log_lines"] or r["publish_errors"] or r["exit_code"]:
                lines.append(
                    f"{r['variant']} #{r['run']}: exit {r['exit_code']}, {r['log_lines']} log"
                    f" lines at warning+, {r['publish_errors']} publish errors; first: "
                    f"{r['log_first'][:1]}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=20, help="normal devices")
    parser.add_argument("--rate-per-device", type=float, default=20.0, help="ops/s of each")
    parser.add_argument(
        "--device-rate", type=float, help="limits.device_rate [default: 2 x --rate-per-device]"
    )
    parser.add_argument(
        "--device-burst", type=int, help="limits.device_burst [default: --device-rate]"
    )
    parser.add_argument("--flood-factor", type=float, default=10.0, help="x device_rate")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds excluded first")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=2, help="normal publisher processes")
    parser.add_argument("--entities", type=int, default=1_000_000, help="tasks edited")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds to wait for answers after the load"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, dbs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    device_rate = args.device_rate or 2 * args.rate_per_device
    burst = args.device_burst or max(1, math.ceil(device_rate))
    if min(args.devices, args.repeat, args.publishers) < 1 or args.rate_per_device <= 0:
        parser.error("devices, repeat, publishers and rate-per-device must be positive")
    if args.duration <= 0 or args.warmup < 0 or args.flood_factor <= 0:
        parser.error("duration and flood-factor must be positive, warmup not negative")
    if args.rate_per_device >= device_rate:
        parser.error(
            "the normal devices must be within their budget: rate-per-device < device-rate"
        )
    normal = Load(
        rate=args.devices * args.rate_per_device,
        devices=args.devices,
        duration_s=args.duration,
        warmup_s=args.warmup,
        entities=args.entities,
        publishers=args.publishers,
        seed=args.seed,
    )
    flood = Load(
        rate=args.flood_factor * device_rate,
        devices=1,
        duration_s=args.duration,
        warmup_s=args.warmup,
        entities=args.entities,
        publishers=1,
        seed=args.seed + 1,
        device_prefix="flood",
    )
    limits = {"LIMITS__DEVICE_RATE": f"{device_rate:g}", "LIMITS__DEVICE_BURST": str(burst)}

    base = Path(tempfile.mkdtemp(prefix="fieldgate-flood-"))
    broker = Mosquitto(base / "mosquitto", persistence=False).start()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        for index in range(args.repeat):
            for variant in VARIANTS:
                runs[variant].append(
                    run_once(variant, index, normal, flood, limits, broker, base, args.settle)
                )
    finally:
        broker.stop(10, kill=True)
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "checkout": describe(ROOT),
        "normal": asdict(normal),
        "flood": asdict(flood),
        "limits": limits,
        "repeat": args.repeat,
        "summary": summarize(runs),
        "runs": runs,
    }
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
