"""The datagram transport under an endpoint: a UDP socket, or a test double.

Sending is synchronous on purpose: a non-blocking ``sendto`` on UDP either
succeeds at once or the datagram is dropped (QUIC recovers from loss), so the
QUIC driver can flush right after each receive, timer or write without a task
switch.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

import trio

from meshd.addresses import format_address
from meshd.errors import BindError

Address = tuple[Any, ...]

_BATCH = 64
_SOCKET_BUFFER = 4 * 1024 * 1024


class DatagramTransport(Protocol):
    """What the endpoint needs from the network."""

    @property
    def local_address(self) -> tuple[str, int]: ...

    def send(self, data: bytes, address: Address) -> None:
        """Send one datagram without blocking; dropping it is allowed."""

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram and return all that are ready."""

    def close(self) -> None: ...


async def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A UDP socket of the family ``host`` resolves to, bound to ``host:port``.

    With ``reuse_port`` several sockets (in several processes) can bind the same port,
    and the kernel spreads the peers across them (SO_REUSEPORT, Linux).
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise BindError(format_address((host, port)), exc) from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(format_address((host, port)), exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


class UdpTransport:
    """A non-blocking UDP socket, read in batches to coalesce the replies."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.send_errors = 0

    @classmethod
    async def bind(cls, host: str, port: int) -> UdpTransport:
        """Bind a socket of the family ``host`` resolves to."""
        return cls(await bind_udp(host, port))

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def send(self, data: bytes, address: Address) -> None:
        try:
            self._sock.sendto(data, address)
        except OSError:
            self.send_errors += 1

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        await trio.lowlevel.checkpoint()
        while True:
            batch: list[tuple[bytes, Address]] = []
            while len(batch) < _BATCH:
                try:
                    batch.append(self._sock.recvfrom(65536))
                except BlockingIOError:
                    break
                except OSError:
                    continue  # an ICMP error reported on the socket; not a datagram
            if batch:
                return batch
            await trio.lowlevel.wait_readable(self._sock.fileno())

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sock.fileno())
        self._sock.close()
