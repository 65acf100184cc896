"""The suite's side of `--child`: a tracker and parents it controls, and the node under
test as a process.

Every case gets a `Scene`: a fresh stream key, a tracker on 127.0.0.1 port 0, parents
made on demand (each a QUIC server with a key of the suite's), and the node started from
the user's command with those placeholders filled in. The tracker answers every JOIN
and REJOIN with the assignment the case set; the parents do nothing by themselves: the
case writes every byte they send (signed right or wrong), and reads what the node sends.
At the end of the scene the node's process group is killed and every socket closed.
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.conformance.suite import Mismatch
from meshd.conformance.wire import (
    Event,
    Link,
    Received,
    describe,
    describe_event,
    framed,
    packb,
    signed,
)
from meshd.quic import ConnectionLost, QuicConn, QuicEndpoint, StreamReset, open_quic_endpoint
from protocol import (
    Ack,
    Assigned,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    Message,
    MessageReader,
    Moved,
    Peer,
    ProtocolError,
    Refresh,
    Rejoin,
    Subscribe,
    frame,
    key_id,
    key_to_text,
)

# A mono OpusHead (RFC 7845 §5.1) and one 20 ms CELT packet (TOC 0xf8): enough for a
# node to write a valid Ogg file.
HEAD = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48_000, 0, 0)
PACKET = b"\xf8\xff\xfe"
SAMPLES_PER_CHUNK = 960
PLACEHOLDERS = ("tracker", "tracker_id", "stream", "output")
_KILL_WAIT = 5.0  # seconds to reap a killed node


class Media:
    """What the origin signs: STREAM_INFO and chunks of one 20 ms packet each, signed by
    the stream key, or (`forged`) by another key, so the signature does not verify."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.stream = key_id(key)
        self._forger = Ed25519PrivateKey.generate()

    def info(self, *, forged: bool = False) -> bytes:
        return signed([0x02, "opus", HEAD], self._signer(forged), self.stream)

    def chunk(self, seq: int, *, end: bool = False, forged: bool = False) -> bytes:
        items = [0x03, seq, (seq + 1) * SAMPLES_PER_CHUNK, 1 if end else 0, [PACKET]]
        return signed(items, self._signer(forged), self.stream)

    def _signer(self, forged: bool) -> Ed25519PrivateKey:
        return self._forger if forged else self.key


def heartbeat(latest_seq: int | None, stalled_ms: int = 0) -> bytes:
    return framed(packb([0x04, latest_seq, stalled_ms]))


def path(nodes: Sequence[bytes]) -> bytes:
    return framed(packb([0x09, list(nodes)]))


def goodbye(code: ErrorCode, reason: str = "") -> bytes:
    return framed(packb([0x08, int(code), reason]))


# -- the tracker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A tracker request from the node, and the connection it came on."""

    message: Message
    at: float
    conn: QuicConn


class FakeTracker:
    """Answers JOIN and REJOIN with `assignment`, REFRESH with ACK, LEAVE with MOVED([]);
    `answers` holds one-off answers (encoded) used first, in order."""

    def __init__(self, endpoint: QuicEndpoint) -> None:
        self.endpoint = endpoint
        self.id = b""
        self.assignment: Assigned | None = None
        self.answers: list[bytes] = []
        self.requests: list[Request] = []
        self._send, self._receive = trio.open_memory_channel[Request](100)

    def assign(
        self, parent: Peer, backups: Sequence[Peer] = (), live_granule: int | None = None
    ) -> None:
        self.assignment = Assigned(parent, tuple(backups), 1, 180, live_granule)

    async def request(self, within: float) -> Request | None:
        """The next request from the node, or None if none came within `within` s."""
        with trio.move_on_after(max(0.0, within)):
            return await self._receive.receive()
        return None

    async def handle(self, conn: QuicConn) -> None:
        try:
            stream = await conn.accept_stream()
            reader = MessageReader()
            while data := await stream.receive_some(65536):
                reader.receive_data(data)
                while (message := reader.next_message()) is not None:
                    request = Request(message, trio.current_time(), conn)
                    self.requests.append(request)
                    self._send.send_nowait(request)
                    await stream.send_all(self._answer(message))
        except (ProtocolError, ConnectionLost, StreamReset, trio.WouldBlock):
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _answer(self, message: Message) -> bytes:
        if self.answers:
            return framed(self.answers.pop(0))
        if isinstance(message, Join | Rejoin) and self.assignment is not None:
            return frame(self.assignment)
        if isinstance(message, Refresh):
            return frame(Ack(180))
        if isinstance(message, Leave):
            return frame(Moved(()))
        return frame(Goodbye(ErrorCode.UNEXPECTED_MESSAGE, "not a node's request"))


# -- parents -----------------------------------------------------------------------------


class NodeLink:
    """The node's connection to one of the suite's parents, and its first stream."""

    def __init__(self, link: Link, media: Media, parent: FakeParent) -> None:
        self.link = link
        self.media = media
        self.parent = parent
        self.subscribe: Subscribe | None = None
        self.arrived_at = trio.current_time()

    async def read_subscribe(self, within: float) -> Subscribe:
        event = await self.link.next_message(within)
        if not (isinstance(event, Received) and isinstance(event.message, Subscribe)):
            got = "nothing" if event is None else describe_event(event)
            raise Mismatch("a parent's address in ASSIGNED", "SUBSCRIBE", got)
        self.subscribe = event.message
        return event.message

    async def send(self, data: bytes) -> None:
        await self.link.send(data)

    def send_datagram(self, data: bytes) -> None:
        self.link.send_datagram(data)

    async def accept(self, nodes: Sequence[bytes] | None = None, *, forged: bool = False) -> None:
        """STREAM_INFO, then PATH (this parent's own, unless `nodes` is given), in one
        write: a node that refuses the STREAM_INFO may close before a second one."""
        info = framed(self.media.info(forged=forged))
        await self.send(info + path(self.parent.path if nodes is None else nodes))

    async def chunks(self, seqs: Sequence[int], *, datagram: bool = False) -> None:
        for seq in seqs:
            data = self.media.chunk(seq)
            if datagram:
                self.send_datagram(data)
            else:
                await self.send(framed(data))

    async def live(self, first_seq: int) -> None:
        """A new chunk (datagram) every 200 ms from `first_seq` until cancelled: a parent
        whose stream advances, so the node has no stall to act on."""
        for seq in itertools.count(first_seq):
            self.send_datagram(self.media.chunk(seq))
            await trio.sleep(0.2)

    async def heartbeats(self, latest_seq: int | None, stalled_ms: int = 0) -> None:
        """A HEARTBEAT every 200 ms until cancelled (stalled_ms grows, if not 0)."""
        started = trio.current_time()
        while True:
            grown = int((trio.current_time() - started) * 1000)
            await self.send(heartbeat(latest_seq, stalled_ms + grown if stalled_ms else 0))
            await trio.sleep(0.2)

    async def next_event(self, within: float) -> Event | None:
        return await self.link.next_message(within)

    async def close(self, code: ErrorCode, reason: str = "") -> None:
        await self.link.conn.aclose(int(code), reason)

    async def leave(self, code: ErrorCode, within: float) -> None:
        """GOODBYE(code), then the close with that code once the node closed or `within`
        s passed: closing at once would drop stream bytes still in flight before it."""
        await self.send(goodbye(code, "the suite's parent leaves"))
        with trio.move_on_after(within):
            await self.link.conn.wait_closed()
        await self.close(code)


class FakeParent:
    """A QUIC server that the tracker names as `node` (its certificate key's id, unless
    it is an impostor)."""

    def __init__(self, endpoint: QuicEndpoint, node: bytes, media: Media) -> None:
        self.endpoint = endpoint
        self.node = node
        self.media = media
        self.path: tuple[bytes, ...] = (
            (media.stream,) if node == media.stream else (media.stream, node)
        )
        self.links: list[NodeLink] = []
        self._send, self._receive = trio.open_memory_channel[NodeLink](100)

    @property
    def peer(self) -> Peer:
        return Peer(self.node, format_address(self.endpoint.address))

    async def connected(self, within: float) -> NodeLink | None:
        """The next connection the node opened (with its first stream), if any."""
        with trio.move_on_after(max(0.0, within)):
            return await self._receive.receive()
        return None

    async def subscribed(self, within: float, *, after: float = 0.0) -> NodeLink:
        """The next connection that arrived `after` (a trio time), whose first message
        must be SUBSCRIBE. (One that arrived before is left out: a node may try a backup
        while its first parent is still answering, and drop that link once it is.)"""
        deadline = trio.current_time() + within
        link = await self.connected(within)
        while link is not None and link.arrived_at < after:
            link = await self.connected(deadline - trio.current_time())
        if link is None:
            raise Mismatch(
                f"ASSIGNED naming the parent at {self.peer.address}",
                "a connection and SUBSCRIBE",
                f"no connection within {within:g} s",
            )
        await link.read_subscribe(within)
        return link

    async def handle(self, conn: QuicConn) -> None:
        try:
            stream = await conn.accept_stream()
        except (ConnectionLost, trio.BrokenResourceError):
            return
        # The link's pumps end once the connection is closed (or the scene ends).
        async with trio.open_nursery() as nursery:
            link = NodeLink(Link(conn, stream, nursery), self.media, self)
            self.links.append(link)
            self._send.send_nowait(link)


# -- the node ----------------------------------------------------------------------------


def node_command(template: Sequence[str], values: dict[str, str]) -> list[str]:
    """The argv of one run: `template` with {tracker}, {tracker_id}, {stream} and
    {output} filled in (KeyError names an unknown placeholder)."""
    return [arg.format_map(values) for arg in template]


class NodeProcess:
    """The implementation's node, in a process group of its own (so nothing it starts
    outlives the case)."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, argv: list[str], log: Path) -> NodeProcess:
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        return cls(process, log)

    async def exit_status(self, within: float) -> int | None:
        with trio.move_on_after(max(0.0, within)):
            return await self.process.wait()
        return None

    def tail(self, lines: int = 6) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return " | ".join(line.strip() for line in text[-lines:])

    async def kill(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(_KILL_WAIT):
            await self.process.wait()


# -- one case's world ---------------------------------------------------------------------


@dataclass
class Scene:
    command: Sequence[str]
    workdir: Path
    name: str
    media: Media
    tracker: FakeTracker
    exits: AsyncExitStack
    nursery: trio.Nursery
    node: NodeProcess | None = None
    join: Join | None = None
    parents: list[FakeParent] = field(default_factory=list)

    @property
    def stream(self) -> bytes:
        return self.media.stream

    @property
    def node_id(self) -> bytes:
        assert self.join is not None, "the node has not joined yet"
        return self.join.node

    async def parent(self, *, impostor: bool = False, origin: bool = False) -> FakeParent:
        """A new parent: a relay with a key of its own (or the origin, whose key is the
        stream key); an impostor's certificate carries another key than the one the
        tracker names."""
        key = self.media.key if origin else Ed25519PrivateKey.generate()
        endpoint = await self.exits.enter_async_context(
            open_quic_endpoint(key, host="127.0.0.1", port=0)
        )
        node = key_id(Ed25519PrivateKey.generate()) if impostor else key_id(key)
        parent = FakeParent(endpoint, node, self.media)
        self.nursery.start_soon(endpoint.serve, parent.handle)
        self.parents.append(parent)
        return parent

    async def start(self) -> NodeProcess:
        """Run the node's command."""
        values = {
            "tracker": format_address(self.tracker.endpoint.address),
            "tracker_id": key_to_text(self.tracker.id),
            "stream": key_to_text(self.stream),
            "output": str(self.workdir / f"{self.name}.ogg"),
        }
        argv = node_command(self.command, values)
        try:
            self.node = await NodeProcess.start(argv, self.workdir / f"{self.name}.log")
        except OSError as exc:
            raise Mismatch(" ".join(argv), "a running node", f"it did not start: {exc}") from None
        return self.node

    async def joined(self, parent: FakeParent, backups: Sequence[FakeParent] = (), *,
                     within: float, live_granule: int | None = None) -> Request:  # fmt: skip
        """Assign `parent` (and `backups`, saying the origin was at `live_granule`), start
        the node, and wait for its first request, which must be a JOIN."""
        self.tracker.assign(parent.peer, [b.peer for b in backups], live_granule)
        await self.start()
        request = await self.request(within, "the node started")
        if not isinstance(request.message, Join):
            raise Mismatch("the node started", "JOIN", describe_request(request))
        self.join = request.message
        return request

    async def request(self, within: float, sent: str) -> Request:
        request = await self.tracker.request(within)
        if request is None:
            raise Mismatch(sent, "a request at the tracker", f"nothing; {self.log_tail()}")
        return request

    def background(self, work: Callable[[], Awaitable[None]]) -> trio.CancelScope:
        """Run `work` (a parent's heartbeats, say) until the scene ends or the returned
        scope is cancelled; the link it uses closing ends it quietly."""
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    await work()
                except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        self.nursery.start_soon(run)
        return scope

    def log_tail(self) -> str:
        if self.node is None:
            return "the node was not started"
        return f"node log: {self.node.tail() or '(empty)'}"


def describe_request(request: Request) -> str:
    return describe(request.message)


@asynccontextmanager
async def open_scene(command: Sequence[str], workdir: Path, name: str) -> AsyncIterator[Scene]:
    """A case's tracker, stream and (once started) node; everything ends with it."""
    tracker_key = Ed25519PrivateKey.generate()
    # The parents' endpoints join `exits` as the case makes them: the nursery their
    # servers run in is entered first, so it is left last.
    async with AsyncExitStack() as exits:
        nursery = await exits.enter_async_context(trio.open_nursery())
        endpoint = await exits.enter_async_context(
            open_quic_endpoint(tracker_key, host="127.0.0.1", port=0)
        )
        tracker = FakeTracker(endpoint)
        tracker.id = key_id(tracker_key)
        nursery.start_soon(endpoint.serve, tracker.handle)
        scene = Scene(command, workdir, name, Media(Ed25519PrivateKey.generate()), tracker,
                      exits, nursery)  # fmt: skip
        try:
            yield scene
        finally:
            if scene.node is not None:
                await scene.node.kill()
            nursery.cancel_scope.cancel()
