"""The node's decisions, sans-I/O: which parent, when to fail over, what to repair, when to end.

`NodeCore` is one relay/listener as a pure state machine, in the style of
meshd/tracker/tree.py. The driver (meshd/node/relay.py over real QUIC, or the simulator)
tells it what happened: tracker answers, link bytes and datagrams, connections that
failed, and the time. It performs what `next_action` asks for: connect to a parent, close
a link, ask the tracker, play a chunk, finish. Children are served by the `Children` it
owns. No I/O and no clock reads here, so a simulator can run thousands of these.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from meshd.node.children import Children
from meshd.node.config import NodeConfig
from meshd.node.stats import NodeStats
from protocol import (
    Assigned,
    ChildLink,
    ChunkRing,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    LinkState,
    Moved,
    Peer,
    ProtocolError,
    Refresh,
    Rejoin,
    ReorderBuffer,
    StreamVerifier,
    VerifiedChunk,
    key_to_text,
    short_id,
)
from protocol.backoff import Backoff
from protocol.events import (
    ChunkReceived,
    HeartbeatReceived,
    InfoReceived,
    LinkClosed,
    ParentSilent,
    Redirected,
    RepairUnavailable,
)
from protocol.media import OPUS_RATE
from protocol.messages import TrackerResponse

logger = logging.getLogger("meshd.node")

ATTACH_STAGGER = 0.25  # seconds before also trying the next candidate parent
STORM_WINDOW = 30.0  # seconds during which failovers lengthen the silence timeout
UNKNOWN_RETRIES = 3  # REFRESHes refused with UNKNOWN_PEER before joining again
LEAVE_TIMEOUT = 3.0  # how long a leaving node waits for the tracker's MOVED
FATAL_REFUSALS = frozenset(
    {ErrorCode.TOKEN_REQUIRED, ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED}
)

# -- actions the driver performs ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection to `peer` (pinned to its key) and a control stream, then call
    `link_opened`; call `link_failed` if that fails."""

    link: int
    peer: Peer


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Send the link's last bytes (`data`: a GOODBYE, say), then close with `code`."""

    link: int
    code: int
    reason: str
    data: bytes


@dataclass(frozen=True, slots=True)
class AskTracker:
    """Fill in `time_ms`, sign, send and retry as docs/spec.md §7.4 says; report the
    answer (a GOODBYE for a refusal, None if the tracker never answered) with
    `tracker_answered(ticket, ...)`."""

    ticket: int
    request: Join | Rejoin | Refresh | Leave


@dataclass(frozen=True, slots=True)
class StartOutput:
    """The stream's codec header: begin the audio output."""

    head: bytes


@dataclass(frozen=True, slots=True)
class Play:
    """The next chunk in order: write its packets to the audio output."""

    item: VerifiedChunk


@dataclass(frozen=True, slots=True)
class Finished:
    """The node is done: exit with `status` (0: complete), saying `message`."""

    status: int
    message: str


NodeAction = Connect | CloseLink | AskTracker | StartOutput | Play | Finished


class Purpose(Enum):
    """Why a tracker request or an attach round was started; decides what its outcome does."""

    PLACE = "place"  # we have no parent: JOIN, or REJOIN naming the one that failed
    REPORT = "report"  # we switched to a backup: REJOIN naming the dead parent
    REFRESH = "refresh"
    JOIN_AGAIN = "join-again"  # the tracker forgot us: JOIN while keeping our parent
    LEAVE = "leave"
    FAILOVER = "failover"  # attach round to the backups after a parent failed
    MOVE = "move"  # attach round to a new parent while keeping the current one


class Phase(Enum):
    RUNNING = "running"
    LEAVING = "leaving"  # LEAVE sent, waiting for MOVED
    DRAINING = "draining"  # waiting (at most the grace period) for children to go
    DONE = "done"


@dataclass
class Upstream:
    """One connection to a (candidate) parent."""

    id: int
    peer: Peer
    deadline: float | None
    """While attaching: give up on this candidate at this time."""
    link: ChildLink | None = None
    attached: bool = False


@dataclass
class AttachRound:
    """Candidates tried "happy eyeballs" style: the next one when the previous fails or
    after `stagger`; the first to accept wins."""

    purpose: Purpose
    pending: list[Peer]
    stagger: float
    next_at: float
    dead: Peer | None = None
    """FAILOVER: the parent that failed (reported in REJOIN once we are attached)."""
    trying: set[int] = field(default_factory=set)
    full: list[Peer] = field(default_factory=list)


class NodeCore:
    """One listener that also relays to up to `capacity` children."""

    def __init__(
        self,
        node_id: bytes,
        stream_id: bytes,
        *,
        capacity: int,
        config: NodeConfig,
        rng: random.Random,
        join_timeout: float,
        address: str = "",
        token: bytes | None = None,
        tracker_name: str = "the tracker",
        verifier: StreamVerifier | None = None,
    ) -> None:
        self.node_id = node_id
        self.stream_id = stream_id
        self.capacity = capacity
        self.address = address
        self.config = config
        self.rng = rng
        self.join_timeout = join_timeout
        self.token = token
        self.tracker_name = tracker_name
        """How error messages name the tracker (its address, say)."""
        self.verifier = verifier or StreamVerifier(stream_id)
        role = "relay" if capacity else "listener"
        self.stats = NodeStats(role, key_to_text(node_id), key_to_text(stream_id))
        self.ring = ChunkRing(int(config.buffer_seconds * OPUS_RATE))
        self.reorder = ReorderBuffer()
        self.children = Children(stream_id, self.ring, capacity, config, self.stats)
        self.backups: tuple[Peer, ...] = ()
        self.current: Upstream | None = None
        self.refresh_s = 180
        self.phase = Phase.RUNNING
        self.on_arrival: Callable[[int], None] | None = None
        """Called with each chunk's sequence number as it first arrives (for traces)."""
        self._actions: deque[NodeAction] = deque()
        self._links: dict[int, Upstream] = {}
        self._dirty_links: set[int] = set()
        self._next_id = 0
        self._requests: dict[int, tuple[Purpose, Peer | None]] = {}
        self._round: AttachRound | None = None
        self._started_at = 0.0
        self._failovers: list[float] = []
        self._place_retry = Backoff(rng, base=0.5, cap=10.0)
        self._round_retry = Backoff(rng, base=0.2, cap=5.0)
        self._refresh_retry = Backoff(rng, base=1.0, cap=60.0)
        self._place_at: float | None = None
        self._place_dead: Peer | None = None
        self._placing = False
        self._unknown_since: float | None = None
        self._problem = "no answer"
        self._refresh_at: float | None = None
        self._drain_until: float | None = None
        self._leave_deadline: float | None = None
        self._last_played_at: float | None = None
        self._output_started = False
        self._move_backups: tuple[Peer, ...] = ()

    # -- inputs ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Ask the tracker for a parent."""
        self._started_at = now
        self._ask_for_parent(None, now)

    def leave(self, now: float) -> None:
        """Graceful leave (SIGINT/SIGTERM): LEAVE, move the children, then go."""
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.LEAVING
        self.children.leaving = True
        self._leave_deadline = now + LEAVE_TIMEOUT
        self._ask(Leave(self.stream_id, self.node_id, 0), Purpose.LEAVE, None)

    def tracker_answered(self, ticket: int, answer: TrackerResponse | None, now: float) -> None:
        """The outcome of an `AskTracker`: its answer, a GOODBYE refusal, or None."""
        pending = self._requests.pop(ticket, None)
        if pending is None or self.phase is Phase.DONE:
            return
        purpose, dead = pending
        if purpose is Purpose.PLACE and self.phase is Phase.RUNNING:
            self._placed(answer, dead, now)
        elif purpose is Purpose.REPORT:
            if isinstance(answer, Assigned):
                self._follow(answer, now)
            else:
                logger.warning("could not report the failed parent: %s", _why(answer))
        elif purpose is Purpose.REFRESH:
            self._refreshed(answer, now)
        elif purpose is Purpose.JOIN_AGAIN:
            if isinstance(answer, Assigned):
                logger.info("the tracker had forgotten us; joined again")
                self._follow(answer, now)
            else:
                logger.warning("could not join again: %s", _why(answer))
        elif purpose is Purpose.LEAVE:
            self._left(answer, now)

    def link_opened(self, link: int, now: float) -> None:
        """The connection to the candidate parent is up: subscribe."""
        up = self._links.get(link)
        if up is None:
            return
        up.link = ChildLink(
            self.stream_id,
            self.node_id,
            self.reorder.next_seq,
            now=now,
            silence_timeout=self._silence_timeout(now),
            verifier=self.verifier,
        )
        self._dirty_links.add(link)

    def link_data(self, link: int, data: bytes, now: float) -> None:
        """Stream bytes from a parent (b"" when it ended the stream)."""
        up = self._links.get(link)
        if up is None or up.link is None:
            return
        try:
            up.link.receive_data(data, now)
        except ProtocolError as exc:
            self._protocol_error(up, exc, now)
            return
        self._dispatch(up, now)
        if not data and up.id in self._links:
            self._link_ended(up, ErrorCode.GOING_AWAY, "parent ended the stream", now)

    def link_datagram(self, link: int, data: bytes, now: float) -> None:
        """A datagram from a parent (one CHUNK)."""
        up = self._links.get(link)
        if up is None or up.link is None:
            return
        try:
            up.link.receive_datagram(data, now)
        except ProtocolError as exc:
            self._protocol_error(up, exc, now)
            return
        self._dispatch(up, now)

    def link_failed(self, link: int, reason: str, now: float) -> None:
        """The connection could not be made, or broke."""
        up = self._links.get(link)
        if up is not None:
            self._link_ended(up, ErrorCode.GOING_AWAY, reason, now)

    def get_timer(self) -> float | None:
        deadlines = [
            self._place_at,
            self._refresh_at,
            self._drain_until,
            self._leave_deadline,
            self.children.get_timer(),
        ]
        if self._round is not None and self._round.pending:
            deadlines.append(self._round.next_at)
        for up in self._links.values():
            deadlines.append(up.deadline)
            if up.link is not None:
                deadlines.append(up.link.get_timer())
        if self.current is not None:
            deadlines.append(self.reorder.get_timer())
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        self.children.handle_timer(now)
        for up in list(self._links.values()):
            if up.deadline is not None and now >= up.deadline:
                self._link_ended(up, ErrorCode.GOING_AWAY, "no answer in time", now)
            elif up.link is not None:
                up.link.handle_timer(now)
                self._dispatch(up, now)
        if self._round is not None and self._round.pending and now >= self._round.next_at:
            self._launch_next(self._round, now)
        if self.current is not None and self.current.link is not None:
            seqs = self.reorder.due_repairs(now)
            if seqs:
                self.stats.repairs_requested += len(seqs)
                self.current.link.request_repair(seqs)
                self._dirty_links.add(self.current.id)
        if self._place_at is not None and now >= self._place_at:
            self._place_at = None
            self._ask_for_parent(self._place_dead, now)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._ask(self._refresh_request(), Purpose.REFRESH, None)
        if self._leave_deadline is not None and now >= self._leave_deadline:
            self._leave_deadline = None
            logger.warning("tracker did not answer LEAVE; sending children upstream")
            self._left(None, now)
        if self._drain_until is not None and (now >= self._drain_until):
            self._finish(now)

    # -- outputs -----------------------------------------------------------------------

    def next_action(self) -> NodeAction | None:
        return self._actions.popleft() if self._actions else None

    def take_dirty_links(self) -> set[int]:
        """Parent links with bytes to send (see `take_link_output`)."""
        dirty, self._dirty_links = self._dirty_links, set()
        return dirty

    def is_attached(self, link: int) -> bool:
        """Whether the parent on this link accepted us."""
        up = self._links.get(link)
        return up is not None and up.attached

    def take_link_output(self, link: int) -> bytes:
        up = self._links.get(link)
        if up is None or up.link is None:
            return b""
        return up.link.data_to_send()

    def child_closed(self, child: int, now: float) -> None:
        """A child connection is gone; a draining node may be done."""
        self.children.closed(child)
        if self.phase is Phase.DRAINING and self.children.connections == 0:
            self._finish(now)

    # -- the tracker -------------------------------------------------------------------

    def _ask(
        self, request: Join | Rejoin | Refresh | Leave, purpose: Purpose, dead: Peer | None
    ) -> None:
        ticket = self._new_id()
        self._requests[ticket] = (purpose, dead)
        self._actions.append(AskTracker(ticket, request))

    def _ask_for_parent(self, dead: Peer | None, now: float) -> None:
        """JOIN (or REJOIN naming the failed parent) to be placed; retried until placed."""
        if self.stats.joined_at is None and now - self._started_at > self.join_timeout:
            self._fail(
                f"no parent after {self.join_timeout:.0f} s ({self._problem}); is the "
                f"tracker at {self.tracker_name} up and the stream live?",
                now,
            )
            return
        if self._unknown_since is not None and now - self._unknown_since > self.join_timeout:
            self._fail(
                f"the tracker has not known the stream for {self.join_timeout:.0f} s: it has ended",
                now,
            )
            return
        self._placing = True
        self._place_dead = dead
        if dead is None:
            request: Join | Rejoin = self._join_request()
        else:
            request = self._rejoin_request(dead, None)
        self._ask(request, Purpose.PLACE, dead)

    def _placed(self, answer: TrackerResponse | None, dead: Peer | None, now: float) -> None:
        if isinstance(answer, Assigned):
            self._placing = False
            self._place_retry.reset()
            self._assigned(answer, now)
            if self.current is None:
                self._start_round(
                    Purpose.FAILOVER if dead else Purpose.PLACE,
                    [answer.parent, *answer.backups],
                    now,
                    dead=dead,
                )
            return
        if isinstance(answer, Goodbye):
            if answer.code in FATAL_REFUSALS:
                self._fail(f"tracker refused: {_why(answer)}", now)
                return
            if answer.code != ErrorCode.UNKNOWN_STREAM:
                self._unknown_since = None
            elif self._unknown_since is None:
                self._unknown_since = now
        self._problem = _why(answer)
        logger.warning("%s; retrying", self._problem)
        self._place_at = now + self._place_retry.next_delay()

    def _assigned(self, answer: Assigned, now: float) -> None:
        self.backups = answer.backups
        self.stats.backups = [key_to_text(peer.node) for peer in answer.backups]
        self.refresh_s = answer.refresh_s
        self.stats.depth = answer.depth
        if self.stats.joined_at is None:
            self.stats.joined_at = now
            self._schedule_refresh(now)

    def _follow(self, answer: Assigned, now: float) -> None:
        """Adopt an assignment; if it names another parent, move there make-before-break
        (so the tracker's view and the real tree agree)."""
        self._assigned(answer, now)
        current = self.current
        if current is not None and answer.parent.node != current.peer.node:
            self._start_move([answer.parent, *answer.backups], answer.backups, now)

    def _schedule_refresh(self, now: float) -> None:
        self._refresh_at = now + self.refresh_s * self.rng.uniform(0.8, 1.0)

    def _refreshed(self, answer: TrackerResponse | None, now: float) -> None:
        """Soft state: UNKNOWN_PEER means the tracker lost us (it restarted): a few quick
        retries give our parent's own REFRESH time to arrive, then we JOIN again."""
        if self.phase is not Phase.RUNNING:
            return
        retry = self._refresh_retry
        if isinstance(answer, Goodbye):
            if answer.code == ErrorCode.UNKNOWN_PEER and retry.attempt >= UNKNOWN_RETRIES:
                self._ask(self._join_request(), Purpose.JOIN_AGAIN, None)
                retry.reset()
                self._schedule_refresh(now)
                return
            logger.info("refresh refused (%s); retrying sooner", _why(answer))
            self._refresh_at = now + min(retry.next_delay(), self.refresh_s)
        elif answer is None:
            logger.info("refresh failed (the tracker did not answer); retrying later")
            self._refresh_at = now + min(retry.next_delay(), self.refresh_s)
        else:
            retry.reset()
            self._schedule_refresh(now)

    def _left(self, answer: TrackerResponse | None, now: float) -> None:
        """LEAVE answered (or timed out): redirect every child, then drain."""
        if self.phase is not Phase.LEAVING:
            return
        self._leave_deadline = None
        moves: dict[bytes, tuple[Peer, tuple[Peer, ...]]] = {}
        if isinstance(answer, Moved):
            moves = {move.child: (move.parent, move.backups) for move in answer.moves}
        elif answer is not None:
            logger.warning(
                "tracker did not answer LEAVE (%s); sending children upstream", _why(answer)
            )
        if self.current is not None:
            moves[b""] = (self.current.peer, self.backups)
        self.children.redirect_all(moves)
        self._drain(now)

    def _join_request(self) -> Join:
        return Join(self.stream_id, self.node_id, self.capacity, self.address, self.token, 0)

    def _rejoin_request(self, dead: Peer, attached: bytes | None) -> Rejoin:
        return Rejoin(
            self.stream_id, self.node_id, dead.node, attached, self.capacity, self.address,
            self.token, 0,
        )  # fmt: skip

    def _refresh_request(self) -> Refresh:
        parent = self.current.peer.node if self.current is not None else None
        return Refresh(self.stream_id, self.node_id, parent, self.capacity, self.address, 0)

    # -- attaching ---------------------------------------------------------------------

    def _start_round(
        self, purpose: Purpose, candidates: list[Peer], now: float, *, dead: Peer | None = None
    ) -> None:
        """Attach to the first candidate that accepts us ("happy eyeballs": the next
        candidate is tried when the previous one fails or after a stagger, so a dead one
        costs a fraction of a second). A failover tries all backups at once: they are
        equals, and time is audio."""
        eligible = [peer for peer in candidates if peer.node != self.node_id and peer.address]
        stagger = 0.0 if purpose is Purpose.FAILOVER else ATTACH_STAGGER
        self._round = AttachRound(purpose, eligible, stagger, now, dead=dead)
        if not eligible:
            self._round_failed(self._round, now)
            return
        self._launch_next(self._round, now)

    def _start_move(self, candidates: list[Peer], backups: tuple[Peer, ...], now: float) -> None:
        if self._round is not None:
            return  # already moving or failing over; the outcome is followed up there
        self._move_backups = backups
        self._start_round(Purpose.MOVE, candidates, now)

    def _launch_next(self, round_: AttachRound, now: float) -> None:
        while round_.pending:
            peer = round_.pending.pop(0)
            up = Upstream(self._new_id(), peer, now + self.config.connect_timeout)
            self._links[up.id] = up
            round_.trying.add(up.id)
            self._actions.append(Connect(up.id, peer))
            round_.next_at = now + round_.stagger
            if round_.stagger > 0:
                return

    def _attached(self, up: Upstream, now: float) -> None:
        """A candidate accepted (STREAM_INFO arrived): it wins its round."""
        round_ = self._round
        up.deadline = None
        up.attached = True
        if round_ is None or up.id not in round_.trying:
            self._close(up, ErrorCode.NO_ERROR, "not wanted any more")
            return
        round_.trying.discard(up.id)
        for other in round_.trying:
            self._close(self._links[other], ErrorCode.NO_ERROR, "another parent answered first")
        self._round = None
        self._round_retry.reset()
        previous = self.current
        if round_.purpose is Purpose.MOVE:
            self.backups = self._move_backups or self.backups
        self._became_current(up, round_.dead, now)
        if previous is not None and previous is not up:
            self._close(previous, ErrorCode.NO_ERROR, "moved")

    def _attach_failed(self, up: Upstream, code: int, now: float) -> None:
        round_ = self._round
        if round_ is None or up.id not in round_.trying:
            return
        round_.trying.discard(up.id)
        if code == ErrorCode.NO_CAPACITY:
            round_.full.append(up.peer)
        if round_.pending:
            self._launch_next(round_, now)
        elif not round_.trying:
            self._round_failed(round_, now)

    def _round_failed(self, round_: AttachRound, now: float) -> None:
        """Nobody accepted: a move keeps the current parent (until it goes); otherwise
        ask the tracker, naming the full or failed parent so it places us elsewhere."""
        self._round = None
        if round_.purpose is Purpose.MOVE:
            return
        delay = self._round_retry.next_delay()
        dead = round_.dead or (round_.full[0] if round_.full else None)
        if self._round_retry.attempt > 1:  # the first round asks the tracker at once
            self._place_dead = dead
            self._place_at = now + delay
        else:
            self._ask_for_parent(dead, now)

    def _became_current(self, up: Upstream, dead: Peer | None, now: float) -> None:
        previous = self.current
        self.current = up
        self.stats.parent = key_to_text(up.peer.node)
        if previous is not None or dead is not None:
            self.stats.parent_switches += 1
        self.reorder.retry_gaps_now(now)
        logger.info("receiving from %s at %s", short_id(up.peer.node), up.peer.address)
        if dead is not None:
            self._ask(self._rejoin_request(dead, up.peer.node), Purpose.REPORT, dead)

    # -- the link ----------------------------------------------------------------------

    def _dispatch(self, up: Upstream, now: float) -> None:
        """Act on the link's events."""
        assert up.link is not None
        while (event := up.link.next_event()) is not None:
            if isinstance(event, ChunkReceived):
                if up is self.current:
                    self._on_chunk(event.item, now)
            elif isinstance(event, InfoReceived):
                self.children.set_info(event.info, now)
                if not self._output_started:
                    self._output_started = True
                    self._actions.append(StartOutput(event.info.head))
                if not up.attached:
                    self._attached(up, now)
            elif isinstance(event, HeartbeatReceived):
                if up is self.current and event.latest_seq is not None:
                    self.reorder.note_latest(event.latest_seq, now)
            elif isinstance(event, RepairUnavailable):
                if up is self.current:
                    self.reorder.unavailable(event.seqs)
                    self._play_ready(now)
            elif isinstance(event, Redirected):
                if up is self.current:
                    self._start_move([event.parent, *event.backups], event.backups, now)
            elif isinstance(event, ParentSilent):
                self._link_ended(up, ErrorCode.PARENT_TIMEOUT, "parent went silent", now)
                return
            elif isinstance(event, LinkClosed):
                self._link_ended(up, event.code, event.reason, now)
                return
        if up.link.state is not LinkState.CLOSED:
            self._dirty_links.add(up.id)

    def _protocol_error(self, up: Upstream, exc: ProtocolError, now: float) -> None:
        logger.warning("parent %s broke the protocol: %s", short_id(up.peer.node), exc)
        assert up.link is not None
        up.link.goodbye(exc.code, str(exc))
        self._link_ended(up, exc.code, str(exc), now, bad=True)

    def _link_ended(
        self, up: Upstream, code: int, reason: str, now: float, *, bad: bool = False
    ) -> None:
        """A link is over (refused, failed, closed): drop it and decide what follows."""
        if self._links.pop(up.id, None) is None:
            return
        close_code = up.link.goodbye_code if up.link is not None else None
        data = up.link.data_to_send() if up.link is not None else b""
        self._actions.append(CloseLink(up.id, close_code or ErrorCode.NO_ERROR, reason[:100], data))
        if not up.attached:
            logger.info(
                "could not attach: parent %s at %s: %s",
                short_id(up.peer.node),
                up.peer.address,
                reason,
            )
            self._attach_failed(up, code, now)
            return
        if up is not self.current or self.phase is Phase.DONE:
            return
        self.current = None
        if self.phase is not Phase.RUNNING:
            return  # leaving or done: the link closing is ours
        logger.warning(
            "parent %s failed (%s); switching to a backup", short_id(up.peer.node), reason
        )
        self.stats.failovers += 1
        self.stats.bad_peers += bad
        self._failovers.append(now)
        if self._round is not None:  # a move in progress: its candidates are not backups
            for other in list(self._round.trying):
                self._close(self._links[other], ErrorCode.NO_ERROR, "failing over instead")
            self._round = None
        candidates = [peer for peer in self.backups if peer.node != up.peer.node]
        self._start_round(Purpose.FAILOVER, candidates, now, dead=up.peer)

    def _close(self, up: Upstream, code: int, reason: str) -> None:
        """Close a link ourselves (GOODBYE first if it got that far)."""
        if self._links.pop(up.id, None) is None:
            return
        data = b""
        if up.link is not None:
            up.link.goodbye(code, reason)
            data = up.link.data_to_send()
        self._actions.append(CloseLink(up.id, code, reason[:100], data))

    def _silence_timeout(self, now: float) -> float:
        """The configured timeout, doubled for each failover in the last STORM_WINDOW
        seconds (up to 8x): on a starved machine, parents look silent when they are not,
        and quick failovers would feed a storm of handshakes and backlogs."""
        self._failovers = [t for t in self._failovers if now - t < STORM_WINDOW]
        return self.config.silence_timeout * (1 << min(len(self._failovers), 3))

    # -- the data path -----------------------------------------------------------------

    def _on_chunk(self, item: VerifiedChunk, now: float) -> None:
        if not self.reorder.add(item, now):
            self.stats.duplicates += 1
            return
        self.stats.chunks_in += 1
        self.stats.bytes_in += len(item.raw)
        if self.on_arrival is not None:
            self.on_arrival(item.seq)
        self.ring.add(item)
        self.children.forward(item, now)
        self._play_ready(now)

    def _play_ready(self, now: float) -> None:
        for ready in self.reorder.pop_ready():
            chunk = ready.chunk
            if self.stats.first_seq is None:
                self.stats.first_seq = chunk.seq
                self.stats.first_audio_at = now
                self.stats.join_to_audio_ms = (now - self._started_at) * 1000
            self.stats.last_seq = chunk.seq
            if self._last_played_at is not None:
                stall = (now - self._last_played_at) * 1000
                self.stats.longest_stall_ms = max(self.stats.longest_stall_ms, stall)
            self._last_played_at = now
            self.stats.packets_played += len(chunk.packets)
            self._actions.append(Play(ready))
            if chunk.is_end:
                self.stats.ended = True
                self._drain(now)
                break
        self.stats.lost = self.reorder.lost_count
        self.stats.gaps = self.reorder.gaps

    # -- ending ------------------------------------------------------------------------

    def _drain(self, now: float) -> None:
        """Wait (at most the grace period) for the children to go, then finish."""
        if self.phase in (Phase.DRAINING, Phase.DONE):
            return
        self.phase = Phase.DRAINING
        self._refresh_at = self._place_at = None
        if self.children.connections == 0:
            self._finish(now)
        else:
            self._drain_until = now + self.config.leave_grace

    def _finish(self, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        self._drain_until = None
        for up in list(self._links.values()):
            ended = self.stats.ended
            self._close(
                up,
                ErrorCode.STREAM_ENDED if ended else ErrorCode.GOING_AWAY,
                "stream ended" if ended else "leaving",
            )
        message = "the stream ended" if self.stats.ended else "left"
        self._actions.append(Finished(0, message))

    def _fail(self, message: str, now: float) -> None:
        self.phase = Phase.DONE
        for up in list(self._links.values()):
            self._close(up, ErrorCode.GOING_AWAY, "giving up")
        self._actions.append(Finished(1, message))

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _why(answer: TrackerResponse | None) -> str:
    if answer is None:
        return "the tracker did not answer"
    if isinstance(answer, Goodbye):
        try:
            name = ErrorCode(answer.code).name
        except ValueError:
            name = f"code {answer.code}"
        return f"tracker refused: {name}: {answer.reason}"
    return f"unexpected answer {type(answer).__name__}"
