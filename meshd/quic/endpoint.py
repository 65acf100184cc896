"""The QUIC endpoint: one datagram socket that is both client and server.

Datagrams are demultiplexed by destination connection id. Unknown ids create
server connections only for well-formed Initials of at least 1200 bytes, and
only within the pending-handshake and connection caps, and within the limits per
source network; under load (``retry_above``) the client's address is validated first,
statelessly, with a Retry.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported from _buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.networks import NetworkBuckets, network_of
from meshd.quic import admission
from meshd.quic._aioquic import MeshQuicConnection, release, set_ack_delay
from meshd.quic.config import EndpointConfig
from meshd.quic.connection import QuicConn
from meshd.quic.errors import HandshakeFailed
from meshd.quic.identity import RAW_KEY_SIZE, raw_public_key, self_signed_certificate
from meshd.quic.tickets import ClientTickets, ServerTickets
from meshd.quic.transport import Address, DatagramTransport, UdpTransport

logger = logging.getLogger(__name__)

Handler = Callable[[QuicConn], Awaitable[None]]


@dataclass
class EndpointStats:
    """Counters for what the endpoint refused or threw away, and why."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    unroutable_dropped: int = 0
    """Unparseable, unknown connection id, or an Initial below 1200 bytes."""
    bogus_initials: int = 0
    """Initials that parsed but that aioquic could not make sense of."""
    initials_over_pending_cap: int = 0
    initials_over_network_limits: int = 0
    """Dropped: their source network had its connections, pending handshakes or rate used
    up."""
    connections_refused: int = 0
    retries_sent: int = 0
    connection_errors: int = 0
    """Connections torn down because processing their packets raised."""


class QuicEndpoint:
    """A UDP socket serving and opening QUIC connections; see ``open_quic_endpoint``."""

    def __init__(
        self,
        transport: DatagramTransport,
        private_key: Ed25519PrivateKey,
        config: EndpointConfig,
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.stats = EndpointStats()
        self._transport = transport
        self._nursery = nursery
        certificate = self_signed_certificate(private_key)
        self.key = raw_public_key(private_key.public_key())
        """The raw Ed25519 key this endpoint's certificate carries: its node id."""
        self._server_config = config.quic_configuration(
            is_client=False, certificate=certificate, private_key=private_key
        )
        self._client_config = config.quic_configuration(
            is_client=True, certificate=certificate, private_key=private_key
        )
        self._cid_length = self._server_config.connection_id_length
        self._retry = admission.RetryGate()
        self._handshake_buckets = (
            NetworkBuckets(config.handshakes_per_network, config.handshake_burst)
            if config.handshakes_per_network > 0
            else None
        )
        self._server_tickets = ServerTickets(config.session_tickets)
        self._client_tickets = ClientTickets()
        self._by_cid: dict[bytes, QuicConn] = {}
        self._conns: set[QuicConn] = set()
        self._server_conns = 0
        self._networks: dict[QuicConn, str] = {}  # server connection -> source network
        self._conns_by_network: Counter[str] = Counter()
        self._pending: dict[QuicConn, str] = {}  # handshaking server connection -> network
        self._pending_by_network: Counter[str] = Counter()
        self._accept_queue: deque[QuicConn] = deque()
        self._accepted = trio.lowlevel.ParkingLot()
        self._closed = False
        self._receive_scope = trio.CancelScope()
        self.refuse_when: Callable[[], bool] | None = None
        """Asked for each new connection's first packet: True refuses it at once
        (CONNECTION_REFUSED), before any handshake work; a server's load shedding."""

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), useful after binding port 0."""
        return self._transport.local_address

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def pending_handshakes(self) -> int:
        return len(self._pending)

    def connect(
        self,
        address: tuple[str, int],
        expected_peer_key: bytes | None = None,
        *,
        early_data: bytes | None = None,
        replay_safe: bool = False,
    ) -> _Connecting:
        """Open a connection; await it, or use it as an async context manager.

        With ``expected_peer_key`` (32 raw Ed25519 bytes) the handshake fails
        with PeerKeyMismatch unless the server's certificate carries that key.
        A session ticket from an earlier connection to ``address`` resumes the TLS
        session (no certificate work on either side).

        ``early_data`` goes on the connection's first stream (``conn.first_stream``)
        without waiting for the handshake: with the client's Finished, or, if
        ``replay_safe`` and the ticket allows, in 0-RTT with the first packet.
        """
        if expected_peer_key is not None and len(expected_peer_key) != RAW_KEY_SIZE:
            raise ValueError(f"expected_peer_key must be {RAW_KEY_SIZE} raw bytes")
        return _Connecting(self, address, expected_peer_key, early_data, replay_safe)

    async def accept(self) -> QuicConn:
        """The next incoming connection whose handshake completed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the endpoint was closed")
            while self._accept_queue:
                conn = self._accept_queue.popleft()
                if not conn.is_closed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return conn
            await self._accepted.park()

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``handler(conn)`` for each incoming connection, closing it afterwards.

        A handler ending with trio.BrokenResourceError or ClosedResourceError
        (the peer went away, the endpoint closed) is normal and only logged;
        any other exception propagates, as bugs should. Returns once the
        endpoint is closed and every handler has finished.
        """
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn = await self.accept()
                except trio.ClosedResourceError:
                    return
                nursery.start_soon(_run_handler, handler, conn)

    async def aclose(self) -> None:
        """Close every connection (peers see code 0) and stop receiving."""
        self._shutdown()
        await trio.lowlevel.checkpoint()

    def _shutdown(self) -> None:
        # Background tasks are stopped one by one rather than by cancelling the
        # nursery: the nursery also encloses the body of open_quic_endpoint,
        # and cancelling it would swallow whatever that body was raising.
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns):
            conn._abandon(0, "endpoint closing")
        self._accepted.unpark_all()
        self._receive_scope.cancel()

    # ConnectionOwner

    def send_datagram(self, data: bytes, address: Address) -> None:
        self.stats.datagrams_sent += 1
        self._transport.send(data, address)

    def register_cid(self, cid: bytes, conn: QuicConn) -> None:
        self._by_cid[cid] = conn

    def unregister_cid(self, cid: bytes) -> None:
        self._by_cid.pop(cid, None)

    def connection_established(self, conn: QuicConn) -> None:
        if not conn.is_client:
            self._end_pending(conn)
            self._accept_queue.append(conn)
            self._accepted.unpark_all()

    def connection_finished(self, conn: QuicConn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        if not conn.is_client:
            self._server_conns -= 1
            self._end_pending(conn)
            _discount(self._conns_by_network, self._networks.pop(conn, None))
            if conn in self._accept_queue:
                self._accept_queue.remove(conn)

    # Internals

    def _end_pending(self, conn: QuicConn) -> None:
        _discount(self._pending_by_network, self._pending.pop(conn, None))

    async def _open(
        self,
        address: tuple[str, int],
        expected_peer_key: bytes | None,
        early_data: bytes | None,
        replay_safe: bool,
    ) -> QuicConn:
        if self._closed:
            raise trio.ClosedResourceError("the endpoint was closed")
        local_host = self.address[0]
        family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
        # aioquic drops packets from any address but the one we dialled, so
        # dial the numeric address recvfrom() will report.
        try:
            infos = await trio.socket.getaddrinfo(
                address[0], address[1], family=family, type=socket.SOCK_DGRAM
            )
        except OSError as exc:  # a peer-supplied address we cannot use is the peer's problem
            raise HandshakeFailed(
                None, f"cannot reach {address[0]}: {exc}", by_peer=False
            ) from None
        if self._closed:  # while we looked the address up
            raise trio.ClosedResourceError("the endpoint was closed")
        remote: Address = tuple(infos[0][4])
        resume = self._client_tickets.take(
            remote, expected_peer_key, early_data=replay_safe and early_data is not None
        )
        configuration = self._client_config
        if resume is not None:
            configuration = dataclasses.replace(configuration, session_ticket=resume[0])
        quic = MeshQuicConnection(
            configuration=configuration,
            max_ack_delay=self.config.max_ack_delay,
            session_ticket_handler=lambda ticket: self._client_tickets.put(
                remote, ticket, conn.peer_key
            ),
        )
        conn: QuicConn = QuicConn(
            self,
            quic,
            is_client=True,
            expected_peer_key=expected_peer_key,
            early_data=early_data,
            resumed_peer_key=None if resume is None else resume[1],
        )
        self._conns.add(conn)
        conn._register_cid(quic.host_cid)
        quic.connect(remote, now=trio.current_time())
        conn._send_early_data()
        conn._pump()
        self._nursery.start_soon(conn._run_timer)
        await conn._wait_established()
        return conn

    async def _receive_loop(self) -> None:
        with self._receive_scope:
            while True:
                batch = await self._transport.receive_batch()
                now = trio.current_time()
                touched: dict[QuicConn, None] = {}
                for data, address in batch:
                    self.stats.datagrams_received += 1
                    conn = self._route(data, address, now)
                    if conn is not None:
                        touched[conn] = None
                for conn in touched:
                    self._guarded(conn, conn._pump_received)

    def _guarded(self, conn: QuicConn, action: Callable[[], object]) -> bool:
        """Run ``action``; a failure tears down that one connection, not the endpoint."""
        try:
            action()
        except Exception:
            logger.exception("QUIC connection %r failed; closing it", conn)
            self.stats.connection_errors += 1
            conn._abandon(QuicErrorCode.INTERNAL_ERROR, "internal error")
            return False
        return True

    def _route(self, data: bytes, address: Address, now: float) -> QuicConn | None:
        """The known connection the datagram belongs to (fed, not yet pumped), if any."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._cid_length)
        except ValueError:
            self.stats.unroutable_dropped += 1
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            ok = self._guarded(conn, lambda: conn._receive(data, address, now))
            return conn if ok else None
        if header.version is None or header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            self.stats.unroutable_dropped += 1
            return None
        if header.version not in self._server_config.supported_versions:
            if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:
                supported = self._server_config.supported_versions
                self.send_datagram(admission.version_negotiation(header, supported), address)
            return None
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self.stats.unroutable_dropped += 1
            return None
        self._accept_initial(header, data, address, now)
        return None

    def _accept_initial(self, header: Any, data: bytes, address: Address, now: float) -> None:
        if self._closed:
            return
        if len(self._pending) >= self.config.max_pending_handshakes:
            self.stats.initials_over_pending_cap += 1
            return
        if self._server_conns >= self.config.max_connections or (
            self.refuse_when is not None and self.refuse_when()
        ):
            self.stats.connections_refused += 1
            self.send_datagram(admission.refusal(header), address)
            return
        original_dcid: bytes | None = header.destination_cid
        retry_scid: bytes | None = None
        if header.token:
            original_dcid = self._retry.validate(header, address, now)
            if original_dcid is None:
                reply = admission.initial_close(header, QuicErrorCode.INVALID_TOKEN)
                self.send_datagram(reply, address)
                return
            retry_scid = header.destination_cid
        elif self.config.retry_above is not None and len(self._pending) >= self.config.retry_above:
            self.stats.retries_sent += 1
            self.send_datagram(self._retry.challenge(header, address, now), address)
            return
        # Past here the address is proven, or the server is not under load: charging the
        # Initial to its source network cannot be a spoofer's way to lock a network out
        # for long (at most `retry_above` unproven handshakes are pending at once).
        network = network_of(address[0])
        buckets = self._handshake_buckets
        if (
            self._conns_by_network[network] >= self.config.max_connections_per_network
            or self._pending_by_network[network] >= self.config.max_pending_per_network
            or (buckets is not None and buckets.wait(address[0], now) > 0)
        ):
            self.stats.initials_over_network_limits += 1
            return
        tickets = self._server_tickets if self._server_tickets.capacity else None
        quic = MeshQuicConnection(
            configuration=self._server_config,
            max_ack_delay=self.config.max_ack_delay,
            request_client_certificate=self.config.request_client_certificate,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            session_ticket_fetcher=None if tickets is None else tickets.take,
            session_ticket_handler=None if tickets is None else tickets.add,
        )
        if self.config.reply_delay:
            set_ack_delay(quic, self.config.reply_delay)
        conn = QuicConn(self, quic, is_client=False)
        conn._receive(data, address, now)
        if conn._pump() == 0:
            # aioquic found nothing to answer (undecryptable): keep no state.
            self.stats.bogus_initials += 1
            release(quic)
            return
        self._conns.add(conn)
        self._server_conns += 1
        self._pending[conn] = network
        self._pending_by_network[network] += 1
        self._networks[conn] = network
        self._conns_by_network[network] += 1
        conn._register_cid(header.destination_cid)
        conn._register_cid(quic.host_cid)
        self._nursery.start_soon(conn._run_timer)


def _discount(counts: Counter[str], network: str | None) -> None:
    if network is not None:
        counts[network] -= 1
        if not counts[network]:
            del counts[network]


class _Connecting:
    """``await ep.connect(...)`` or ``async with ep.connect(...) as conn``."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        address: tuple[str, int],
        expected_peer_key: bytes | None,
        early_data: bytes | None,
        replay_safe: bool,
    ) -> None:
        self._endpoint = endpoint
        self._args = (address, expected_peer_key, early_data, replay_safe)
        self._conn: QuicConn | None = None

    def __await__(self) -> Generator[Any, None, QuicConn]:
        return self._endpoint._open(*self._args).__await__()

    async def __aenter__(self) -> QuicConn:
        self._conn = await self._endpoint._open(*self._args)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        await self._conn.aclose()


async def _run_handler(handler: Handler, conn: QuicConn) -> None:
    async with conn:
        try:
            await handler(conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            logger.debug("handler for %r ended: %r", conn, group.exceptions)


async def serve_quic(
    endpoint: QuicEndpoint,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``endpoint.serve`` as a function, for ``nursery.start(serve_quic, ep, handler)``."""
    await endpoint.serve(handler, task_status=task_status)


@asynccontextmanager
async def open_quic_endpoint(
    private_key: Ed25519PrivateKey,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    alpn: str | None = None,
    max_connections: int | None = None,
    max_pending_handshakes: int | None = None,
    idle_timeout: float | None = None,
    keepalive_interval: float | None = None,
    retry_above: int | None = None,
    config: EndpointConfig | None = None,
    transport: DatagramTransport | None = None,
) -> AsyncIterator[QuicEndpoint]:
    """Bind ``host:port`` (port 0 picks one) and run an endpoint until the block exits.

    Keyword settings left as None keep ``config``'s value (EndpointConfig
    defaults if no config). ``transport`` replaces the UDP socket, for tests.
    """
    overrides: dict[str, Any] = {
        "alpn": alpn,
        "max_connections": max_connections,
        "max_pending_handshakes": max_pending_handshakes,
        "idle_timeout": idle_timeout,
        "keepalive_interval": keepalive_interval,
        "retry_above": retry_above,
    }
    settings = dataclasses.replace(
        config or EndpointConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    if transport is None:
        transport = await UdpTransport.bind(host, port)
    try:
        async with trio.open_nursery() as nursery:
            endpoint = QuicEndpoint(transport, private_key, settings, nursery)
            nursery.start_soon(endpoint._receive_loop)
            try:
                yield endpoint
            finally:
                endpoint._shutdown()
    finally:
        transport.close()
