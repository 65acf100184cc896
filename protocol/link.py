"""The parent <-> child link: one bidirectional QUIC stream plus QUIC datagrams.

`ChildLink` and `ParentLink` are sans-I/O: feed them stream bytes (`receive_data`) and
datagrams (`receive_datagram`), take `LinkEvent`s from `next_event`, send what
`data_to_send` / `datagrams_to_send` return, and drive `get_timer` / `handle_timer(now)`.
The allowed messages per state are the tables in docs/spec.md §6, mirrored below.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from enum import Enum

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.events import (
    ChunkReceived,
    HeartbeatReceived,
    InfoReceived,
    LinkClosed,
    LinkEvent,
    ParentSilent,
    PathReceived,
    Redirected,
    RepairRequested,
    RepairUnavailable,
    SubscribeRequested,
)
from protocol.framing import MessageReader, frame, frame_bytes
from protocol.limits import MAX_PATH, MAX_STALLED_MS, REPAIR_BURST_BYTES
from protocol.media import StreamVerifier, VerifiedChunk
from protocol.messages import (
    Admit,
    Chunk,
    Goodbye,
    Heartbeat,
    Message,
    Missing,
    PathUpdate,
    Peer,
    Redirect,
    Repair,
    StreamInfo,
    Subscribe,
)


class LinkState(Enum):
    SUBSCRIBING = "subscribing"  # child sent / parent awaits SUBSCRIBE
    ACCEPTED = "accepted"  # child: STREAM_INFO arrived, PATH expected next
    STREAMING = "streaming"
    CLOSED = "closed"


# Messages each side may receive in each state, and the state that follows.
CHILD_RECEIVES: dict[LinkState, dict[type[Message], LinkState]] = {
    LinkState.SUBSCRIBING: {StreamInfo: LinkState.ACCEPTED, Goodbye: LinkState.CLOSED},
    LinkState.ACCEPTED: {PathUpdate: LinkState.STREAMING, Goodbye: LinkState.CLOSED},
    LinkState.STREAMING: {
        Chunk: LinkState.STREAMING,
        Heartbeat: LinkState.STREAMING,
        Missing: LinkState.STREAMING,
        Redirect: LinkState.STREAMING,
        PathUpdate: LinkState.STREAMING,
        Goodbye: LinkState.CLOSED,
    },
    LinkState.CLOSED: {},
}
PARENT_RECEIVES: dict[LinkState, dict[type[Message], LinkState]] = {
    LinkState.SUBSCRIBING: {
        Admit: LinkState.SUBSCRIBING,
        Subscribe: LinkState.SUBSCRIBING,
        Goodbye: LinkState.CLOSED,
    },
    LinkState.ACCEPTED: {},  # the parent accepts with STREAM_INFO and PATH at once
    LinkState.STREAMING: {Repair: LinkState.STREAMING, Goodbye: LinkState.CLOSED},
    LinkState.CLOSED: {},
}


class _Link:
    """What both ends share: framing, the event queue, the state table, GOODBYE."""

    _table: dict[LinkState, dict[type[Message], LinkState]]

    def __init__(self) -> None:
        self.state = LinkState.SUBSCRIBING
        self._reader = MessageReader()
        self._outgoing = bytearray()
        self._events: deque[LinkEvent] = deque()
        self.goodbye_code: int | None = None
        """The code of the GOODBYE we sent, if any: the connection closes with it too."""

    def receive_data(self, data: bytes, now: float) -> None:
        """Stream bytes from the peer (b"" when it ended the stream). Raises ProtocolError."""
        self._reader.receive_data(data)
        while self.state is not LinkState.CLOSED:
            msg = self._reader.next_message()
            if msg is None:
                break
            self._receive(msg, self._reader.last_raw, now)
        if self._reader.at_eof and self.state is not LinkState.CLOSED:
            self.state = LinkState.CLOSED
            self._events.append(LinkClosed(ErrorCode.GOING_AWAY, "stream ended without GOODBYE"))

    def _receive(self, msg: Message, raw: bytes, now: float) -> None:
        allowed = self._table[self.state]
        next_state = allowed.get(type(msg))
        if next_state is None:
            raise RemoteProtocolError(
                f"{type(msg).__name__} is not allowed while {self.state.value}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )
        self._handle(msg, raw, now)
        if self.state is not LinkState.CLOSED:  # the handler may have closed it (a refusal)
            self.state = next_state
        if isinstance(msg, Goodbye):
            self._events.append(LinkClosed(msg.code, msg.reason))

    def _handle(self, msg: Message, raw: bytes, now: float) -> None:
        raise NotImplementedError

    def next_event(self) -> LinkEvent | None:
        return self._events.popleft() if self._events else None

    @property
    def buffered(self) -> int:
        """Bytes queued for the stream and not yet taken by `data_to_send` (a slow peer)."""
        return len(self._outgoing)

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _send(self, msg: Message) -> None:
        if self.state is LinkState.CLOSED:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} on a closed link")
        self._outgoing += frame(msg)

    def goodbye(self, code: int, reason: str) -> None:
        """Queue our last message and close the link (no-op if already closed)."""
        if self.state is LinkState.CLOSED:
            return
        self._outgoing += frame(Goodbye(int(code), reason[:200]))
        self.goodbye_code = int(code)
        self.state = LinkState.CLOSED


class ChildLink(_Link):
    """The child's end: subscribes, verifies everything, refuses a path through itself,
    notices a silent parent."""

    _table = CHILD_RECEIVES

    def __init__(
        self,
        stream: bytes,
        node: bytes,
        from_seq: int | None,
        *,
        parent: bytes,
        now: float,
        silence_timeout: float = 1.0,
        verifier: StreamVerifier | None = None,
        token: bytes | None = None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._node = node
        self._parent = parent
        self._verifier = verifier or StreamVerifier(stream)
        self._silence_timeout = silence_timeout
        self._last_heard = now
        self._silence_reported = False
        self.announced: int | None = None
        """The highest sequence number this parent announced (chunk or HEARTBEAT)."""
        if token is not None:
            self._send(Admit(token))  # docs/spec.md §6.1: the parent may check it
        self._send(Subscribe(stream, from_seq, node))

    def _announce(self, seq: int | None) -> None:
        if seq is not None and (self.announced is None or seq > self.announced):
            self.announced = seq

    def receive_datagram(self, data: bytes, now: float) -> None:
        """A datagram from the parent: one CHUNK, only once streaming. Raises ProtocolError."""
        if self.state is not LinkState.STREAMING:
            return  # a datagram may overtake STREAM_INFO or trail GOODBYE; nothing is lost
        self._last_heard = now
        item = self._verifier.verify_datagram(data)
        self._announce(item.seq)
        self._events.append(ChunkReceived(item))

    def _handle(self, msg: Message, raw: bytes, now: float) -> None:
        self._last_heard = now
        if isinstance(msg, StreamInfo):
            self._verifier.verify_info(msg)
            self._events.append(InfoReceived(msg))
        elif isinstance(msg, Chunk):
            item = self._verifier.verify_chunk(msg, raw)
            self._announce(item.seq)
            self._events.append(ChunkReceived(item))
        elif isinstance(msg, PathUpdate):
            self._check_path(msg.nodes)
        elif isinstance(msg, Heartbeat):
            self._announce(msg.latest_seq)
            self._events.append(HeartbeatReceived(msg.latest_seq, msg.stalled_ms))
        elif isinstance(msg, Missing):
            self._events.append(RepairUnavailable(msg.seqs))
        elif isinstance(msg, Redirect):
            self._events.append(Redirected(msg.parent, msg.backups))

    def _check_path(self, nodes: tuple[bytes, ...]) -> None:
        """A path runs from the stream's origin to this parent, each node once. One that
        contains us is a cycle: no chunk can ever reach us through it, so we leave."""
        if nodes[0] != self._stream or nodes[-1] != self._parent:
            raise RemoteProtocolError(
                "a PATH must run from the origin to the parent", ErrorCode.BAD_PATH
            )
        if len(set(nodes)) != len(nodes):
            raise RemoteProtocolError("a PATH names a node twice", ErrorCode.BAD_PATH)
        if self._node in nodes:
            reason = "the parent's path contains this node: a cycle"
        elif len(nodes) >= MAX_PATH:
            reason = f"the parent is {len(nodes) - 1} hops deep: too deep to feed a child"
        else:
            self._events.append(PathReceived(nodes))
            return
        self.goodbye(ErrorCode.BAD_PATH, reason)
        self._events.append(LinkClosed(ErrorCode.BAD_PATH, reason))

    def request_repair(self, seqs: Iterable[int]) -> None:
        """Ask the parent for chunks again (at most 64 per REPAIR): only those it announced
        (asking for more is a protocol error; a parent we just moved to may lag behind
        the old one, and its HEARTBEATs tell when it has them)."""
        announced = self.announced
        if self.state is not LinkState.STREAMING or announced is None:
            return
        wanted = tuple(seq for seq in seqs if seq <= announced)
        if not wanted:
            return
        for start in range(0, len(wanted), 64):
            self._send(Repair(wanted[start : start + 64]))

    def get_timer(self) -> float | None:
        if self.state is LinkState.CLOSED or self._silence_reported:
            return None
        return self._last_heard + self._silence_timeout

    def handle_timer(self, now: float) -> None:
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            self._silence_reported = True
            self._events.append(ParentSilent())


class ParentLink(_Link):
    """The parent's end: accepts or refuses, streams chunks, repairs, heartbeats, redirects,
    keeps the child's PATH current, and lets a child go that it no longer hears from."""

    _table = PARENT_RECEIVES

    def __init__(
        self,
        stream: bytes,
        *,
        now: float,
        max_datagram: int = 0,
        heartbeat_interval: float = 0.25,
        child_timeout: float | None = None,
        subscribe_timeout: float | None = None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._max_datagram = max_datagram
        self._heartbeat_interval = heartbeat_interval
        self._child_timeout = child_timeout
        self._subscribe_by = None if subscribe_timeout is None else now + subscribe_timeout
        self._last_sent = now
        self._last_heartbeat = now
        self._datagrams: list[bytes] = []
        self.latest_seq: int | None = None
        self.child: bytes | None = None
        self.token: bytes | None = None
        """The admission token of the child's ADMIT, if it sent one."""
        self.path: tuple[bytes, ...] = ()
        self.child_heard_at = now
        """When we last heard from the child (the driver adds what the transport saw)."""
        self.stalled_since: float | None = None
        """Since when our own playback is stalled (reported in HEARTBEAT), if it is."""
        self._live_bytes = 0
        self._repair_bytes = 0

    def receive_data(self, data: bytes, now: float) -> None:
        self.child_heard(now)
        super().receive_data(data, now)

    def child_heard(self, at: float) -> None:
        """The child was heard from at `at` (any packet on its connection counts)."""
        self.child_heard_at = max(self.child_heard_at, at)

    def _handle(self, msg: Message, raw: bytes, now: float) -> None:
        if isinstance(msg, Admit):
            if self.child is not None or self.token is not None:
                raise RemoteProtocolError(
                    "ADMIT after SUBSCRIBE, or twice", ErrorCode.UNEXPECTED_MESSAGE
                )
            self.token = msg.token
        elif isinstance(msg, Subscribe):
            if self.child is not None:
                raise RemoteProtocolError("SUBSCRIBE sent twice", ErrorCode.UNEXPECTED_MESSAGE)
            self.child = msg.node
            if msg.stream != self._stream:
                self.goodbye(ErrorCode.UNKNOWN_STREAM, "this node does not carry that stream")
                self._events.append(LinkClosed(ErrorCode.UNKNOWN_STREAM, "wrong stream"))
                return
            self._events.append(SubscribeRequested(msg.from_seq, msg.node, self.token))
        elif isinstance(msg, Repair):
            if self.latest_seq is None or max(msg.seqs) > self.latest_seq:
                raise RemoteProtocolError(
                    "REPAIR for a chunk this parent never announced", ErrorCode.BAD_REPAIR
                )
            self._events.append(RepairRequested(msg.seqs))

    def accept(
        self,
        info: StreamInfo,
        path: tuple[bytes, ...],
        backlog: Iterable[VerifiedChunk],
        now: float,
    ) -> None:
        """Start streaming: the header, our path, then the backlog on the stream (reliable,
        in order)."""
        if self.state is not LinkState.SUBSCRIBING or self.child is None:
            raise LocalProtocolError("accept() needs a pending SUBSCRIBE")
        self._send(info)
        self._send(PathUpdate(path))
        self.path = path
        self.state = LinkState.STREAMING
        for item in backlog:
            self._send_on_stream(item)
        self._last_sent = now

    def _send_on_stream(self, item: VerifiedChunk) -> None:
        self._outgoing += frame_bytes(item.raw)
        self._live_bytes += len(item.raw)
        if self.latest_seq is None or item.seq > self.latest_seq:
            self.latest_seq = item.seq

    def send_chunk(self, item: VerifiedChunk, now: float) -> None:
        """A live chunk: a datagram when it fits (no head-of-line blocking), else the stream."""
        if self.state is not LinkState.STREAMING:
            return
        if len(item.raw) <= self._max_datagram:
            self._datagrams.append(item.raw)
            self._live_bytes += len(item.raw)
            if self.latest_seq is None or item.seq > self.latest_seq:
                self.latest_seq = item.seq
        else:
            self._send_on_stream(item)
        self._last_sent = now

    def answer_repair(
        self, found: Iterable[VerifiedChunk], missing: Iterable[int]
    ) -> list[VerifiedChunk]:
        """Resend what we hold on the stream, within the child's repair budget (the live
        bytes it got, plus a burst); say MISSING for the rest. Returns the chunks sent."""
        if self.state is not LinkState.STREAMING:
            return []
        lost = list(missing)
        sent = []
        for item in found:
            if self._repair_bytes + len(item.raw) > self._live_bytes + REPAIR_BURST_BYTES:
                lost.append(item.seq)
                continue
            self._repair_bytes += len(item.raw)
            self._outgoing += frame_bytes(item.raw)
            sent.append(item)
        lost.sort()
        for start in range(0, len(lost), 64):
            self._send(Missing(tuple(lost[start : start + 64])))
        return sent

    def redirect(self, parent: Peer, backups: tuple[Peer, ...]) -> None:
        """Graceful leave: tell the child where to go; keep streaming until it says GOODBYE."""
        if self.state is LinkState.STREAMING:
            self._send(Redirect(parent, backups))

    def send_path(self, path: tuple[bytes, ...]) -> None:
        """Our path changed (we moved): tell the child, so it can refuse a cycle."""
        if self.state is LinkState.STREAMING and path != self.path:
            self._send(PathUpdate(path))
            self.path = path

    def datagrams_to_send(self) -> list[bytes]:
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def get_timer(self) -> float | None:
        if self.state is LinkState.CLOSED:
            return None
        deadlines = []
        if self._subscribe_by is not None and self.child is None:
            deadlines.append(self._subscribe_by)
        if self._child_timeout is not None and self.child is not None:
            deadlines.append(self.child_heard_at + self._child_timeout)
        if self.state is LinkState.STREAMING:
            deadlines.append(self._heartbeat_due())
        return min(deadlines, default=None)

    def _heartbeat_due(self) -> float:
        """After a heartbeat interval of silence; while our own playback is stalled, every
        interval even if chunks flow, so the child knows the trouble is above us."""
        due = self._last_sent + self._heartbeat_interval
        if self.stalled_since is not None:
            due = min(due, self._last_heartbeat + self._heartbeat_interval)
        return due

    def handle_timer(self, now: float) -> None:
        if self.state is LinkState.CLOSED:
            return
        if self._subscribe_by is not None and self.child is None and now >= self._subscribe_by:
            reason = "no SUBSCRIBE in time"  # a slow or idle peer holds no connection long
            self.goodbye(ErrorCode.CHILD_TIMEOUT, reason)
            self._events.append(LinkClosed(ErrorCode.CHILD_TIMEOUT, reason))
            return
        timeout = self._child_timeout
        if timeout is not None and self.child is not None and now >= self.child_heard_at + timeout:
            reason = f"nothing heard from the child for {timeout:g} s"
            self.goodbye(ErrorCode.CHILD_TIMEOUT, reason)
            self._events.append(LinkClosed(ErrorCode.CHILD_TIMEOUT, reason))
            return
        if self.state is LinkState.STREAMING and now >= self._heartbeat_due():
            stalled = 0 if self.stalled_since is None else now - self.stalled_since
            stalled_ms = min(int(stalled * 1000), MAX_STALLED_MS)
            self._send(Heartbeat(self.latest_seq, stalled_ms))
            self._last_sent = self._last_heartbeat = now
