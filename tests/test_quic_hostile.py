"""Hostile input on the server's socket: garbage, truncated Initials, floods.

Whatever arrives, existing connections keep working, new handshakes still
complete, and the server keeps no state for packets it cannot authenticate.
"""

from __future__ import annotations

import random
import struct

import pytest
import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from meshd.quic import DEFAULT_ALPN, EndpointConfig, QuicConn, QuicEndpoint, open_quic_endpoint
from tests.quic_helpers import endpoints, new_key

INITIAL_SIZE = 1200
ATTACKER = "127.66.0.1"  # another /24 than the honest client's 127.0.0.1


def random_initial(rng: random.Random, version: int = 1) -> bytes:
    """A well-formed Initial header with a random CID and an undecryptable payload."""
    head = bytes([0xC3]) + struct.pack("!I", version)
    head += bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(8)
    head += bytes([0])  # no token
    length = INITIAL_SIZE - len(head) - 2
    head += struct.pack("!H", 0x4000 | length)
    return head + rng.randbytes(length)


def client_hello(address: tuple[str, int]) -> bytes:
    """A genuine first Initial from a client that will never follow up."""
    quic = QuicConnection(configuration=QuicConfiguration(alpn_protocols=[DEFAULT_ALPN]))
    quic.connect(address, now=0.0)
    datagram, _ = quic.datagrams_to_send(now=0.0)[0]
    return datagram


async def echo_once(conn: QuicConn, data: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all(data)
    await stream.send_eof()
    return await stream.receive_some()


async def spray(server: QuicEndpoint, datagrams: list[bytes]) -> None:
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        for i, datagram in enumerate(datagrams):
            await sock.sendto(datagram, server.address)
            if i % 100 == 99:
                await trio.sleep(0.001)  # stay within the socket buffers
        await trio.sleep(0.2)  # let the server chew through them


async def test_garbage_and_truncated_initials_leave_no_state() -> None:
    rng = random.Random(11)
    hello = client_hello(("127.0.0.1", 1))
    garbage = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(300)]
    truncated = [hello[:size] for size in (1, 5, 20, 60, 300, 1199)]
    corrupted = [hello[:100] + bytes(b ^ 0xFF for b in hello[100:200]) + hello[200:]]
    with trio.fail_after(15):
        async with endpoints() as (server, client), client.connect(server.address) as conn:
            await spray(server, garbage + truncated + corrupted)
            assert server.connection_count == 1
            assert server.pending_handshakes == 0
            assert server.stats.unroutable_dropped + server.stats.bogus_initials >= 300
            assert server.stats.bogus_initials >= 1  # the corrupted full-size Initial
            assert await echo_once(conn, b"still fine") == b"still fine"
            async with client.connect(server.address) as fresh:
                assert await echo_once(fresh, b"new") == b"new"


async def test_flood_of_random_cid_initials() -> None:
    rng = random.Random(12)
    flood = [random_initial(rng) for _ in range(2000)]
    with trio.fail_after(20):
        async with endpoints() as (server, client), client.connect(server.address) as conn:
            start = trio.current_time()
            await spray(server, flood)
            assert trio.current_time() - start < 10
            # Undecryptable, or dropped before the decryption when their network's rate
            # was used up; a few may be lost on the socket.
            dropped = server.stats.bogus_initials + server.stats.initials_over_network_limits
            assert dropped >= 1900
            assert server.connection_count == 1
            assert server.pending_handshakes == 0
            assert await echo_once(conn, b"survived") == b"survived"
            async with client.connect(server.address) as fresh:
                assert await echo_once(fresh, b"new") == b"new"


async def test_pending_handshake_cap_is_honoured() -> None:
    config = EndpointConfig(
        max_pending_handshakes=20,
        handshake_timeout=1.0,
        retry_above=None,
        max_pending_per_network=100,
        handshakes_per_network=0,
    )
    with trio.fail_after(20):
        async with endpoints(server_config=config) as (server, client):
            established = await client.connect(server.address)
            hellos = [client_hello(server.address) for _ in range(100)]
            await spray(server, hellos)
            assert server.pending_handshakes == 20
            assert server.stats.initials_over_pending_cap >= 70
            # Established connections are unaffected by a full handshake queue ...
            assert await echo_once(established, b"busy") == b"busy"
            # ... and once the half-open handshakes time out, newcomers get in.
            async with client.connect(server.address) as late:
                assert server.pending_handshakes < 20  # half-open ones time out as they go
                assert await echo_once(late, b"in") == b"in"


async def spray_from(host: str, server: QuicEndpoint, datagrams: list[bytes]) -> None:
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind((host, 0))
        for datagram in datagrams:
            await sock.sendto(datagram, server.address)
        await trio.sleep(0.2)


async def test_under_load_initials_must_prove_their_address_first() -> None:
    config = EndpointConfig(retry_above=4, handshake_timeout=5.0)
    with trio.fail_after(20):
        async with endpoints(server_config=config) as (server, client):
            await spray(server, [client_hello(server.address) for _ in range(100)])
            # Four half-open handshakes hold state; the rest got a stateless Retry that
            # a source which never answers (or a spoofed one) cannot follow.
            assert server.pending_handshakes == 4
            assert server.stats.retries_sent >= 90
            async with client.connect(server.address) as conn:  # follows the Retry
                assert await echo_once(conn, b"proven") == b"proven"
            assert server.stats.retries_sent >= 91


@pytest.mark.parametrize(
    ("config", "admitted"),
    [
        (EndpointConfig(retry_above=None, max_pending_per_network=5, handshakes_per_network=0), 5),
        (
            EndpointConfig(
                retry_above=None,
                max_pending_per_network=100,
                handshakes_per_network=1,
                handshake_burst=8,
            ),
            8,
        ),
    ],
    ids=["pending", "rate"],
)
async def test_one_network_gets_a_bounded_share_of_handshakes(
    config: EndpointConfig, admitted: int
) -> None:
    """One network's flood of Initials takes its pending handshakes, or its burst of new
    ones, and no more; another network still gets in."""
    with trio.fail_after(20):
        async with endpoints(server_config=config) as (server, client):
            hellos = [client_hello(server.address) for _ in range(50)]
            await spray_from(ATTACKER, server, hellos)
            assert server.pending_handshakes == admitted
            assert server.stats.initials_over_network_limits >= 40
            async with client.connect(server.address) as conn:  # 127.0.0.1: another network
                assert await echo_once(conn, b"other network") == b"other network"


async def test_one_network_holds_a_bounded_number_of_connections() -> None:
    config = EndpointConfig(retry_above=None, max_connections_per_network=3)
    with trio.fail_after(20):
        async with (
            endpoints(server_config=config) as (server, _),
            open_quic_endpoint(new_key(), ATTACKER) as attacker,
        ):
            held = [await attacker.connect(server.address) for _ in range(3)]
            with trio.move_on_after(2):  # its Initials are dropped: no answer at all
                await attacker.connect(server.address)
                raise AssertionError("a fourth connection from one network got in")
            assert server.stats.initials_over_network_limits >= 1
            await held[0].aclose()
            while server.connection_count > 2:  # noqa: ASYNC110 (the endpoint has no event)
                await trio.sleep(0.05)
            async with attacker.connect(server.address) as again:  # a place came free
                assert await echo_once(again, b"again") == b"again"


async def test_unknown_version_gets_version_negotiation() -> None:
    initial = random_initial(random.Random(13), version=0x1A2A3A4A)
    with trio.fail_after(10):
        async with endpoints() as (server, _):
            with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                await sock.sendto(initial, server.address)
                reply, _ = await sock.recvfrom(2048)
    assert reply[1:5] == bytes(4)  # version 0: Version Negotiation
    assert struct.pack("!I", 1) in reply[5:]
    assert server.connection_count == 0
