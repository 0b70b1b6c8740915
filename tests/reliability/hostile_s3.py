"""A hostile "S3 endpoint" on loopback (test infrastructure, not product code).

It answers every request with a huge body, the way a tenant's own endpoint could: either a
fast body whose size is hidden (chunked encoding, the Range header ignored), or a slow one
that trickles a byte at a time to keep a reader busy forever. It records what it was sent
(the request line and the Authorization header, to tell whether the operator signed with
its own keys) and how each connection ended: how many body bytes it managed to send before
the reader closed the connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

BODY_BYTES = 300 * 1024 * 1024


@dataclass
class Served:
    """One request and what became of its answer."""

    request_line: str
    authorization: str
    sent: int = 0
    closed_by_peer: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class HostileS3:
    """`mode`: "flood" (300 MB, chunked, as fast as the reader takes it) or "trickle"
    (one byte every `trickle_s`, Content-Length 300 MB)."""

    mode: str = "flood"
    trickle_s: float = 0.2
    served: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="hostile-s3").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._srv.getsockname()[1]}"

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="hostile-s3-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
        lines = head.decode("latin-1").split("\r\n")
        auth = next((ln.split(":", 1)[1].strip() for ln in lines
                     if ln.lower().startswith("authorization:")), "")
        served = Served(lines[0] if lines else "", auth)
        self.served.append(served)
        try:
            if self.mode == "flood":
                self._flood(conn, served)
            else:
                self._trickle(conn, served)
        except OSError:
            served.closed_by_peer = True
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            served.done.set()

    def _flood(self, conn: socket.socket, served: Served) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        block = b" " * 65536
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        while served.sent < BODY_BYTES and not self._stop.is_set():
            conn.sendall(frame)
            served.sent += len(block)
        conn.sendall(b"0\r\n\r\n")

    def _trickle(self, conn: socket.socket, served: Served) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")
        while served.sent < 100 and not self._stop.is_set():
            conn.sendall(b" ")
            served.sent += 1
            time.sleep(self.trickle_s)
        # A peer that closed shows up on a later send, or as EOF on a read.
        conn.settimeout(self.trickle_s)
        with contextlib.suppress(TimeoutError):
            if conn.recv(1) == b"":
                raise ConnectionResetError("closed by the reader")
