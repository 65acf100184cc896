"""A userspace UDP relay that drops and delays datagrams: netem for kernels without it.

Each node that serves children gets a front socket; the node advertises the front's
address (`--advertise`), so its children (and the tracker's probes) reach it through the
proxy. For each client address seen on a front, the proxy opens its own upstream socket
toward the node, so the node still sees distinct clients, and relays the node's replies
back to that client. Every datagram, in each direction, is dropped with probability
`loss` (a seeded random.Random) and held for `delay` (+ up to `jitter`) seconds. With no
jitter datagrams leave in the order they came; jitter may reorder them, as on a real path.

Everything runs in one background thread around a selector, with a timer heap for the
delays; `stop()` joins it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import random
import re
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

Address = tuple[str, int]
Direction = Literal["to_node", "to_client"]
DIRECTIONS: tuple[Direction, ...] = ("to_node", "to_client")
MAX_DATAGRAM = 65535


class _Front:
    """A socket children send to; `backend` is the node behind it, once known."""

    def __init__(self, sock: socket.socket, backend: Address | None) -> None:
        self.sock = sock
        self.backend = backend
        self.upstreams: dict[Address, _Upstream] = {}  # client -> its own upstream socket


@dataclass(frozen=True)
class _Upstream:
    """The proxy's socket toward a node on behalf of one client of a front."""

    sock: socket.socket
    front: _Front
    client: Address


class UdpProxy:
    def __init__(
        self, *, loss: float = 0.0, delay: float = 0.0, jitter: float = 0.0, seed: int = 0
    ) -> None:
        if not 0.0 <= loss < 1.0 or delay < 0 or jitter < 0:
            raise ValueError("loss must be in [0, 1), delay and jitter >= 0")
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.forwarded: Counter[Direction] = Counter()
        self.dropped: Counter[Direction] = Counter()
        self.unrouted = 0
        """Datagrams that reached a front before its backend was known."""
        self._rng = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._fronts: dict[int, _Front] = {}  # by front port
        self._new_fronts: list[_Front] = []  # registered by the thread itself
        self._lock = threading.Lock()
        # (due, tiebreak, socket, payload, destination): the tiebreak keeps equal due
        # times first in, first out, so a constant delay never reorders.
        self._timers: list[tuple[float, int, socket.socket, bytes, Address]] = []
        self._order = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="udp-proxy", daemon=True)

    # -- control, from the test's thread -------------------------------------------------

    def start(self) -> UdpProxy:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, wait for it, close every socket."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the UDP proxy thread did not stop in {timeout}s")
        for front in self._fronts.values():
            for upstream in front.upstreams.values():
                upstream.sock.close()
            front.sock.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> UdpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def add_front(self, backend: Address | None = None) -> Address:
        """A new front socket on 127.0.0.1 (any port); its backend may be set later."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        address: Address = sock.getsockname()
        front = _Front(sock, backend)
        with self._lock:
            self._fronts[address[1]] = front
            self._new_fronts.append(front)
        self._wake()
        return address

    def set_backend(self, front: Address, backend: Address) -> None:
        self._fronts[front[1]].backend = backend  # one reference assignment: thread-safe

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def clients(self) -> int:
        """Distinct (front, client address) pairs seen so far."""
        return sum(len(front.upstreams) for front in list(self._fronts.values()))

    def loss_rate(self, direction: Direction) -> float:
        seen = self.forwarded[direction] + self.dropped[direction]
        return self.dropped[direction] / seen if seen else 0.0

    def summary(self) -> str:
        directions = ", ".join(
            f"{d}: {self.forwarded[d]} forwarded, {self.dropped[d]} dropped"
            f" ({100 * self.loss_rate(d):.2f} %)"
            for d in DIRECTIONS
        )
        return f"{directions}; {self.unrouted} unrouted"

    # -- the thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full of wake-ups already
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._woken()
                elif isinstance(key.data, _Front):
                    self._from_client(key.data)
                else:
                    self._from_node(key.data)
            self._send_due()

    def _woken(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            new, self._new_fronts = self._new_fronts, []
        for front in new:
            self._selector.register(front.sock, selectors.EVENT_READ, front)

    def _from_client(self, front: _Front) -> None:
        for payload, client in _received(front.sock):
            if front.backend is None:
                self.unrouted += 1
                continue
            upstream = front.upstreams.get(client)
            if upstream is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                upstream = front.upstreams[client] = _Upstream(sock, front, client)
                self._selector.register(sock, selectors.EVENT_READ, upstream)
            self._pass(upstream.sock, payload, front.backend, "to_node")

    def _from_node(self, upstream: _Upstream) -> None:
        for payload, _ in _received(upstream.sock):
            self._pass(upstream.front.sock, payload, upstream.client, "to_client")

    def _pass(self, sock: socket.socket, payload: bytes, to: Address, direction: Direction) -> None:
        if self._rng.random() < self.loss:
            self.dropped[direction] += 1
            return
        self.forwarded[direction] += 1
        hold = self.delay + (self._rng.uniform(0, self.jitter) if self.jitter else 0.0)
        heapq.heappush(
            self._timers, (time.monotonic() + hold, next(self._order), sock, payload, to)
        )

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, sock, payload, to = heapq.heappop(self._timers)
            with contextlib.suppress(OSError):  # a killed node, a full buffer: a loss
                sock.sendto(payload, to)


def _received(sock: socket.socket) -> Iterator[tuple[bytes, Address]]:
    """Every datagram waiting on `sock`."""
    while True:
        try:
            yield sock.recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return
        except OSError:
            return  # an ICMP error reported on the socket: nothing to relay


def bound_udp_port(pid: int) -> int:
    """The port of the one UDP socket process `pid` has bound on 127.0.0.1 (from /proc).

    For a node whose log names only its advertised address (the origin): the proxy
    needs the real one as its backend.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(match.group(1))
    ports = []
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        local, inode = fields[1], fields[9]
        if inode in inodes and local.startswith("0100007F:"):
            ports.append(int(local.split(":")[1], 16))
    if len(ports) != 1:
        raise RuntimeError(f"process {pid} has {len(ports)} UDP sockets on 127.0.0.1: {ports}")
    return ports[0]
