"""The per-request half of the tracker: QUIC connections in, checked requests out.

A `TrackerFront` does the work every request costs: the QUIC handshake, decoding, and the
checks that need no tree (clock skew, signature, token). Only sound requests reach its
`decide`, with the sender's source network (the per-network limits need it), which is
`Tracker.decide` in this process or a call to the process that owns the trees
(`meshd.tracker.workers`).

A front sheds load before the handshake: with ``max_pending`` requests and handshakes in
progress, a new connection's first packet is answered with a QUIC CONNECTION_CLOSE
(CONNECTION_REFUSED), which costs a few percent of a JOIN; the client backs off with
jitter (docs/spec.md §7.4). One source network gets a bounded rate of JOINs, however
many identities it has (`NetworkBuckets`).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio

from meshd.networks import NetworkBuckets, network_of
from meshd.quic import EndpointConfig, QuicConn, QuicEndpoint, QuicStream
from meshd.tracker.service import TrackerConfig, check_request
from protocol import (
    ErrorCode,
    Goodbye,
    Join,
    ProtocolError,
    Refresh,
    RemoteProtocolError,
    RetryAfter,
    StatusRequest,
    TrackerChannel,
    frame,
)
from protocol.messages import TrackerRequest, TrackerResponse

logger = logging.getLogger("meshd.tracker")

REQUEST_TIMEOUT = 5.0  # as long as a client waits for one attempt
MAX_REQUESTS_PER_CONNECTION = 16
SESSION_TICKETS = 100_000
"""Tickets a front keeps (~0.3 KB each): a node's next request resumes its TLS session."""
REPLY_DELAY = 0.01
"""A request's ACK waits this long for its answer, so both leave in one packet."""
PENDING_BEFORE_RETRY = 32
"""Handshakes a tracker has pending before new ones must answer a Retry first (and what
one source network may have pending): a flood of Initials that never complete holds at
most this much state."""

CONNECTIONS_PER_NETWORK = 256
"""Connections one source network may hold at the tracker at once (a node keeps one a
few seconds, for its next request): one network cannot take the 1,024 of them all."""

YOUNG_GENERATION_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation in a tracker process."""

REPLAYABLE = (Refresh, StatusRequest)
"""The requests a front takes from 0-RTT data: a replay costs at most a soft-state
update the node's next REFRESH corrects (docs/spec.md §2)."""

Decide = Callable[[TrackerRequest, str], Awaitable[TrackerResponse]]
"""`Tracker.decide`, given a checked request and its sender's source network."""


def endpoint_config(config: TrackerConfig) -> EndpointConfig:
    """A tracker endpoint: session tickets for resumption, replies coalesced with ACKs,
    a datagram (a request sent the wrong way) closes the connection (docs/spec.md §10),
    and the handshakes one source network may start are `config`'s. Its nodes come
    and go in bursts: more of them may handshake at once than at a node."""
    return EndpointConfig(
        session_tickets=SESSION_TICKETS,
        reply_delay=REPLY_DELAY,
        client_datagram_error=ErrorCode.UNEXPECTED_MESSAGE,
        retry_above=PENDING_BEFORE_RETRY,
        max_pending_per_network=PENDING_BEFORE_RETRY,
        max_connections_per_network=CONNECTIONS_PER_NETWORK,
        handshakes_per_network=config.handshakes_per_network_s,
        handshake_burst=config.handshake_burst_per_network,
    )


def collect_garbage_less_often() -> None:
    """For a process that serves tracker requests: collect the youngest generation every
    10,000 allocations instead of Python's 700. With dozens of requests in flight, each
    collection walks the thousands of objects of their live connections and frees almost
    nothing (a finished connection is freed by refcounting: `meshd.quic._aioquic.release`).
    Measured with bench/bench_tracker_server.py, the collector's share of a loaded
    tracker's CPU fell from about a tenth to under 4 %."""
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


class TrackerFront:
    """Moves requests between QUIC connections and `decide`, checking them on the way."""

    def __init__(
        self,
        config: TrackerConfig,
        endpoint: QuicEndpoint,
        decide: Decide,
        on_shed: Callable[[], None],
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self._decide = decide
        self._on_shed = on_shed
        """Called for each request answered RETRY_AFTER or connection refused."""
        self._active = 0
        self._joins = (
            NetworkBuckets(config.joins_per_network_s, config.join_burst_per_network)
            if config.joins_per_network_s > 0
            else None
        )
        endpoint.refuse_when = self._busy

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.endpoint.serve(self._handle_connection, task_status=task_status)

    def _busy(self) -> bool:
        busy = self._active + self.endpoint.pending_handshakes >= self.config.max_pending
        if busy:
            self._on_shed()
        return busy

    async def _handle_connection(self, conn: QuicConn) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT):
            await self._exchange(conn)
        await conn.aclose(ErrorCode.NO_ERROR)

    async def _exchange(self, conn: QuicConn) -> None:
        """Answer the requests on the connection's stream. Only the time from a request's
        bytes to its answer counts as load: a node keeps a connection open for its next
        request (docs/spec.md §7.1), and an idle connection costs nothing."""
        stream = await conn.accept_stream()
        channel = TrackerChannel()
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            data = await stream.receive_some(65536)
            self._active += 1
            try:
                overloaded = self._active > self.config.max_pending
                channel.receive_data(data)
                while (request := channel.next_request()) is not None:
                    _check_replayable(request, channel.request_offset, stream)
                    answer = await self._answer(request, overloaded, conn.remote_address[0])
                    channel.respond(answer)
                reply = channel.data_to_send()
                if reply:
                    await stream.send_all(reply)
            except ProtocolError as exc:
                logger.warning("bad request from %s: %s", conn.remote_address, exc)
                await stream.send_all(frame(Goodbye(exc.code, str(exc)[:200])))
                await conn.aclose(exc.code, str(exc)[:100])
                return
            finally:
                self._active -= 1
            if not data:
                return

    async def _answer(
        self, request: TrackerRequest, overloaded: bool, host: str
    ) -> TrackerResponse:
        if overloaded:
            self._on_shed()
            return RetryAfter(self.config.retry_after_ms, "tracker overloaded")
        joins = self._joins
        if (
            isinstance(request, Join)
            and joins is not None
            and (wait := joins.wait(host, trio.current_time()))
        ):
            # Before the signature check: a flood from one network costs little here.
            wait_ms = max(self.config.retry_after_ms, math.ceil(wait * 1000))
            return RetryAfter(wait_ms, "too many JOINs from your network; retry later")
        refusal = check_request(request, self.config, int(time.time() * 1000))
        return refusal or await self._decide(request, network_of(host))


def _check_replayable(request: TrackerRequest, offset: int, stream: QuicStream) -> None:
    """Only a request whose replay is harmless may come in 0-RTT (docs/spec.md §2); one
    that starts after the 0-RTT data (sent on the stream once the handshake was done, a
    reused connection's next request) is not 0-RTT data."""
    if offset < stream.early_data_end and not isinstance(request, REPLAYABLE):
        raise RemoteProtocolError(
            f"{type(request).__name__} in 0-RTT data (only REFRESH and STATUS may be)",
            ErrorCode.UNEXPECTED_MESSAGE,
        )
