"""Fault injection for the reliability suite (test infrastructure, not product code).

`S3Outage` is a loopback TCP proxy in front of the local SeaweedFS S3 gateway. A trainer
pointed at it sees a real S3 server until the test (or a trigger) takes it down: then the
listening socket is closed and every open connection is reset, which is exactly what a
client sees when the S3 process dies. `up()` brings it back. Triggers fire on the request
line of an S3 call (e.g. the first PUT of the final adapter), so an outage can be timed to
"during the checkpoint upload" or "during the final upload" without sleeping and hoping.

Only the proxy goes down: the shared SeaweedFS process keeps serving every other test.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class Trigger:
    """When a request line matches `pattern` (and `unless` does not), go down for
    `seconds` (None: for good), or with `stall` hang instead: keep every connection open
    but forward nothing more to S3 (a slow, stuck upload) until `stop()`. Fires once."""

    method: bytes
    pattern: bytes
    seconds: float | None
    unless: bytes | None = None
    fired_at: float | None = None
    stall: bool = False

    def matches(self, method: bytes, path: bytes) -> bool:
        return (self.fired_at is None and method == self.method and self.pattern in path
                and not (self.unless and self.unless in path))


@dataclass
class S3Outage:
    """A switchable TCP proxy: `endpoint` is what the trainer uses."""

    target_host: str
    target_port: int
    port: int = 0
    requests: list[tuple[float, bytes, bytes]] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)
    outages: list[tuple[float, float | None]] = field(default_factory=list)
    refused: int = 0  # requests cut by an outage (connections reset)
    stalled_at: float | None = None  # when a stall trigger fired; nothing is forwarded since

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: socket.socket | None = None
        self._stopped = False
        self._restore: threading.Timer | None = None
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = int(s.getsockname()[1])
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------ switching

    def up(self) -> None:
        with self._lock:
            if self._server is not None or self._stopped:
                return
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", self.port))
            srv.listen(64)
            self._server = srv
            if self.outages and self.outages[-1][1] is None:
                self.outages[-1] = (self.outages[-1][0], time.monotonic())
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self, seconds: float | None = None) -> None:
        """Refuse connections and reset open ones; come back after `seconds` if given."""
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = list(self._conns), set()
            if srv is not None:
                self.outages.append((time.monotonic(), None))
        if srv is not None:
            _close(srv)
        for c in conns:
            _reset(c)
        if seconds is not None:
            self._restore = threading.Timer(seconds, self.up)
            self._restore.daemon = True
            self._restore.start()

    def stop(self) -> None:
        self._stopped = True
        if self._restore:
            self._restore.cancel()
        self.down()

    def on(self, method: str, pattern: str, seconds: float | None, unless: str | None = None,
           stall: bool = False) -> Trigger:
        trig = Trigger(method.encode(), pattern.encode(), seconds,
                       unless.encode() if unless else None, stall=stall)
        self.triggers.append(trig)
        return trig

    # ------------------------------------------------------------------ plumbing

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), 5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._server is not srv:  # went down meanwhile
                    _reset(client)
                    _close(upstream)
                    continue
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if inspect and self._inspect(data):
                    self.refused += 1
                    return  # the outage reset both ends
                while inspect and self.stalled_at is not None and not self._stopped:
                    time.sleep(0.05)  # stalled: hold the bytes; stop() resets the sockets
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _inspect(self, data: bytes) -> bool:
        """Record request lines; True when a trigger took S3 down for this request."""
        m = REQUEST_LINE.match(data)
        if not m:
            return False
        method, path = m.group(1), m.group(2)
        self.requests.append((time.monotonic(), method, path))
        for trig in self.triggers:
            if trig.matches(method, path):
                trig.fired_at = time.monotonic()
                if trig.stall:
                    self.stalled_at = trig.fired_at
                    return False
                self.down(trig.seconds)
                return True
        return False

    def paths(self, method: str) -> list[str]:
        return [p.decode() for _, m, p in self.requests if m == method.encode()]


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dying server's kernel would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    _close(sock)


def wait_until(what: str, fn: Callable[[], object], timeout: float, interval: float = 0.5,
               ) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
