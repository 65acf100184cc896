"""Real QUIC over UDP on 127.0.0.1: handshake, streams, datagrams, closing, pinning."""

from __future__ import annotations

import gc
import hashlib
import os

import pytest
import trio
from aioquic.quic.packet import QuicErrorCode

from meshd.quic import (
    ConnectionLost,
    DatagramTooLarge,
    EndpointConfig,
    HandshakeFailed,
    PeerKeyMismatch,
    QuicConn,
    StreamReset,
    open_quic_endpoint,
    raw_public_key,
    serve_quic,
)
from meshd.quic._aioquic import MeshQuicConnection
from tests.quic_helpers import endpoints, new_key, read_all


async def silent_address() -> tuple[trio.socket.SocketType, tuple[str, int]]:
    """A bound UDP socket that never answers: a peer that is down."""
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()


async def test_handshake_exposes_addresses_and_peer_key() -> None:
    server_key = new_key()
    with trio.fail_after(10):
        async with (
            endpoints(None, server_key=server_key) as (server, client),
            client.connect(server.address) as conn,
        ):
            assert server.address[0] == "127.0.0.1"
            assert server.address[1] != 0
            assert conn.peer_key == raw_public_key(server_key.public_key())
            assert conn.remote_address[:2] == server.address
            accepted = await server.accept()
            assert accepted.peer_key is None  # servers do not ask for a certificate
            assert accepted.remote_address[:2] == client.address


async def test_streams_in_both_directions_and_unidirectional() -> None:
    async def handler(conn: QuicConn) -> None:
        request = await conn.accept_stream()
        assert await read_all(request) == b"ping"
        await request.send_all(b"pong")
        await request.send_eof()
        # The server opens streams towards the client too.
        push = await conn.open_stream()
        await push.send_all(b"from server")
        await push.send_eof()
        uni = await conn.accept_stream()
        assert uni.is_unidirectional
        with pytest.raises(trio.ClosedResourceError):
            await uni.send_all(b"wrong way")
        back = await conn.open_stream(unidirectional=True)
        await back.send_all(await read_all(uni))
        await back.send_eof()
        await conn.wait_closed()

    with trio.fail_after(10):
        async with (
            endpoints(handler) as (server, client),
            client.connect(server.address) as conn,
        ):
            stream = await conn.open_stream()
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"pong"
            pushed = await conn.accept_stream()
            assert pushed.stream_id % 4 == 1  # server-initiated bidirectional
            assert await read_all(pushed) == b"from server"
            uni = await conn.open_stream(unidirectional=True)
            with pytest.raises(trio.ClosedResourceError):
                await uni.receive_some()
            await uni.send_all(b"one way")
            await uni.send_eof()
            back = await conn.accept_stream()
            assert back.stream_id % 4 == 3  # server-initiated unidirectional
            assert await read_all(back) == b"one way"


async def test_multi_megabyte_transfer_is_intact() -> None:
    payload = os.urandom(6 * 1024 * 1024)
    with trio.fail_after(20):
        async with (
            endpoints() as (server, client),
            client.connect(server.address) as conn,
            trio.open_nursery() as nursery,
        ):
            stream = await conn.open_stream()

            async def send() -> None:
                for offset in range(0, len(payload), 100_000):
                    await stream.send_all(payload[offset : offset + 100_000])
                await stream.send_eof()

            nursery.start_soon(send)
            echoed = await read_all(stream)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def test_datagrams_round_trip_and_oversize_is_refused() -> None:
    with trio.fail_after(10):
        async with endpoints() as (server, client), client.connect(server.address) as conn:
            limit = conn.max_datagram_payload
            assert 1000 < limit < 1200
            with pytest.raises(DatagramTooLarge, match=str(limit)) as info:
                conn.send_datagram(b"x" * (limit + 1))
            assert info.value.limit == limit
            # The largest allowed payload goes through, and nothing behind it stalls.
            conn.send_datagram(b"y" * limit)
            assert await conn.receive_datagram() == b"y" * limit
            for i in range(5):
                conn.send_datagram(b"%d" % i)
                assert await conn.receive_datagram() == b"%d" % i


async def test_datagram_queues_are_bounded_and_drop_oldest() -> None:
    config = EndpointConfig(datagram_send_queue=16, datagram_receive_queue=8)
    with trio.fail_after(10):
        async with (
            endpoints(None, server_config=config, client_config=config) as (server, client),
            client.connect(server.address) as client_conn,
        ):
            server_conn = await server.accept()
            # Far more than the congestion window lets out at once.
            for i in range(2000):
                client_conn.send_datagram(i.to_bytes(4, "big") + bytes(150))
            assert client_conn.datagrams_dropped_outgoing > 0
            await trio.sleep(0.3)  # let what was sent arrive, unread
            assert server_conn.datagrams_dropped > 0
            assert len(server_conn._datagrams) == 8
            first = int.from_bytes((await server_conn.receive_datagram())[:4], "big")
            assert first > 8  # the oldest ones were the ones dropped


async def test_delivered_datagrams_come_queued_first_then_as_they_arrive() -> None:
    with trio.fail_after(10):
        async with endpoints(None) as (server, client), client.connect(server.address) as conn:
            server_conn = await server.accept()
            for i in range(3):
                server_conn.send_datagram(b"%d" % i)
            while len(conn._datagrams) < 3:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.01)
            got: list[bytes] = []
            six = trio.Event()

            def take(data: bytes) -> None:
                got.append(data)
                if len(got) == 6:
                    six.set()

            conn.deliver_datagrams(take)
            assert got == [b"0", b"1", b"2"]  # the queued ones, at once
            for i in range(3, 6):
                server_conn.send_datagram(b"%d" % i)
            await six.wait()
            assert got == [b"%d" % i for i in range(6)] and not conn._datagrams


async def test_a_datagram_callback_that_fails_closes_only_its_connection() -> None:
    def broken(data: bytes) -> None:
        raise RuntimeError("a bug in the consumer")

    with trio.fail_after(10):
        async with endpoints() as (server, client):
            async with client.connect(server.address) as conn:
                conn.deliver_datagrams(broken)
                conn.send_datagram(b"echoed back to the callback")
                await conn.wait_closed()
                assert conn.close_code == QuicErrorCode.INTERNAL_ERROR
            async with client.connect(server.address) as other:  # the endpoint lives on
                other.send_datagram(b"still served")
                assert await other.receive_datagram() == b"still served"


async def test_a_server_that_takes_no_datagrams_closes_on_one() -> None:
    config = EndpointConfig(client_datagram_error=0x05)
    with trio.fail_after(10):
        async with (
            endpoints(None, server_config=config) as (server, client),
            client.connect(server.address) as client_conn,
        ):
            server_conn = await server.accept()
            client_conn.send_datagram(b"not for a server")
            await client_conn.wait_closed()
            assert (client_conn.close_code, client_conn.closed_by_peer) == (0x05, True)
            assert server_conn.is_closed and server_conn.close_code == 0x05


async def test_a_longer_ack_delay_is_advertised_and_a_lone_packet_is_still_acknowledged() -> None:
    """A child that holds a lone ACK up to 250 ms tells its parent so (the parent's loss
    recovery waits for it); the last datagram of a burst is acknowledged within it."""
    config = EndpointConfig(max_ack_delay=0.25)
    with trio.fail_after(10):
        async with (
            endpoints(None, client_config=config) as (server, client),
            client.connect(server.address) as client_conn,
        ):
            server_conn = await server.accept()
            assert server_conn._quic._loss.max_ack_delay == 0.25
            before = server_conn.last_received_at
            for i in range(20):
                server_conn.send_datagram(b"%d" % i)
                await trio.sleep(0.01)
            assert [await client_conn.receive_datagram() for _ in range(20)][-1] == b"19"
            await trio.sleep(0.3)
            assert server_conn.last_received_at > before  # the lone last one too


async def test_close_code_and_reason_reach_the_peer() -> None:
    seen: list[ConnectionLost] = []
    server_done = trio.Event()

    async def handler(conn: QuicConn) -> None:
        stream = await conn.accept_stream()
        await read_all(stream)
        with pytest.raises(ConnectionLost) as info:
            await conn.receive_datagram()
        seen.append(info.value)
        assert conn.close_code == 42
        assert conn.close_reason == "bye now"
        assert conn.closed_by_peer
        server_done.set()

    with trio.fail_after(10):
        async with endpoints(handler) as (server, client):
            conn = await client.connect(server.address)
            stream = await conn.open_stream()
            await stream.send_eof()
            await conn.aclose(42, "bye now")
            assert conn.close_code == 42 and not conn.closed_by_peer
            # Closed by us: ClosedResourceError, not BrokenResourceError.
            with pytest.raises(trio.ClosedResourceError):
                conn.send_datagram(b"late")
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()
            await server_done.wait()
    assert seen[0].error_code == 42
    assert seen[0].reason == "bye now"
    assert seen[0].by_peer
    assert isinstance(seen[0], trio.BrokenResourceError)


async def test_alpn_mismatch_fails_the_handshake() -> None:
    with trio.fail_after(10):
        async with endpoints(alpn="other/1") as (server, client):
            with pytest.raises(HandshakeFailed) as info:
                await client.connect(server.address)
            assert info.value.by_peer
            assert (
                info.value.error_code == QuicErrorCode.CRYPTO_ERROR + 120
            )  # no_application_protocol
            assert "another version than meshd/2" in str(info.value)
            with trio.move_on_after(0.5) as scope:
                await server.accept()
            assert scope.cancelled_caught


async def test_peer_key_pinning() -> None:
    server_key = new_key()
    expected = raw_public_key(server_key.public_key())
    with trio.fail_after(10):
        async with (
            endpoints(server_key=server_key) as (right_server, client),
            endpoints() as (wrong_server, _),
        ):
            async with client.connect(right_server.address, expected_peer_key=expected) as conn:
                assert conn.peer_key == expected
            with pytest.raises(PeerKeyMismatch) as info:
                await client.connect(wrong_server.address, expected_peer_key=expected)
            assert info.value.expected == expected
            assert info.value.actual is not None and info.value.actual != expected
            assert isinstance(info.value, trio.BrokenResourceError)
            with pytest.raises(ValueError, match="32"):
                client.connect(right_server.address, expected_peer_key=b"short")
            await trio.sleep(0.5)  # both closed connections finish draining
            assert client.connection_count == 0


async def test_idle_timeout_closes_both_sides() -> None:
    quiet = EndpointConfig(idle_timeout=0.5, keepalive_interval=None)
    with trio.fail_after(10):
        async with endpoints(None, server_config=quiet, client_config=quiet) as (server, client):
            async with await client.connect(server.address):
                server_conn = await server.accept()
                start = trio.current_time()
                await server_conn.wait_closed()
                assert 0.4 < trio.current_time() - start < 3
                assert server_conn.close_reason == "idle timeout"
                assert server_conn.close_code is None
                assert not server_conn.closed_by_peer
                with pytest.raises(ConnectionLost, match="idle timeout"):
                    await server_conn.open_stream()
            await trio.sleep(0.5)
            assert client.connection_count == 0
            assert server.connection_count == 0


async def test_keepalive_holds_an_idle_connection_open() -> None:
    lively = EndpointConfig(idle_timeout=0.6, keepalive_interval=0.15)
    with trio.fail_after(10):
        async with (
            endpoints(server_config=lively, client_config=lively) as (server, client),
            client.connect(server.address) as conn,
        ):
            await trio.sleep(2)
            conn.send_datagram(b"still here")
            assert await conn.receive_datagram() == b"still here"


async def test_stream_reset_is_reported_with_code() -> None:
    async def handler(conn: QuicConn) -> None:
        stream = await conn.accept_stream()
        await stream.receive_some()
        stream.reset(7)
        await conn.wait_closed()

    with trio.fail_after(10):
        async with (
            endpoints(handler) as (server, client),
            client.connect(server.address) as conn,
        ):
            stream = await conn.open_stream()
            await stream.send_all(b"hello")
            with pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.error_code == 7
            with pytest.raises(StreamReset):  # the reset also stops our sending
                for _ in range(100):
                    await stream.send_all(b"more")
                    await trio.sleep(0.01)


async def test_reader_that_does_not_read_stalls_the_sender() -> None:
    config = EndpointConfig(stream_send_buffer=64 * 1024, stream_receive_window=128 * 1024)

    async def handler(conn: QuicConn) -> None:
        await conn.accept_stream()  # ... and never read it
        await conn.wait_closed()

    with trio.fail_after(10):
        async with (
            endpoints(handler, server_config=config, client_config=config) as (server, client),
            client.connect(server.address) as conn,
        ):
            stream = await conn.open_stream()
            sent = 0
            with trio.move_on_after(1):
                while True:
                    await stream.send_all(bytes(16 * 1024))
                    sent += 16 * 1024
            # Receive credit (128 KiB) + send buffer (64 KiB) + one chunk.
            assert 128 * 1024 <= sent <= (128 + 64 + 16) * 1024
            # Cancelling a blocked send_all leaves the connection usable.
            other = await conn.open_stream()
            await other.send_all(b"x")


async def test_cancelled_receive_leaves_stream_and_connection_usable() -> None:
    with trio.fail_after(10):
        async with endpoints() as (server, client), client.connect(server.address) as conn:
            stream = await conn.open_stream()
            with trio.move_on_after(0.1) as scope:
                await stream.receive_some()
            assert scope.cancelled_caught
            with trio.move_on_after(0.1) as scope:
                await conn.receive_datagram()
            assert scope.cancelled_caught
            await stream.send_all(b"after cancel")
            assert await stream.receive_some() == b"after cancel"
            conn.send_datagram(b"dgram")
            assert await conn.receive_datagram() == b"dgram"


async def test_cancelled_connect_leaves_nothing_behind() -> None:
    with trio.fail_after(10):
        async with open_quic_endpoint(new_key()) as client:
            sock, address = await silent_address()
            with sock, trio.move_on_after(0.3) as scope:
                await client.connect(address)
            assert scope.cancelled_caught
            assert client.connection_count == 0


async def test_handshake_timeout() -> None:
    config = EndpointConfig(handshake_timeout=0.5)
    with trio.fail_after(10):
        async with open_quic_endpoint(new_key(), config=config) as client:
            sock, address = await silent_address()
            with sock, pytest.raises(HandshakeFailed, match="timed out"):
                await client.connect(address)
            assert client.connection_count == 0


async def test_no_tasks_or_sockets_leak() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with trio.fail_after(10):
        tasks_before = trio.lowlevel.current_statistics().tasks_living
        fds_before = open_fds()
        async with endpoints() as (server, _):
            async with open_quic_endpoint(new_key()) as client:
                conns = [await client.connect(server.address) for _ in range(5)]
                for conn in conns[:2]:
                    await conn.aclose()
                stream = await conns[3].open_stream()
                await stream.send_all(b"open when the endpoint closes")
                assert client.connection_count >= 3
            # Using a connection after its endpoint closed is a ClosedResourceError.
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")
            with pytest.raises(trio.ClosedResourceError):
                await client.accept()
            with pytest.raises(trio.ClosedResourceError):
                await client.connect(server.address)
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before
        assert open_fds() == fds_before


async def test_finished_connections_are_freed_without_the_cyclic_collector() -> None:
    """A tracker makes a connection per request: one that is done must be freed when the
    last reference goes, not linger (hundreds of objects) until a full collection."""
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(10):
            async with endpoints() as (server, client):
                for _ in range(3):
                    async with client.connect(server.address) as conn:
                        stream = await conn.open_stream()
                        await stream.send_all(b"ping")
                        await stream.send_eof()
                        assert await read_all(stream) == b"ping"
                while server.connection_count or client.connection_count:  # noqa: ASYNC110 - no event
                    await trio.sleep(0.01)
            del conn, stream
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            garbage = [o for o in gc.garbage if isinstance(o, (QuicConn, MeshQuicConnection))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert garbage == []


async def test_server_full_refuses_quickly() -> None:
    with trio.fail_after(10):
        async with (
            endpoints(max_connections=2) as (server, client),
            client.connect(server.address),
            client.connect(server.address),
        ):
            start = trio.current_time()
            with pytest.raises(HandshakeFailed) as info:
                await client.connect(server.address)
            assert trio.current_time() - start < 1
            assert info.value.by_peer
            assert info.value.error_code == QuicErrorCode.CONNECTION_REFUSED
            assert server.stats.connections_refused == 1


async def test_stateless_retry() -> None:
    with trio.fail_after(10):
        async with endpoints(retry_above=0) as (server, client):
            async with client.connect(server.address) as conn:
                stream = await conn.open_stream()
                await stream.send_all(b"validated")
                assert await stream.receive_some() == b"validated"
            assert server.stats.retries_sent == 1


async def test_many_concurrent_connections() -> None:
    count = 200
    results: list[bytes] = []
    all_open = trio.Event()
    # One client network opening 200 at once: no per-network limits, and the server asks
    # for a Retry once 16 handshakes are pending.
    config = EndpointConfig(
        max_connections_per_network=count, max_pending_per_network=count, handshakes_per_network=0
    )
    with trio.fail_after(30):
        async with endpoints(server_config=config) as (server, client):

            async def one(i: int) -> None:
                async with client.connect(server.address) as conn:
                    stream = await conn.open_stream()
                    await stream.send_all(b"conn %d" % i)
                    await stream.send_eof()
                    results.append(await read_all(stream))
                    if len(results) == count:
                        assert server.connection_count == count
                        all_open.set()
                    await all_open.wait()

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
    assert sorted(results) == sorted(b"conn %d" % i for i in range(count))


@pytest.mark.parametrize("ask", [True, False])
async def test_a_server_that_asks_learns_the_client_key(ask: bool) -> None:
    client_key = new_key()
    seen: list[bytes | None] = []

    async def handler(conn: QuicConn) -> None:
        seen.append(conn.peer_key)
        stream = await conn.accept_stream()
        await stream.send_all(await stream.receive_some())

    config = EndpointConfig(request_client_certificate=ask)
    with trio.fail_after(10):
        async with (
            open_quic_endpoint(new_key(), config=config) as server,
            open_quic_endpoint(client_key) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_quic, server, handler)
            async with client.connect(server.address) as conn:
                stream = await conn.open_stream()
                await stream.send_all(b"who")
                assert await stream.receive_some() == b"who"
            nursery.cancel_scope.cancel()
    assert seen == [raw_public_key(client_key.public_key()) if ask else None]
