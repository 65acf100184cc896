"""One listener at the flow level: the node core's rules, at the granularity of links.

`FlowNode` makes the decisions of `meshd.node.core.NodeCore` and the admission of
`meshd.node.children.Children` with the same timers and the same order of events, but
over modelled links instead of bytes (docs/spec.md §6.3, §6.7, §7):

- JOIN; the answer's parent and backups are tried one after another, 0.25 s apart, the
  first to accept wins (a candidate that never answers costs the attach timeout, 2 s).
- A parent that dies is noticed after the silence timeout (0.6 s, lengthened after recent
  failovers); one that leaves closes its links. The child then tries every backup at
  once and, after 0.25 s or a NO_CAPACITY refusal, also sends REJOIN naming the dead one;
  a parent the answer names that has not taken it 0.5 s later (or refused) is named in
  another REJOIN, and a round that fails names the tracker's choice, else the dead one.
  Once on a parent the tracker did not name, it sends REJOIN with `attached`, and it
  moves make-before-break wherever the tracker's answer says.
- A node whose parent plays nothing new waits while the parent says it is stalled too,
  and leaves it after stall timeout + stall grace (2 + 4 s) whatever it says; a parent
  that never delivered is left after the first-chunk timeout (1 s) unless it is dark
  too, and after the stall timeout whatever.
- REFRESH every refresh_s (0.8..1 x); an ASSIGNED answer is followed. A chunk with
  ANNOUNCE (the tracker lost the tree) brings it forward to (depth - 1 + U[0, 1)) x 0.5 s.
- A graceful leave sends LEAVE, REDIRECTs its children where MOVED says (or to its own
  parent), keeps feeding them until they moved (at most 5 s), then goes.
- A parent lets a dead child go after the child timeout and tells the tracker
  (CHILD_GONE), the origin too.
- A parent admits at most `capacity` children, refuses its own ancestors and, while it
  has no path yet, or while a dead child still holds a slot, holds a SUBSCRIBE as
  `Children` does. Leaves (capacity 0) never get children.

Simplifications: a link that closes frees its slot at once (a dead child's only after
the child timeout, as for real); the stale path a detached node would advertise is not
kept, so only live ancestry refuses a SUBSCRIBE.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshd.node.children import INFO_WAIT
from meshd.node.core import (
    ANNOUNCE_QUIET,
    ANNOUNCE_STEP,
    ATTACH_STAGGER,
    FAILOVER_ASK_AFTER,
    LEAVE_TIMEOUT,
    REJOIN_AGAIN_AFTER,
    SHUN_FOR,
    STALL_SLACK,
    STORM_WINDOW,
    UNKNOWN_RETRIES,
    Phase,
    Purpose,
)
from meshd.sim.flow.tracker import retransmissions
from meshd.sim.hosts import wall_ms
from protocol import (
    Assigned,
    ChildGone,
    ErrorCode,
    Goodbye,
    Join,
    Leave,
    Moved,
    Peer,
    Refresh,
    Rejoin,
)
from protocol.backoff import Backoff
from protocol.limits import MAX_PATH
from protocol.messages import TrackerRequest, TrackerResponse

if TYPE_CHECKING:
    from meshd.sim.flow.room import FlowRoom

# The backoffs NodeCore keeps: (base, cap) in seconds.
RETRIES = {
    "place": (0.5, 10.0),
    "round": (0.2, 5.0),
    "follow": (0.5, 10.0),
    "refresh": (1.0, 60.0),
}


class Round:
    """Candidate parents tried in turn (all at once for a failover)."""

    __slots__ = ("asked", "dead", "next_at", "pending", "purpose", "rejoin_at", "stagger", "trying")

    def __init__(self, purpose: Purpose, stagger: float, dead: Peer | None) -> None:
        self.purpose = purpose
        self.stagger = stagger
        self.dead = dead
        self.pending: list[Peer] = []
        self.trying: set[int] = set()
        self.next_at = 0.0
        self.asked = False
        self.rejoin_at: float | None = None


class FlowNode:
    __slots__ = (
        "_next_id",
        "_retries",
        "alive",
        "announced_at",
        "assigned",
        "attempts",
        "backups",
        "capacity",
        "children",
        "dark_since",
        "delay",
        "delivered",
        "failovers",
        "first_audio_at",
        "follow_failed",
        "gone_at",
        "has_path",
        "id",
        "initial",
        "is_origin",
        "joined",
        "link_epoch",
        "lit",
        "loss",
        "lost",
        "lost_before_shock",
        "peer",
        "phase",
        "place_dead",
        "progress_at",
        "recovered_at",
        "refresh_at",
        "refresh_s",
        "report_dead",
        "requests",
        "reserved",
        "room",
        "round",
        "shunned",
        "stall",
        "started_at",
        "timers",
        "up",
        "up_at",
        "up_silence",
        "waiting",
    )

    def __init__(
        self,
        room: FlowRoom,
        node_id: bytes,
        address: str,
        *,
        capacity: int,
        delay: float,
        loss: float,
        initial: bool = False,
        is_origin: bool = False,
    ) -> None:
        self.room = room
        self.id = node_id
        self.peer = Peer(node_id, address if capacity else "")
        self.capacity = capacity
        self.delay = delay
        self.loss = loss
        self.initial = initial
        """Part of the room when the scenario starts: its refreshes are spread evenly."""
        self.is_origin = is_origin
        self.alive = True
        self.phase = Phase.RUNNING
        # Links. `link_epoch` changes with every change of parent, so that a timer set
        # for an old parent does nothing.
        self.up: FlowNode | None = None
        self.up_at = 0.0
        self.up_silence = 0.0
        self.link_epoch = 0
        self.children: list[FlowNode] = []
        self.reserved = 0
        """Accepted children whose STREAM_INFO is still on its way."""
        self.waiting: list[tuple[FlowNode, int]] = []
        """SUBSCRIBEs held until we have a path (child, attempt id)."""
        self.has_path = is_origin
        self.gone_at = math.inf
        # Media (see meshd.sim.flow.media).
        self.lit = is_origin
        self.started_at = 0.0
        self.progress_at = 0.0
        self.first_audio_at: float | None = None
        self.dark_since: float | None = None
        self.delivered = False
        """Whether the current parent lit us (NodeCore's `Upstream.delivered`)."""
        self.stall = 0.0
        self.lost = 0
        self.lost_before_shock: int | None = None
        """Set for the survivors of a shock: chunks lost before it."""
        self.recovered_at: float | None = None
        # Decisions, named as in NodeCore.
        self.assigned: Peer | None = None
        self.backups: tuple[Peer, ...] = ()
        self.refresh_s = 180
        self.refresh_at = math.inf
        self.announced_at = -math.inf
        self.joined = False
        self.round: Round | None = None
        self.attempts: dict[int, Peer] = {}
        """Connections to candidate parents, by attempt id."""
        self.requests: dict[int, Purpose] = {}
        self.place_dead: Peer | None = None
        self.report_dead: Peer | None = None
        self.follow_failed = False
        self.failovers: list[float] = []
        self.shunned: dict[bytes, float] = {}
        """Parents that stalled us -> when (as `NodeCore._shunned`)."""
        self.timers = [0, 0, 0, 0]
        """Generations of the place, reconcile, refresh and drain timers: re-arming or
        clearing one bumps its generation, and a stale wake-up does nothing."""
        self._retries: dict[str, Backoff] | None = None
        self._next_id = 0

    # -- driving ---------------------------------------------------------------------------

    def answers_probe(self) -> bool:
        return self.alive and self.capacity > 0

    def start(self, now: float) -> None:
        self.started_at = self.progress_at = now
        self._ask_for_parent(None, now)

    def crash(self, now: float) -> None:
        """The node vanishes: no GOODBYE, no LEAVE. Children notice the silence; the
        parent lets its slot go after the child timeout."""
        if not self.alive:
            return
        room = self.room
        room.media.departed(self, now)
        self.alive = False
        self.phase = Phase.DONE
        self.gone_at = now
        for child in self.children:
            if child.alive and child.up is self:
                room.media.darken(child, now)
                notice = now + self.delay + child.delay + child.up_silence
                room.at(notice, functools.partial(child.parent_silent, self, child.link_epoch))
        parent = self.up
        if parent is not None:
            room.at(now + room.config.child_timeout, functools.partial(parent.child_silent, self))

    def leave(self, now: float) -> None:
        """Graceful leave (Ctrl-C): LEAVE, redirect the children, then go."""
        if self.phase is not Phase.RUNNING or not self.alive:
            return
        self.phase = Phase.LEAVING
        self._cancel_round()
        if not self.joined:
            self._finish(now)
            return
        self.room.at(now + LEAVE_TIMEOUT, functools.partial(self._left, None))
        self._ask(Leave(self.room.stream_id, self.id, wall_ms(now)), Purpose.LEAVE)

    # -- the parent's side -------------------------------------------------------------------

    def subscribe(self, child: FlowNode, attempt: int, last_try: bool = False) -> None:
        """A SUBSCRIBE arrives (as `Children._admit`)."""
        if not self.alive:
            return  # a dead host answers nothing: the child's attach timeout fires
        room = self.room
        now = room.now
        full = len(self.children) + self.reserved >= self.capacity
        if not last_try and self.phase is Phase.RUNNING:
            hold_until = None
            if not self.has_path:
                self.waiting.append((child, attempt))
                room.at(now + INFO_WAIT, functools.partial(self._info_wait_over, child, attempt))
                return
            hold_until = self._silent_child_deadline(now) if full else None
            if hold_until is not None:
                room.at(hold_until, functools.partial(self.subscribe, child, attempt, True))
                return
        code: int | None = None
        if self.phase is not Phase.RUNNING:
            code = ErrorCode.GOING_AWAY
        elif not self.has_path:
            code = ErrorCode.NOT_AVAILABLE
        else:
            depth = self.ancestry_depth(child)
            if depth is None:
                code = ErrorCode.BAD_PATH
            elif depth >= MAX_PATH - 1 or full:
                code = ErrorCode.NO_CAPACITY
                if self.is_origin and full:
                    room.origin_full()
        delay = self.delay + child.delay
        back = now + delay + retransmissions(room.rng, self.loss + child.loss, 2 * delay)
        if code is None:
            self.reserved += 1
            room.at(back, functools.partial(child.accepted, self, attempt))
        else:
            room.at(back, functools.partial(child.refused, attempt, code))

    def _info_wait_over(self, child: FlowNode, attempt: int) -> None:
        if (child, attempt) in self.waiting:  # else decided when our path came
            self.waiting.remove((child, attempt))
            self.subscribe(child, attempt, last_try=True)

    def _silent_child_deadline(self, now: float) -> float | None:
        """When the first child we no longer hear from is let go (None: none is silent)."""
        quiet = now - 2 * self.room.config.heartbeat_interval
        gone = [c.gone_at for c in self.children if c.gone_at < quiet]
        return min(gone) + self.room.config.child_timeout if gone else None

    def ancestry_depth(self, other: FlowNode) -> int | None:
        """Our depth along live links (None: `other` is on our path, a cycle)."""
        depth = 0
        node: FlowNode | None = self
        while node is not None:
            if node is other:
                return None
            node = node.up
            depth += 1
        return depth - 1

    def drop_child(self, child: FlowNode) -> None:
        """A child's link is gone (it moved, left, or timed out): its slot is free."""
        if child in self.children:
            self.children.remove(child)
        if self.phase is Phase.DRAINING and not self.children:
            self._finish(self.room.now)

    def child_silent(self, child: FlowNode) -> None:
        """A dead child is let go after the child timeout, and the tracker is told
        (CHILD_GONE), as `NodeCore` and the origin do."""
        ours = child in self.children
        self.drop_child(child)
        if ours and self.alive and self.phase is Phase.RUNNING:
            gone = ChildGone(self.room.stream_id, self.id, child.id, wall_ms(self.room.now))
            self._ask(gone, Purpose.CHILD_GONE)

    def release(self) -> None:
        """An accepted child that no longer wanted us closed the link."""
        self.reserved -= 1

    # -- the child's side: links -------------------------------------------------------------

    def accepted(self, parent: FlowNode, attempt: int) -> None:
        """STREAM_INFO and PATH arrived from a candidate (as `NodeCore._attached`)."""
        room = self.room
        now = room.now
        if not self.alive:
            room.at(now + room.config.child_timeout, parent.release)
            return
        if self.attempts.pop(attempt, None) is None:
            room.at(now + self.delay + parent.delay, parent.release)
            return  # given up on already (timed out, or the round is over)
        if parent.ancestry_depth(self) is None:
            # Its PATH contains us: a cycle formed by concurrent moves (§6.5).
            room.at(now + self.delay + parent.delay, parent.release)
            self._attach_failed(attempt, parent.peer, ErrorCode.BAD_PATH, now)
            return
        round_ = self.round
        if round_ is None or attempt not in round_.trying:
            room.at(now + self.delay + parent.delay, parent.release)
            return
        round_.trying.discard(attempt)
        self._cancel_round()
        self._reset("round")
        previous = self.up
        self._became_current(parent, now)
        if previous is not None:
            previous.drop_child(self)
        at_assigned = self.assigned is not None and self.assigned.node == parent.id
        if round_.purpose in (Purpose.FOLLOW, Purpose.REDIRECT) or (
            at_assigned and round_.dead is not None
        ):
            self.assigned = parent.peer
            self._ask(self._refresh_request(now), Purpose.REFRESH)
        elif not at_assigned:
            self.report_dead = round_.dead or self.assigned
            self.follow_failed = False
        self._reconcile(now)

    def refused(self, attempt: int, code: int) -> None:
        peer = self.attempts.pop(attempt, None) if self.alive else None
        if peer is not None:
            self._attach_failed(attempt, peer, code, self.room.now)

    def _attempt_timeout(self, attempt: int) -> None:
        peer = self.attempts.pop(attempt, None) if self.alive else None
        if peer is not None:
            self._attach_failed(attempt, peer, None, self.room.now)

    def parent_silent(self, parent: FlowNode, epoch: int) -> None:
        if self.alive and self.up is parent and self.link_epoch == epoch:
            self._link_ended(self.room.now)

    def parent_closed(self, parent: FlowNode, epoch: int) -> None:
        if self.alive and self.up is parent and self.link_epoch == epoch:
            self._link_ended(self.room.now)

    def redirected(self, leaver: FlowNode, parent: Peer, backups: tuple[Peer, ...]) -> None:
        """Our parent is leaving: move where it says, make before break."""
        if not self.alive or self.phase is not Phase.RUNNING or self.up is not leaver:
            return
        self._cancel_round()
        self.backups = backups or self.backups
        self._start_round(Purpose.REDIRECT, [parent, *backups], self.room.now)

    def watch_stall(self, now: float) -> None:
        """We went dark under a parent that still runs: check the stall rules later."""
        if self.up is not None and self.up.alive:
            first, _ = self._stall_limits()
            self.room.at(first, functools.partial(self._check_stall, self.link_epoch))

    def _stall_limits(self) -> tuple[float, float]:
        config = self.room.config
        factor = self._storm_factor(self.room.now)
        since = max(self.progress_at, self.up_at)
        stall = since + config.stall_timeout * factor
        if not self.delivered:  # before first audio, unlengthened (as NodeCore)
            first = factor if self.first_audio_at is not None else 1
            return since + config.first_chunk_timeout * first, stall
        return stall, stall + config.stall_grace * factor

    def _check_stall(self, epoch: int) -> None:
        """Progress, not presence (as `NodeCore._check_progress`)."""
        up = self.up
        if self.lit or not self.alive or epoch != self.link_epoch or up is None:
            return
        if self.phase is not Phase.RUNNING:
            return
        now = self.room.now
        first, last = self._stall_limits()
        # The parent says it is stalled too if it has been stalled about as long as us.
        since = up.progress_at if up.first_audio_at is not None else up.started_at
        # A parent that never lit us and is dark was dark when it took us: it says so.
        stalled_too = not up.lit and (not self.delivered or since <= self.progress_at + STALL_SLACK)
        if now >= last or (now >= first and not stalled_too):
            self.shunned[up.id] = now
            self._link_ended(now)
        else:
            wake = first if now < first else last
            self.room.at(wake, functools.partial(self._check_stall, epoch))

    def _became_current(self, parent: FlowNode, now: float) -> None:
        parent.reserved -= 1
        parent.children.append(self)
        self.up = parent
        self.up_at = now
        self.link_epoch += 1
        self.up_silence = self.room.config.silence_timeout * self._storm_factor(now)
        # A lit parent delivers at once; a moving node that plays on is already lit, so
        # `Media.light` would pass it by.
        self.delivered = parent.lit
        media = self.room.media
        if parent.lit:
            media.light(self, now)
        elif self.lit:
            media.darken(self, now)
        else:
            self.watch_stall(now)
        if not parent.alive:
            # It died while its acceptance was on the way: silence, as for any dead parent.
            notice = max(now, parent.gone_at + parent.delay + self.delay) + self.up_silence
            self.room.at(notice, functools.partial(self.parent_silent, parent, self.link_epoch))
        if not self.has_path:
            self.has_path = True
            waiting, self.waiting = self.waiting, []
            for child, attempt in waiting:
                self.subscribe(child, attempt)

    def _link_ended(self, now: float) -> None:
        """The current parent failed (silent, closed, stalled): fail over."""
        old = self.up
        assert old is not None
        self.up = None
        self.link_epoch += 1
        old.drop_child(self)
        if self.lit:
            self.room.media.darken(self, now)
        if self.phase is not Phase.RUNNING:
            return
        self.failovers.append(now)
        self._cancel_round()
        self.assigned = None
        self.timers[1] += 1  # no reconcile pending
        self.shunned = {node: t for node, t in self.shunned.items() if now - t < SHUN_FOR}
        candidates = [
            peer for peer in self.backups if peer.node != old.id and peer.node not in self.shunned
        ]
        self._start_round(Purpose.FAILOVER, candidates, now, dead=old.peer)

    def _storm_factor(self, now: float) -> int:
        self.failovers = [t for t in self.failovers if now - t < STORM_WINDOW]
        return 1 << min(len(self.failovers), 3)

    # -- the child's side: attach rounds ------------------------------------------------------

    def _start_round(
        self, purpose: Purpose, candidates: list[Peer], now: float, *, dead: Peer | None = None
    ) -> None:
        stagger = 0.0 if purpose is Purpose.FAILOVER else ATTACH_STAGGER
        round_ = self.round = Round(purpose, stagger, dead)
        if purpose is Purpose.FAILOVER:
            self.room.at(now + FAILOVER_ASK_AFTER, functools.partial(self._failover_late, round_))
        self._add_candidates(round_, candidates, now)
        if not round_.trying:
            self._round_failed(round_, now)

    def _failover_late(self, round_: Round) -> None:
        if self.alive and self.round is round_:
            self._ask_during_failover(round_, self.room.now)

    def _add_candidates(self, round_: Round, candidates: list[Peer], now: float) -> None:
        tried = {peer.node for peer in round_.pending}
        tried.update(peer.node for peer in self.attempts.values())
        if self.up is not None:
            tried.add(self.up.id)
        for peer in candidates:
            if peer.node != self.id and peer.address and peer.node not in tried:
                round_.pending.append(peer)
                tried.add(peer.node)
        # As `NodeCore`, whose timer launches pending candidates once `next_at` passed: a
        # candidate added after the last stagger ran out is tried at once.
        if round_.pending and (round_.stagger == 0 or not round_.trying or now >= round_.next_at):
            self._launch_next(round_, now)

    def _launch_next(self, round_: Round, now: float) -> None:
        room = self.room
        while round_.pending:
            peer = round_.pending.pop(0)
            round_.trying.add(self._connect(peer, now))
            round_.next_at = now + round_.stagger
            if round_.stagger > 0:
                room.at(round_.next_at, functools.partial(self._stagger_due, round_))
                return

    def _stagger_due(self, round_: Round) -> None:
        now = self.room.now
        if self.alive and self.round is round_ and round_.pending and now >= round_.next_at:
            self._launch_next(round_, now)

    def _connect(self, peer: Peer, now: float) -> int:
        """Connect and SUBSCRIBE: a handshake round trip, then the request."""
        room = self.room
        self._next_id += 1
        attempt = self._next_id
        target = room.nodes.get(peer.node)
        self.attempts[attempt] = peer
        room.at(
            now + room.config.connect_timeout, functools.partial(self._attempt_timeout, attempt)
        )
        if target is not None:
            rtt = 2 * (self.delay + target.delay)
            lost = retransmissions(room.rng, self.loss + target.loss, rtt)
            room.at(now + 1.5 * rtt + lost, functools.partial(target.subscribe, self, attempt))
        return attempt

    def _cancel_round(self) -> None:
        round_ = self.round
        if round_ is None:
            return
        self.round = None
        for attempt in round_.trying:
            self.attempts.pop(attempt, None)

    def _attach_failed(self, attempt: int, peer: Peer, code: int | None, now: float) -> None:
        round_ = self.round
        if round_ is None or attempt not in round_.trying:
            return
        round_.trying.discard(attempt)
        assigned = self.assigned
        if round_.rejoin_at is not None and assigned is not None and assigned.node == peer.node:
            if self.place_dead is not None and self.place_dead.node == assigned.node:
                round_.rejoin_at = None  # told back where it was: the round's backoff asks
            else:
                self._rejoin_again(round_, now)
        if code == ErrorCode.NO_CAPACITY:
            self._ask_during_failover(round_, now)
        if round_.pending:
            self._launch_next(round_, now)
        elif not round_.trying:
            self._round_failed(round_, now)

    def _ask_during_failover(self, round_: Round, now: float) -> None:
        if round_.purpose is Purpose.FAILOVER and not round_.asked:
            round_.asked = True
            self._ask_for_parent(round_.dead, now)

    def _rejoin_again(self, round_: Round, now: float) -> None:
        round_.rejoin_at = None
        if self.alive and self.round is round_ and self.assigned is not None:
            self._ask_for_parent(self.assigned, now)

    def _rejoin_due(self, round_: Round) -> None:
        at = round_.rejoin_at
        if at is not None and self.room.now >= at:
            self._rejoin_again(round_, self.room.now)

    def _round_failed(self, round_: Round, now: float) -> None:
        self.round = None
        if self.up is not None:
            if round_.purpose is Purpose.FOLLOW:
                self.follow_failed = True
                self.report_dead = self.assigned
                self._arm(1, now + self._retry("follow").next_delay(), self._reconcile_due)
            return
        delay = self._retry("round").next_delay()
        dead = self.assigned or round_.dead
        if self._asking(Purpose.PLACE):
            return
        if self._retry("round").attempt > 1:
            self.place_dead = dead
            self._arm(0, now + delay, self._place_due)
        else:
            self._ask_for_parent(dead, now)

    # -- the tracker -------------------------------------------------------------------------

    def _ask(self, request: TrackerRequest, purpose: Purpose) -> None:
        self._next_id += 1
        ticket = self._next_id
        self.requests[ticket] = purpose
        self.room.tracker.ask(self, request, functools.partial(self._answered, ticket))

    def _asking(self, purpose: Purpose) -> bool:
        return purpose in self.requests.values()

    def _answered(self, ticket: int, answer: TrackerResponse | None) -> None:
        purpose = self.requests.pop(ticket, None)
        if purpose is None or not self.alive:
            return
        now = self.room.now
        if purpose is Purpose.LEAVE:
            self._left(answer)
        elif self.phase is not Phase.RUNNING:
            return
        elif purpose is Purpose.PLACE:
            self._placed(answer, now)
        elif purpose in (Purpose.REPORT, Purpose.JOIN_AGAIN):
            self._confirmed(answer, now)
        elif purpose is Purpose.REFRESH:
            self._refreshed(answer, now)

    def _ask_for_parent(self, dead: Peer | None, now: float) -> None:
        if self._asking(Purpose.PLACE) or self.up is not None:
            return
        self.place_dead = dead
        stream = self.room.stream_id
        request: Join | Rejoin
        if dead is None:
            request = Join(stream, self.id, self.capacity, self.peer.address, None, wall_ms(now))
        else:
            request = self._rejoin_request(dead, None, now)
        self._ask(request, Purpose.PLACE)

    def _rejoin_request(self, dead: Peer, attached: bytes | None, now: float) -> Rejoin:
        return Rejoin(
            self.room.stream_id, self.id, dead.node, attached, self.capacity,
            self.peer.address, None, wall_ms(now),
        )  # fmt: skip

    def _refresh_request(self, now: float) -> Refresh:
        parent = self.up.id if self.up is not None else None
        return Refresh(
            self.room.stream_id, self.id, parent, self.capacity, self.peer.address, wall_ms(now)
        )

    def _placed(self, answer: TrackerResponse | None, now: float) -> None:
        if isinstance(answer, Assigned):
            self._reset("place")
            self._assigned(answer, now)
            candidates = [answer.parent, *answer.backups]
            if self.up is not None:
                self._reconcile(now)
                return
            if self.round is not None:
                self._add_candidates(self.round, candidates, now)
            else:
                self._start_round(Purpose.PLACE, candidates, now, dead=self.place_dead)
            round_ = self.round
            if round_ is not None and self.place_dead is not None:
                round_.rejoin_at = now + REJOIN_AGAIN_AFTER
                self.room.at(round_.rejoin_at, functools.partial(self._rejoin_due, round_))
            return
        self._arm(0, now + self._retry("place").next_delay(), self._place_due)

    def _place_due(self) -> None:
        self._ask_for_parent(self.place_dead, self.room.now)

    def _confirmed(self, answer: TrackerResponse | None, now: float) -> None:
        if isinstance(answer, Assigned):
            self._assigned(answer, now)
            self.report_dead = None
            self.follow_failed = False
            self._reconcile(now)
            return
        if isinstance(answer, Goodbye) and answer.code == ErrorCode.UNKNOWN_PEER:
            join = Join(self.room.stream_id, self.id, self.capacity, self.peer.address, None,
                        wall_ms(now))  # fmt: skip
            self._ask(join, Purpose.JOIN_AGAIN)
            return
        self._arm(1, now + self._retry("follow").next_delay(), self._reconcile_due)

    def _assigned(self, answer: Assigned, now: float) -> None:
        self.assigned = answer.parent
        self.backups = answer.backups
        self.refresh_s = answer.refresh_s
        if not self.joined:
            self.joined = True
            self._schedule_refresh(now, first=True)

    def _reconcile_due(self) -> None:
        self._reconcile(self.room.now)

    def _reconcile(self, now: float) -> None:
        """Converge on the tracker's answer (as `NodeCore._reconcile`)."""
        current = self.up
        if self.phase is not Phase.RUNNING or current is None or self.round is not None:
            return
        if self._asking(Purpose.REPORT) or self._asking(Purpose.JOIN_AGAIN):
            return
        assigned = self.assigned
        if assigned is not None and assigned.node == current.id:
            self._reset("follow")
            return
        if assigned is not None and not self.follow_failed:
            self._start_round(Purpose.FOLLOW, [assigned], now)
            return
        dead = self.report_dead or assigned
        if dead is None:
            join = Join(self.room.stream_id, self.id, self.capacity, self.peer.address, None,
                        wall_ms(now))  # fmt: skip
            self._ask(join, Purpose.JOIN_AGAIN)
        else:
            self._ask(self._rejoin_request(dead, current.id, now), Purpose.REPORT)

    def _schedule_refresh(self, now: float, *, first: bool = False) -> None:
        spread = (0.0, 1.0) if first and self.initial else (0.8, 1.0)
        self._arm_refresh(now + self.refresh_s * self.room.rng.uniform(*spread))

    def _arm_refresh(self, at: float) -> None:
        self.refresh_at = at
        self._arm(2, at, self._refresh_due)

    def announced(self) -> None:
        """A chunk at the live edge carries ANNOUNCE (as `NodeCore._announced`)."""
        now = self.room.now
        if not (self.alive and self.lit and self.joined and self.phase is Phase.RUNNING):
            return
        if self._asking(Purpose.REFRESH) or now - self.announced_at < ANNOUNCE_QUIET:
            return
        self.announced_at = now
        level = self.depth() - 1
        at = now + ANNOUNCE_STEP * (level + self.room.rng.random())
        if at < self.refresh_at:
            self._arm_refresh(at)

    def depth(self) -> int:
        """Hops up to the origin along the links."""
        depth, node = 0, self
        while node.up is not None:
            depth, node = depth + 1, node.up
        return depth

    def _refresh_due(self) -> None:
        self.refresh_at = math.inf
        if self.phase is Phase.RUNNING:
            self._ask(self._refresh_request(self.room.now), Purpose.REFRESH)

    def _refreshed(self, answer: TrackerResponse | None, now: float) -> None:
        if isinstance(answer, Assigned):
            self._reset("refresh")
            self._schedule_refresh(now)
            self._confirmed(answer, now)
        elif isinstance(answer, Goodbye) or answer is None:
            retry = self._retry("refresh")
            if (
                isinstance(answer, Goodbye)
                and answer.code == ErrorCode.UNKNOWN_PEER
                and retry.attempt >= UNKNOWN_RETRIES
            ):
                join = Join(self.room.stream_id, self.id, self.capacity, self.peer.address, None,
                            wall_ms(now))  # fmt: skip
                self._ask(join, Purpose.JOIN_AGAIN)
                self._reset("refresh")
                self._schedule_refresh(now)
                return
            self._arm_refresh(now + min(retry.next_delay(), self.refresh_s))
        else:
            self._reset("refresh")
            self._schedule_refresh(now)

    # -- leaving -----------------------------------------------------------------------------

    def _left(self, answer: TrackerResponse | None) -> None:
        """MOVED (or no answer in time): redirect every child, then drain."""
        if self.phase is not Phase.LEAVING:
            return
        room = self.room
        now = room.now
        self.phase = Phase.DRAINING
        moves: dict[bytes, tuple[Peer, tuple[Peer, ...]]] = {}
        if isinstance(answer, Moved):
            moves = {move.child: (move.parent, move.backups) for move in answer.moves}
        fallback = (self.up.peer, self.backups) if self.up is not None else None
        for child in self.children:
            target = moves.get(child.id, fallback)
            if target is not None and child.alive:
                notice = now + self.delay + child.delay
                room.at(notice, functools.partial(child.redirected, self, *target))
        if not self.children:
            self._finish(now)
        else:
            self._arm(3, now + room.config.leave_grace, self._drained)

    def _drained(self) -> None:
        self._finish(self.room.now)

    def _finish(self, now: float) -> None:
        """Gone for good: the links still open close (children hear it one way later)."""
        if not self.alive:
            return
        room = self.room
        room.media.departed(self, now)
        self.alive = False
        self.phase = Phase.DONE
        for child in self.children:
            if child.alive and child.up is self:
                if child.lit:
                    room.media.darken(child, now)
                notice = now + self.delay + child.delay
                room.at(notice, functools.partial(child.parent_closed, self, child.link_epoch))
        if self.up is not None:
            self.up.drop_child(self)

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, timer: int, at: float, due: Callable[[], None]) -> None:
        self.timers[timer] += 1
        self.room.at(at, functools.partial(self._fire, timer, self.timers[timer], due))

    def _fire(self, timer: int, generation: int, due: Callable[[], None]) -> None:
        if self.alive and self.timers[timer] == generation:
            due()

    def _retry(self, name: str) -> Backoff:
        retries = self._retries
        if retries is None:
            retries = self._retries = {}
        backoff = retries.get(name)
        if backoff is None:
            base, cap = RETRIES[name]
            backoff = retries[name] = Backoff(self.room.rng, base=base, cap=cap)
        return backoff

    def _reset(self, name: str) -> None:
        if self._retries is not None:
            self._retries.pop(name, None)
