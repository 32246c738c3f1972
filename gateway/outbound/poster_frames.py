"""The frames between the sender and its poster process (gateway/channel.py's framing).

Posts go over in batches, each with what one attempt needs, signed already: the
endpoints' secrets stay in the MQTT process. What each came to comes back, batched
too, keyed by the id the sender gave it.
"""

from __future__ import annotations

import msgspec


class Post(msgspec.Struct, array_like=True):
    id: int
    lane: str
    limit: int
    """At most this many of the lane's posts are attempted at once (0: no bound)."""
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_s: float


class Posts(msgspec.Struct, tag="posts", array_like=True):
    posts: list[Post]


class Posted(msgspec.Struct, array_like=True):
    """An `Attempt` (gateway/outbound/webhook_http.py), for the post of this `id`."""

    id: int
    status: int | None
    error: str | None
    retry_after_s: float | None
    seconds: float


class Answers(msgspec.Struct, tag="answers", array_like=True):
    answers: list[Posted]


class Withdraw(msgspec.Struct, tag="withdraw", array_like=True):
    """The lane's posts that wait their turn are answered WITHDRAWN, unattempted."""

    lane: str


ToPoster = Posts | Withdraw
