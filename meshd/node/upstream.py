"""One link to one parent: connect (pinning its key), subscribe, receive, repair, close.

`UpstreamLink.attach` returns once the parent has accepted (STREAM_INFO arrived), or
raises `AttachFailed` so the caller can try the next candidate. `serve` then never
raises; it records how the link ended and sets `changed`, which the relay also sees
when the parent redirects us.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from meshd.addresses import parse_address
from meshd.node.config import NodeConfig
from meshd.quic import QuicConn, QuicEndpoint, QuicStream
from protocol import ChildLink, ErrorCode, LinkState, Peer, ProtocolError, short_id
from protocol.events import (
    ChunkReceived,
    HeartbeatReceived,
    InfoReceived,
    LinkClosed,
    ParentSilent,
    Redirected,
    RepairUnavailable,
)
from protocol.media import VerifiedChunk
from protocol.messages import StreamInfo

logger = logging.getLogger(__name__)

STARVED = 0.1  # a timer this late means our event loop, not the parent, was stuck


class AttachFailed(Exception):
    """The parent could not be reached or did not accept us."""

    def __init__(self, peer: Peer, reason: str, code: int = ErrorCode.NO_ERROR) -> None:
        super().__init__(f"parent {short_id(peer.node)} at {peer.address}: {reason}")
        self.code = code


class ChunkConsumer(Protocol):
    """What a link hands its traffic to (the relay)."""

    def on_info(self, info: StreamInfo) -> None: ...
    def on_chunk(self, item: VerifiedChunk) -> None: ...
    def on_latest(self, seq: int) -> None: ...
    def on_unavailable(self, seqs: tuple[int, ...]) -> None: ...
    def repair_timer(self, link: UpstreamLink) -> float | None: ...
    def due_repairs(self, link: UpstreamLink) -> list[int]: ...


class UpstreamLink:
    def __init__(
        self,
        consumer: ChunkConsumer,
        peer: Peer,
        stream_id: bytes,
        node_id: bytes,
        config: NodeConfig,
    ) -> None:
        self.peer = peer
        self.changed = trio.Event()
        self.redirect: Redirected | None = None
        self.end_code: int | None = None
        self.end_reason = ""
        self.bad_peer = False
        self._consumer = consumer
        self._stream_id = stream_id
        self._node_id = node_id
        self._config = config
        self._link: ChildLink | None = None
        self._conn: QuicConn | None = None
        self._stream: QuicStream | None = None
        self._send_lock = trio.Lock()
        self._poke = trio.Event()
        self._cancel = trio.CancelScope()

    @property
    def ended(self) -> bool:
        return self.end_code is not None

    async def attach(self, endpoint: QuicEndpoint, from_seq: int | None) -> None:
        """Connect, subscribe, and wait for STREAM_INFO; AttachFailed if that fails."""
        try:
            with trio.fail_after(self._config.connect_timeout):
                await self._subscribe(endpoint, from_seq)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self._abort()
            raise AttachFailed(self.peer, str(exc) or type(exc).__name__) from None
        except ProtocolError as exc:
            await self._abort(exc.code, str(exc))
            raise AttachFailed(self.peer, str(exc), exc.code) from None
        except BaseException:  # refused, or cancelled because another parent was faster
            await self._abort()
            raise

    async def serve(self) -> None:
        """Receive until the link ends; records why in `end_code`/`end_reason`."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                assert self._stream and self._conn and self._link
                stream, datagrams = self._stream.receive_some, self._conn.receive_datagram
                scope = nursery.cancel_scope
                nursery.start_soon(self._receive_loop, stream, self._link.receive_data, scope, True)
                nursery.start_soon(
                    self._receive_loop, datagrams, self._link.receive_datagram, scope, False
                )
                nursery.start_soon(self._run_timers)
        self._finish(ErrorCode.GOING_AWAY, "link closed")
        await self._abort(self._link.goodbye_code if self._link else None)

    async def close(self, code: int, reason: str) -> None:
        """Say GOODBYE to this parent and drop the link (e.g. after moving elsewhere)."""
        if self._link is not None and self._link.state is not LinkState.CLOSED:
            self._link.goodbye(code, reason)
            with trio.move_on_after(0.5):
                await self._flush()
        self._finish(code, reason)
        self._cancel.cancel()
        await self._abort(code, reason)

    async def _subscribe(self, endpoint: QuicEndpoint, from_seq: int | None) -> None:
        try:
            address = parse_address(self.peer.address)
        except ValueError as exc:
            raise AttachFailed(self.peer, str(exc)) from None
        self._conn = await endpoint.connect(address, expected_peer_key=self.peer.node)
        self._stream = await self._conn.open_stream()
        self._link = ChildLink(
            self._stream_id,
            self._node_id,
            from_seq,
            now=trio.current_time(),
            silence_timeout=self._config.silence_timeout,
        )
        await self._flush()
        while self._link.state is LinkState.SUBSCRIBING:
            data = await self._stream.receive_some(65536)
            self._link.receive_data(data, trio.current_time())
            if not data:
                break
            self._dispatch()
        if self._link.state is not LinkState.STREAMING:
            raise AttachFailed(self.peer, f"refused: {self.end_reason}", self.end_code or 0)

    async def _receive_loop(
        self,
        receive: Callable[[], Awaitable[bytes]],
        feed: Callable[[bytes, float], None],
        scope: trio.CancelScope,
        ends_on_empty: bool,
    ) -> None:
        """Feed what `receive` returns (stream bytes or datagrams) to the link until it ends.

        b"" is the end of the stream, but only an (invalid) empty datagram."""
        while not self.ended:
            try:
                data = await receive()
                feed(data, trio.current_time())
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._finish(ErrorCode.GOING_AWAY, f"connection lost: {exc}")
            except ProtocolError as exc:
                await self._protocol_error(exc)
            else:
                self._dispatch()
                if ends_on_empty and not data:
                    self._finish(ErrorCode.GOING_AWAY, "parent ended the stream")
        scope.cancel()

    async def _run_timers(self) -> None:
        """Silence detection and repair requests; sleeps until the next deadline or a poke."""
        assert self._link is not None
        while not self.ended:
            deadlines = [self._link.get_timer(), self._consumer.repair_timer(self)]
            deadline = min((d for d in deadlines if d is not None), default=math.inf)
            with trio.move_on_at(deadline):
                await self._poke.wait()
            if trio.current_time() - deadline > STARVED:
                # We woke far too late: our own process was starved of CPU, and what the
                # parent sent may still be unread. Read it before blaming the parent.
                await trio.sleep(STARVED)
            self._link.handle_timer(trio.current_time())
            self._link.request_repair(self._consumer.due_repairs(self))
            self._dispatch()
            # Re-arm only now: our own _dispatch pokes too, and must not wake us again.
            self._poke = trio.Event()
            await self._flush()

    async def _protocol_error(self, exc: ProtocolError) -> None:
        logger.warning("parent %s broke the protocol: %s", short_id(self.peer.node), exc)
        self.bad_peer = True
        assert self._link is not None
        self._link.goodbye(exc.code, str(exc))
        with trio.move_on_after(0.5):
            await self._flush()
        self._finish(exc.code, str(exc))

    def _dispatch(self) -> None:
        """Hand the link's events to the consumer; note redirects and the end."""
        assert self._link is not None
        while (event := self._link.next_event()) is not None:
            if isinstance(event, ChunkReceived):
                self._consumer.on_chunk(event.item)
            elif isinstance(event, InfoReceived):
                self._consumer.on_info(event.info)
            elif isinstance(event, HeartbeatReceived):
                if event.latest_seq is not None:
                    self._consumer.on_latest(event.latest_seq)
            elif isinstance(event, RepairUnavailable):
                self._consumer.on_unavailable(event.seqs)
            elif isinstance(event, Redirected):
                self.redirect = event
                self.changed.set()
            elif isinstance(event, ParentSilent):
                self._finish(ErrorCode.PARENT_TIMEOUT, "parent went silent")
            elif isinstance(event, LinkClosed):
                self._finish(event.code, event.reason)
        self._poke.set()

    def _finish(self, code: int, reason: str) -> None:
        if self.end_code is None:
            self.end_code = code
            self.end_reason = reason
        self.changed.set()
        self._poke.set()

    async def _flush(self) -> None:
        assert self._link is not None and self._stream is not None
        async with self._send_lock:
            data = self._link.data_to_send()
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._finish(ErrorCode.GOING_AWAY, f"connection lost: {exc}")

    async def _abort(self, code: int | None = None, reason: str = "") -> None:
        if self._conn is not None:
            with trio.CancelScope(shield=True):
                await self._conn.aclose(code or ErrorCode.NO_ERROR, reason[:100])
