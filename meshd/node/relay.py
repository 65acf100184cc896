"""The relay/listener: joins through the tracker, plays the stream, feeds its children.

Data path: a parent link verifies each chunk -> `on_chunk` puts it in the reorder
buffer and the ring and forwards it to the children at once -> chunks that are next in
order go to the audio output. Control path: `_follow_upstream` keeps exactly one parent,
failing over to a backup parent without waiting for the tracker, and moving
make-before-break when redirected.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.node.config import NodeConfig
from meshd.node.fanout import Fanout
from meshd.node.output import AudioSink
from meshd.node.stats import ChunkTrace, NodeStats, report_periodically
from meshd.node.upstream import AttachFailed, UpstreamLink
from meshd.quic import QuicEndpoint, open_quic_endpoint
from meshd.tracker_client import TrackerRefused, ask_tracker, now_ms
from protocol import (
    Assigned,
    ChunkRing,
    ErrorCode,
    Join,
    Leave,
    Moved,
    Peer,
    Refresh,
    Rejoin,
    ReorderBuffer,
    StreamInfo,
    VerifiedChunk,
    key_id,
    key_to_text,
    short_id,
    sign_message,
)
from protocol.backoff import Backoff
from protocol.events import Redirected
from protocol.media import OPUS_RATE

logger = logging.getLogger(__name__)

ATTACH_STAGGER = 0.25  # seconds before also trying the next candidate parent
STORM_WINDOW = 30.0  # seconds during which failovers lengthen the silence timeout
UNKNOWN_RETRIES = 3  # REFRESHes refused with UNKNOWN_PEER before joining again
FATAL_REFUSALS = frozenset(
    {ErrorCode.TOKEN_REQUIRED, ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED}
)


class NodeError(Exception):
    """The node cannot go on (e.g. the tracker refused our token); the message says why."""


@dataclass(frozen=True)
class RelaySettings:
    tracker: tuple[str, int]
    stream: bytes
    capacity: int = 4
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise: str | None = None
    token: bytes | None = None
    tracker_key: bytes | None = None
    join_timeout: float = 60.0
    """Give up (NodeError) if the first JOIN finds no parent within this long."""


class Relay:
    """One listener that also relays to up to `capacity` children."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        settings: RelaySettings,
        output: AudioSink | None,
        config: NodeConfig | None = None,
        rng: random.Random | None = None,
        stats_file: Path | None = None,
        trace: ChunkTrace | None = None,
    ) -> None:
        self.key = key
        self.stats_file = stats_file
        self.trace = trace
        self.node_id = key_id(key)
        self.settings = settings
        self.config = config or NodeConfig()
        self.output = output
        if output is not None:
            output.on_broken = self.leave
        self.rng = rng or random.Random()
        role = "relay" if settings.capacity else "listener"
        self.stats = NodeStats(role, key_to_text(self.node_id), key_to_text(settings.stream))
        self.ring = ChunkRing(int(self.config.buffer_seconds * OPUS_RATE))
        self.reorder = ReorderBuffer()
        self.fanout = Fanout(settings.stream, self.ring, settings.capacity, self.config, self.stats)
        self.backups: tuple[Peer, ...] = ()
        self.current: UpstreamLink | None = None
        self.address = ""
        self.refresh_s = 180
        self._endpoint: QuicEndpoint | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._last_played_at: float | None = None
        self._join_started = 0.0
        self._failovers: list[float] = []
        self._joined = trio.Event()
        self.playing = trio.Event()
        """Set once the first chunk has been played."""

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, play and relay until the stream ends or `leave()` is called."""
        host, port = self.settings.listen
        async with trio.open_nursery() as outer:
            if self.output is not None:
                outer.start_soon(self.output.run)
            try:
                async with open_quic_endpoint(self.key, host, port) as endpoint:
                    self._endpoint = endpoint
                    self.address = self.settings.advertise or format_address(endpoint.address)
                    if self.settings.capacity > 0:
                        logger.info(
                            "serving children on %s (advertised as %s)",
                            format_address(endpoint.address),
                            self.address,
                        )
                    await self._run_node(endpoint, task_status)
            finally:
                if self.output is not None:
                    self.output.close()

    async def _run_node(self, endpoint: QuicEndpoint, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.settings.capacity > 0:
                await nursery.start(endpoint.serve, self.fanout.handle_connection)
            nursery.start_soon(
                report_periodically, self.stats, self.config.stats_interval, self.stats_file
            )
            nursery.start_soon(self._follow_upstream)
            nursery.start_soon(self._refresh_loop)
            task_status.started()
            await self._stop.wait()
            if self.stats.ended:
                await self.fanout.wait_until_empty(self.config.leave_grace)
            else:
                await self._leave_gracefully()
            if self.current is not None:
                code = ErrorCode.STREAM_ENDED if self.stats.ended else ErrorCode.GOING_AWAY
                await self.current.close(code, "stream ended" if self.stats.ended else "leaving")
            nursery.cancel_scope.cancel()
        logger.info("%s", self.stats.line())
        if self.stats_file is not None:
            self.stats.write_json(self.stats_file)
        if self.trace is not None:
            self.trace.close()

    def leave(self) -> None:
        """Start a graceful leave (SIGINT/SIGTERM): children are moved first."""
        self._stop.set()

    # -- parent management ---------------------------------------------------------------

    async def _follow_upstream(self) -> None:
        self._join_started = trio.current_time()
        candidates = list(await self._ask_for_parent(None))
        current: UpstreamLink | None = None
        dead: Peer | None = None
        retry = Backoff(self.rng, base=0.2, cap=5.0)
        while not self._stop.is_set():
            if current is None:
                current, full = await self._attach_first(
                    candidates, 0.0 if dead else ATTACH_STAGGER
                )
                if current is None:
                    delay = retry.next_delay()
                    if retry.attempt > 1:  # the first round asks the tracker at once
                        await trio.sleep(delay)
                    candidates = list(await self._ask_for_parent(dead or full))
                    continue
                retry.reset()
                self._became_current(current, dead)
                dead = None
            await current.changed.wait()
            current.changed = trio.Event()
            if self._stop.is_set():
                return  # we are leaving or done: the link closing is ours
            if current.redirect is not None and not current.ended:
                current = await self._move(current, current.redirect)
                continue
            if current.ended:
                # Even STREAM_ENDED lands here: we have not played END yet (else _stop is
                # set), so another parent may still hold what we miss.
                logger.warning(
                    "parent %s failed (%s); switching to a backup",
                    short_id(current.peer.node),
                    current.end_reason,
                )
                dead = current.peer
                self.stats.failovers += 1
                self._failovers.append(trio.current_time())
                self.stats.bad_peers += current.bad_peer
                candidates = [peer for peer in self.backups if peer.node != dead.node]
                current = None
                self.current = None

    def _silence_timeout(self) -> float:
        """The configured timeout, doubled for each failover in the last STORM_WINDOW
        seconds (up to 8x): on a starved machine, parents look silent when they are not,
        and quick failovers would feed a storm of handshakes and backlogs."""
        now = trio.current_time()
        self._failovers = [t for t in self._failovers if now - t < STORM_WINDOW]
        return self.config.silence_timeout * (1 << min(len(self._failovers), 3))

    async def _attach_first(
        self, candidates: list[Peer], stagger: float = ATTACH_STAGGER
    ) -> tuple[UpstreamLink | None, Peer | None]:
        """Attach to the first candidate that accepts us ("happy eyeballs": the next
        candidate is tried when the previous one fails or after `stagger`, so a dead
        backup costs a fraction of a second, not a whole connect timeout). A failover
        tries all backups at once (stagger 0): they are equals, and time is audio.

        Also returns the first candidate that refused because it is full: the tracker's
        view of it is stale (e.g. after a tracker restart), and the REJOIN that names it
        makes the tracker place us elsewhere.
        """
        assert self._nursery is not None
        eligible = [peer for peer in candidates if peer.node != self.node_id and peer.address]
        winners: list[UpstreamLink] = []
        full: list[Peer] = []
        async with trio.open_nursery() as attempts:
            previous_failed: trio.Event | None = None
            for peer in eligible:
                failed = trio.Event()
                attempts.start_soon(
                    self._try_attach,
                    peer,
                    previous_failed,
                    stagger,
                    failed,
                    winners,
                    full,
                    attempts,
                )
                previous_failed = failed
        if not winners:
            return None, full[0] if full else None
        self._nursery.start_soon(winners[0].serve)
        return winners[0], None

    async def _try_attach(
        self,
        peer: Peer,
        turn: trio.Event | None,
        stagger: float,
        failed: trio.Event,
        winners: list[UpstreamLink],
        full: list[Peer],
        attempts: trio.Nursery,
    ) -> None:
        assert self._endpoint is not None
        if turn is not None and stagger > 0:
            with trio.move_on_after(stagger):
                await turn.wait()
        config = dataclasses.replace(self.config, silence_timeout=self._silence_timeout())
        link = UpstreamLink(self, peer, self.settings.stream, self.node_id, config)
        try:
            await link.attach(self._endpoint, self.reorder.next_seq)
        except AttachFailed as exc:
            logger.info("could not attach: %s", exc)
            if exc.code == ErrorCode.NO_CAPACITY:
                full.append(peer)
            failed.set()
            return
        if attempts.cancel_scope.cancel_called:  # another attempt won first
            with trio.CancelScope(shield=True):
                await link.close(ErrorCode.NO_ERROR, "another parent answered first")
            return
        winners.append(link)
        attempts.cancel_scope.cancel()

    def _became_current(self, link: UpstreamLink, dead: Peer | None) -> None:
        previous = self.current
        self.current = link
        self.stats.parent = key_to_text(link.peer.node)
        if previous is not None or dead is not None:
            self.stats.parent_switches += 1
        self.reorder.retry_gaps_now(trio.current_time())
        logger.info("receiving from %s at %s", short_id(link.peer.node), link.peer.address)
        if dead is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._report_failure, dead, link)

    async def _move(self, current: UpstreamLink, target: Redirected) -> UpstreamLink:
        """Make before break: attach to the new parent, then say GOODBYE to the old one."""
        current.redirect = None
        new, _ = await self._attach_first([target.parent, *target.backups])
        if new is None:
            return current  # keep the old parent until it goes; then the usual failover
        self.backups = target.backups or self.backups
        self._became_current(new, None)
        await current.close(ErrorCode.NO_ERROR, "moved")
        return new

    # -- the tracker --------------------------------------------------------------------

    async def _ask_for_parent(self, dead: Peer | None) -> list[Peer]:
        """JOIN (or REJOIN naming the dead parent) until the tracker assigns a parent.

        Gives up after `join_timeout` before the node ever had a parent (a wrong tracker
        address or a stream that never starts is an error, not a silent wait), and after
        `join_timeout` of UNKNOWN_STREAM later on (the stream ended while we were cut off;
        a restarted tracker knows the stream again as soon as the origin re-registers).
        """
        retry = Backoff(self.rng, base=0.5, cap=10.0)
        timeout = self.settings.join_timeout
        give_up_at = trio.current_time() + timeout
        unknown_since: float | None = None
        problem = "no answer"
        while True:
            now = trio.current_time()
            if self.stats.joined_at is None and now > give_up_at:
                raise NodeError(
                    f"no parent after {timeout:.0f} s ({problem}); is the tracker at "
                    f"{format_address(self.settings.tracker)} up and the stream live?"
                )
            if unknown_since is not None and now - unknown_since > timeout:
                raise NodeError(f"the tracker has not known the stream for {timeout:.0f} s: "
                                "it has ended")  # fmt: skip
            try:
                if dead is None:
                    answer = await self._request(self._join_request())
                else:
                    answer = await self._request(self._rejoin_request(dead, None))
            except TrackerRefused as exc:
                if exc.code in FATAL_REFUSALS:
                    raise NodeError(str(exc)) from None
                if exc.code != ErrorCode.UNKNOWN_STREAM:
                    unknown_since = None
                elif unknown_since is None:
                    unknown_since = now
                problem = str(exc)
                logger.warning("%s; retrying", exc)
            except trio.TooSlowError as exc:
                problem = str(exc)
                logger.warning("%s; retrying", exc)
            else:
                assert isinstance(answer, Assigned)
                self._assigned(answer)
                return [answer.parent, *answer.backups]
            await trio.sleep(retry.next_delay())

    async def _report_failure(self, dead: Peer, attached: UpstreamLink) -> None:
        """Tell the tracker we moved off a dead parent; follow it if it places us elsewhere."""
        try:
            answer = await self._request(self._rejoin_request(dead, attached.peer.node))
        except (TrackerRefused, trio.TooSlowError) as exc:
            logger.warning("could not report the failed parent: %s", exc)
            return
        assert isinstance(answer, Assigned)
        self._follow(answer)

    def _follow(self, answer: Assigned) -> None:
        """Adopt an assignment; if it names another parent, move there make-before-break
        (so the tracker's view and the real tree agree)."""
        self._assigned(answer)
        current = self.current
        if current is not None and answer.parent.node != current.peer.node and not current.ended:
            current.redirect = Redirected(answer.parent, answer.backups)
            current.changed.set()

    def _assigned(self, answer: Assigned) -> None:
        self.backups = answer.backups
        self.stats.backups = [key_to_text(peer.node) for peer in answer.backups]
        self.refresh_s = answer.refresh_s
        self.stats.depth = answer.depth
        if self.stats.joined_at is None:
            self.stats.joined_at = trio.current_time()
            self._joined.set()

    async def _refresh_loop(self) -> None:
        """Soft state: tell the tracker every `refresh_s` that we are alive and where.

        UNKNOWN_PEER means the tracker lost us (it restarted): a few quick retries give
        our parent's own REFRESH time to arrive, then we JOIN again and follow the answer.
        """
        await self._joined.wait()  # refresh_s comes with the first ASSIGNED
        retry = Backoff(self.rng, base=1.0, cap=60.0)
        delay = self.refresh_s * self.rng.uniform(0.8, 1.0)
        while True:
            await trio.sleep(delay)
            try:
                await self._request(self._refresh_request())
            except TrackerRefused as exc:
                if exc.code == ErrorCode.UNKNOWN_PEER and retry.attempt >= UNKNOWN_RETRIES:
                    await self._join_again()
                    retry.reset()
                    delay = self.refresh_s * self.rng.uniform(0.8, 1.0)
                    continue
                logger.info("refresh refused (%s); retrying sooner", exc)
                delay = min(retry.next_delay(), self.refresh_s)
            except trio.TooSlowError as exc:
                logger.info("refresh failed (%s); retrying later", exc)
                delay = min(retry.next_delay(), self.refresh_s)
            else:
                retry.reset()
                delay = self.refresh_s * self.rng.uniform(0.8, 1.0)

    async def _join_again(self) -> None:
        try:
            answer = await self._request(self._join_request())
        except (TrackerRefused, trio.TooSlowError) as exc:
            logger.warning("could not join again: %s", exc)
            return
        assert isinstance(answer, Assigned)
        logger.info("the tracker had forgotten us; joined again")
        self._follow(answer)

    def _refresh_request(self) -> Refresh:
        parent = self.current.peer.node if self.current is not None else None
        request = Refresh(
            self.settings.stream,
            self.node_id,
            parent,
            self.settings.capacity,
            self.address,
            now_ms(),
        )
        return sign_message(request, self.key)

    async def _request(self, request: Join | Rejoin | Leave | Refresh) -> object:
        assert self._endpoint is not None
        return await ask_tracker(
            self._endpoint,
            self.settings.tracker,
            request,
            rng=self.rng,
            give_up_after=min(60.0, self.settings.join_timeout),
            tracker_key=self.settings.tracker_key,
        )

    def _join_request(self) -> Join:
        request = Join(
            self.settings.stream,
            self.node_id,
            self.settings.capacity,
            self.address,
            self.settings.token,
            now_ms(),
        )
        return sign_message(request, self.key)

    def _rejoin_request(self, dead: Peer, attached: bytes | None) -> Rejoin:
        request = Rejoin(
            self.settings.stream,
            self.node_id,
            dead.node,
            attached,
            self.settings.capacity,
            self.address,
            self.settings.token,
            now_ms(),
        )
        return sign_message(request, self.key)

    async def _leave_gracefully(self) -> None:
        """LEAVE, redirect every child where the tracker says, wait for them to go."""
        self.fanout.leaving = True
        moves: dict[bytes, tuple[Peer, tuple[Peer, ...]]] = {}
        try:
            with trio.fail_after(3.0):
                leave = Leave(self.settings.stream, self.node_id, now_ms())
                answer = await self._request(sign_message(leave, self.key))
            if isinstance(answer, Moved):
                moves = {move.child: (move.parent, move.backups) for move in answer.moves}
        except (TrackerRefused, trio.TooSlowError) as exc:
            logger.warning("tracker did not answer LEAVE (%s); sending children upstream", exc)
        if self.current is not None:
            moves[b""] = (self.current.peer, self.backups)
        if self.fanout.children:
            self.fanout.redirect_all(moves)
            moved = await self.fanout.wait_until_empty(self.config.leave_grace)
            logger.info("children moved: %s", "all" if moved else "not all, leaving anyway")

    # -- the data path (called by the current UpstreamLink) --------------------------------

    def on_info(self, info: StreamInfo) -> None:
        self.fanout.set_info(info)
        if self.output is not None:
            self.output.start(info.head)

    def on_chunk(self, item: VerifiedChunk) -> None:
        now = trio.current_time()
        if not self.reorder.add(item, now):
            self.stats.duplicates += 1
            return
        self.stats.chunks_in += 1
        self.stats.bytes_in += len(item.raw)
        if self.trace is not None:
            self.trace.record(item.seq)
        self.ring.add(item)
        self.fanout.forward(item)
        self._play_ready(now)

    def _play_ready(self, now: float) -> None:
        for ready in self.reorder.pop_ready():
            chunk = ready.chunk
            if self.stats.first_seq is None:
                self.stats.first_seq = chunk.seq
                self.stats.first_audio_at = now
                self.stats.join_to_audio_ms = (now - self._join_started) * 1000
                self.playing.set()
            self.stats.last_seq = chunk.seq
            if self._last_played_at is not None:
                stall = (now - self._last_played_at) * 1000
                self.stats.longest_stall_ms = max(self.stats.longest_stall_ms, stall)
            self._last_played_at = now
            self.stats.packets_played += len(chunk.packets)
            if self.output is not None and self.output.started:
                self.output.write(chunk.packets)
            if chunk.is_end:
                self.stats.ended = True
                self._stop.set()
        self.stats.lost = self.reorder.lost_count
        self.stats.gaps = self.reorder.gaps

    def on_latest(self, seq: int) -> None:
        self.reorder.note_latest(seq, trio.current_time())

    def on_unavailable(self, seqs: tuple[int, ...]) -> None:
        self.reorder.unavailable(seqs)
        self._play_ready(trio.current_time())

    def repair_timer(self, link: UpstreamLink) -> float | None:
        return self.reorder.get_timer() if link is self.current else None

    def due_repairs(self, link: UpstreamLink) -> list[int]:
        if link is not self.current:
            return []
        seqs = self.reorder.due_repairs(trio.current_time())
        self.stats.repairs_requested += len(seqs)
        return seqs
