"""Asking the tracker: a short-lived QUIC connection per attempt, retried with backoff.

The retry policy (jittered exponential backoff, RETRY_AFTER, refusals) lives in the
sans-I/O `protocol.TrackerExchange`; this module only moves its bytes. The request rides
with the client's TLS Finished (in 0-RTT for REFRESH and STATUS when a session ticket
allows), and with `TrackerConnections` a node that asks again within seconds (joining,
failing over) reuses the connection it has instead of paying for a handshake.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import trio

from meshd.addresses import format_address
from meshd.quic import PeerKeyMismatch, QuicConn, QuicEndpoint, QuicStream
from protocol import (
    ChildGone,
    ErrorCode,
    ExchangeState,
    Join,
    Leave,
    ProtocolError,
    Refresh,
    Register,
    Rejoin,
    StatusRequest,
    TrackerExchange,
    TreeRequest,
)
from protocol.messages import TrackerResponse

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0
REUSE_FOR = 3.0
"""Seconds a tracker connection is reused after it opened (the tracker closes it at 5)."""
UNHEARD_AFTER = 1.0
"""Seconds a request on a reused connection may go unacknowledged before it is asked
again on a new one (a live tracker acknowledges within a round trip or two)."""
REUSE_REQUESTS = 15  # the tracker answers 16 on one connection
REPLAYABLE = (Refresh, StatusRequest)
"""Requests that may go in 0-RTT: a replay is harmless (docs/spec.md §2)."""
WARN_AFTER = 3.0
"""Callers that a person waits on pass this as `warn_after`: a silent wait is worse than
a line saying what is being waited for."""


class TrackerConnections:
    """The open connection to one tracker that a node may reuse for its next request.

    A node asks the tracker in bursts (JOIN then REFRESH, REJOINs while failing over);
    each answered connection is kept for the next request within `REUSE_FOR` seconds.
    One at a time: concurrent requests open their own, as without reuse.
    """

    def __init__(self) -> None:
        self._idle: _Open | None = None

    async def take(self, now: float) -> _Open | None:
        idle, self._idle = self._idle, None
        if idle is None or idle.conn.is_closed:
            return None
        if now - idle.opened_at > REUSE_FOR or idle.used >= REUSE_REQUESTS:
            await idle.conn.aclose()
            return None
        return idle

    def give_back(self, idle: _Open) -> bool:
        """Keep a connection for the next request; False if one is kept already."""
        if self._idle is not None and not self._idle.conn.is_closed:
            return False
        self._idle = idle
        return True


@dataclass
class _Open:
    conn: QuicConn
    stream: QuicStream
    opened_at: float
    used: int = 0


class TrackerRefused(Exception):
    """The tracker answered GOODBYE: `code` says why (e.g. TOKEN_EXPIRED, NO_CAPACITY)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"tracker refused: {name}: {reason}")


def now_ms() -> int:
    """Unix time in ms, for the `time_ms` field of tracker requests."""
    return int(time.time() * 1000)


async def ask_tracker(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    request: Register | Join | Rejoin | Leave | Refresh | StatusRequest | TreeRequest | ChildGone,
    *,
    rng: random.Random | None = None,
    give_up_after: float | None = 60.0,
    tracker_key: bytes | None = None,
    connections: TrackerConnections | None = None,
    warn_after: float | None = None,
) -> TrackerResponse:
    """Send one (already signed) request until answered; raises TrackerRefused or TooSlowError.

    With `connections`, an open connection to the tracker is reused, and this one is
    kept open for the next request. With `warn_after`, a request still unanswered after
    that many seconds logs one warning that names the tracker and what went wrong so far.
    """
    now = trio.current_time()
    exchange = TrackerExchange(
        request,
        rng=rng or random.Random(),
        now=now,
        deadline=None if give_up_after is None else now + give_up_after,
    )
    problem = _Problem()
    async with trio.open_nursery() as nursery:
        if warn_after is not None:
            nursery.start_soon(problem.warn_at, now + warn_after, tracker)
        while exchange.state is ExchangeState.WAITING:
            assert exchange.next_attempt_at is not None
            await trio.sleep_until(exchange.next_attempt_at)
            await _attempt(endpoint, tracker, exchange, tracker_key, connections, problem)
        nursery.cancel_scope.cancel()
    if exchange.response is not None:
        return exchange.response
    assert exchange.refusal is not None
    if exchange.refusal.code == ErrorCode.OVERLOADED:
        raise trio.TooSlowError(
            f"the tracker at {format_address(tracker)} did not answer ({problem.text})"
        )
    raise TrackerRefused(exchange.refusal.code, exchange.refusal.reason)


class _Problem:
    """What went wrong with the attempts so far, for the warning and the final error."""

    def __init__(self) -> None:
        self.text = "no reply"

    async def warn_at(self, deadline: float, tracker: tuple[str, int]) -> None:
        await trio.sleep_until(deadline)
        logger.warning(
            "no answer from the tracker at %s yet (%s); is it running, and is the address "
            "right? Still trying",
            format_address(tracker),
            self.text,
        )


async def _attempt(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    exchange: TrackerExchange,
    tracker_key: bytes | None,
    connections: TrackerConnections | None,
    problem: _Problem,
) -> None:
    payload = exchange.start_attempt(trio.current_time())
    link = None if connections is None else await connections.take(trio.current_time())
    close_code = ErrorCode.NO_ERROR
    try:
        with trio.fail_after(ATTEMPT_TIMEOUT):
            if link is not None:
                try:
                    await link.stream.send_all(payload)
                    heard = await _read_answer_if_heard(link.stream, exchange)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # The tracker closed it meanwhile, which says nothing about its
                    # health: ask at once on a new connection instead of backing off.
                    logger.debug("reused tracker connection failed: %s", exc)
                    heard = False
                if not heard:
                    await link.conn.aclose()
                    link = None
            if link is None:
                conn = await endpoint.connect(
                    tracker,
                    expected_peer_key=tracker_key,
                    early_data=payload,
                    replay_safe=isinstance(exchange.request, REPLAYABLE),
                )
                assert conn.first_stream is not None
                link = _Open(conn, conn.first_stream, trio.current_time())
                await _read_answer(link.stream, exchange)
    except PeerKeyMismatch:
        raise TrackerRefused(
            ErrorCode.WRONG_PEER,
            f"the server at {format_address(tracker)} is not the tracker whose id was given",
        ) from None
    except trio.TooSlowError:
        problem.text = "no reply"
        exchange.attempt_failed(trio.current_time())
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        logger.debug("tracker attempt failed: %s", exc)
        problem.text = str(exc)
        exchange.attempt_failed(trio.current_time())
    except ProtocolError as exc:
        logger.warning("tracker sent something invalid: %s", exc)
        problem.text = f"it sent something invalid: {exc}"
        exchange.attempt_failed(trio.current_time())
        close_code = exc.code  # the error ends the connection with its code (spec §2)
    else:
        if exchange.state is ExchangeState.WAITING:  # answered RETRY_AFTER or OVERLOADED
            problem.text = "it is overloaded and asked us to retry later"
    if link is None:
        return
    link.used += 1
    answered = exchange.state is ExchangeState.DONE
    if not (answered and connections is not None and connections.give_back(link)):
        await link.conn.aclose(close_code)


async def _read_answer_if_heard(stream: QuicStream, exchange: TrackerExchange) -> bool:
    """Read the answer on a reused connection; False if the tracker has not even
    acknowledged the request after `UNHEARD_AFTER` seconds. A restarted tracker drops the
    packets of connections it does not know, and waiting out the attempt would delay
    the node's first request to it by `ATTEMPT_TIMEOUT`."""
    with trio.move_on_after(UNHEARD_AFTER):
        await _read_answer(stream, exchange)
        return True
    if stream.unacknowledged:
        logger.debug("reused tracker connection unheard; asking on a new one")
        return False
    await _read_answer(stream, exchange)
    return True


async def _read_answer(stream: QuicStream, exchange: TrackerExchange) -> None:
    while exchange.state is ExchangeState.SENT:
        exchange.receive_data(await stream.receive_some(), trio.current_time())
