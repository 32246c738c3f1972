"""`webhooks/list`: each endpoint's state, slots, waiting deliveries and last outcomes."""

from __future__ import annotations

from typing import Any

from gateway.admin.args import NoArgs
from gateway.admin.server import Command
from gateway.outbound.webhook_sender import WebhookSender
from handlers.admin import Progress


class WebhookCommands:
    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    def commands(self) -> list[Command]:
        return [Command("webhooks/list", self.list)]

    async def list(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        """Every configured endpoint, by name (a handful: one page)."""
        return {"items": await self.sender.snapshot(), "next_cursor": None}
