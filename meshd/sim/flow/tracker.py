"""The real `Tracker` behind a server of stated capacity, as nodes reach it.

Every request is a fresh QUIC connection (docs/spec.md §7.1): a handshake round trip,
then the request, then the answer. The server serves `rate` requests per second, first
come first served; a connection that finds `max_pending` requests ahead of it is refused
before the handshake, as `meshd.tracker.front` does (CONNECTION_REFUSED, counted by the
real `Tracker.shed`), for `SHED_COST` of a request. Clients retry as
`protocol.TrackerExchange` does: jittered exponential backoff (at least the delay of a
RETRY_AFTER), each attempt given up after 5 s, the request after 60 s. The host probes
suspects and expires soft state, as meshd/tracker/server.py does.

`restart` kills the tracker process and starts a new one on its address, which knows
nothing: the requests it had not answered are lost (their attempts time out), and a
connection made while it is down reaches it once it is up, when the client's
retransmitted Initial does (within a second).

Requests go straight to `Tracker.decide`: the checks a worker process runs first (clock
skew, signature, token: `check_request`) are skipped, since Ed25519 costs ~100 µs a
request and would dominate the run; the server's cost is the stated rate instead.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Protocol

from meshd.sim.clock import Scheduler
from meshd.sim.hosts import EXPIRY_INTERVAL, PROBE_INTERVAL, PROBE_TIMEOUT
from meshd.sim.metrics import TrackerLoad
from meshd.tracker.service import Tracker
from meshd.tracker_client import ATTEMPT_TIMEOUT
from protocol import ErrorCode, Goodbye, RetryAfter
from protocol.backoff import Backoff
from protocol.messages import TrackerRequest, TrackerResponse
from protocol.tracker import BACKOFF_CAP, RETRYABLE_CODES, backoff_base

GIVE_UP = 60.0  # as `ask_tracker`: a request not answered in this long fails
SHED_COST = 0.06
"""A refused connection costs the server this much of a full request: its first packet
is answered before any handshake work (docs/deployment.md: 534 µs against a JOIN's
8,285 µs, measured by bench/bench_tracker_server.py)."""
_REFUSED = Goodbye(ErrorCode.OVERLOADED, "connection refused")
"""How the sim hands a client the refusal: a failed connection, retried after backoff."""


class Client(Protocol):
    """What the tracker needs of a requester: where it is, and whether it still runs."""

    @property
    def delay(self) -> float: ...

    @property
    def loss(self) -> float: ...

    @property
    def alive(self) -> bool: ...


class Probed(Client, Protocol):
    """A node the host may probe: it answers a handshake pinned to its key, or not."""

    def answers_probe(self) -> bool: ...


def retransmissions(rng: random.Random, loss: float, rtt: float) -> float:
    """Extra time a message takes to get through: each loss costs QUIC's probe timeout
    (as `meshd.sim.network.Network.stream_arrival`)."""
    extra = 0.0
    while rng.random() < loss:
        extra += 2 * rtt + 0.05
    return extra


class QueuedTracker:
    def __init__(
        self,
        scheduler: Scheduler,
        rng: random.Random,
        tracker: Tracker,
        *,
        rate: float | None,
        delay: float,
        load: TrackerLoad,
        resolve: Callable[[bytes], Probed | None],
    ) -> None:
        self.scheduler = scheduler
        self.rng = rng
        self.tracker = tracker
        self.rate = rate
        """Requests served per second (None: answered at once)."""
        self.delay = delay
        self.load = load
        self._resolve = resolve
        self._free_at = 0.0
        self._up_at = 0.0
        self._epoch = 0
        """Bumped by each restart: the dead process answers nothing it had queued."""
        scheduler.after(PROBE_INTERVAL, self._probe_round)
        scheduler.after(EXPIRY_INTERVAL, self._expire)

    def ask(
        self,
        client: Client,
        request: TrackerRequest,
        answer: Callable[[TrackerResponse | None], None],
    ) -> None:
        """Send `request` until answered; `answer` gets the response, a GOODBYE refusal,
        or None when the client gave up."""
        Exchange(self, client, request, answer).attempt()

    def restart(self, down: float) -> None:
        """The tracker dies now and runs again, knowing nothing, `down` seconds later."""
        self.tracker = Tracker(self.tracker.config)
        self._epoch += 1
        self._up_at = self._free_at = self.scheduler.now + down

    def _receive(self, exchange: Exchange, number: int) -> None:
        scheduler = self.scheduler
        now = scheduler.now
        if now < self._up_at:
            retransmitted = self._up_at + self.rng.uniform(0.0, 1.0)
            scheduler.at(retransmitted, functools.partial(self._receive, exchange, number))
            return
        self.load.request(now, exchange.kind)
        rate = self.rate
        if rate is None:
            self._decide(exchange, number, self._epoch)
            return
        start = max(now, self._free_at)
        if (start - now) * rate >= self.tracker.config.max_pending:
            self._free_at = start + SHED_COST / rate
            shed = functools.partial(self._shed, exchange, number, self._epoch)
            scheduler.at(self._free_at, shed)
            return
        self._free_at = start + 1 / rate
        decide = functools.partial(self._decide, exchange, number, self._epoch)
        scheduler.at(self._free_at, decide)

    def _shed(self, exchange: Exchange, number: int, epoch: int) -> None:
        if epoch == self._epoch:
            self.tracker.shed(self.scheduler.now)
            exchange.reply(number, _REFUSED)

    def _decide(self, exchange: Exchange, number: int, epoch: int) -> None:
        if epoch != self._epoch:
            return
        now = self.scheduler.now
        self.load.decision(now)
        exchange.reply(number, self.tracker.decide(exchange.request, now))

    def _probe_round(self) -> None:
        scheduler = self.scheduler
        scheduler.after(PROBE_INTERVAL, self._probe_round)
        for stream_id, ref in self.tracker.suspects(scheduler.now):
            self.load.request(scheduler.now, "probe")
            target = self._resolve(ref.peer_id)
            if target is not None and target.answers_probe():
                delay, alive = 2 * (self.delay + target.delay), True
            else:
                delay, alive = PROBE_TIMEOUT, False
            scheduler.after(delay, functools.partial(self._probed, stream_id, ref.peer_id, alive))

    def _probed(self, stream_id: bytes, peer: bytes, alive: bool) -> None:
        self.tracker.probed(stream_id, peer, alive, self.scheduler.now)

    def _expire(self) -> None:
        self.scheduler.after(EXPIRY_INTERVAL, self._expire)
        self.tracker.expire(self.scheduler.now)


class Exchange:
    """One request, retried until answered or given up.

    Each attempt is numbered; an answer or timeout of an attempt that is no longer the
    current one does nothing. A plain object rather than closures: closures that call
    one another form reference cycles, and the garbage collector's passes over millions
    of them cost more than the rest of the run.
    """

    __slots__ = (
        "answer",
        "attempts",
        "backoff",
        "client",
        "give_up_at",
        "kind",
        "request",
        "server",
    )

    def __init__(
        self,
        server: QueuedTracker,
        client: Client,
        request: TrackerRequest,
        answer: Callable[[TrackerResponse | None], None],
    ) -> None:
        self.server = server
        self.client = client
        self.request = request
        self.answer = answer
        self.kind = type(request).__name__.lower()
        self.give_up_at = server.scheduler.now + GIVE_UP
        self.attempts = 0
        self.backoff: Backoff | None = None
        """Made at the first retry (most requests get through at once)."""

    def attempt(self) -> None:
        self.attempts += 1
        server = self.server
        scheduler = server.scheduler
        rtt = 2 * (self.client.delay + server.delay)
        # Handshake round trip, then the request (lost packets cost retransmissions).
        arrival = scheduler.now + 1.5 * rtt + retransmissions(server.rng, self.client.loss, rtt)
        scheduler.at(arrival, functools.partial(server._receive, self, self.attempts))
        scheduler.after(ATTEMPT_TIMEOUT, functools.partial(self._timed_out, self.attempts))

    def reply(self, number: int, response: TrackerResponse) -> None:
        """The server answers attempt `number`: the answer travels back."""
        server = self.server
        rtt = 2 * (self.client.delay + server.delay)
        back = rtt / 2 + retransmissions(server.rng, self.client.loss, rtt)
        server.scheduler.after(back, functools.partial(self._received, number, response))

    def _received(self, number: int, response: TrackerResponse) -> None:
        if number != self.attempts or not self.client.alive:
            return  # that attempt was given up on; another one is under way
        self.attempts += 1  # settles this attempt: its timeout does nothing now
        if isinstance(response, RetryAfter):
            self._wait(response.delay_ms / 1000)
        elif isinstance(response, Goodbye) and response.code in RETRYABLE_CODES:
            self._wait(0.0)
        else:
            self.answer(response)

    def _timed_out(self, number: int) -> None:
        if number == self.attempts and self.client.alive:
            self._wait(0.0)

    def _wait(self, floor: float) -> None:
        server = self.server
        if self.backoff is None:
            self.backoff = Backoff(server.rng, base=backoff_base(self.request), cap=BACKOFF_CAP)
        at = server.scheduler.now + self.backoff.next_delay(floor)
        if at > self.give_up_at:
            self.answer(None)
        else:
            server.scheduler.at(at, self.attempt)
