"""The node <-> tracker exchange: answers, RETRY_AFTER, backoff, refusals, tokens."""

from __future__ import annotations

import itertools
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    Assigned,
    ChildGone,
    ErrorCode,
    ExchangeState,
    Goodbye,
    Heartbeat,
    Join,
    Peer,
    ProtocolError,
    Refresh,
    RetryAfter,
    TrackerChannel,
    TrackerExchange,
    check_token,
    frame,
    issue_token,
    key_id,
    sign_message,
    verify_message,
)
from protocol.backoff import Backoff

NODE_KEY = Ed25519PrivateKey.generate()
STREAM = b"\x05" * 32
JOIN = sign_message(Join(STREAM, key_id(NODE_KEY), 4, "127.0.0.1:7000", None, 1_000), NODE_KEY)
ASSIGNED = Assigned(Peer(STREAM, "127.0.0.1:4433"), (), 1, 180)


def exchange(now: float = 0.0, deadline: float | None = None) -> TrackerExchange:
    return TrackerExchange(JOIN, rng=random.Random(7), now=now, deadline=deadline)


def state_of(client: TrackerExchange) -> ExchangeState:
    """`client.state` read afresh: mypy keeps an attribute narrowed by an earlier `assert`
    across the calls that change it."""
    return client.state


def test_request_then_answer_through_the_tracker_channel() -> None:
    client = exchange()
    channel = TrackerChannel()
    channel.receive_data(client.start_attempt(now=0.0))
    request = channel.next_request()
    assert request == JOIN
    assert isinstance(request, Join)
    verify_message(request, NODE_KEY.public_key())
    channel.respond(ASSIGNED)
    client.receive_data(channel.data_to_send(), now=0.01)
    assert client.state is ExchangeState.DONE and client.response == ASSIGNED


def test_retry_after_is_honoured_with_jitter_above_it() -> None:
    client = exchange()
    client.start_attempt(now=0.0)
    client.receive_data(frame(RetryAfter(2_000, "busy")), now=0.0)
    assert client.state is ExchangeState.WAITING
    assert client.next_attempt_at is not None and 2.0 <= client.next_attempt_at <= 3.0
    client.start_attempt(now=client.next_attempt_at)
    with pytest.raises(ProtocolError):
        client.start_attempt(now=client.next_attempt_at)  # one attempt at a time


def test_connection_failures_back_off_exponentially_with_jitter() -> None:
    client = exchange()
    delays = []
    now = 0.0
    for _ in range(8):
        client.start_attempt(now)
        client.attempt_failed(now)
        assert client.next_attempt_at is not None
        delays.append(client.next_attempt_at - now)
        now = client.next_attempt_at
    assert delays[0] < 0.11 and delays[-1] > 5.0
    assert all(later > earlier * 1.0 for earlier, later in itertools.pairwise(delays))


def test_refresh_and_child_gone_retry_from_a_second_and_placements_at_once() -> None:
    """Soft state and advice wait: after an ANNOUNCE or a mass failure every node sends
    them at once, and a busy tracker would get back what it refused as a storm."""
    node = key_id(NODE_KEY)
    requests: dict[str, Join | Refresh | ChildGone] = {
        "join": JOIN,
        "refresh": sign_message(Refresh(STREAM, node, None, 4, "127.0.0.1:7000", 1_000), NODE_KEY),
        "child_gone": sign_message(ChildGone(STREAM, node, b"\x06" * 32, 1_000), NODE_KEY),
    }
    first_delay = {}
    for name, request in requests.items():
        client = TrackerExchange(request, rng=random.Random(7), now=0.0)
        client.start_attempt(0.0)
        client.receive_data(frame(Goodbye(ErrorCode.OVERLOADED, "shed")), now=0.0)
        assert client.next_attempt_at is not None
        first_delay[name] = client.next_attempt_at
    assert first_delay["join"] <= 0.1
    assert 0.5 <= first_delay["refresh"] <= 1.0 and 0.5 <= first_delay["child_gone"] <= 1.0


def test_jitter_spreads_clients_that_failed_together() -> None:
    firsts = {round(Backoff(random.Random(seed)).next_delay(floor=1.0), 6) for seed in range(50)}
    assert len(firsts) == 50 and min(firsts) >= 1.0 and max(firsts) <= 1.5


def test_overloaded_goodbye_is_retried_but_a_refusal_is_final() -> None:
    client = exchange()
    client.start_attempt(now=0.0)
    client.receive_data(frame(Goodbye(ErrorCode.OVERLOADED, "shed")), now=0.0)
    assert client.state is ExchangeState.WAITING
    client.start_attempt(now=1.0)
    client.receive_data(frame(Goodbye(ErrorCode.TOKEN_EXPIRED, "expired")), now=1.0)
    assert state_of(client) is ExchangeState.FAILED
    assert client.refusal is not None and client.refusal.code == ErrorCode.TOKEN_EXPIRED


def test_deadline_ends_the_retries() -> None:
    client = exchange(deadline=1.0)
    now = 0.0
    for _ in range(10):
        client.start_attempt(now)
        client.attempt_failed(now)
        if client.next_attempt_at is None:
            break
        now = client.next_attempt_at
    assert client.state is ExchangeState.FAILED
    assert client.refusal is not None and now <= 1.0


def test_a_wrong_answer_is_a_protocol_error() -> None:
    client = exchange()
    client.start_attempt(now=0.0)
    with pytest.raises(ProtocolError) as caught:
        client.receive_data(frame(Heartbeat(1)), now=0.0)
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_the_tracker_channel_refuses_non_requests() -> None:
    channel = TrackerChannel()
    channel.receive_data(frame(ASSIGNED))
    with pytest.raises(ProtocolError):
        channel.next_request()


def test_tokens_admit_only_their_node_and_stream_until_expiry() -> None:
    host = Ed25519PrivateKey.generate()
    node = key_id(NODE_KEY)
    token = issue_token(host, STREAM, node, expires_ms=10_000)
    keys = [host.public_key()]
    check_token(token, keys, stream=STREAM, node=node, now_ms=9_999)
    check_token(None, [], stream=STREAM, node=node, now_ms=0)  # open mode

    def code(data: bytes | None, **overrides: object) -> ErrorCode:
        args: dict[str, object] = {"stream": STREAM, "node": node, "now_ms": 0} | overrides
        with pytest.raises(ProtocolError) as caught:
            check_token(data, keys, **args)  # type: ignore[arg-type]
        return ErrorCode(caught.value.code)

    assert code(token, now_ms=10_000) == ErrorCode.TOKEN_EXPIRED
    assert code(None) == ErrorCode.TOKEN_REQUIRED
    assert code(token, node=b"\x01" * 32) == ErrorCode.TOKEN_INVALID
    assert code(token, stream=b"\x01" * 32) == ErrorCode.TOKEN_INVALID
    assert code(b"garbage") == ErrorCode.TOKEN_INVALID
    other = issue_token(Ed25519PrivateKey.generate(), STREAM, node, expires_ms=10_000)
    assert code(other) == ErrorCode.TOKEN_INVALID
