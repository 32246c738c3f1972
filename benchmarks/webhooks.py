"""Webhook delivery throughput: the gateway's sender against a bare aiohttp loop, in one run.

The issue's target (13): delivery to a local fast receiver at least 0.7 of the rate
of a bare aiohttp loop that posts the same signed events with the same concurrency.

    .venv/bin/python -m benchmarks.webhooks [--events 20000] [--concurrency 8,32]
        [--repeat 3] [--profile DIR] [--json] [--keep]

A short check: `--events 3000 --repeat 1 --concurrency 8`. Run it with the
virtualenv's python from the repository's root (`sys.executable` starts the
daemon, the receiver and the baseline). It needs the broker on 127.0.0.1:1883
and Redis on 127.0.0.1:6379 (`--broker-port`, `--redis`), as `make run` has them.

What runs, for each concurrency C and repetition, the two sides alternating
(baseline, gateway, baseline, gateway, ...) so that a machine that gets busier
or quieter weighs on both alike, all against one receiver:

- **the receiver** (`benchmarks/receiver.py`, a process of its own for the whole
  run): aiohttp on uvloop, answers 200 at once, counts requests and distinct
  `webhook-id`s, signatures not checked (`--verify` checks them, at a cost to the
  receiver's CPU that both sides share). It is reset before each run.
- **gateway**: a real daemon (`python -m gateway run --config <cfg>`), the shipped
  config (`config/fieldgate.toml`) plus one `[[webhooks]]` endpoint subscribed to
  `"*"` with `max_in_flight = C`, its own SQLite database in a temp dir (migrated
  with `python -m gateway db upgrade` first), its own topic root and client id
  on the broker, Redis database 15 for its dead-letter queue. Before it starts,
  the N events are written into its database as the engine writes them: unsent
  outbox rows of channel `webhook` (`conflict.detected` and `conflict.updated`,
  with bodies shaped and sized like the drain's conflict messages). So the run
  measures delivery alone: fan-out of the outbox rows into deliveries, the lane's
  claims, signing, the POSTs and the settling of outcomes in the database. The
  other way, events made by the daemon itself (crisis alerts published over MQTT),
  would time the ingest as well: each alert is an urgent commit of its own in the
  engine process, and that, not the sender, would set the pace.
- **baseline**: a bare aiohttp loop in a process of its own (on uvloop, as the
  daemon), one `ClientSession` (unlimited `TCPConnector`, as the sender's), C
  coroutines posting the same N bodies (the bytes the gateway sends: the same
  events with the same `timestamp`), each request with a fresh `webhook-id` and
  signed then (`handlers.webhooks.sign` and `headers`), with the same timeout
  and reading each answer. No database: the ceiling of posting from Python.

Both are timed at the receiver, the same way: from its first request to the
request that brought the distinct `webhook-id`s to N (events/s). Reported as
well: the gateway's rate from the daemon's start (its start-up included), the
CPU per event of the daemon's MQTT process (where the sender claims and settles:
its main thread and its other threads, aiosqlite's among them), of its poster
process (where the POSTs are made) and of its engine process,
of the baseline process and of the receiver; whether every delivery was settled
(its row deleted) and every outbox row fanned out by the end; requests beyond N
(sent twice). Medians over the repetitions; the ratio is of the medians.

`--profile DIR` runs py-spy on the daemon's MQTT process during each gateway run
(`DIR/webhooks-c<C>-<i>.txt`) and on its poster process (`...-<i>.poster.txt`), raw
format, to read with `benchmarks/webhooks.py`'s `--summarize` or any flamegraph tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.drain import CONFIG, child_running, cpu_seconds, machine
from benchmarks.receiver import ReceiverProcess
from handlers import webhooks
from tests.support import ROOT, end_process

TARGET = 0.7
SECRET = "whsec_" + "ZmllbGRnYXRlLWJlbmNobWFyay1zaWduaW5nLWtleS0wMQ=="
TIMEOUT_S = 15.0
"""The endpoint's `timeout_s` (the default), also the baseline's per request."""
_TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[webhooks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the events ------------------------------------------------------------------


_NAMES = ["ana", "ben", "chen", "diego", "elena", "fatima", "james", "lukas", "nora", "olga"]
_FIELDS = ["status", "priority", "assigned_to", "due_at", "location", "notes"]


def conflict_event(rng: random.Random, index: int) -> tuple[str, bytes]:
    """A conflict event as the engine writes it (`handlers.conflicts.ConflictNotices`):
    `{"event", "conflict"}` with its members. Member counts are drawn so that the
    sizes are like the drain's conflict messages (most under 2 KB, mean ~4 KB, up
    to ~18 KB)."""
    members = min(50, 1 + int(rng.expovariate(1 / 9)))
    event = "conflict.detected" if rng.random() < 0.67 else "conflict.updated"
    devices = sorted({f"sim-{rng.randrange(50)}" for _ in range(members)})
    users = sorted({f"{rng.choice(_NAMES)}.{rng.choice(_NAMES)}" for _ in range(members)})
    record = {
        "conflict_id": f"c{index:012d}",
        "entity_type": "work_order",
        "entity_id": f"wo-{rng.randrange(10_000):06d}",
        "status": "open",
        "severity": rng.choice(["low", "medium", "high", "critical"]),
        "strategy": "last_writer_wins",
        "fields": sorted(rng.sample(_FIELDS, rng.randint(1, 4))),
        "winners": {},
        "member_count": members,
        "device_ids": devices,
        "user_ids": users,
        "detected_at": "2026-12-06T05:17:52.290229Z",
        "updated_at": "2026-12-06T05:17:52.438509Z",
        "resolved_at": None,
        "resolved_by": None,
        "merged_into": None,
        "note": None,
        "members": [
            {
                "op_id": str(uuid.UUID(int=rng.getrandbits(128))),
                "device_id": rng.choice(devices),
                "user_id": rng.choice(users),
                "operation": "update",
                "version": m + 1,
                "edited_at": "2026-12-06T05:07:44.079000Z",
                "changes": {
                    f: {"old": "on_hold", "new": "in_progress"}
                    for f in rng.sample(_FIELDS, rng.randint(1, 3))
                },
            }
            for m in range(members)
        ],
    }
    return event, msgspec.json.encode({"event": event, "conflict": record})


def make_events(n: int, seed: int) -> list[tuple[str, bytes, int]]:
    """N events: (type, payload, created_at in µs), created a millisecond apart."""
    rng = random.Random(seed)
    start_us = time.time_ns() // 1000 - n * 1000
    return [(*conflict_event(rng, i), start_us + i * 1000) for i in range(n)]


def seed_outbox(db: Path, events: list[tuple[str, bytes, int]]) -> None:
    """The events as unsent webhook rows of the outbox (as the engine's commits write them)."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "insert into outbox (channel, topic, also_to, event_type, payload, qos, retain,"
            " created_at, attempts, claimed_until, sent_at, origin_at)"
            " values ('webhook', null, null, ?, ?, 0, 0, ?, 0, null, null, null)",
            events,
        )


def endpoint_table(name: str, url: str, max_in_flight: int) -> str:
    return (
        f'\n[[webhooks]]\nname = "{name}"\nurl = "{url}"\nevents = ["*"]\n'
        f'secret = "{SECRET}"\ntimeout_s = {TIMEOUT_S:g}\nmax_in_flight = {max_in_flight}\n'
    )


# -- the baseline: a bare aiohttp loop ---------------------------------------------


async def _post_all(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    import aiohttp

    key = webhooks.secret_key(SECRET)
    statuses: Counter[int] = Counter()
    errors = 0
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"user-agent": "bench", "content-type": "application/json"},
        skip_auto_headers=("accept-encoding",),
    ) as session:
        todo = iter(bodies)

        async def worker() -> None:
            nonlocal errors
            for body in todo:
                msg_id = f"msg_{uuid.uuid4().hex}"
                stamp = int(time.time())
                headers = webhooks.headers(msg_id, stamp, webhooks.sign(key, msg_id, stamp, body))
                try:
                    async with session.post(
                        url, data=body, headers=headers, allow_redirects=False, timeout=timeout
                    ) as response:
                        await response.read()
                        statuses[response.status] += 1
                except (aiohttp.ClientError, TimeoutError, OSError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"statuses": dict(statuses), "errors": errors}


def baseline_worker(url: str, bodies_path: Path, concurrency: int) -> int:
    """The baseline's process: post every body of the file, print what it came to."""
    bodies = msgspec.msgpack.decode(bodies_path.read_bytes(), type=list[bytes])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_post_all(url, bodies, concurrency))
    else:
        result = uvloop.run(_post_all(url, bodies, concurrency))
    print(json.dumps(result), flush=True)
    return 0


# -- one run of each side ------------------------------------------------------------


def _cpu(pid: int) -> float:
    return sum(cpu_seconds(pid).values())


def _await_first(receiver: ReceiverProcess, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    """Until the receiver has its first request (polled every 2 ms)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if receiver.count()["requests"]:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before its first request")
        time.sleep(0.002)
    raise RuntimeError(f"no request within {limit_s:.0f} s")


def run_baseline(
    receiver: ReceiverProcess, bodies_path: Path, n: int, concurrency: int, timeout_s: float
) -> dict[str, Any]:
    receiver.reset()
    load = os.getloadavg()[0]
    rx_before = _cpu(receiver.pid)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.webhooks",
            "--baseline-worker",
            str(bodies_path),
            "--url",
            receiver.url,
            "--concurrency",
            str(concurrency),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        _await_first(receiver, proc, 60)
        at_first = _cpu(proc.pid)
        rx_first = _cpu(receiver.pid)
        counts = receiver.wait(n, timeout_s)
        at_done = _cpu(proc.pid)
        out, _ = proc.communicate(timeout=60)
    finally:
        end_process(proc)
    if counts["distinct"] < n:
        raise RuntimeError(f"baseline: {counts['distinct']} of {n} arrived in {timeout_s:.0f} s")
    seconds = counts["distinct_at"] - counts["first_at"]
    return {
        "rate": round(n / seconds, 1),
        "seconds": round(seconds, 3),
        "load_1m": round(load, 2),
        "requests": counts["requests"],
        "cpu_us_per_event": round((at_done - at_first) / n * 1e6, 1),
        "receiver_cpu_us_per_event": round((_cpu(receiver.pid) - rx_first) / n * 1e6, 1),
        "receiver_cpu_whole_s": round(_cpu(receiver.pid) - rx_before, 2),
        **json.loads(out.decode().strip().splitlines()[-1]),
    }


def _unsettled(db: Path) -> tuple[int, int]:
    """(deliveries still in the table, webhook outbox rows not fanned out)."""
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        (deliveries,) = conn.execute("select count(*) from webhook_deliveries").fetchone()
        (unsent,) = conn.execute(
            "select count(*) from outbox where channel = 'webhook' and sent_at is null"
        ).fetchone()
    return int(deliveries), int(unsent)


def run_gateway(
    receiver: ReceiverProcess,
    events: list[tuple[str, bytes, int]],
    concurrency: int,
    workdir: Path,
    args: argparse.Namespace,
    profile: Path | None,
) -> dict[str, Any]:
    n = len(events)
    workdir.mkdir(parents=True)
    db = workdir / "gateway.db"
    config = workdir / "fieldgate.toml"
    config.write_text(CONFIG.read_text() + endpoint_table("bench", receiver.url, concurrency))
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "FIELDGATE_MQTT__HOST": "127.0.0.1",
        "FIELDGATE_MQTT__PORT": str(args.broker_port),
        "FIELDGATE_MQTT__TOPIC_ROOT": f"benchwh{tag}",
        "FIELDGATE_MQTT__CLIENT_ID": f"bench-webhooks-{tag}",
        "FIELDGATE_MQTT__SESSION_EXPIRY_S": "60",
        "FIELDGATE_DATABASE__URL": f"sqlite+aiosqlite:///{db}",
        "FIELDGATE_REDIS__URL": args.redis,
        "FIELDGATE_INSTANCE": f"bench-webhooks-{tag}",
        "FIELDGATE_LOG__LEVEL": "warning",
        "FIELDGATE_LOG__FORMAT": "json",
    }
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    subprocess.run(
        [sys.executable, "-m", "gateway", "db", "upgrade", "--config", str(config)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    seed_outbox(db, events)
    receiver.reset()
    load = os.getloadavg()[0]
    out = open(workdir / "gateway.log", "ab")  # noqa: SIM115
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    spies: list[subprocess.Popen[bytes]] = []
    try:
        _await_first(receiver, proc, 60)
        at_first = cpu_seconds(proc.pid)
        engine = child_running(proc.pid, "gateway.ingest.process")
        engine_first = _cpu(engine) if engine else 0.0
        poster = child_running(proc.pid, "gateway.outbound.poster_child")
        poster_first = _cpu(poster) if poster else 0.0
        rx_first = _cpu(receiver.pid)
        if profile is not None:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            targets = [(proc.pid, profile)]
            if poster is not None:
                targets.append((poster, profile.with_suffix(".poster.txt")))
            for pid, path in targets:
                cmd = [py_spy, "record", "--pid", str(pid), "-o", str(path)]
                cmd += ["--format", "raw", "--rate", "200", "--nonblocking", "--threads"]
                spies.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        counts = receiver.wait(n, args.timeout)
        at_done = cpu_seconds(proc.pid)
        engine_done = _cpu(engine) if engine else 0.0
        poster_done = _cpu(poster) if poster else 0.0
        rx_done = _cpu(receiver.pid)
        while spies:
            end_process(spies.pop(), signal.SIGINT)
        settled_at = None
        left = _unsettled(db)
        deadline = time.monotonic() + 30
        while left != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _unsettled(db)
        if left == (0, 0):
            settled_at = time.time()
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited {proc.returncode}")
    finally:
        for spy in spies:
            end_process(spy, signal.SIGINT)
        end_process(proc)
        out.close()
    if counts["distinct"] < n:
        tail = (workdir / "gateway.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"gateway: {counts['distinct']} of {n} arrived\n{tail}")
    seconds = counts["distinct_at"] - counts["first_at"]
    main_s = at_done.get(proc.pid, 0.0) - at_first.get(proc.pid, 0.0)
    threads_s = sum(t - at_first.get(tid, 0.0) for tid, t in at_done.items() if tid != proc.pid)
    return {
        "rate": round(n / seconds, 1),
        "seconds": round(seconds, 3),
        "load_1m": round(load, 2),
        "rate_from_start": round(n / (counts["distinct_at"] - started), 1),
        "first_request_after_start_s": round(counts["first_at"] - started, 3),
        "requests": counts["requests"],
        "cpu_us_per_event": {
            "main": round(main_s / n * 1e6, 1),
            "threads": round(threads_s / n * 1e6, 1),
        },
        "engine_cpu_us_per_event": round((engine_done - engine_first) / n * 1e6, 1),
        "poster_cpu_us_per_event": round((poster_done - poster_first) / n * 1e6, 1),
        "receiver_cpu_us_per_event": round((rx_done - rx_first) / n * 1e6, 1),
        "settled_after_last_s": (
            round(settled_at - counts["distinct_at"], 2) if settled_at is not None else None
        ),
        "left_unsettled": {"deliveries": left[0], "outbox": left[1]},
        "exit_code": proc.returncode,
    }


# -- profiles ------------------------------------------------------------------------


def summarize(paths: list[Path], top: int = 25) -> str:
    """A py-spy raw profile (collapsed stacks) read as: the share of samples per thread,
    and the functions most often on the stack (inclusive) and at the top (self)."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            threads[frames[0]] += count
            seen = set()
            for frame in frames[1:]:
                name = frame.split(" (")[0] + " (" + frame.rsplit("/", 1)[-1]
                if name not in seen:
                    inclusive[name] += count
                    seen.add(name)
            if len(frames) > 1:
                own[frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    lines += [f"  {c / total:6.1%}  {t}" for t, c in threads.most_common(8)]
    lines.append("inclusive:")
    lines += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.webhooks", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--concurrency", default="8,32", help="max_in_flight values, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--broker-port", type=int, default=1883)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--verify", action="store_true", help="the receiver checks signatures")
    parser.add_argument("--timeout", type=float, default=0.0, help="per run [default: scaled]")
    parser.add_argument("--profile", help="a directory: py-spy raw profiles of the gateway runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--summarize", nargs="+", help="print a summary of py-spy raw profiles")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize([Path(p) for p in args.summarize]))
        return 0
    if args.baseline_worker:
        return baseline_worker(args.url, Path(args.baseline_worker), int(args.concurrency))
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.timeout:
        args.timeout = max(120.0, args.events / 100)

    n = args.events
    log(f"making {n} events")
    events = make_events(n, args.seed)
    bodies = [webhooks.body(kind, at_us, payload) for kind, payload, at_us in events]
    sizes = sorted(len(b) for b in bodies)
    base = Path(tempfile.mkdtemp(prefix="fieldgate-webhooks-"))
    bodies_path = base / "bodies.msgpack"
    bodies_path.write_bytes(msgspec.msgpack.encode(bodies))
    profiles = Path(args.profile) if args.profile else None
    if profiles is not None:
        profiles.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        c: {"baseline": [], "gateway": []} for c in levels
    }
    secret = SECRET if args.verify else None
    try:
        with ReceiverProcess(secret, base / "receiver.log") as receiver:
            for index in range(args.repeat):
                for c in levels:
                    log(f"C={c} #{index + 1}: baseline")
                    b = run_baseline(receiver, bodies_path, n, c, args.timeout)
                    runs[c]["baseline"].append(b)
                    log(f"C={c} #{index + 1}: baseline {b['rate']:,.0f} events/s")
                    profile = profiles / f"webhooks-c{c}-{index + 1}.txt" if profiles else None
                    g = run_gateway(receiver, events, c, base / f"gw-c{c}-{index}", args, profile)
                    runs[c]["gateway"].append(g)
                    log(f"C={c} #{index + 1}: gateway {g['rate']:,.0f} events/s")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"kept {base}")

    report: dict[str, Any] = {
        "machine": machine(),
        "events": n,
        "repeat": args.repeat,
        "body_bytes": {"mean": round(sum(sizes) / n), "median": sizes[n // 2], "max": sizes[-1]},
        "receiver_verifies": args.verify,
        "concurrency": {},
    }
    for c, sides in runs.items():
        medians = {side: statistics.median(r["rate"] for r in rs) for side, rs in sides.items()}
        report["concurrency"][str(c)] = {
            "median_rate": medians,
            "ratio": round(medians["gateway"] / medians["baseline"], 3),
            "runs": sides,
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_text(report))
    return 0


def _text(report: dict[str, Any]) -> str:
    m = report["machine"]
    b = report["body_bytes"]
    lines = [
        f"{report['events']} events (bodies mean {b['mean']} B, median {b['median']} B, "
        f"max {b['max']} B) to one fast receiver, {report['repeat']} run(s) each, medians; "
        f"{m['nproc']} CPUs {m['cpu']}, Python {m['python']}",
        "",
        f"{'C':>3}  {'side':<9}{'events/s':>10}   runs",
    ]
    for c, level in report["concurrency"].items():
        for side in ("baseline", "gateway"):
            each = ", ".join(f"{r['rate']:,.0f}" for r in level["runs"][side])
            lines.append(f"{c:>3}  {side:<9}{level['median_rate'][side]:>10,.0f}   {each}")
        lines.append(f"{'':>3}  gateway / baseline: {level['ratio']:.2f} (target >= {TARGET})")
    loads = [
        r["load_1m"]
        for lv in report["concurrency"].values()
        for rs in lv["runs"].values()
        for r in rs
    ]
    lines.append(f"load average (1 min) at the runs' starts: {min(loads):.2f} to {max(loads):.2f}")
    lines.append("")
    for c, level in report["concurrency"].items():
        g = level["runs"]["gateway"]
        bl = level["runs"]["baseline"]
        main = statistics.median(r["cpu_us_per_event"]["main"] for r in g)
        threads = statistics.median(r["cpu_us_per_event"]["threads"] for r in g)
        lines.append(
            f"C={c}: CPU per event (medians): gateway MQTT process {main + threads:.0f} us "
            f"(main thread {main:.0f}, other threads {threads:.0f}), engine process "
            f"{statistics.median(r['engine_cpu_us_per_event'] for r in g):.0f} us, poster process "
            f"{statistics.median(r.get('poster_cpu_us_per_event', 0) for r in g):.0f} us; baseline "
            f"{statistics.median(r['cpu_us_per_event'] for r in bl):.0f} us; receiver "
            f"{statistics.median(r['receiver_cpu_us_per_event'] for r in g):.0f} us (gateway"
            f" runs), {statistics.median(r['receiver_cpu_us_per_event'] for r in bl):.0f} us"
            " (baseline runs)"
        )
        lines.append(
            f"      gateway from its start: "
            f"{statistics.median(r['rate_from_start'] for r in g):,.0f} events/s (first request"
            f" {statistics.median(r['first_request_after_start_s'] for r in g):.2f} s after"
            f" the start); requests beyond N: {[r['requests'] - report['events'] for r in g]};"
            " unsettled at the end: "
            f"{[r['left_unsettled'] for r in g]}; settled "
            f"{[r['settled_after_last_s'] for r in g]} s after the last arrival"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
