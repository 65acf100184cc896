"""A modelled network between simulated hosts: latency, loss, partitions, dead and stopped hosts.

It gives a meshd link what QUIC gives it, and no more: a connection carries one reliable,
ordered byte stream each way, plus unreliable datagrams; every packet that arrives is
acknowledged, so each end knows when it last heard from the other; a connection whose
peer stays silent for the idle timeout closes. Loss on the stream costs retransmission
time, never bytes. A killed host drops everything; a stopped host (SIGSTOP) holds what
arrives and runs it, late, when it continues.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from meshd.sim.clock import Scheduler

IDLE_TIMEOUT = 10.0  # QUIC idle timeout, as meshd configures it
MAX_DATAGRAM = 1200  # the datagram payload a path carries


class Host:
    """A simulated machine: an address, a one-way delay to the core network, and a state."""

    def __init__(self, address: str, delay: float, loss: float = 0.0) -> None:
        self.address = address
        self.delay = delay
        self.loss = loss
        """The probability that a packet to or from this host is lost on its own link."""
        self.alive = True
        self.stopped = False
        self._held: list[Callable[[], None]] = []

    def run(self, callback: Callable[[], None]) -> None:
        """Run `callback` on this host now, later if it is stopped, never if it is dead."""
        if not self.alive:
            return
        if self.stopped:
            self._held.append(callback)
        else:
            callback()

    def kill(self) -> None:
        self.alive = False
        self._held.clear()

    def stop(self) -> None:
        self.stopped = True

    def resume(self) -> None:
        """SIGCONT: run everything that arrived meanwhile, in order."""
        self.stopped = False
        held, self._held = self._held, []
        for callback in held:
            self.run(callback)

    def accept(self, end: ConnEnd) -> bool:
        """A connection arrived; False refuses it (the host serves no children)."""
        return False


class ConnEnd:
    """One end of a connection. The owner sets the `on_*` callbacks."""

    def __init__(self, network: Network, host: Host) -> None:
        self.network = network
        self.host = host
        self.peer: ConnEnd | None = None
        self.open = False
        self.closed = False
        self.last_heard = network.scheduler.now
        self._stream_free_at = 0.0  # keeps this direction's stream bytes in order
        self.on_open: Callable[[], None] = lambda: None
        self.on_stream: Callable[[bytes], None] = lambda data: None
        self.on_datagram: Callable[[bytes], None] = lambda data: None
        self.on_closed: Callable[[str], None] = lambda reason: None

    def send_stream(self, data: bytes) -> None:
        peer = self.peer
        if self.closed or peer is None or not data:
            return
        network = self.network
        at = network.stream_arrival(self.host, peer.host)
        if at is None:
            return  # cut off for good: the connection will idle out
        at = max(at, self._stream_free_at)
        self._stream_free_at = at
        network.scheduler.at(at, lambda: network.arrive(self, peer, lambda: peer.on_stream(data)))

    def send_datagram(self, data: bytes) -> None:
        peer = self.peer
        if self.closed or peer is None:
            return
        network = self.network
        if network.dropped(self.host, peer.host):
            return
        delay = network.one_way(self.host, peer.host)
        network.scheduler.after(
            delay, lambda: network.arrive(self, peer, lambda: peer.on_datagram(data))
        )

    def close(self, reason: str = "closed") -> None:
        """Close this end; the peer hears of it unless the close is lost."""
        if self.closed:
            return
        self.closed = True
        peer = self.peer
        if peer is None or not self.open:
            return
        network = self.network
        if network.dropped(self.host, peer.host):
            return  # the peer will idle out
        network.scheduler.after(
            network.one_way(self.host, peer.host),
            lambda: peer.host.run(lambda: peer.lose(f"peer closed the connection: {reason}")),
        )

    def lose(self, reason: str) -> None:
        """The connection is gone under us (peer closed, or idle timeout)."""
        if self.closed:
            return
        self.closed = True
        self.on_closed(reason)

    def _watch_idle(self) -> None:
        def check() -> None:
            if self.closed:
                return
            deadline = self.last_heard + IDLE_TIMEOUT
            if deadline <= self.network.scheduler.now:  # the same sum as scheduled: no float drift
                self.host.run(lambda: self.lose("idle timeout"))
            else:
                self.network.scheduler.at(deadline, check)

        self.network.scheduler.at(self.last_heard + IDLE_TIMEOUT, check)


class Network:
    """Who can reach whom, how fast, and what gets lost."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, *, loss: float = 0.0) -> None:
        self.scheduler = scheduler
        self.rng = rng
        self.loss = loss
        """The probability that a packet is lost, each way, on every path."""
        self.hosts: dict[str, Host] = {}
        self._cuts: list[tuple[frozenset[str], float]] = []  # (one side, until)

    def add(self, host: Host) -> None:
        self.hosts[host.address] = host

    # -- paths ---------------------------------------------------------------------------

    def one_way(self, a: Host, b: Host) -> float:
        return a.delay + b.delay

    def partition(self, side: set[str], seconds: float) -> None:
        """Cut `side` off from every other host for `seconds`."""
        self._cuts.append((frozenset(side), self.scheduler.now + seconds))

    def heal(self) -> None:
        self._cuts.clear()

    def cut_until(self, a: Host, b: Host) -> float:
        """Until when the path between a and b is cut (the past: not cut)."""
        now = self.scheduler.now
        self._cuts = [(side, until) for side, until in self._cuts if until > now]
        until = now
        for side, end in self._cuts:
            if (a.address in side) != (b.address in side):
                until = max(until, end)
        return until

    def dropped(self, a: Host, b: Host) -> bool:
        """Whether a packet sent now from a to b is lost."""
        return self.cut_until(a, b) > self.scheduler.now or self.rng.random() < self.path_loss(a, b)

    def path_loss(self, a: Host, b: Host) -> float:
        """The chance a packet between a and b is lost: the network's, or either link's."""
        if not a.loss and not b.loss:
            return self.loss
        return 1 - (1 - self.loss) * (1 - a.loss) * (1 - b.loss)

    def stream_arrival(self, a: Host, b: Host) -> float | None:
        """When stream bytes sent now arrive: each loss costs a retransmission timeout,
        and a cut path holds them until it heals (None: not before the idle timeout)."""
        now = self.scheduler.now
        rtt = 2 * self.one_way(a, b)
        start = self.cut_until(a, b)
        if start - now >= IDLE_TIMEOUT:
            return None
        at = start + rtt / 2
        loss = self.path_loss(a, b)
        while self.rng.random() < loss:
            at += 2 * rtt + 0.05  # QUIC's probe timeout, roughly
        return at

    # -- connections ---------------------------------------------------------------------

    def connect(self, client: Host, address: str) -> ConnEnd:
        """Start a handshake; the returned end's `on_open` runs if the server accepts.

        A server that is dead, stopped, unreachable or not serving never answers: the
        client gives up on its own timeout, as with real QUIC."""
        end = ConnEnd(self, client)
        server = self.hosts.get(address)
        if server is None or self.dropped(client, server):
            return end
        self.scheduler.after(
            self.one_way(client, server), lambda: server.run(lambda: self._answer(end, server))
        )
        return end

    def _answer(self, client_end: ConnEnd, server: Host) -> None:
        if client_end.closed:
            return
        server_end = ConnEnd(self, server)
        server_end.peer, client_end.peer = client_end, server_end
        if not server.accept(server_end):
            return
        server_end.open = True
        server_end._watch_idle()
        if self.dropped(server, client_end.host):
            return  # the client retries the handshake in reality; here it times out

        def opened() -> None:
            if client_end.closed:
                server_end.lose("the client went away")
                return
            client_end.open = True
            client_end.last_heard = self.scheduler.now
            client_end._watch_idle()
            client_end.on_open()

        self.scheduler.after(
            self.one_way(server, client_end.host), lambda: client_end.host.run(opened)
        )

    def arrive(self, src: ConnEnd, dst: ConnEnd, deliver: Callable[[], None]) -> None:
        """A packet from `src` reaches `dst`'s host: deliver it and acknowledge it."""

        def receive() -> None:
            if dst.closed:
                return
            dst.last_heard = self.scheduler.now
            deliver()
            if not self.dropped(dst.host, src.host):
                self.scheduler.after(
                    self.one_way(dst.host, src.host), lambda: src.host.run(acknowledged)
                )

        def acknowledged() -> None:
            if not src.closed:
                src.last_heard = self.scheduler.now

        dst.host.run(receive)
