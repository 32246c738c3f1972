"""The poster process (gateway/outbound/poster_process.py): webhook attempts made by a
child process, against real receivers on loopback.

What an attempt came to crosses intact; a lane's limit holds in the child although
the sender hands it more; a child that dies or stops answering ends its attempts as
failed ones, and the next attempt starts another; no secret reaches it; it ends
with its parent, however the parent ends.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from gateway.outbound import poster_process
from gateway.outbound.poster_process import STOPPED, PosterProcess
from gateway.outbound.webhook_http import WITHDRAWN, Attempt
from handlers import webhooks
from tests.support.processes import children_running
from tests.support.webhooks import SECRET, Receiver, Reply

KEY = webhooks.secret_key(SECRET)
BODY = b'{"type":"alert.crisis","timestamp":"2026-12-07T00:00:00Z","data":{}}'


def child_pids(parent: int = 0) -> list[int]:
    """The poster processes of `parent` (this process by default)."""
    return children_running(parent or os.getpid(), poster_process.CHILD)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def closed_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_outcomes_cross_from_the_child_as_the_receiver_gave_them() -> None:
    replies = {0: Reply(200), 1: Reply(500), 2: Reply(429, headers={"retry-after": "7"})}

    async def scenario(url: str, refused_url: str) -> list[Attempt]:
        async with PosterProcess() as poster:
            made = [
                await poster.post(url, KEY, f"msg_{i}", BODY, 5.0, lane="a", limit=1)
                for i in range(3)
            ]
            made.append(await poster.post(url, KEY, "msg_slow", BODY, 0.2))
            made.append(await poster.post(refused_url, KEY, "msg_refused", BODY, 5.0))
            return made

    with Receiver(lambda n: replies.get(n, Reply(200, delay_s=1.0))) as receiver:
        made = await scenario(receiver.url, f"http://127.0.0.1:{closed_port()}/hook")
        requests = receiver.wait(4)
    assert [(a.status, a.error) for a in made] == [
        (200, None),
        (500, None),
        (429, None),
        (None, "no answer within 0.2 s"),
        (None, "cannot connect: Connection refused"),
    ]
    assert made[2].retry_after_s == 7.0
    assert [a.outcome for a in made] == ["success", "retry", "retry", "retry", "retry"]
    # signed in the MQTT process, as Standard Webhooks and the reference library check
    assert [r.msg_id for r in requests] == ["msg_0", "msg_1", "msg_2", "msg_slow"]
    assert all(r.verified and r.body == BODY for r in requests)


async def test_a_lanes_limit_holds_in_the_child_though_it_is_handed_more() -> None:
    """Six posts at once, limit 2: the receiver never holds more than two of the lane's,
    while another lane's go at once."""
    holding: list[int] = []
    receiver_box: list[Receiver] = []

    def respond(n: int) -> Reply:
        receiver = receiver_box[0]
        holding.append(len(receiver.requests) - receiver.answered)
        return Reply(200, delay_s=0.3)

    async def scenario(url: str) -> list[Attempt]:
        async with PosterProcess() as poster:
            lane_a = [
                poster.post(url, KEY, f"a_{i}", BODY, 5.0, lane="a", limit=2) for i in range(6)
            ]
            return list(await asyncio.gather(*lane_a))

    with Receiver(respond) as receiver:
        receiver_box.append(receiver)
        started = time.monotonic()
        made = await scenario(receiver.url)
        took = time.monotonic() - started
    assert [a.status for a in made] == [200] * 6
    assert max(holding) == 2
    assert took >= 0.85  # three rounds of 0.3 s, two at a time


async def test_a_killed_child_ends_its_attempts_failed_and_the_next_starts_another() -> None:
    async def scenario(url: str) -> tuple[list[Attempt], Attempt, int, list[int]]:
        async with PosterProcess() as poster:
            held = [
                asyncio.ensure_future(poster.post(url, KEY, f"held_{i}", BODY, 5.0))
                for i in range(3)
            ]
            await asyncio.sleep(0.5)
            (first,) = child_pids()
            os.kill(first, signal.SIGKILL)
            lost = list(await asyncio.gather(*held))
            after = await poster.post(url, KEY, "after", BODY, 5.0)
            return lost, after, poster.restarts, [first, *child_pids()]

    with Receiver(lambda n: Reply(200, delay_s=2.0 if n < 3 else 0)) as receiver:
        lost, after, restarts, pids = await scenario(receiver.url)
    assert [(a.status, a.error) for a in lost] == [(None, STOPPED)] * 3
    assert [a.outcome for a in lost] == ["retry"] * 3
    assert (after.status, after.error) == (200, None)
    assert restarts == 1
    first, *now = pids
    assert len(now) == 1 and now[0] != first
    assert child_pids() == []  # and the second one ended with the context


async def test_a_child_that_stops_answering_is_killed_past_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(poster_process, "ANSWER_GRACE_S", 0.5)
    monkeypatch.setattr(poster_process, "WATCH_EVERY_S", 0.1)

    async def scenario(url: str) -> tuple[Attempt, float, int]:
        async with PosterProcess() as poster:
            await poster.post(url, KEY, "warm", BODY, 0.3)
            (child,) = child_pids()
            os.kill(child, signal.SIGSTOP)
            started = time.monotonic()
            stuck = await poster.post(url, KEY, "stuck", BODY, 0.3)
            return stuck, time.monotonic() - started, poster.restarts

    with Receiver() as receiver:
        stuck, took, restarts = await scenario(receiver.url)
    assert (stuck.status, stuck.error) == (None, STOPPED)
    # its deadline: the timeout for each place it may wait behind and its own, and the grace
    assert 0.3 * PosterProcess.depth + 0.5 <= took < 5
    assert restarts == 1
    assert child_pids() == []


async def test_the_child_holds_no_secret_and_ends_with_the_context() -> None:
    async def scenario(url: str) -> tuple[int, bytes, bytes]:
        async with PosterProcess() as poster:
            await poster.post(url, KEY, "one", BODY, 5.0)
            (child,) = child_pids()
            proc = Path(f"/proc/{child}")
            return child, (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()

    with Receiver() as receiver:
        child, cmdline, environ = await scenario(receiver.url)
    for secret in (SECRET.encode(), base64.b64encode(KEY)):
        assert secret not in cmdline and secret not in environ
    assert child_pids() == []
    assert not alive(child)


async def test_withdrawn_posts_are_answered_unattempted_and_the_others_go_on() -> None:
    """One place for lane a, three posts: the first in flight, two waiting their turn
    in the child. Withdrawing a ends those two at once, unattempted; the one in
    flight, and lane b's, go on."""

    async def scenario(receiver: Receiver) -> tuple[list[Attempt], Attempt]:
        url = receiver.url
        async with PosterProcess() as poster:
            lane_a = [
                asyncio.ensure_future(poster.post(url, KEY, f"a_{i}", BODY, 5.0, lane="a", limit=1))
                for i in range(3)
            ]
            # the first at the receiver (not a sleep: a loaded machine's child may
            # read the posts and the withdrawal together, before the first started)
            await asyncio.to_thread(receiver.wait, 1)
            poster.withdraw("a")
            other = await poster.post(url, KEY, "b_0", BODY, 5.0, lane="b", limit=1)
            return list(await asyncio.gather(*lane_a)), other

    with Receiver(lambda n: Reply(200, delay_s=1.0 if n == 0 else 0)) as receiver:
        made, other = await scenario(receiver)
        requests = receiver.wait(2)
    assert [(a.status, a.error) for a in made] == [(200, None), *[(None, WITHDRAWN)] * 2]
    assert (other.status, other.error) == (200, None)
    assert sorted(r.msg_id for r in requests) == ["a_0", "b_0"]
