"""The origin: reads Ogg Opus, cuts it into signed chunks, paces them, feeds its children.

Whatever the audience, the origin only ever sends to its `capacity` children: everyone
else gets the stream from other listeners.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.errors import NodeError, UsageError
from meshd.logs import log_as
from meshd.node.config import NodeConfig
from meshd.node.fanout import Fanout, node_endpoint
from meshd.node.report import StatsReporter
from meshd.node.source import OriginCore
from meshd.node.stats import ChunkTrace
from meshd.node.timer import CoreTimer
from meshd.node.treewatch import LOOK_AGAIN_AFTER, Look, TreeWatch
from meshd.ogg import AudioError, OggOpusParser, OpusPacket
from meshd.quic import QuicEndpoint, open_quic_endpoint
from meshd.tracker_client import WARN_AFTER, TrackerRefused, ask_tracker, now_ms
from protocol import (
    Ack,
    ChildGone,
    ErrorCode,
    Goodbye,
    Leave,
    Register,
    TreeRequest,
    key_to_text,
    short_id,
    sign_message,
)
from protocol.backoff import Backoff
from protocol.media import OPUS_RATE
from protocol.messages import TrackerResponse

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = OPUS_RATE // 5  # 200 ms of audio per chunk
CHUNK_PACKET_BYTES = 1000  # packet bytes (with their bin headers) so a chunk fits a datagram
READ_SIZE = 16384


@dataclass(frozen=True)
class OriginSettings:
    tracker: tuple[str, int]
    input: str  # a path, or "-" for stdin
    capacity: int = 4
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise: str | None = None
    tracker_key: bytes | None = None
    pace: bool = True
    register_timeout: float = 10.0
    """Give up (NodeError) if the tracker has not accepted the stream by then: streaming
    to a tracker nobody can reach would reach nobody."""


class Origin:
    def __init__(
        self,
        key: Ed25519PrivateKey,
        settings: OriginSettings,
        config: NodeConfig | None = None,
        rng: random.Random | None = None,
        stats_file: Path | None = None,
        trace: ChunkTrace | None = None,
    ) -> None:
        self.key = key
        self.trace = trace
        self.settings = settings
        self.config = config or NodeConfig()
        self.rng = rng or random.Random()
        self.core = OriginCore(key, settings.capacity, self.config)
        self.stream_id = self.core.stream_id
        self.stats = self.core.stats
        self.reporter = StatsReporter(self.stats, self.config.stats_interval, stats_file)
        self.fanout = Fanout(self.core.children, self._pump)
        self.address = ""
        self.registered = trio.Event()
        self._endpoint: QuicEndpoint | None = None
        self._input_scope = trio.CancelScope()
        self._timer = CoreTimer(self.core.get_timer)
        self._nursery: trio.Nursery | None = None
        self._tell_child_gone = True
        """False once the tracker answered CHILD_GONE with UNKNOWN_MESSAGE (it is older)."""
        self._watch = TreeWatch(self.stream_id, settings.capacity)
        self._refused = trio.Event()
        """Set when we refused a SUBSCRIBE for lack of slots (see `_look_when_full`)."""
        self.core.children.on_full = self._full

    def stop(self) -> None:
        """End the stream now (SIGINT/SIGTERM): stop reading, send END, let children finish."""
        self._input_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the input, register the stream, stream the whole input, then wait for the
        children to get the end. Raises NodeError if the input is not Ogg Opus or the
        tracker does not accept the stream (then nothing is streamed)."""
        log_as("origin", short_id(self.stream_id))
        source = await _open_input(self.settings.input)
        try:
            parser = OggOpusParser()
            first = await self._read_head(source, parser)
            assert parser.head is not None
            await self._serve(parser.head.raw, self._packets(source, parser, first), task_status)
        finally:
            await source.aclose()
        self.reporter.report()
        if self.trace is not None:
            self.trace.close()

    async def _serve(
        self,
        head: bytes,
        packets: AsyncIterator[OpusPacket],
        task_status: trio.TaskStatus[None],
    ) -> None:
        host, port = self.settings.listen
        async with open_quic_endpoint(
            self.key, host, port, config=node_endpoint(self.settings.capacity)
        ) as endpoint:
            self._endpoint = endpoint
            self.address = self.settings.advertise or format_address(endpoint.address)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(endpoint.serve, self.fanout.handle_connection)
                nursery.start_soon(self._run_timer)
                nursery.start_soon(self.reporter.run)
                task_status.started()
                try:
                    with self._input_scope:
                        refresh_s = await self._register_first()
                        nursery.start_soon(self._keep_registered, refresh_s)
                        nursery.start_soon(self._look_when_full)
                        self.core.set_head(head, trio.current_time())
                        logger.info(
                            "streaming %s from %s", key_to_text(self.stream_id), self.address
                        )
                        await self._stream(packets)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.fanout.wait_until_empty(self.config.leave_grace)
                        await self._unregister()
                        nursery.cancel_scope.cancel()

    async def _stream(self, packets: AsyncIterator[OpusPacket]) -> None:
        """Group packets into chunks of <= 200 ms, sign, pace in real time, send; then END."""
        pending: list[OpusPacket] = []
        start: tuple[float, int] | None = None  # (clock, granule) at the first packet
        try:
            async for packet in packets:
                if start is None:
                    start = (trio.current_time(), packet.granule - packet.samples)
                if pending and not _fits(pending, packet):
                    await self._send(pending, start, end=False)
                    pending = []
                pending.append(packet)
        except AudioError as exc:
            raise NodeError(f"bad input: {exc}") from None
        finally:
            with trio.CancelScope(shield=True):
                await self._send(pending, start, end=True)

    async def _send(
        self, packets: list[OpusPacket], start: tuple[float, int] | None, *, end: bool
    ) -> None:
        granule = packets[-1].granule if packets else self.core.signer.last_granule
        if self.settings.pace and start is not None and not end:
            await trio.sleep_until(start[0] + (granule - start[1]) / OPUS_RATE)
        item = self.core.push([p.data for p in packets], granule, trio.current_time(), end=end)
        if self.trace is not None:
            self.trace.record(item.seq)
        self._pump()

    def _pump(self) -> None:
        """Send what the children core queued and move the timer's deadline."""
        self.fanout.flush()
        self._timer.rearm()
        for child in self.core.take_gone():
            if self._tell_child_gone:
                assert self._nursery is not None
                self._nursery.start_soon(self._child_gone, child)

    async def _child_gone(self, child: bytes) -> None:
        """CHILD_GONE for a child let go for silence (docs/spec.md §5.2; children are
        accepted only once the stream is registered): advice, so a refusal or no answer
        is only logged, and a tracker too old to know the message is not told again."""
        gone = ChildGone(self.stream_id, self.stream_id, child, now_ms())
        try:
            await self._ask(sign_message(gone, self.key), give_up_after=10.0)
        except TrackerRefused as exc:
            if exc.code == ErrorCode.UNKNOWN_MESSAGE:
                logger.info("the tracker does not know CHILD_GONE; not sending it any more")
                self._tell_child_gone = False
            else:
                logger.info("CHILD_GONE for %s not taken: %s", short_id(child), exc)
        except trio.TooSlowError as exc:
            logger.info("CHILD_GONE for %s not answered: %s", short_id(child), exc)

    async def _run_timer(self) -> None:
        while True:
            deadline = await self._timer.wait()
            if deadline is not None and trio.current_time() >= deadline:
                self.core.handle_timer(trio.current_time())
                self._pump()

    async def _read_head(
        self, source: trio.abc.ReceiveStream, parser: OggOpusParser
    ) -> list[OpusPacket]:
        """Read up to the Opus headers, so a bad input fails before anything is streamed;
        returns the audio packets that came with them."""
        name = "-" if self.settings.input == "-" else self.settings.input
        first: list[OpusPacket] = []
        read = 0
        try:
            while parser.tags is None:
                packet = parser.next_packet()
                if packet is not None:
                    first.append(packet)
                    continue
                data = await source.receive_some(READ_SIZE)
                read += len(data)
                parser.feed(data)
        except AudioError as exc:
            what = "it is empty" if read == 0 else f"not an Ogg Opus stream: {exc}"
            raise UsageError(f"--input {name}: {what}") from None
        return first

    async def _packets(
        self, source: trio.abc.ReceiveStream, parser: OggOpusParser, first: list[OpusPacket]
    ) -> AsyncIterator[OpusPacket]:
        for packet in first:
            yield packet
        while not parser.done:
            data = await source.receive_some(READ_SIZE)
            parser.feed(data)
            while (more := parser.next_packet()) is not None:
                yield more
            if not data:
                break

    async def _ask(
        self,
        request: Register | ChildGone | TreeRequest,
        give_up_after: float | None,
        warn_after: float | None = None,
    ) -> TrackerResponse:
        assert self._endpoint is not None
        return await ask_tracker(
            self._endpoint,
            self.settings.tracker,
            request,
            rng=self.rng,
            give_up_after=give_up_after,
            tracker_key=self.settings.tracker_key,
            warn_after=warn_after,
        )

    async def _register(self, give_up_after: float | None) -> Ack:
        signer = self.core.signer
        live = signer.last_granule if signer.next_seq else None  # newcomers' reference
        request = Register(self.stream_id, self.address, self.settings.capacity, now_ms(), live)
        answer = await self._ask(sign_message(request, self.key), give_up_after, WARN_AFTER)
        assert isinstance(answer, Ack)
        return answer

    async def _register_first(self) -> int:
        """REGISTER before the first chunk; returns the refresh period."""
        tracker = format_address(self.settings.tracker)
        timeout = self.settings.register_timeout
        try:
            ack = await self._register(timeout)
        except trio.TooSlowError:
            raise NodeError(
                f"the tracker at {tracker} did not answer in {timeout:g} s, so nobody could "
                "join; nothing was streamed. Is it running, and is --tracker right?"
            ) from None
        except TrackerRefused as exc:
            raise NodeError(f"the tracker at {tracker} refused the stream: {exc}") from None
        logger.info("stream %s registered at the tracker", key_to_text(self.stream_id))
        self.registered.set()
        self._watch.registered(trio.current_time(), self.core.children.streaming_nodes())
        return ack.refresh_s

    async def _keep_registered(self, refresh_s: int) -> None:
        """REGISTER again every `refresh_s`; a tracker that went away meanwhile is retried
        (with a warning) while the stream plays on for the listeners already in it."""
        retry = Backoff(self.rng, base=0.5, cap=30.0)
        delay = refresh_s * self.rng.uniform(0.8, 1.0)
        while True:
            await trio.sleep(delay)
            try:
                ack = await self._register(None)
            except TrackerRefused as exc:
                logger.error("the tracker refused the stream: %s", exc)  # noqa: TRY400
                delay = retry.next_delay()
                continue
            retry.reset()
            delay = ack.refresh_s * self.rng.uniform(0.8, 1.0)
            children = self.core.children.streaming_nodes()
            await self._take_look(self._watch.registered(trio.current_time(), children))

    def _full(self) -> None:
        self._refused.set()

    async def _look_when_full(self) -> None:
        """A SUBSCRIBE refused for lack of slots: whoever sent that child thought we had
        room. After a tracker restart the first newcomer says so at once, up to a
        REGISTER period before our next look."""
        while True:
            await self._refused.wait()
            children = self.core.children.streaming_nodes()
            await self._take_look(self._watch.refused(trio.current_time(), children))
            await trio.sleep(LOOK_AGAIN_AFTER)
            self._refused = trio.Event()

    async def _take_look(self, look: Look | None) -> None:
        """Ask the tracker (TREE) which children it has us feed; if it lost the tree (it
        restarted), the next chunks carry ANNOUNCE (meshd/node/treewatch.py)."""
        if look is None:
            return
        answer: TrackerResponse | None
        try:
            answer = await self._ask(look.request, give_up_after=5.0)
        except TrackerRefused as exc:
            answer = Goodbye(exc.code, exc.reason)
        except trio.TooSlowError:
            answer = None
        if not self._watch.answered(look, answer, trio.current_time()):
            if not self._watch.asks_tree:
                logger.info("the tracker does not know TREE: a restart of it goes unnoticed")
            return
        logger.warning(
            "the tracker had lost the stream's tree (it restarted?): asking every listener "
            "to tell it where they are"
        )
        self.core.announce(trio.current_time())

    async def _unregister(self) -> None:
        """Best effort: tell the tracker the stream is over."""
        if self._endpoint is None or not self.registered.is_set():
            return
        leave = sign_message(Leave(self.stream_id, self.stream_id, now_ms()), self.key)
        with trio.move_on_after(2.0):
            try:
                await ask_tracker(self._endpoint, self.settings.tracker, leave, give_up_after=2.0)
            except (TrackerRefused, trio.TooSlowError) as exc:
                logger.info("could not unregister the stream: %s", exc)


def _fits(pending: list[OpusPacket], packet: OpusPacket) -> bool:
    """Whether `packet` may join the chunk being built (duration and datagram size)."""
    samples = sum(p.samples for p in pending)
    size = sum(len(p.data) + 3 for p in pending) + len(packet.data) + 3
    return samples + packet.samples <= CHUNK_SAMPLES and size <= CHUNK_PACKET_BYTES


async def _open_input(path: str) -> trio.abc.ReceiveStream:
    """The input as a trio stream: stdin (a pipe from ffmpeg, say) or a file."""
    if path == "-":
        return trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    try:
        return _FileStream(open(path, "rb"))  # noqa: ASYNC230 - opening is instant; reads use a thread
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--input {path}: that is a folder, not an Ogg Opus file") from None
    except OSError as exc:
        raise UsageError(f"--input {path}: cannot read it ({exc.strerror})") from None


class _FileStream(trio.abc.ReceiveStream):
    """A file read in trio's thread pool, as a ReceiveStream."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await trio.to_thread.run_sync(self._file.read, max_bytes or READ_SIZE)

    async def aclose(self) -> None:
        self._file.close()
        await trio.lowlevel.checkpoint()
