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
from meshd.quic import PeerKeyMismatch, QuicEndpoint
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
    TreeRequest,
)
from protocol.messages import TrackerResponse

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0
WARN_AFTER = 3.0
"""Callers that a person waits on pass this as `warn_after`: a silent wait is worse than
a line saying what is being waited for."""


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
    request: Register | Join | Rejoin | Leave | Refresh | StatusRequest | TreeRequest,
    *,
    rng: random.Random | None = None,
    give_up_after: float | None = 60.0,
    tracker_key: bytes | None = None,
    warn_after: float | None = None,
) -> TrackerResponse:
    """Send one (already signed) request until answered; raises TrackerRefused or TooSlowError.

    With `warn_after`, a request still unanswered after that many seconds logs one warning
    that names the tracker and what went wrong so far."""
    now = trio.current_time()
    exchange = TrackerExchange(
        request,
        rng=rng or random.Random(),
        now=now,
        deadline=None if give_up_after is None else now + give_up_after,
    )
    attempts = _Attempts(endpoint, tracker, exchange, tracker_key)
    async with trio.open_nursery() as nursery:
        if warn_after is not None:
            nursery.start_soon(attempts.warn_at, now + warn_after)
        while exchange.state is ExchangeState.WAITING:
            assert exchange.next_attempt_at is not None
            await trio.sleep_until(exchange.next_attempt_at)
            await attempts.attempt()
        nursery.cancel_scope.cancel()
    if exchange.response is not None:
        return exchange.response
    assert exchange.refusal is not None
    if exchange.refusal.code == ErrorCode.OVERLOADED:
        raise trio.TooSlowError(
            f"the tracker at {format_address(tracker)} did not answer ({attempts.problem})"
        )
    raise TrackerRefused(exchange.refusal.code, exchange.refusal.reason)


class _Attempts:
    """Attempts of one exchange, each on a new connection, remembering what went wrong."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        tracker: tuple[str, int],
        exchange: TrackerExchange,
        tracker_key: bytes | None,
    ) -> None:
        self.endpoint = endpoint
        self.tracker = tracker
        self.exchange = exchange
        self.tracker_key = tracker_key
        self.problem = "no reply"

    async def warn_at(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        logger.warning(
            "no answer from the tracker at %s yet (%s); is it running, and is the address "
            "right? Still trying",
            format_address(self.tracker),
            self.problem,
        )

    async def attempt(self) -> None:
        exchange = self.exchange
        payload = exchange.start_attempt(trio.current_time())
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT):
                async with self.endpoint.connect(
                    self.tracker, expected_peer_key=self.tracker_key
                ) as conn:
                    stream = await conn.open_stream()
                    await stream.send_all(payload)
                    while exchange.state is ExchangeState.SENT:
                        data = await stream.receive_some()
                        exchange.receive_data(data, trio.current_time())
        except PeerKeyMismatch:
            raise TrackerRefused(
                ErrorCode.WRONG_PEER,
                f"the server at {format_address(self.tracker)} is not the tracker whose id "
                "was given",
            ) from None
        except trio.TooSlowError:
            self.problem = "no reply"
            exchange.attempt_failed(trio.current_time())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("tracker attempt failed: %s", exc)
            self.problem = str(exc)
            exchange.attempt_failed(trio.current_time())
        except ProtocolError as exc:
            logger.warning("tracker sent something invalid: %s", exc)
            self.problem = f"it sent something invalid: {exc}"
            exchange.attempt_failed(trio.current_time())
        else:
            if exchange.state is ExchangeState.WAITING:
                self.problem = "it is overloaded and asked us to retry later"
