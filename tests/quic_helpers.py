"""Shared pieces for the QUIC tests: keys, echo handlers, a seeded fake network."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.quic import EndpointConfig, QuicConn, QuicEndpoint, open_quic_endpoint, serve_quic
from meshd.quic.endpoint import Handler
from meshd.quic.transport import Address


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


async def echo_handler(conn: QuicConn) -> None:
    """Echo every bidirectional stream until EOF, and every datagram."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echo_datagrams, conn)
        while True:
            stream = await conn.accept_stream()
            nursery.start_soon(_echo_stream, stream)


async def _echo_stream(stream: trio.abc.HalfCloseableStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def _echo_datagrams(conn: QuicConn) -> None:
    while True:
        conn.send_datagram(await conn.receive_datagram())


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


@asynccontextmanager
async def endpoints(
    handler: Handler | None = echo_handler,
    *,
    server_key: Ed25519PrivateKey | None = None,
    server_config: EndpointConfig | None = None,
    client_config: EndpointConfig | None = None,
    **server_settings: Any,
) -> AsyncIterator[tuple[QuicEndpoint, QuicEndpoint]]:
    """A loopback (server, client) pair; the server runs ``handler`` unless it is None."""
    async with (
        open_quic_endpoint(
            server_key or new_key(), config=server_config, **server_settings
        ) as server,
        open_quic_endpoint(new_key(), config=client_config) as client,
        trio.open_nursery() as nursery,
    ):
        if handler is not None:
            await nursery.start(serve_quic, server, handler)
        yield server, client
        nursery.cancel_scope.cancel()


class FakeNetwork:
    """An in-memory IP network with seeded loss, duplication and reordering.

    Runs on trio's clock, so with autojump_clock minutes of timers take no time.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        seed: int,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        latency: float = 0.005,
    ) -> None:
        self._nursery = nursery
        self._random = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.latency = latency
        self._hosts: dict[Address, FakeTransport] = {}
        self.delivered = 0
        self.dropped = 0

    def transport(self, host: str, port: int = 4433) -> FakeTransport:
        transport = FakeTransport(self, (host, port))
        self._hosts[(host, port)] = transport
        return transport

    def route(self, data: bytes, source: Address, destination: Address) -> None:
        if self._random.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if self._random.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.latency
            if self._random.random() < self.reorder:
                delay += self._random.uniform(0, 4 * self.latency)
            self._nursery.start_soon(self._deliver, delay, data, source, destination)

    async def _deliver(self, delay: float, data: bytes, source: Address, dest: Address) -> None:
        await trio.sleep(delay)
        host = self._hosts.get(dest)
        if host is not None and not host.closed:
            self.delivered += 1
            host.inbox.send_nowait((data, source))


class FakeTransport:
    """One host on a FakeNetwork; satisfies meshd.quic.DatagramTransport."""

    def __init__(self, network: FakeNetwork, address: tuple[str, int]) -> None:
        self._network = network
        self._address = address
        self.inbox, self._outbox = trio.open_memory_channel[tuple[bytes, Address]](math.inf)
        self.closed = False

    @property
    def local_address(self) -> tuple[str, int]:
        return self._address

    def send(self, data: bytes, address: Address) -> None:
        self._network.route(data, self._address, tuple(address))

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        batch = [await self._outbox.receive()]
        while True:
            try:
                batch.append(self._outbox.receive_nowait())
            except trio.WouldBlock:
                return batch

    def close(self) -> None:
        self.closed = True
