"""The node's decisions, sans-I/O: which parent, when to fail over, what to repair, when to end.

`NodeCore` is one relay/listener as a pure state machine, in the style of
meshd/tracker/tree.py. The driver (meshd/node/relay.py over real QUIC, or the simulator)
tells it what happened: tracker answers, link bytes and datagrams, connections that
failed, and the time. It performs what `next_action` asks for: connect to a parent, close
a link, ask the tracker, play a chunk, finish. Children are served by the `Children` it
owns. No I/O and no clock reads here, so a simulator can run thousands of these.

The rules it keeps (docs/spec.md §6.3):
- A parent has failed when its connection breaks, when it is silent for the silence
  timeout, when its path runs through us (a cycle), or when it delivers nothing new to
  play for the stall timeout while it does not say its own playback is stalled as long
  (then the trouble is above it, and its own child is the one to act). A parent that has
  delivered nothing since it accepted us gets less: the first-chunk timeout unless it
  showed it is behind us (said it is stalled, or sent old chunks), the stall timeout
  whatever it says.
- Failover goes to the backups at once, all in parallel; the tracker is told (REJOIN)
  and its answer is followed, make before break, until the parent we stream from is
  the one the tracker assigned: a node never settles on a parent the tracker did not
  confirm. A parent the tracker chose after a failure that has not taken us within
  0.5 s is named in another REJOIN (it may have died too); the attempt goes on.
- Every sequence number up to the newest announced is played; a gap is given up only
  once no ring buffer can still hold it. Before its first audio a node plays nothing
  further behind the origin's live granule, as the tracker last heard it, than the start
  lag: a relay replaying the past would start it where no ring can follow.
- A node cut off from the stream for the join timeout, or told by the tracker that the
  stream ended, exits, saying it missed audio.
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
from meshd.node.stats import NodeStats, PlayoutMeter
from protocol import (
    Ack,
    Assigned,
    ChildGone,
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
    PathReceived,
    Redirected,
    RepairUnavailable,
)
from protocol.media import OPUS_RATE
from protocol.messages import TrackerResponse

logger = logging.getLogger("meshd.node")

ATTACH_STAGGER = 0.25  # seconds before also trying the next candidate parent
STORM_WINDOW = 30.0  # seconds during which failovers lengthen the silence timeout
SHUN_FOR = 30.0  # seconds a failover passes over a backup that stalled us or broke the rules
UNKNOWN_RETRIES = 3  # REFRESHes refused with UNKNOWN_PEER before joining again
LEAVE_TIMEOUT = 3.0  # how long a leaving node waits for the tracker's MOVED
STALL_SLACK = 0.5  # a parent stalled this much less than us still counts as stalled too
FAILOVER_ASK_AFTER = 0.25  # a failover not done by then asks the tracker too
REJOIN_AGAIN_AFTER = 0.5
"""A parent the tracker chose after a failure that has not accepted us by then is named
in another REJOIN: after a mass failure it may be dead too, unknown to the tracker, and
the connect timeout would cost seconds of audio. The attempt goes on meanwhile."""
ANNOUNCE_STEP = 0.5
"""On a chunk with ANNOUNCE, a node at depth d REFRESHes within [d - 1, d) steps: parents
before children, so the restarted tracker knows each REFRESH's parent (§7.2)."""
ANNOUNCE_QUIET = 10.0  # seconds after one ANNOUNCE during which more are ignored
FATAL_REFUSALS = frozenset(
    {ErrorCode.TOKEN_REQUIRED, ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED}
)
EXIT_MISSED_AUDIO = 3
"""Exit status of a node that ended without all of the stream (1: it never got going)."""

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
    request: Join | Rejoin | Refresh | Leave | ChildGone


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
    """The node is done: exit with `status` (0: it played the whole stream), saying why."""

    status: int
    message: str


NodeAction = Connect | CloseLink | AskTracker | StartOutput | Play | Finished


class Purpose(Enum):
    """Why a tracker request or an attach round was started; decides what its outcome does."""

    PLACE = "place"  # we have no parent: JOIN, or REJOIN naming the one that failed
    REPORT = "report"  # we stream from a parent the tracker did not assign: REJOIN
    REFRESH = "refresh"
    JOIN_AGAIN = "join-again"  # the tracker forgot us: JOIN while keeping our parent
    LEAVE = "leave"
    FAILOVER = "failover"  # attach round to the backups after a parent failed
    FOLLOW = "follow"  # attach round to the tracker's choice, keeping the current parent
    REDIRECT = "redirect"  # attach round to where a leaving parent sends us
    CHILD_GONE = "child-gone"  # we let a child go for silence: its slot is free


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
    attached_at: float | None = None
    """When it accepted us (STREAM_INFO and PATH arrived)."""
    path: tuple[bytes, ...] = ()
    stalled: tuple[float, float] | None = None
    """(seconds the parent said its playback was stalled, when it said so)."""
    delivered: bool = False
    """Whether anything it sent has been played: a parent that never delivered is unproven."""
    behind: bool = False
    """Whether it showed since it accepted us that it is behind us, catching up: it said
    its own playback is stalled, or sent a chunk we had already."""
    too_old: int = 0
    """Chunks it sent before our first audio that were older than a newcomer may start."""


@dataclass
class AttachRound:
    """Candidates tried "happy eyeballs" style: the next one when the previous fails or
    after `stagger`; the first to accept wins."""

    purpose: Purpose
    pending: list[Peer]
    stagger: float
    started: float
    next_at: float = 0.0
    dead: Peer | None = None
    """The parent that failed, or refused us, before this round."""
    trying: set[int] = field(default_factory=set)
    asked: bool = False
    """A failover asked the tracker for a place meanwhile."""
    rejoin_at: float | None = None
    """Ask the tracker again then, naming its choice (see REJOIN_AGAIN_AFTER)."""


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
        """How long a node may go without a chunk to play before it gives up."""
        self.token = token
        self.tracker_name = tracker_name
        """How error messages name the tracker (its address, say)."""
        self.verifier = verifier or StreamVerifier(stream_id)
        role = "relay" if capacity else "listener"
        self.stats = NodeStats(role, key_to_text(node_id), key_to_text(stream_id))
        span = int(config.buffer_seconds * OPUS_RATE)
        self.ring = ChunkRing(span)
        self.reorder = ReorderBuffer(span_samples=span)
        self.children = Children(stream_id, self.ring, capacity, config, self.stats)
        self.children.on_gone = self._child_gone
        self.playout = PlayoutMeter(OPUS_RATE)
        self.on_arrival: Callable[[int], None] | None = None
        """Called with each chunk's sequence number as it first arrives (for traces)."""
        self.backups: tuple[Peer, ...] = ()
        self.assigned: Peer | None = None
        """The parent the tracker last placed us under (None: not known or not current)."""
        self.current: Upstream | None = None
        self.path: tuple[bytes, ...] | None = None
        """Ours: the origin down to this node, through the current parent."""
        self.refresh_s = 180
        self.phase = Phase.RUNNING
        self._actions: deque[NodeAction] = deque()
        self._links: dict[int, Upstream] = {}
        self._dirty_links: set[int] = set()
        self._next_id = 0
        self._requests: dict[int, Purpose] = {}
        self._round: AttachRound | None = None
        self._started_at = 0.0
        self._progress_at = 0.0
        """When the playback point last advanced (or the node started)."""
        self._stalled_notice = False
        self._failovers: list[float] = []
        self._shunned: dict[bytes, float] = {}
        """Parents that stalled us or broke the protocol -> when; a failover passes over
        them for `SHUN_FOR` (they accept at once and would win every round again)."""
        self._place_retry = Backoff(rng, base=0.5, cap=10.0)
        self._round_retry = Backoff(rng, base=0.2, cap=5.0)
        self._follow_retry = Backoff(rng, base=0.5, cap=10.0)
        self._refresh_retry = Backoff(rng, base=1.0, cap=60.0)
        self._place_at: float | None = None
        self._place_dead: Peer | None = None
        self._report_dead: Peer | None = None
        """The parent to name in the next REJOIN that asks the tracker to confirm ours."""
        self._follow_failed = False
        self._reconcile_at: float | None = None
        self._problem = "the tracker did not answer"
        self._said: str | None = None
        """The last placement problem logged as a warning (a repeat is not worth one)."""
        self._live_granule: int | None = None
        """Where the origin was by the tracker's last ASSIGNED (None: it did not say); our
        first chunk may be at most the start lag behind it."""
        self._before_start = False
        """The tracker did not know the stream when we first asked: once it starts, it is
        played from its first chunk."""
        self._refresh_at: float | None = None
        self._announced_at: float | None = None
        self._drain_until: float | None = None
        self._leave_deadline: float | None = None
        self._output_started = False
        self._tell_child_gone = True
        """False once the tracker answered CHILD_GONE with UNKNOWN_MESSAGE (it is older)."""

    # -- inputs ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Ask the tracker for a parent."""
        self._started_at = self._progress_at = now
        self._ask_for_parent(None, now)

    def leave(self, now: float) -> None:
        """Graceful leave (SIGINT/SIGTERM): LEAVE, move the children, then go."""
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.LEAVING
        self.children.leaving = True
        self._cancel_round()
        if self.stats.joined_at is None:
            self._finish(0, "left before joining", now)
            return
        self._leave_deadline = now + LEAVE_TIMEOUT
        self._ask(Leave(self.stream_id, self.node_id, 0), Purpose.LEAVE)

    def tracker_answered(self, ticket: int, answer: TrackerResponse | None, now: float) -> None:
        """The outcome of an `AskTracker`: its answer, a GOODBYE refusal, or None."""
        purpose = self._requests.pop(ticket, None)
        if purpose is None or self.phase is Phase.DONE:
            return
        if purpose is Purpose.LEAVE:
            self._left(answer, now)
            return
        if purpose is Purpose.CHILD_GONE:
            self._child_gone_answered(answer)
            return
        if self.phase is not Phase.RUNNING:
            return
        if isinstance(answer, Goodbye) and answer.code in FATAL_REFUSALS:
            self._finish(1, f"tracker refused: {_why(answer)}", now)
        elif isinstance(answer, Goodbye) and answer.code == ErrorCode.STREAM_ENDED:
            self._finish(EXIT_MISSED_AUDIO, "the stream ended before this node got all of it", now)
        elif purpose is Purpose.PLACE:
            self._placed(answer, now)
        elif purpose in (Purpose.REPORT, Purpose.JOIN_AGAIN):
            self._confirmed(answer, now)
        elif purpose is Purpose.REFRESH:
            self._refreshed(answer, now)

    def link_opened(self, link: int, now: float) -> None:
        """The connection to the candidate parent is up: subscribe."""
        up = self._links.get(link)
        if up is None:
            return
        if self.reorder.next_seq is None and self._from_the_start():
            self.reorder.next_seq = 0  # it started since we asked: all of it is ours to play
        up.link = ChildLink(
            self.stream_id,
            self.node_id,
            self.reorder.next_seq,
            parent=up.peer.node,
            now=now,
            silence_timeout=self.config.silence_timeout * self._storm_factor(now),
            verifier=self.verifier,
            token=self.token,
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
            self._link_ended(up, "parent ended the stream", now)

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
            self._link_ended(up, reason, now)

    def child_closed(self, child: int, now: float) -> None:
        """A child connection is gone; a draining node may be done."""
        self.children.closed(child)
        if self.phase is Phase.DRAINING and self.children.connections == 0:
            self._done(now)

    def get_timer(self) -> float | None:
        if self.phase is Phase.DONE:
            return None  # handle_timer does nothing now: a deadline would only spin
        deadlines = [
            self._place_at,
            self._refresh_at,
            self._drain_until,
            self._leave_deadline,
            self._reconcile_at,
            self.children.get_timer(),
        ]
        round_ = self._round
        if round_ is not None:
            if round_.pending:
                deadlines.append(round_.next_at)
            if round_.purpose is Purpose.FAILOVER and not round_.asked:
                deadlines.append(round_.started + FAILOVER_ASK_AFTER)
            deadlines.append(round_.rejoin_at)
        for up in self._links.values():
            deadlines.append(up.deadline)
            if up.link is not None:
                deadlines.append(up.link.get_timer())
        if self.current is not None:
            deadlines.append(self.reorder.get_timer())
        if self._live():
            deadlines.append(self._give_up_at())
            if not self._stalled_notice:
                deadlines.append(self._progress_at + self._stall_notice())
            deadlines.append(self._stall_check_at())
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        self.children.handle_timer(now)
        for up in list(self._links.values()):
            if up.deadline is not None and now >= up.deadline:
                self._link_ended(up, "no answer in time", now)
            elif up.link is not None:
                up.link.handle_timer(now)
                self._dispatch(up, now)
        round_ = self._round
        if round_ is not None:
            if round_.pending and now >= round_.next_at:
                self._launch_next(round_, now)
            if now >= round_.started + FAILOVER_ASK_AFTER:
                self._ask_during_failover(round_, now)
            if round_.rejoin_at is not None and now >= round_.rejoin_at:
                self._rejoin_again(round_, now)
        self._request_repairs(now)
        if self._place_at is not None and now >= self._place_at:
            self._place_at = None
            self._ask_for_parent(self._place_dead, now)
        if self._reconcile_at is not None and now >= self._reconcile_at:
            self._reconcile_at = None
            self._reconcile(now)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._ask(self._refresh_request(), Purpose.REFRESH)
        if self._leave_deadline is not None and now >= self._leave_deadline:
            self._leave_deadline = None
            logger.warning("the tracker did not answer LEAVE; sending children upstream")
            self._left(None, now)
        if self._drain_until is not None and now >= self._drain_until:
            self._done(now)
        if self._live():
            self._check_progress(now)

    # -- outputs -----------------------------------------------------------------------

    def next_action(self) -> NodeAction | None:
        return self._actions.popleft() if self._actions else None

    def take_dirty_links(self) -> set[int]:
        """Parent links with bytes to send (see `take_link_output`)."""
        dirty, self._dirty_links = self._dirty_links, set()
        return dirty

    def take_link_output(self, link: int) -> bytes:
        up = self._links.get(link)
        if up is None or up.link is None:
            return b""
        return up.link.data_to_send()

    def is_attached(self, link: int) -> bool:
        """Whether the parent on this link accepted us."""
        up = self._links.get(link)
        return up is not None and up.attached_at is not None

    def refresh_stats(self, now: float) -> None:
        """Bring the time-dependent figures up to date (before they are reported)."""
        self.stats.stall_ms = self.playout.stall(now, live=self._live()) * 1000
        self.stats.gaps = self.reorder.gaps

    # -- the tracker -------------------------------------------------------------------

    def _ask(self, request: Join | Rejoin | Refresh | Leave | ChildGone, purpose: Purpose) -> None:
        ticket = self._new_id()
        self._requests[ticket] = purpose
        self._actions.append(AskTracker(ticket, request))

    def _asking(self, purpose: Purpose) -> bool:
        return purpose in self._requests.values()

    def _ask_for_parent(self, dead: Peer | None, now: float) -> None:
        """JOIN (or REJOIN naming the failed parent) to be placed; retried until placed."""
        if self._asking(Purpose.PLACE) or self.current is not None:
            return
        self._place_dead = dead
        if dead is None:
            request: Join | Rejoin = self._join_request()
        else:
            request = self._rejoin_request(dead, None)
        self._ask(request, Purpose.PLACE)

    def _placed(self, answer: TrackerResponse | None, now: float) -> None:
        if isinstance(answer, Assigned):
            self._place_retry.reset()
            self._assigned(answer, now)
            candidates = [answer.parent, *answer.backups]
            if self.current is not None:
                self._reconcile(now)
                return
            if self._round is not None:  # a failover still trying backups: these too
                self._add_candidates(self._round, candidates, now)
            else:
                self._start_round(Purpose.PLACE, candidates, now, dead=self._place_dead)
            if self._round is not None and self._place_dead is not None:
                # A place after a failure: tentative, and maybe dead (REJOIN_AGAIN_AFTER).
                self._round.rejoin_at = now + REJOIN_AGAIN_AFTER
            return
        self._problem = _why(answer)
        retrying = "retrying"
        if isinstance(answer, Goodbye) and answer.code == ErrorCode.UNKNOWN_STREAM:
            self._before_start = self.stats.joined_at is None
            self._problem = f"the tracker does not know stream {short_id(self.stream_id)}"
            retrying = "it has not started yet, or --stream is wrong; waiting for it"
        if self._problem != self._said:
            self._said = self._problem
            logger.warning("%s: %s", self._problem, retrying)
        self._place_at = now + self._place_retry.next_delay()

    def _confirmed(self, answer: TrackerResponse | None, now: float) -> None:
        """The tracker's answer to "here is where I am": follow it."""
        if isinstance(answer, Assigned):
            self._assigned(answer, now)
            self._report_dead = None
            self._follow_failed = False
            self._reconcile(now)
            return
        if isinstance(answer, Goodbye) and answer.code == ErrorCode.UNKNOWN_PEER:
            self._ask(self._join_request(), Purpose.JOIN_AGAIN)  # it forgot us: join again
            return
        logger.info("the tracker did not confirm our parent (%s); asking again later", _why(answer))
        self._reconcile_at = now + self._follow_retry.next_delay()

    def _assigned(self, answer: Assigned, now: float) -> None:
        self.assigned = answer.parent
        self.backups = answer.backups
        self.stats.backups = [key_to_text(peer.node) for peer in answer.backups]
        self.refresh_s = answer.refresh_s
        self._live_granule = answer.live_granule  # the latest word, nil included
        if self.stats.joined_at is None:
            self.stats.joined_at = now
            self._schedule_refresh(now)

    def _reconcile(self, now: float) -> None:
        """Converge on the tracker's answer: move to the parent it assigned (make before
        break) or, if that parent refused us, report it and ask again, with backoff."""
        current = self.current
        if self.phase is not Phase.RUNNING or current is None or self._round is not None:
            return
        if self._asking(Purpose.REPORT) or self._asking(Purpose.JOIN_AGAIN):
            return
        assigned = self.assigned
        if assigned is not None and assigned.node == current.peer.node:
            self._follow_retry.reset()
            return
        if assigned is not None and not self._follow_failed:
            logger.info("moving to %s, where the tracker placed us", short_id(assigned.node))
            self._start_round(Purpose.FOLLOW, [assigned], now)
            return
        dead = self._report_dead or assigned
        if dead is None:  # nothing to report: let the tracker say where it has us
            self._ask(self._join_request(), Purpose.JOIN_AGAIN)
        else:
            self._ask(self._rejoin_request(dead, current.peer.node), Purpose.REPORT)

    def _schedule_refresh(self, now: float) -> None:
        self._refresh_at = now + self.refresh_s * self.rng.uniform(0.8, 1.0)

    def _refreshed(self, answer: TrackerResponse | None, now: float) -> None:
        """Soft state: UNKNOWN_PEER means the tracker lost us (it restarted): a few quick
        retries give our parent's own REFRESH time to arrive, then we JOIN again. With a
        token, at once: a tracker that requires them never takes us back from a REFRESH."""
        retry = self._refresh_retry
        if isinstance(answer, Assigned):  # it has us elsewhere: move there
            retry.reset()
            self._schedule_refresh(now)
            self._confirmed(answer, now)
        elif isinstance(answer, Goodbye):
            retried = retry.attempt >= UNKNOWN_RETRIES or self.token is not None
            if answer.code == ErrorCode.UNKNOWN_PEER and retried:
                self._ask(self._join_request(), Purpose.JOIN_AGAIN)
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
            logger.warning("the tracker did not answer LEAVE (%s); sending children upstream",
                           _why(answer))  # fmt: skip
        if self.current is not None:
            moves[b""] = (self.current.peer, self.backups)
        self.children.redirect_all(moves)
        self._drain(now, self.config.leave_grace)

    def _child_gone(self, child: bytes) -> None:
        """Tell the tracker we let `child` go for silence: a dead leaf has no child of its
        own to report it, so its slot would look taken for the tracker's peer_ttl. Not
        while leaving or draining: the tracker hears of our children from LEAVE, or lets
        them expire after the stream's end."""
        if self._tell_child_gone and self.phase is Phase.RUNNING:
            self._ask(ChildGone(self.stream_id, self.node_id, child, 0), Purpose.CHILD_GONE)

    def _child_gone_answered(self, answer: TrackerResponse | None) -> None:
        """Advice only: a refusal or no answer changes nothing here (the slot is free
        anyway, and the child's soft state runs out at the tracker in the end)."""
        if isinstance(answer, Goodbye) and answer.code == ErrorCode.UNKNOWN_MESSAGE:
            logger.info("the tracker does not know CHILD_GONE; not sending it any more")
            self._tell_child_gone = False
        elif not isinstance(answer, Ack):
            logger.info("CHILD_GONE not taken: %s", _why(answer))

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
        self,
        purpose: Purpose,
        candidates: list[Peer],
        now: float,
        *,
        dead: Peer | None = None,
        trying: set[int] | None = None,
    ) -> None:
        """Attach to the first candidate that accepts us ("happy eyeballs": the next
        candidate is tried when the previous one fails or after a stagger, so a dead one
        costs a fraction of a second). A failover tries all backups at once: they are
        equals, and time is audio; the tracker is asked in parallel soon after (see
        `_ask_during_failover`). `trying`: links already on their way (a move)."""
        stagger = 0.0 if purpose is Purpose.FAILOVER else ATTACH_STAGGER
        self._round = AttachRound(purpose, [], stagger, now, dead=dead, trying=trying or set())
        self._add_candidates(self._round, candidates, now)
        if not self._round.trying:
            self._round_failed(self._round, now)

    def _add_candidates(self, round_: AttachRound, candidates: list[Peer], now: float) -> None:
        tried = {up.peer.node for up in self._links.values()} | {p.node for p in round_.pending}
        for peer in candidates:
            if peer.node != self.node_id and peer.address and peer.node not in tried:
                round_.pending.append(peer)
                tried.add(peer.node)
        if round_.pending and (round_.stagger == 0 or not round_.trying):
            self._launch_next(round_, now)

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

    def _moving_to(self) -> dict[bytes, int]:
        """A move to where the tracker placed us that is on its way: node -> link. When
        the parent fails meanwhile, that link is the best candidate there is."""
        round_ = self._round
        if round_ is None or round_.purpose not in (Purpose.FOLLOW, Purpose.REDIRECT):
            return {}
        moving = {self._links[link].peer.node: link for link in round_.trying}
        round_.trying.clear()  # handed over, not cancelled
        return moving

    def _cancel_round(self) -> None:
        round_ = self._round
        if round_ is None:
            return
        self._round = None
        for link in list(round_.trying):
            self._close(self._links[link], ErrorCode.NO_ERROR, "not needed any more")

    def _attached(self, up: Upstream, now: float) -> None:
        """A candidate accepted us (STREAM_INFO and PATH arrived): it wins its round."""
        round_ = self._round
        up.deadline = None
        up.attached_at = now
        if round_ is None or up.id not in round_.trying:
            self._close(up, ErrorCode.NO_ERROR, "not wanted any more")
            return
        round_.trying.discard(up.id)
        self._cancel_round()
        self._round_retry.reset()
        previous = self.current
        self._became_current(up, now)
        if previous is not None:
            self._close(previous, ErrorCode.NO_ERROR, "moved")
        at_assigned = self.assigned is not None and self.assigned.node == up.peer.node
        if round_.purpose in (Purpose.FOLLOW, Purpose.REDIRECT) or (
            at_assigned and round_.dead is not None
        ):
            # Where the tracker placed us while we streamed from elsewhere (REDIRECT:
            # when our parent left): say we are there, so it is no longer a guess.
            self.assigned = up.peer
            self._ask(self._refresh_request(), Purpose.REFRESH)
        elif not at_assigned:
            # Not where the tracker put us (a backup, or its choice refused): ask it to
            # confirm this parent or name another.
            self._report_dead = round_.dead or self.assigned
            self._follow_failed = False
        self._reconcile(now)

    def _attach_failed(self, up: Upstream, code: int | None, now: float) -> None:
        round_ = self._round
        if round_ is None or up.id not in round_.trying:
            return
        round_.trying.discard(up.id)
        assigned = self.assigned
        if round_.rejoin_at is not None and assigned is not None and assigned.node == up.peer.node:
            if self._place_dead is not None and self._place_dead.node == assigned.node:
                # The tracker named the very parent we reported: it has no other place for
                # us now, and asking at once would loop. The round's backoff asks again.
                round_.rejoin_at = None
            else:
                self._rejoin_again(round_, now)  # the tracker's choice refused us: no need to wait
        if code == ErrorCode.NO_CAPACITY:
            self._ask_during_failover(round_, now)
        if round_.pending:
            self._launch_next(round_, now)
        elif not round_.trying:
            self._round_failed(round_, now)

    def _ask_during_failover(self, round_: AttachRound, now: float) -> None:
        """Backups go stale (full, or dead too): once one refuses, or soon anyway, the
        tracker is asked for a place while the others are still tried."""
        if round_.purpose is Purpose.FAILOVER and not round_.asked:
            round_.asked = True
            self._ask_for_parent(round_.dead, now)

    def _rejoin_again(self, round_: AttachRound, now: float) -> None:
        """The tracker's choice after a failure has not taken us: name it in a REJOIN (the
        tracker probes it and places us elsewhere) while the round goes on."""
        round_.rejoin_at = None
        if self._round is round_ and self.assigned is not None:
            self._ask_for_parent(self.assigned, now)

    def _round_failed(self, round_: AttachRound, now: float) -> None:
        """Nobody accepted. With a parent still (a move): keep it; if the tracker's choice
        refused us, report that and ask again. Without one: ask the tracker, naming the
        full or failed parent so it places us elsewhere."""
        self._round = None
        if self.current is not None:
            if round_.purpose is Purpose.FOLLOW:
                self._follow_failed = True
                self._report_dead = self.assigned
                self._reconcile_at = now + self._follow_retry.next_delay()
            return
        delay = self._round_retry.next_delay()
        # Name the latest parent that failed us: the tracker's choice, else the old one (a
        # full backup is not our parent in the tracker's view: naming it changes nothing).
        dead = self.assigned or round_.dead
        if self._asking(Purpose.PLACE):
            return  # a failover asked already: its answer starts the next round
        if self._round_retry.attempt > 1:  # the first round asks the tracker at once
            self._place_dead = dead
            self._place_at = now + delay
        else:
            self._ask_for_parent(dead, now)

    def _became_current(self, up: Upstream, now: float) -> None:
        previous = self.current
        self.current = up
        self.stats.parent = key_to_text(up.peer.node)
        if previous is not None or self.stats.failovers:
            self.stats.parent_switches += 1
        self._set_path(up.path, now)
        self.reorder.retry_gaps_now(now)
        logger.info("receiving from %s at %s", short_id(up.peer.node), up.peer.address)

    def _set_path(self, parent_path: tuple[bytes, ...], now: float) -> None:
        self.path = (*parent_path, self.node_id)
        self.stats.path = [key_to_text(node) for node in self.path]
        self.stats.depth = len(parent_path)
        self.children.set_path(self.path, now)

    # -- the link ----------------------------------------------------------------------

    def _dispatch(self, up: Upstream, now: float) -> None:
        """Act on the link's events."""
        assert up.link is not None
        current = up is self.current
        while (event := up.link.next_event()) is not None:
            if isinstance(event, ChunkReceived):
                if current:
                    self._on_chunk(up, event.item, now)
            elif isinstance(event, InfoReceived):
                self.children.set_info(event.info, now)
                if not self._output_started:
                    self._output_started = True
                    self._actions.append(StartOutput(event.info.head))
            elif isinstance(event, PathReceived):
                up.path = event.nodes
                if current:
                    self._set_path(event.nodes, now)
                elif up.attached_at is None:
                    self._attached(up, now)
                    current = up is self.current
            elif isinstance(event, HeartbeatReceived):
                up.stalled = (event.stalled_ms / 1000, now)
                up.behind = up.behind or event.stalled_ms > 0
                if current and event.latest_seq is not None:
                    self.reorder.note_latest(event.latest_seq, now)
            elif isinstance(event, RepairUnavailable):
                # Asked again after the repair timeout: the parent may have it by then. But
                # a start the parent no longer holds was never ours to miss: start later.
                if current and self.reorder.skip_start(event.seqs):
                    self._play_ready(now)
            elif isinstance(event, Redirected):
                if current:
                    self._redirected(event, now)
            elif isinstance(event, ParentSilent):
                self._link_ended(up, "parent went silent", now, code=ErrorCode.PARENT_TIMEOUT)
                return
            elif isinstance(event, LinkClosed):
                self._link_ended(up, event.reason or f"code {event.code}", now, refused=event.code)
                return
        if up.link.state is not LinkState.CLOSED and up.link.buffered:
            self._dirty_links.add(up.id)  # not on every chunk: each wakes a writer task

    def _redirected(self, event: Redirected, now: float) -> None:
        """Our parent is leaving: move where it says, make before break."""
        self._cancel_round()
        self.backups = event.backups or self.backups
        self._start_round(Purpose.REDIRECT, [event.parent, *event.backups], now)

    def _protocol_error(self, up: Upstream, exc: ProtocolError, now: float) -> None:
        logger.warning("parent %s broke the protocol: %s", short_id(up.peer.node), exc)
        assert up.link is not None
        up.link.goodbye(exc.code, str(exc))
        self._link_ended(up, str(exc), now, bad=True)

    def _link_ended(
        self,
        up: Upstream,
        reason: str,
        now: float,
        *,
        code: int | None = None,
        refused: int | None = None,
        bad: bool = False,
    ) -> None:
        """A link is over (refused, failed, closed): drop it and decide what follows.

        `code` is the GOODBYE we send (if we end it), `refused` the one the parent sent."""
        if self._links.pop(up.id, None) is None:
            return
        data = b""
        close_code: int = ErrorCode.NO_ERROR
        if up.link is not None:
            if code is not None:
                up.link.goodbye(code, reason)
            close_code = up.link.goodbye_code or close_code
            data = up.link.data_to_send()
        self._actions.append(CloseLink(up.id, close_code, reason[:100], data))
        if up.attached_at is None:
            logger.info("could not attach: parent %s at %s: %s", short_id(up.peer.node),
                        up.peer.address, reason)  # fmt: skip
            self._attach_failed(up, refused, now)
            return
        if up is not self.current:
            return
        self.current = None
        if self.phase is not Phase.RUNNING:
            return  # leaving or done: the link closing is ours
        logger.warning("parent %s failed (%s); switching to a backup", short_id(up.peer.node),
                       reason)  # fmt: skip
        self.stats.failovers += 1
        self.stats.bad_peers += bad
        self._failovers.append(now)
        if bad or code == ErrorCode.PARENT_STALLED:
            self._shunned[up.peer.node] = now
        moving = self._moving_to()
        self._cancel_round()
        if self.assigned is not None and self.assigned.node not in moving:
            self.assigned = None
        self._reconcile_at = None
        self._shunned = {node: t for node, t in self._shunned.items() if now - t < SHUN_FOR}
        candidates = [
            peer
            for peer in self.backups
            if peer.node != up.peer.node and peer.node not in self._shunned
        ]
        if refused == ErrorCode.CHILD_TIMEOUT:
            # It let us go because it heard nothing from us (we were stopped or starved):
            # it is alive, and the first place to try again.
            candidates.insert(0, up.peer)
        self._start_round(
            Purpose.FAILOVER, candidates, now, dead=up.peer, trying=set(moving.values())
        )

    def _close(self, up: Upstream, code: int, reason: str) -> None:
        """Close a link ourselves (GOODBYE first if it got that far)."""
        if self._links.pop(up.id, None) is None:
            return
        data = b""
        if up.link is not None:
            up.link.goodbye(code, reason)
            data = up.link.data_to_send()
        self._actions.append(CloseLink(up.id, code, reason[:100], data))

    def _storm_factor(self, now: float) -> int:
        """1, doubled for each failover in the last STORM_WINDOW seconds (up to 8): on a
        starved machine parents look silent when they are not, and quick failovers would
        feed a storm of handshakes and backlogs."""
        self._failovers = [t for t in self._failovers if now - t < STORM_WINDOW]
        return 1 << min(len(self._failovers), 3)

    # -- progress ----------------------------------------------------------------------

    def _live(self) -> bool:
        return self.phase is Phase.RUNNING and not self.stats.ended

    def _stall_notice(self) -> float:
        """How long without progress before we tell our children we are stalled."""
        return 2 * self.config.heartbeat_interval

    def _give_up_at(self) -> float:
        return self._progress_at + self.join_timeout

    def _stall_limits(self, up: Upstream) -> tuple[float, float]:
        """When the current parent fails for a stall: (if it is not stalled itself, at all)."""
        assert up.attached_at is not None
        factor = 1 << min(len(self._failovers), 3)
        since = max(self._progress_at, up.attached_at)
        stall = since + self.config.stall_timeout * factor
        if not up.delivered:
            # Before our first audio a failover costs nobody a backlog (we subscribe at
            # the live edge), and hostile parents that accept and send nothing must cost
            # a newcomer 1 s each, not 1, 2, 4 and 8 s.
            first = factor if self.stats.first_seq is not None else 1
            return since + self.config.first_chunk_timeout * first, stall
        return stall, stall + self.config.stall_grace * factor

    def _stall_check_at(self) -> float | None:
        up = self.current
        if up is None or up.attached_at is None:
            return None
        first, last = self._stall_limits(up)
        if not up.delivered:
            return last if up.behind else first
        if up.stalled is None or not self._parent_stalled_too(up, max(first, up.stalled[1])):
            return first  # a parent that does not claim a stall as long as ours: no delay
        # While the parent says it is stalled too, look again when that report goes stale.
        return max(first, min(last, up.stalled[1] + 3 * self.config.heartbeat_interval))

    def _parent_stalled_too(self, up: Upstream, now: float) -> bool:
        """Whether the parent recently said its own playback is stalled about as long as
        ours: then what we lack is missing above it too. A parent that never delivered:
        whether it showed it is behind us (it may have joined or failed over just before
        us; once it plays again it catches up, with nothing new for us for a while)."""
        if not up.delivered:
            return up.behind
        if up.stalled is None:
            return False
        seconds, said_at = up.stalled
        if now >= said_at + 3 * self.config.heartbeat_interval:
            # It stopped saying so (it sends chunks, or nothing at all). The same sum as
            # `_stall_check_at`'s, so the check it schedules finds the report stale.
            return False
        return seconds + (now - said_at) >= (now - self._progress_at) - STALL_SLACK

    def _check_progress(self, now: float) -> None:
        """Progress, not presence: a live stream moves the playback point; a parent that
        does not, and is not stalled itself, has failed; a node cut off too long gives up."""
        if now >= self._give_up_at():
            self._cut_off(now)
            return
        if not self._stalled_notice and now >= self._progress_at + self._stall_notice():
            self._stalled_notice = True
            self.children.set_stalled_since(self._progress_at)
        up = self.current
        if up is None or up.attached_at is None:
            return
        first, last = self._stall_limits(up)
        if now >= last or (now >= first and not self._parent_stalled_too(up, now)):
            seconds = now - max(self._progress_at, up.attached_at)
            since = "" if up.delivered else " since it accepted us"
            if up.too_old:
                since += f" (it sent {up.too_old} chunks from the past)"
            self._link_ended(
                up,
                f"nothing new to play for {seconds:.1f} s{since}",
                now,
                code=ErrorCode.PARENT_STALLED,
            )

    def _cut_off(self, now: float) -> None:
        seconds = self.join_timeout
        if self.stats.first_seq is None:
            self._finish(
                1,
                f"no audio after {seconds:.0f} s ({self._problem}); is the tracker at "
                f"{self.tracker_name} up and the stream live?",
                now,
            )
        else:
            self._finish(
                EXIT_MISSED_AUDIO,
                f"cut off from the stream for {seconds:.0f} s; giving up (audio was missed)",
                now,
            )

    # -- the data path -----------------------------------------------------------------

    def _on_chunk(self, up: Upstream, item: VerifiedChunk, now: float) -> None:
        if self.stats.first_seq is None and self._too_old_to_start(item):
            # Validly signed, but the past: a relay replaying what it kept would start us
            # far behind the live edge, and once it stops no ring holds what follows.
            up.too_old += 1
            self.stats.too_old += 1
            return
        seen = self.reorder.highest_seen
        if not self.reorder.add(item, now):
            self.stats.duplicates += 1
            up.behind = True
            return
        if item.chunk.announces and (seen is None or item.seq > seen):
            self._announced(now)  # only at the live edge: an old chunk replayed is no news
        self.stats.chunks_in += 1
        self.stats.bytes_in += len(item.raw)
        if self.on_arrival is not None:
            self.on_arrival(item.seq)
        self.ring.add(item)
        self.children.forward(item, now)
        self._play_ready(now)

    def _announced(self, now: float) -> None:
        """The origin asks every node to REFRESH: the tracker lost its view of the tree."""
        if self.stats.joined_at is None or self.phase is not Phase.RUNNING:
            return  # not in the tracker's tree (yet, or any more)
        if self._asking(Purpose.REFRESH):
            return  # one is on its way (retried until the tracker answers)
        last = self._announced_at
        if last is not None and now - last < ANNOUNCE_QUIET:
            return
        self._announced_at = now
        level = max(self.stats.depth or 1, 1) - 1
        at = now + ANNOUNCE_STEP * (level + self.rng.random())
        if self._refresh_at is None or at < self._refresh_at:
            self._refresh_at = at

    def _from_the_start(self) -> bool:
        """Whether we play the stream from its first chunk: the tracker did not know it
        when we first asked, and by its word the rings still hold the beginning (after a
        tracker restart mid-stream they do not: we start near the live edge then)."""
        live = self._live_granule
        held = self.config.buffer_seconds * OPUS_RATE
        return self._before_start and (live is None or live <= held)

    def _too_old_to_start(self, item: VerifiedChunk) -> bool:
        """Before our first audio: whether `item` is further behind the origin's live
        granule than the start lag (the check costs nothing once we play)."""
        live = self._live_granule
        if live is None or self._from_the_start():
            return False
        return item.chunk.granule < live - int(self.config.start_lag * OPUS_RATE)

    def _play_ready(self, now: float) -> None:
        ready = self.reorder.pop_ready()
        if not ready:
            return
        self._progress_at = now
        if self.current is not None:
            self.current.delivered = True
        if self._stalled_notice:
            self._stalled_notice = False
            self.children.set_stalled_since(None)
        for item in ready:
            chunk = item.chunk
            if self.stats.first_seq is None:
                self.stats.first_seq = chunk.seq
                self.stats.first_audio_at = now
                self.stats.join_to_audio_ms = (now - self._started_at) * 1000
            self.stats.last_seq = chunk.seq
            self.stats.packets_played += len(chunk.packets)
            self.playout.played(chunk.granule, now)
            self._actions.append(Play(item))
            if chunk.is_end:
                self.stats.ended = True
                self._drain(now, self.config.buffer_seconds)
                break
        self.stats.lost = self.reorder.lost_count

    def _request_repairs(self, now: float) -> None:
        up = self.current
        if up is None or up.link is None:
            return
        seqs = self.reorder.due_repairs(now)
        if seqs:
            self.stats.repairs_requested += len(seqs)
            up.link.request_repair(seqs)
            self._dirty_links.add(up.id)

    # -- ending ------------------------------------------------------------------------

    def _drain(self, now: float, grace: float) -> None:
        """Keep serving the children until they go (at most `grace`), then finish."""
        if self.phase in (Phase.DRAINING, Phase.DONE):
            return
        self.phase = Phase.DRAINING
        self._cancel_round()
        self._refresh_at = self._place_at = self._reconcile_at = None
        self.refresh_stats(now)
        if self.children.connections == 0:
            self._done(now)
        else:
            self._drain_until = now + grace

    def _done(self, now: float) -> None:
        if self.stats.ended:
            lost = self.stats.lost
            if lost:
                self._finish(EXIT_MISSED_AUDIO, f"the stream ended; {lost} chunks were lost", now)
            else:
                self._finish(0, "the stream ended", now)
        else:
            self._finish(0, "left", now)

    def _finish(self, status: int, message: str, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        self._drain_until = None
        self.refresh_stats(now)
        ended = self.stats.ended
        for up in list(self._links.values()):
            self._close(
                up,
                ErrorCode.STREAM_ENDED if ended else ErrorCode.GOING_AWAY,
                "stream ended" if ended else "leaving",
            )
        self._actions.append(Finished(status, message))

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
