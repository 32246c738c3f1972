"""The admin protocol: request on `<root>/admin/request/<command>`, answer after.

Shaped like zigbee2mqtt's bridge: one table maps command names to handlers
(`gateway.commands.TABLE`); each request runs in its own task, so a slow
command never blocks a fast one nor the ingest path; a long command answers
`accepted` at once, reports progress, then answers with its result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from sqlalchemy.exc import DBAPIError

from gateway.mqtt import Inbound, MqttSession, Outbound
from gateway.services import Services
from handlers.admin import AdminRequest, convert_args, parse
from handlers.errors import Code, Error

log = structlog.get_logger("fieldgate.admin")

_encode = msgspec.json.Encoder().encode

MAX_REQUEST_BYTES = 64 * 1024
MAX_CONCURRENT = 16


class CommandError(Exception):
    """Raised by a command to answer with a typed error (e.g. `invalid_args`)."""

    def __init__(self, code: Code, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.error = Error(code, message, path)


Progress = Callable[[int, int], None]
Handler = Callable[[Services, Any, Progress], Awaitable[dict[str, Any]]]


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


@dataclass(frozen=True)
class Command:
    handler: Handler
    args: type[Any] = NoArgs
    long: bool = False


class AdminServer:
    def __init__(
        self,
        services: Services,
        table: dict[str, Command],
        hold: Callable[[Inbound], Any],
        release: Callable[[list[Any]], None],
    ) -> None:
        self.services = services
        self.table = table
        self._hold = hold
        self._release = release
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    @property
    def session(self) -> MqttSession:
        return self.services.session

    @property
    def root(self) -> str:
        return self.services.settings.mqtt.topic_root

    def request(self, message: Inbound, params: dict[str, str]) -> None:
        """Router endpoint: take the request, ack it, run it in its own task."""
        ticket = self._hold(message)
        if ticket is None:
            return
        self._release([ticket])
        self.services.metrics.messages_received.labels("admin").inc()
        command = params["command"]
        if message.retain:
            # A retained request would run again on every reconnect of every instance.
            log.warning("retained admin request ignored", command=command, topic=message.topic)
            return
        token = self.services.settings.admin.token
        request, transaction, error = parse(
            command,
            message.payload,
            token.get_secret_value() if token else None,
            MAX_REQUEST_BYTES,
        )
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

        async with self._slots:
            try:
                data = await command.handler(self.services, args, progress)
            except CommandError as exc:
                self._answer(message, request.command, request.transaction, error=exc.error)
                return
            except DBAPIError as exc:
                log.warning(
                    "admin command failed", command=request.command, error=type(exc).__name__
                )
                error = Error(Code.UNAVAILABLE, "the database is unavailable; retry later")
                self._answer(message, request.command, request.transaction, error=error)
                return
            except Exception:
                log.exception("admin command crashed", command=request.command)
                error = Error(Code.UNAVAILABLE, "the command failed; see the gateway's log")
                self._answer(message, request.command, request.transaction, error=error)
                return
        log.info("admin command done", command=request.command)
        self._answer(message, request.command, request.transaction, data=data)

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

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
