"""The real `Tracker` behind a server of stated capacity, as nodes reach it.

Every request is a fresh QUIC connection (docs/spec.md §7.1): a handshake round trip,
then the request, then the answer. The server serves `rate` requests per second, first
come first served; a request that finds more than `max_pending` ahead of it is answered
RETRY_AFTER (counted by the real `Tracker.shed`), which still costs the server the
handshake (`SHED_COST` of a request). Clients retry as `protocol.TrackerExchange` does: jittered
exponential backoff, at least the RETRY_AFTER delay, each attempt given up after 5 s,
the request after 60 s. The host probes suspects and expires soft state, as
meshd/tracker/server.py does.

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
from protocol import Goodbye, RetryAfter
from protocol.backoff import Backoff
from protocol.messages import TrackerRequest, TrackerResponse
from protocol.tracker import RETRYABLE_CODES

GIVE_UP = 60.0  # as `ask_tracker`: a request not answered in this long fails
SHED_COST = 0.8
"""A RETRY_AFTER costs the server this much of a full request: the QUIC handshake, the
bulk of the work, happens before the server can say no."""


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
        scheduler = self.scheduler
        backoff = Backoff(self.rng, base=0.1, cap=30.0)
        give_up_at = scheduler.now + GIVE_UP
        kind = type(request).__name__.lower()
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            number = attempts
            rtt = 2 * (client.delay + self.delay)
            # Handshake round trip, then the request (lost packets cost retransmissions).
            arrival = scheduler.now + 1.5 * rtt + retransmissions(self.rng, client.loss, rtt)
            scheduler.at(arrival, lambda: self._receive(request, kind, reply(number)))
            scheduler.after(ATTEMPT_TIMEOUT, lambda: timed_out(number))

        def reply(number: int) -> Callable[[TrackerResponse], None]:
            def send(response: TrackerResponse) -> None:
                rtt = 2 * (client.delay + self.delay)
                back = rtt / 2 + retransmissions(self.rng, client.loss, rtt)
                scheduler.after(back, lambda: received(number, response))

            return send

        def received(number: int, response: TrackerResponse) -> None:
            nonlocal attempts
            if number != attempts or not client.alive:
                return  # that attempt was given up on; another one is under way
            attempts += 1  # settles this attempt: its timeout does nothing now
            if isinstance(response, RetryAfter):
                wait(response.delay_ms / 1000)
            elif isinstance(response, Goodbye) and response.code in RETRYABLE_CODES:
                wait(0.0)
            else:
                answer(response)

        def timed_out(number: int) -> None:
            if number == attempts and client.alive:
                wait(0.0)

        def wait(floor: float) -> None:
            at = scheduler.now + backoff.next_delay(floor)
            if at > give_up_at:
                answer(None)
            else:
                scheduler.at(at, attempt)

        attempt()

    def _receive(
        self, request: TrackerRequest, kind: str, send: Callable[[TrackerResponse], None]
    ) -> None:
        scheduler = self.scheduler
        now = scheduler.now
        self.load.request(now, kind)
        rate = self.rate
        if rate is None:
            self._decide(request, send)
            return
        start = max(now, self._free_at)
        if (start - now) * rate >= self.tracker.config.max_pending:
            self._free_at = start + SHED_COST / rate
            scheduler.at(self._free_at, lambda: send(self._shed()))
            return
        self._free_at = start + 1 / rate
        scheduler.at(self._free_at, lambda: self._decide(request, send))

    def _shed(self) -> RetryAfter:
        self.tracker.shed(self.scheduler.now)
        return RetryAfter(self.tracker.config.retry_after_ms, "tracker overloaded")

    def _decide(self, request: TrackerRequest, send: Callable[[TrackerResponse], None]) -> None:
        now = self.scheduler.now
        self.load.decision(now)
        send(self.tracker.decide(request, now))

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
