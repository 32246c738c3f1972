"""Topic routing: a small table of patterns under the topic root, like starlette's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.mqtt.session import Inbound

Endpoint = Callable[[Inbound, dict[str, str]], None]


class Route:
    """`devices/{device_id}/sync`: `{name}` takes one level, `{name:path}` the rest."""

    def __init__(self, pattern: str, endpoint: Endpoint) -> None:
        self.pattern = pattern
        self.endpoint = endpoint
        self.parts = pattern.split("/")
        self.tail = self.parts[-1].endswith(":path}")

    def match(self, levels: Sequence[str]) -> dict[str, str] | None:
        parts = self.parts
        if len(levels) < len(parts) if self.tail else len(levels) != len(parts):
            return None
        params: dict[str, str] = {}
        for index, part in enumerate(parts):
            if part.startswith("{"):
                name = part[1:-1]
                if name.endswith(":path"):
                    params[name[:-5]] = "/".join(levels[index:])
                    break
                if not levels[index]:
                    return None
                params[name] = levels[index]
            elif part != levels[index]:
                return None
        return params

    def subscription(self, root: str, shared_group: str | None) -> str:
        filt = "/".join(
            "#" if p.endswith(":path}") else "+" if p[:1] == "{" else p for p in self.parts
        )
        topic = f"{root}/{filt}"
        return f"$share/{shared_group}/{topic}" if shared_group else topic


Resolved = tuple[Endpoint, dict[str, str]] | None

CACHE_MAX = 50_000
"""Topics remembered: a device publishes on a handful, so this is devices x kinds."""


class Router:
    def __init__(self, root: str, routes: Sequence[Route]) -> None:
        self.root = root
        self.prefix = root + "/"
        self.routes = list(routes)
        self._cache: dict[str, Resolved] = {}

    def resolve(self, topic: str) -> Resolved:
        """The endpoint and parameters of a topic; cached, it is on the hot path.

        Callers must not mutate the returned parameters.
        """
        try:
            return self._cache[topic]
        except KeyError:
            pass
        resolved = self._match(topic)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = resolved
        return resolved

    def _match(self, topic: str) -> Resolved:
        if not topic.startswith(self.prefix):
            return None
        levels = topic[len(self.prefix) :].split("/")
        for route in self.routes:
            params = route.match(levels)
            if params is not None:
                return route.endpoint, params
        return None

    def subscriptions(self, shared_group: str | None) -> list[str]:
        return [route.subscription(self.root, shared_group) for route in self.routes]
