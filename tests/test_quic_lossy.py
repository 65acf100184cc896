"""Two endpoints on a seeded in-memory network with loss, duplication, reordering.

trio's autojump clock drives aioquic's timers (retransmission, idle timeout,
keep-alive, handshake timeout), so minutes of protocol time take milliseconds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from meshd.quic import EndpointConfig, HandshakeFailed, QuicEndpoint, open_quic_endpoint
from meshd.quic import serve_quic as serve
from tests.quic_helpers import FakeNetwork, echo_handler, new_key, read_all

SERVER = ("10.0.0.1", 4433)


@asynccontextmanager
async def lossy_pair(
    *, seed: int, config: EndpointConfig | None = None, **faults: float
) -> AsyncIterator[tuple[FakeNetwork, QuicEndpoint, QuicEndpoint]]:
    async with trio.open_nursery() as network_nursery:
        net = FakeNetwork(network_nursery, seed=seed, **faults)
        async with (
            open_quic_endpoint(
                new_key(), config=config, transport=net.transport(*SERVER)
            ) as server,
            open_quic_endpoint(
                new_key(), config=config, transport=net.transport("10.0.0.2")
            ) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve, server, echo_handler)
            yield net, server, client
            nursery.cancel_scope.cancel()
        network_nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_streams_deliver_intact_under_loss_duplication_and_reordering(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    payload = os.urandom(300_000)
    with trio.fail_after(600):  # virtual seconds
        async with (
            lossy_pair(seed=seed, loss=0.10, duplicate=0.05, reorder=0.2) as (net, _, client),
            client.connect(SERVER) as conn,
            trio.open_nursery() as nursery,
        ):
            stream = await conn.open_stream()

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            echoed = await read_all(stream)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert net.dropped > 20  # the loss really happened


async def test_datagrams_under_loss_never_stall(autojump_clock: trio.testing.MockClock) -> None:
    received = 0
    with trio.fail_after(600):
        async with (
            lossy_pair(seed=7, loss=0.10, reorder=0.2) as (_, _, client),
            client.connect(SERVER) as conn,
        ):
            for i in range(200):
                conn.send_datagram(b"%d" % i)
                with trio.move_on_after(0.2):
                    await conn.receive_datagram()
                    received += 1
    # Each echo crosses the lossy link twice: about 81% come back, none hold others up.
    assert 120 < received < 200


async def test_keepalive_keeps_an_idle_connection_for_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = EndpointConfig(idle_timeout=10, keepalive_interval=3)
    with trio.fail_after(600):
        async with (
            lossy_pair(seed=3, config=config, loss=0.05) as (_, _, client),
            client.connect(SERVER) as conn,
        ):
            await trio.sleep(300)
            assert not conn.is_closed
            stream = await conn.open_stream()
            await stream.send_all(b"awake")
            assert await stream.receive_some() == b"awake"


async def test_idle_timeout_fires_on_time(autojump_clock: trio.testing.MockClock) -> None:
    config = EndpointConfig(idle_timeout=10, keepalive_interval=None)
    with trio.fail_after(600):
        async with lossy_pair(seed=4, config=config) as (_, _, client):
            conn = await client.connect(SERVER)
            start = trio.current_time()
            await conn.wait_closed()
            assert 10 <= trio.current_time() - start < 11
            assert conn.close_reason == "idle timeout"


async def test_peer_vanishing_is_detected_by_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = EndpointConfig(idle_timeout=5, keepalive_interval=1)
    with trio.fail_after(600):
        async with lossy_pair(seed=5, config=config) as (net, _, client):
            conn = await client.connect(SERVER)
            net.loss = 1.0  # the server's host drops off the network
            start = trio.current_time()
            await conn.wait_closed()
            assert trio.current_time() - start < 6
            assert not conn.closed_by_peer


async def test_handshake_survives_loss_or_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = EndpointConfig(handshake_timeout=8)
    with trio.fail_after(600):
        async with lossy_pair(seed=6, config=config, loss=0.3) as (_, _, client):
            conn = await client.connect(SERVER)  # retransmissions get it through
            await conn.aclose()
        async with lossy_pair(seed=6, config=config, loss=1.0) as (_, _, client):
            start = trio.current_time()
            with pytest.raises(HandshakeFailed, match="timed out"):
                await client.connect(SERVER)
            assert trio.current_time() - start == pytest.approx(8, abs=0.01)
