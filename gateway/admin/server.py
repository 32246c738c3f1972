"""The admin protocol: request on `<root>/admin/request/<command>`, answer after.

Shaped like zigbee2mqtt's bridge: one table of `Command` rows (each area of
commands in a module of gateway/admin/ gives its rows, and the daemon puts them
together), and one place here that wraps every answer and every error. Each
request runs in its own task, so a slow command never blocks a fast one nor the
ingest path; a long command answers `accepted` at once, reports progress, then
answers with its result. A write redelivered under the same transaction is
answered as the first time, and not run again (gateway/admin/replay.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from sqlalchemy.exc import DBAPIError

from gateway.admin.args import CommandError, NoArgs
from gateway.admin.replay import Outcome, RecentAnswers
from gateway.lifecycle import Part
from gateway.metrics import Metrics
from gateway.mqtt.session import Inbound, MqttSession
from gateway.seam import Outbound
from handlers.admin import AdminRequest, Progress, convert_args, parse
from handlers.errors import Code, Error

log = structlog.get_logger("fieldgate.admin")

_encode = msgspec.json.Encoder().encode

MAX_REQUEST_BYTES = 64 * 1024
MAX_CONCURRENT = 16

Handler = Callable[[Any, Progress], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    """A row of the command table: the name, what runs it, its arguments' type."""

    name: str
    handler: Handler
    args: type[Any] = NoArgs
    long: bool = False
    """Answers `accepted` at once, reports progress, then answers with its result."""
    writes: bool = False
    """Changes something: a redelivered request gets the first answer, and does not run
    again."""


class AdminServer(Part):
    """Takes requests from the router, runs each in its own task, answers."""

    name = "admin"
    stop_timeout_s = 3.0

    def __init__(
        self,
        root: str,
        session: MqttSession,
        commands: Sequence[Command],
        token: Callable[[], str | None],
        metrics: Metrics,
    ) -> None:
        self.root = root
        self.session = session
        self.table = {command.name: command for command in commands}
        self.token = token
        self.received = metrics.messages_received.labels("admin")
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._recent = RecentAnswers()
        self._stopped = asyncio.Event()

    def request(self, message: Inbound, params: dict[str, str]) -> None:
        """Router endpoint (the intake has acked the message): run it in its own task."""
        self.received.inc()
        command = params["command"]
        if message.retain:
            # A retained request would run again on every reconnect of every instance.
            log.warning("retained admin request ignored", command=command, topic=message.topic)
            return
        request, transaction, error = parse(
            command, message.payload, self.token(), MAX_REQUEST_BYTES
        )
        if error is None and self._stopped.is_set():
            error = Error(Code.UNAVAILABLE, "the gateway is stopping: ask again later")
        if error is not None or request is None:
            assert error is not None
            log.info("admin request refused", command=command, code=error.code.value)
            self._answer(message, command, transaction, error=error)
            return
        task = asyncio.create_task(self._run(message, request), name=f"admin:{command}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, message: Inbound, request: AdminRequest) -> None:
        command = self.table.get(request.command)
        if command is None:
            self._answer(
                message,
                request.command,
                request.transaction,
                error=Error(Code.UNKNOWN_COMMAND, f"no command {request.command!r}"),
            )
            return
        args = convert_args(request.args, command.args)
        if isinstance(args, Error):
            self._answer(message, request.command, request.transaction, error=args)
            return
        if command.long:
            self._answer(message, request.command, request.transaction, accepted=True)

        def progress(done: int, total: int) -> None:
            body = {"transaction": request.transaction, "done": done, "total": total}
            self.session.publish(
                Outbound(f"{self.root}/admin/progress/{request.command}", _encode(body), qos=0)
            )

        async def execute() -> Outcome:
            return await self._execute(command, args, progress)

        key = RecentAnswers.key(request.command, request.transaction, request.args)
        data, error = await self._recent.once(key if command.writes else None, execute)
        self._answer(message, request.command, request.transaction, data=data, error=error)

    async def _execute(self, command: Command, args: Any, progress: Progress) -> Outcome:
        """Run the command: its data, or the error to answer with."""
        async with self._slots:
            try:
                data = await command.handler(args, progress)
            except CommandError as exc:
                return None, exc.error
            except DBAPIError as exc:
                log.warning("admin command failed", command=command.name, error=type(exc).__name__)
                return None, Error(Code.UNAVAILABLE, "the database is unavailable; retry later")
            except Exception:
                log.exception("admin command crashed", command=command.name)
                return None, Error(Code.UNAVAILABLE, "the command failed; see the gateway's log")
        log.info("admin command done", command=command.name)
        return data, None

    def _answer(
        self,
        message: Inbound,
        command: str,
        transaction: Any,
        *,
        data: dict[str, Any] | None = None,
        error: Error | None = None,
        accepted: bool = False,
    ) -> None:
        body: dict[str, Any] = {"transaction": transaction}
        if accepted:
            body["status"] = "accepted"
        elif error is not None:
            body["status"] = "error"
            body["error"] = error.as_dict()
        else:
            body["status"] = "ok"
            body["data"] = data if data is not None else {}
        topic = message.response_topic or f"{self.root}/admin/response/{command}"
        self.session.publish(Outbound(topic, _encode(body), correlation=message.correlation))

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Take no new command; give those under way a moment to answer, then cancel
        them (a client waits in vain, and may ask again)."""
        self._stopped.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.stop_timeout_s - 1)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
