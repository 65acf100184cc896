"""Cheaper handshakes on loopback: session resumption, 0-RTT, early requests, reply delay."""

from __future__ import annotations

import datetime

import pytest
import trio
from aioquic.tls import CipherSuite, SessionTicket

from meshd.quic import EndpointConfig, PeerKeyMismatch, QuicConn, QuicEndpoint, raw_public_key
from meshd.quic.tickets import ServerTickets
from tests.quic_helpers import endpoints, new_key

TICKETS = EndpointConfig(session_tickets=8)


async def answer_once(conn: QuicConn) -> None:
    """Read one message and answer it, saying whether it came in 0-RTT."""
    stream = await conn.accept_stream()
    data = await stream.receive_some()
    await stream.send_all((b"0rtt:" if stream.early_data_end else b"1rtt:") + data)
    await conn.wait_closed()


async def ask(
    client: QuicEndpoint, address: tuple[str, int], key: bytes, replay_safe: bool = False
) -> tuple[QuicConn, bytes]:
    """Connect with b"hello" as early data; the connection (closed) and the answer."""
    conn = await client.connect(address, key, early_data=b"hello", replay_safe=replay_safe)
    assert conn.first_stream is not None
    received = b""
    while len(received) < 10:
        received += await conn.first_stream.receive_some()
    await conn.aclose()
    return conn, received


async def test_a_second_connection_resumes_and_keeps_the_key_pinned() -> None:
    server_key = new_key()
    key = raw_public_key(server_key.public_key())
    with trio.fail_after(20):
        async with endpoints(answer_once, server_key=server_key, server_config=TICKETS) as (
            server,
            client,
        ):
            first, first_answer = await ask(client, server.address, key)
            second, second_answer = await ask(client, server.address, key)
    assert not first.session_resumed and first_answer == b"1rtt:hello"
    assert second.session_resumed and second.peer_key == key
    assert second_answer == b"1rtt:hello"  # not replay-safe: after the handshake


async def test_only_replay_safe_data_goes_in_0rtt() -> None:
    server_key = new_key()
    key = raw_public_key(server_key.public_key())
    with trio.fail_after(20):
        async with endpoints(answer_once, server_key=server_key, server_config=TICKETS) as (
            server,
            client,
        ):
            await ask(client, server.address, key)
            _, early_answer = await ask(client, server.address, key, replay_safe=True)
            late, late_answer = await ask(client, server.address, key, replay_safe=False)
    assert early_answer == b"0rtt:hello"
    assert late.session_resumed and late_answer == b"1rtt:hello"


async def test_a_ticket_is_not_used_for_another_expected_key() -> None:
    server_key = new_key()
    key = raw_public_key(server_key.public_key())
    with trio.fail_after(20):
        async with endpoints(answer_once, server_key=server_key, server_config=TICKETS) as (
            server,
            client,
        ):
            await ask(client, server.address, key)
            with pytest.raises(PeerKeyMismatch):
                await client.connect(server.address, raw_public_key(new_key().public_key()))


@pytest.mark.parametrize("reply_delay", [0.0, 0.02])
async def test_reply_delay_sends_the_ack_with_the_reply(reply_delay: float) -> None:
    """A request/response server sends its handshake flight, then one packet for the
    reply (with HANDSHAKE_DONE and the ACKs), instead of one each."""
    server_key = new_key()
    key = raw_public_key(server_key.public_key())
    config = EndpointConfig(reply_delay=reply_delay)

    async def slow_answer(conn: QuicConn) -> None:
        await trio.sleep(0.003)  # the answer takes a moment, as a tracker's does
        await answer_once(conn)

    sent: list[int] = []
    with trio.fail_after(20):
        async with endpoints(slow_answer, server_key=server_key, server_config=config) as (
            server,
            client,
        ):
            # On a loaded machine the answer may take longer than the delay: one of three
            # exchanges must show the batching.
            while len(sent) < 3 and 2 not in sent:
                before = server.stats.datagrams_sent
                conn = await client.connect(server.address, key, early_data=b"hello")
                assert conn.first_stream is not None
                await conn.first_stream.receive_some()
                sent.append(server.stats.datagrams_sent - before)
                await conn.aclose()
    if reply_delay:
        assert 2 in sent, sent
    else:
        assert min(sent) >= 3, sent


def test_server_tickets_are_bounded_and_single_use() -> None:
    tickets = ServerTickets(capacity=2)
    now = datetime.datetime.now(datetime.UTC)
    for label in (b"a", b"b", b"c"):
        tickets.add(
            SessionTicket(
                age_add=1,
                cipher_suite=CipherSuite.AES_128_GCM_SHA256,
                not_valid_after=now + datetime.timedelta(hours=1),
                not_valid_before=now,
                resumption_secret=b"secret " + label,
                server_name="",
                ticket=label,
            )
        )
    assert len(tickets) == 2
    assert tickets.take(b"a") is None  # the oldest was forgotten
    resumed = tickets.take(b"c")
    assert resumed is not None and resumed.resumption_secret == b"secret c"
    assert tickets.take(b"c") is None  # used once
