"""Asking the tracker: one short-lived QUIC connection per attempt, retried with backoff.

The retry policy (jittered exponential backoff, RETRY_AFTER, refusals) lives in the
sans-I/O `protocol.TrackerExchange`; this module only moves its bytes.
"""

from __future__ import annotations

import logging
import random
import time

import trio

from meshd.addresses import format_address
from meshd.quic import QuicEndpoint
from protocol import (
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
)
from protocol.messages import TrackerResponse

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0


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
    request: Register | Join | Rejoin | Leave | Refresh | StatusRequest,
    *,
    rng: random.Random | None = None,
    give_up_after: float | None = 60.0,
    tracker_key: bytes | None = None,
) -> TrackerResponse:
    """Send one (already signed) request until answered; raises TrackerRefused or TooSlowError."""
    now = trio.current_time()
    exchange = TrackerExchange(
        request,
        rng=rng or random.Random(),
        now=now,
        deadline=None if give_up_after is None else now + give_up_after,
    )
    while exchange.state is ExchangeState.WAITING:
        assert exchange.next_attempt_at is not None
        await trio.sleep_until(exchange.next_attempt_at)
        await _attempt(endpoint, tracker, exchange, tracker_key)
    if exchange.response is not None:
        return exchange.response
    assert exchange.refusal is not None
    if exchange.refusal.code == ErrorCode.OVERLOADED:
        raise trio.TooSlowError(f"the tracker at {format_address(tracker)} did not answer")
    raise TrackerRefused(exchange.refusal.code, exchange.refusal.reason)


async def _attempt(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    exchange: TrackerExchange,
    tracker_key: bytes | None,
) -> None:
    payload = exchange.start_attempt(trio.current_time())
    try:
        with trio.fail_after(ATTEMPT_TIMEOUT):
            async with endpoint.connect(tracker, expected_peer_key=tracker_key) as conn:
                stream = await conn.open_stream()
                await stream.send_all(payload)
                while exchange.state is ExchangeState.SENT:
                    data = await stream.receive_some()
                    exchange.receive_data(data, trio.current_time())
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        logger.debug("tracker attempt failed: %s", exc)
        exchange.attempt_failed(trio.current_time())
    except ProtocolError as exc:
        logger.warning("tracker sent something invalid: %s", exc)
        exchange.attempt_failed(trio.current_time())
