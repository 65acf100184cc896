"""The node <-> tracker exchange: one request, one response, over a short-lived connection.

`TrackerExchange` is the client's side: it retries with jittered exponential backoff on
connection failures, honours RETRY_AFTER, and ends DONE (with the response) or FAILED
(with the tracker's GOODBYE). `TrackerChannel` is the tracker's side of one stream.
The state table is docs/spec.md §7.
"""

from __future__ import annotations

import random
from enum import Enum

from protocol.backoff import Backoff
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.framing import LENGTH_SIZE, MessageReader, frame
from protocol.messages import (
    Ack,
    Assigned,
    ChildGone,
    Goodbye,
    Join,
    Leave,
    Moved,
    Refresh,
    Register,
    Rejoin,
    RetryAfter,
    StatusReport,
    StatusRequest,
    TrackerRequest,
    TrackerResponse,
    TreeReport,
    TreeRequest,
)

EXPECTED_RESPONSE: dict[type[TrackerRequest], tuple[type[TrackerResponse], ...]] = {
    Register: (Ack,),
    Refresh: (Ack, Assigned),  # ASSIGNED: the tracker has the node elsewhere; move there
    Join: (Assigned,),
    Rejoin: (Assigned,),
    Leave: (Moved,),
    StatusRequest: (StatusReport,),
    TreeRequest: (TreeReport,),
    ChildGone: (Ack,),
}
RETRYABLE_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.INTERNAL_ERROR})
BACKOFF_BASE = 0.1
SLOW_BACKOFF_BASE = 1.0
"""REFRESH (soft state) and CHILD_GONE (advice) retry later: an ANNOUNCE makes every node
REFRESH at once (docs/spec.md §7.2), and a mass failure every surviving parent send
CHILD_GONE in the same second as the REJOINs that matter more; retried from 100 ms, what
a busy tracker refused came back as a storm (`meshd sim`: a 20,000-listener restart, 22,000
requests in its busiest second, 10,000 with this; a 20,000-listener melt, 5,000 CHILD_GONE
as 27,000 attempts in its first seconds)."""
BACKOFF_CAP = 30.0


def backoff_base(request: TrackerRequest) -> float:
    """The first retry delay of `request` (docs/spec.md §7.4)."""
    return SLOW_BACKOFF_BASE if isinstance(request, Refresh | ChildGone) else BACKOFF_BASE


class ExchangeState(Enum):
    WAITING = "waiting"  # until next_attempt_at
    SENT = "sent"  # request sent, awaiting the response
    DONE = "done"
    FAILED = "failed"


class TrackerExchange:
    """One request, retried until answered, refused, or past `deadline`."""

    def __init__(
        self,
        request: TrackerRequest,
        *,
        rng: random.Random,
        now: float,
        deadline: float | None = None,
    ) -> None:
        self.request = request
        self.state = ExchangeState.WAITING
        self.next_attempt_at: float | None = now
        self.response: TrackerResponse | None = None
        self.refusal: Goodbye | None = None
        self.attempts = 0
        self._deadline = deadline
        self._backoff = Backoff(rng, base=backoff_base(request), cap=BACKOFF_CAP)
        self._reader = MessageReader()

    def start_attempt(self, now: float) -> bytes:
        """The framed request to send on a new connection's stream."""
        if self.state is not ExchangeState.WAITING:
            raise LocalProtocolError(f"no attempt to start while {self.state.value}")
        self.state = ExchangeState.SENT
        self.next_attempt_at = None
        self.attempts += 1
        self._reader = MessageReader()
        return frame(self.request)

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the tracker's stream. Raises ProtocolError on a bad or unexpected reply."""
        if self.state is not ExchangeState.SENT:
            return
        self._reader.receive_data(data)
        msg = self._reader.next_message()
        if msg is None:
            if self._reader.at_eof:
                self.attempt_failed(now)
            return
        if isinstance(msg, RetryAfter):
            self._wait(now, floor=msg.delay_ms / 1000)
        elif isinstance(msg, Goodbye):
            if msg.code in RETRYABLE_CODES:
                self._wait(now)
            else:
                self.refusal = msg
                self.state = ExchangeState.FAILED
        elif isinstance(msg, EXPECTED_RESPONSE[type(self.request)]):
            self.response = msg
            self.state = ExchangeState.DONE
        else:
            raise RemoteProtocolError(
                f"{type(msg).__name__} does not answer {type(self.request).__name__}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )

    def attempt_failed(self, now: float) -> None:
        """The connection failed or timed out before an answer: back off and try again."""
        if self.state is ExchangeState.SENT:
            self._wait(now)

    def _wait(self, now: float, floor: float = 0.0) -> None:
        at = now + self._backoff.next_delay(floor)
        if self._deadline is not None and at > self._deadline:
            self.state = ExchangeState.FAILED
            self.refusal = Goodbye(ErrorCode.OVERLOADED, "gave up: the tracker did not answer")
            return
        self.state = ExchangeState.WAITING
        self.next_attempt_at = at


class ChannelState(Enum):
    AWAITING_REQUEST = "awaiting-request"
    RESPONDING = "responding"
    CLOSED = "closed"


class TrackerChannel:
    """The tracker's side of one request stream: requests in, exactly one response each."""

    def __init__(self) -> None:
        self.state = ChannelState.AWAITING_REQUEST
        self._reader = MessageReader()
        self._outgoing = bytearray()
        self._taken = 0
        self.request_offset = 0
        """Where on the stream the request `next_request` returned last began."""

    def receive_data(self, data: bytes) -> None:
        self._reader.receive_data(data)

    def next_request(self) -> TrackerRequest | None:
        """The next request, once the previous one is answered. Raises ProtocolError."""
        if self.state is not ChannelState.AWAITING_REQUEST:
            return None
        msg = self._reader.next_message()
        if msg is None:
            if self._reader.at_eof:
                self.state = ChannelState.CLOSED
            return None
        if not isinstance(msg, tuple(EXPECTED_RESPONSE)):
            raise RemoteProtocolError(
                f"{type(msg).__name__} is not a tracker request", ErrorCode.UNEXPECTED_MESSAGE
            )
        self.state = ChannelState.RESPONDING
        self.request_offset = self._taken
        self._taken += LENGTH_SIZE + len(self._reader.last_raw)
        return msg  # type: ignore[return-value]

    def respond(self, response: TrackerResponse) -> None:
        if self.state is not ChannelState.RESPONDING:
            raise LocalProtocolError("respond() without a pending request")
        self._outgoing += frame(response)
        self.state = ChannelState.AWAITING_REQUEST

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data
