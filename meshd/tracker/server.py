"""The tracker over QUIC: `serve_tracker` answers node requests on one endpoint.

Every request arrives on a short-lived connection (no per-listener connection is kept).
The server caps the connections it works on at once and answers RETRY_AFTER beyond the
cap, so a join storm slows down (clients back off with jitter) instead of melting it.
"""

from __future__ import annotations

import logging
import time

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import parse_address
from meshd.logs import log_as
from meshd.quic import QuicConn, QuicEndpoint, open_quic_endpoint
from meshd.tracker.service import Tracker
from meshd.tracker.tree import PeerRef
from protocol import ErrorCode, Goodbye, ProtocolError, TrackerChannel, frame, key_id, short_id
from protocol.messages import TrackerRequest, TrackerResponse

logger = logging.getLogger("meshd.tracker")

EXPIRY_INTERVAL = 5.0
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0  # as long as a client waits for one attempt
MAX_REQUESTS_PER_CONNECTION = 16


class TrackerServer:
    """Moves bytes between QUIC connections and a `Tracker`."""

    def __init__(self, tracker: Tracker, endpoint: QuicEndpoint) -> None:
        self.tracker = tracker
        self.endpoint = endpoint
        self._active = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_loop)
            nursery.start_soon(self._probe_loop)
            await nursery.start(self.endpoint.serve, self._handle_connection)
            task_status.started()

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRY_INTERVAL)
            self.tracker.expire(trio.current_time())

    async def _probe_loop(self) -> None:
        """Check nodes reported dead by trying a handshake pinned to their key: a lying
        child cannot get a healthy relay evicted, and a real failure is confirmed fast."""
        while True:
            await trio.sleep(PROBE_INTERVAL)
            async with trio.open_nursery() as nursery:
                for stream_id, ref in self.tracker.suspects(trio.current_time()):
                    nursery.start_soon(self._probe, stream_id, ref)

    async def _probe(self, stream_id: bytes, ref: PeerRef) -> None:
        alive = False
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                address = parse_address(ref.address)
                async with self.endpoint.connect(address, expected_peer_key=ref.peer_id):
                    alive = True
            except (ValueError, OSError, trio.BrokenResourceError):
                alive = False
        self.tracker.probed(stream_id, ref.peer_id, alive, trio.current_time())

    async def _handle_connection(self, conn: QuicConn) -> None:
        self._active += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await self._exchange(conn)
        finally:
            self._active -= 1
        await conn.aclose(ErrorCode.NO_ERROR)

    async def _exchange(self, conn: QuicConn) -> None:
        stream = await conn.accept_stream()
        channel = TrackerChannel()
        overloaded = self._active > self.tracker.config.max_pending
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            data = await stream.receive_some(65536)
            try:
                channel.receive_data(data)
                while (request := channel.next_request()) is not None:
                    channel.respond(
                        self.tracker.shed(trio.current_time())
                        if overloaded
                        else self._answer(request)
                    )
            except ProtocolError as exc:
                logger.warning("bad request from %s: %s", conn.remote_address, exc)
                await stream.send_all(frame(Goodbye(exc.code, str(exc)[:200])))
                await conn.aclose(exc.code, str(exc)[:100])
                return
            reply = channel.data_to_send()
            if reply:
                await stream.send_all(reply)
            if not data:
                return

    def _answer(self, request: TrackerRequest) -> TrackerResponse:
        return self.tracker.handle(request, trio.current_time(), int(time.time() * 1000))


async def serve_tracker(
    tracker: Tracker,
    key: Ed25519PrivateKey,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `tracker` on a QUIC endpoint at host:port until cancelled.

    `task_status.started()` reports the bound (host, port), so a host can use port 0:

        tracker = Tracker(TrackerConfig(refresh_s=120))
        host, port = await nursery.start(serve_tracker, tracker, key, "0.0.0.0", 4433)
    """
    log_as("tracker", short_id(key_id(key)))
    async with open_quic_endpoint(key, host, port) as endpoint, trio.open_nursery() as nursery:
        await nursery.start(TrackerServer(tracker, endpoint).serve)
        task_status.started(endpoint.address)
