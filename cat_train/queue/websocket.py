"""The /ws websocket a sweep follows its prompts' progress on, in the standard library alone."""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
import urllib.parse

from .client import Client


class WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's /ws events with the standard library.

    Text frames are returned; binary frames (sampler previews) as bytes; pings are answered.
    No extensions are requested, so the server never compresses frames.
    """

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock, self.buf, self.frag, self.frag_op, self.closed = sock, b"", b"", 0, False
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._read(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        want = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if lines[0].split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != want:
            sock.close()
            raise ConnectionError(f"{url} answered {lines[0]!r}, not a websocket upgrade")

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self.buf += chunk

    def readable(self) -> bool:
        """Data waits in the TLS layer, which select() cannot see."""
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def fill(self) -> None:
        """One read from a socket that select() found readable."""
        self._read(time.monotonic() + 5.0)

    def _frame(self):
        """(fin, opcode, payload) of the first whole frame in the buffer, consumed; None if incomplete."""
        b = self.buf
        if len(b) < 2:
            return None
        n, i = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        mask = b[i:i + 4] if b[1] & 0x80 else None
        i += 4 if mask else 0
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        if mask:
            payload = bytes(c ^ mask[k % 4] for k, c in enumerate(payload))
        self.buf = b[i + n:]
        return bool(b[0] & 0x80), b[0] & 0x0F, payload

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # clients must mask every frame
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                         bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(c ^ mask[k % 4] for k, c in enumerate(payload)))

    def buffered(self):
        """The next whole message already received (str for text, bytes for binary), or None; never reads."""
        while True:
            f = self._frame()
            if f is None:
                return None
            fin, op, payload = f
            if op == 0x8:
                raise ConnectionError("the server closed the websocket")
            if op == 0x9:
                self.send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op in (0x1, 0x2):
                self.frag_op, self.frag = op, b""
            self.frag += payload
            if fin:
                data, self.frag = self.frag, b""
                return data.decode("utf-8", errors="replace") if self.frag_op == 0x1 else data

    def receive(self, timeout: float) -> str | bytes:
        """The next message. TimeoutError after `timeout` s without one; ConnectionError when the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.buffered()
            if m is not None:
                return m
            self._read(deadline)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send(0x8)
        except OSError:
            pass
        self.sock.close()


def connect_ws(client: Client, log=print) -> WebSocket | None:
    """The /ws websocket under this client's id, opened before any prompt is posted: ComfyUI sends a
    prompt's events only to the client id that posted it, and a prompt that fails at once would
    otherwise be over before we listen. None (and /history polling) when it cannot be opened."""
    url = client.base.replace("http", "ws", 1) + f"/ws?clientId={client.client_id}"
    try:
        return WebSocket(url, timeout=min(client.timeout, 10.0))
    except (OSError, ValueError) as e:  # a proxy without websockets: /history still has every answer
        log(f"  (websocket {url} unavailable: {e or type(e).__name__}; polling /history, progress not shown)")
        return None
