"""Stand-ins for a node's address, for the cases about a tracker's probes (§7.3).

A tracker probes a suspect by opening a QUIC handshake to its address, pinned to its node
id. The suite puts one of these at the address it gives a node in JOIN and watches what
arrives: `answering` completes handshakes with a key (the node's own, or another one),
`silent` reads every packet and answers none (a node that is gone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.quic import QuicEndpoint, open_quic_endpoint

POLL = 0.05


class StandIn(ABC):
    """What reached a stand-in's `address`."""

    def __init__(self, address: str) -> None:
        self.address = address

    @property
    @abstractmethod
    def packets(self) -> int:
        """UDP packets received so far."""

    @property
    def connected(self) -> bool:
        """Whether a QUIC connection to it is open now (a probe under way)."""
        return False

    async def wait_until(self, condition: Callable[[], bool], *, within: float) -> bool:
        """Wait until `condition()` holds; False if it does not within `within` s."""
        with trio.move_on_after(max(0.0, within)):
            # Polled: the endpoint's counters signal nothing when they change.
            while not condition():  # noqa: ASYNC110
                await trio.sleep(POLL)
            return True
        return False

    async def probe_over(self, since: int, within: float) -> bool:
        """Wait until packets came after the first `since` and no connection is open
        (a probe has come and gone); False if that does not happen within `within` s."""
        return await self.wait_until(
            lambda: self.packets > since and not self.connected, within=within
        )


class _Answering(StandIn):
    def __init__(self, endpoint: QuicEndpoint) -> None:
        super().__init__(format_address(endpoint.address))
        self._endpoint = endpoint

    @property
    def packets(self) -> int:
        return self._endpoint.stats.datagrams_received

    @property
    def connected(self) -> bool:
        return self._endpoint.connection_count > 0


@asynccontextmanager
async def answering(key: Ed25519PrivateKey, host: str) -> AsyncIterator[StandIn]:
    """A QUIC server on `host` (any port) that completes every handshake with `key`'s
    certificate, while the block runs. It accepts no stream: a probe needs none."""
    async with open_quic_endpoint(key, host, 0) as endpoint:
        yield _Answering(endpoint)


class _Silent(StandIn):
    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.received = 0

    @property
    def packets(self) -> int:
        return self.received


@asynccontextmanager
async def silent(host: str) -> AsyncIterator[StandIn]:
    """A UDP port on `host` that swallows what arrives, while the block runs."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind((host, 0))
        hole = _Silent(format_address(sock.getsockname()[:2]))

        async def swallow() -> None:
            while True:
                await sock.recv(65536)
                hole.received += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(swallow)
            yield hole
            nursery.cancel_scope.cancel()
