"""The channel between the MQTT process and the engine process: framed msgpack.

One stream socket (a socketpair made by the MQTT process), one frame after the
other each way: a 4-byte big-endian length, then a msgspec msgpack body, a
tagged union of the structs below. The vocabulary is the seam's
(gateway/seam.py); the frames add only what two processes need besides: the
settings the engine starts with and reloads, a ping that the engine answers
with its state and metrics, and the drain at a stop. msgpack rather than JSON
because payloads are bytes and cross as they are, unencoded
(docs/decisions/0010-engine-process.md).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

from gateway.seam import Delivery, EngineState, Result

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30
"""A frame longer than this is a broken channel, not a message: a `Submit` holds at
most 8 MiB of payloads, or one payload (MQTT's packets stop at 256 MiB)."""


class Start(msgspec.Struct, tag="start", array_like=True):
    """The first frame to the engine: the settings it runs with (the MQTT process's,
    secrets included: the channel is private to the two processes)."""

    settings: dict[str, Any]


class Submit(msgspec.Struct, tag="submit", array_like=True):
    """Deliveries, in the order the MQTT side took them."""

    deliveries: list[Delivery]


class Ping(msgspec.Struct, tag="ping", array_like=True):
    seq: int


class Reload(msgspec.Struct, tag="reload", array_like=True):
    """New settings to apply at once (what needs a restart is already kept as it was)."""

    seq: int
    settings: dict[str, Any]


class Drain(msgspec.Struct, tag="drain", array_like=True):
    """Take nothing more; commit what is held, answer it, then say `Drained` and exit."""


class Results(msgspec.Struct, tag="result", array_like=True):
    result: Result


class Pong(msgspec.Struct, tag="pong", array_like=True):
    """The answer to a `Ping` (or a `Reload`, with the same seq): the engine's state,
    and its metrics in Prometheus' text format, which the MQTT process exports."""

    seq: int
    state: EngineState
    metrics: bytes


class Drained(msgspec.Struct, tag="drained", array_like=True):
    pass


ToEngine = Start | Submit | Ping | Reload | Drain
FromEngine = Results | Pong | Drained


class ChannelClosed(Exception):
    """The other side closed the channel (or died)."""


class Channel:
    """One end of the channel: frames written as they come, read one at a time.
    `incoming` is the union this end reads (`ToEngine` or `FromEngine`)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, incoming: Any
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(incoming)
        self._encoder = msgspec.msgpack.Encoder()

    @classmethod
    async def open(cls, sock: Any, incoming: Any) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer, incoming)

    def send(self, frame: msgspec.Struct) -> None:
        """Queue a frame for writing; the transport writes it without blocking the loop.
        Raises ChannelClosed once the other side is gone."""
        if self.writer.is_closing():
            raise ChannelClosed
        body = self._encoder.encode(frame)
        self.writer.write(HEADER.pack(len(body)) + body)

    async def receive(self) -> Any:
        """The next frame; ChannelClosed at the end of the stream."""
        try:
            (size,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            if size > MAX_FRAME_BYTES:
                raise ChannelClosed(f"a frame of {size} bytes")
            return self._decoder.decode(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed from exc

    def close(self) -> None:
        self.writer.close()
