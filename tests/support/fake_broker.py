"""A broker that says what a test wants it to say: MQTT v5 over a real socket, enough of
it for the gateway to connect, subscribe, publish and ping, with the CONNACK's
session-present flag and granted session expiry chosen by the test.

Mosquitto grants any session expiry a client asks for and never says otherwise;
other brokers cut it (one to 300 s by default). This stands in for those.
"""

from __future__ import annotations

import socket
import struct
import threading
from contextlib import suppress

from tests.support.processes import free_port

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
SESSION_EXPIRY = 0x11


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes, flags: int = 0) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


class FakeBroker:
    """Listens on a free port; each connection is answered on a thread of its own."""

    def __init__(
        self, *, session_present: bool = False, expiry_s: int | None = None, suback: bool = True
    ) -> None:
        self.session_present = session_present
        self.expiry_s = expiry_s
        self.suback = suback
        """False: SUBSCRIBEs are never answered, as when a broker sends a kept session's
        backlog ahead of the SUBACK (Mosquitto 2.0: 100,000 messages and 12 s)."""
        self.port = free_port()
        self.subscribed: list[str] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> FakeBroker:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        with suppress(OSError):
            self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError, ConnectionError):
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                first = reader.read(1)
                if not first:
                    return
                length, shift = 0, 0
                while True:
                    byte = reader.read(1)[0]
                    length += (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = reader.read(length)
                reply = self._answer(first[0] >> 4, first[0] & 0x0F, body)
                if reply is None:
                    return
                conn.sendall(reply)

    def _answer(self, kind: int, flags: int, body: bytes) -> bytes | None:
        if kind == CONNECT:
            properties = b""
            if self.expiry_s is not None:
                properties = bytes([SESSION_EXPIRY]) + struct.pack(">I", self.expiry_s)
            ack = bytes([int(self.session_present), 0]) + _varint(len(properties)) + properties
            return _packet(CONNACK, ack)
        if kind == SUBSCRIBE:
            packet_id = body[:2]
            at = self._skip_properties(body, 2)
            codes = bytearray()
            while at < len(body):
                (size,) = struct.unpack(">H", body[at : at + 2])
                self.subscribed.append(body[at + 2 : at + 2 + size].decode())
                at += 2 + size + 1
                codes.append(1)
            if not self.suback:
                return b""
            return _packet(SUBACK, packet_id + b"\x00" + bytes(codes))
        if kind == PUBLISH:
            qos = flags >> 1 & 0x03
            if qos == 0:
                return b""
            (size,) = struct.unpack(">H", body[:2])
            packet_id = body[2 + size : 4 + size]
            return _packet(PUBACK, packet_id + b"\x00")
        if kind == PINGREQ:
            return _packet(PINGRESP, b"")
        if kind == DISCONNECT:
            return None
        return b""  # anything else needs no answer

    @staticmethod
    def _skip_properties(body: bytes, at: int) -> int:
        length, shift = 0, 0
        while True:
            byte = body[at]
            at += 1
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return at + length
