"""A whole room at the flow level: the origin, the real tracker, and a `Plan` played out."""

from __future__ import annotations

import functools
import gc
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.node.config import NodeConfig
from meshd.node.core import Phase
from meshd.node.source import ANNOUNCE_FOR
from meshd.node.treewatch import LOOK_AGAIN_AFTER, Look, TreeWatch
from meshd.sim.clock import Scheduler
from meshd.sim.flow.media import Media
from meshd.sim.flow.node import FlowNode
from meshd.sim.flow.tracker import QueuedTracker
from meshd.sim.hosts import wall_ms
from meshd.sim.metrics import EgressSample, Rebuild, Results, TrackerLoad
from meshd.sim.population import WIRE_BYTES_PER_S, Listener
from meshd.sim.scenarios import RESTART_DOWN, Plan, Shock, ShockKind
from meshd.tracker.service import Tracker, TrackerConfig
from protocol import Ack, Register
from protocol.backoff import Backoff
from protocol.limits import MAX_PATH
from protocol.media import OPUS_RATE
from protocol.messages import TrackerResponse

SERVER_DELAY = 0.005  # one-way delay of the origin and the tracker (hosted) to the core
SETTLE = 10.0  # seconds between the initial room's last join and the scenario's start
DEPTH_EVERY = 10.0  # seconds between depth samples (a walk of the whole tree)
WARMUP_LOAD = 0.5  # the initial room joins at this share of the tracker's rate


@dataclass(frozen=True)
class FlowOptions:
    origin_capacity: int = 4
    tracker_rate: float | None = 4000.0
    """Requests per second the tracker serves (None: every answer at once)."""
    refresh_s: int = 180
    config: NodeConfig = field(default_factory=NodeConfig)


class FlowRoom:
    def __init__(self, plan: Plan, options: FlowOptions) -> None:
        self.plan = plan
        self.options = options
        self.config = options.config
        self.rng = random.Random(f"flow/{plan.scenario}/{plan.seed}")
        self.scheduler = Scheduler()
        self.load = TrackerLoad()
        self.media = Media(self, options.config.buffer_seconds)
        self.nodes: dict[bytes, FlowNode] = {}
        self.listeners: list[FlowNode] = []
        self.stream_id = self.rng.randbytes(32)
        self.origin = FlowNode(
            self,
            self.stream_id,
            "origin",
            capacity=options.origin_capacity,
            delay=SERVER_DELAY,
            loss=0.0,
            is_origin=True,
        )
        self.nodes[self.stream_id] = self.origin
        self.tracker = QueuedTracker(
            self.scheduler,
            self.rng,
            Tracker(TrackerConfig(refresh_s=options.refresh_s)),
            rate=options.tracker_rate,
            delay=SERVER_DELAY,
            load=self.load,
            resolve=self.nodes.get,
        )
        self.start = self._warmup() + SETTLE if plan.initial else 0.0
        """When the scenario's clock starts: the initial room has joined and settled."""
        self._arrived = 0
        self._samples: list[EgressSample] = []
        self._depth_max = 0
        self._tracker_depth_max = 0
        self._peak_audience = 0
        # The origin's side of a tracker restart (docs/spec.md §7.2), as `meshd.node.origin`.
        self.watch = TreeWatch(self.stream_id, options.origin_capacity)
        self._register_retry = Backoff(self.rng, base=0.5, cap=30.0)
        self._look_at = 0.0  # refused SUBSCRIBEs look at the tracker's view from then on
        self.announce_until = -1.0
        """The origin's chunks carry ANNOUNCE until then."""
        self._rebuild = Rebuild()

    @property
    def now(self) -> float:
        return self.scheduler.now

    def at(self, when: float, callback: Callable[[], None]) -> None:
        self.scheduler.at(when, callback)

    def run(self) -> Results:
        wall = time.perf_counter()
        end = self.start + self.plan.duration
        self._register()
        self._schedule_initial()
        self.at(self.start, self._next_arrival)
        for shock in self.plan.shocks:
            self.at(self.start + shock.at, functools.partial(self._shock, shock))
        self.at(1.0, self._sample_egress)
        self.at(DEPTH_EVERY, self._sample_depth)
        # Without the cyclic garbage collector: the run leaves next to no cycles (a
        # subtree the tree core drops), so its passes would only walk the millions of
        # pending events over and over, which cost as much CPU as the run itself.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.scheduler.run_until(end)
        finally:
            if collecting:
                gc.enable()
        results = self._results(end)
        results.wall_s = time.perf_counter() - wall
        results.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results.events = self.scheduler.events_run
        return results

    # -- the plan ----------------------------------------------------------------------------

    def _warmup(self) -> float:
        rate = self.options.tracker_rate
        spread = 5.0
        if rate is not None:
            spread = max(spread, self.plan.initial / (rate * WARMUP_LOAD))
        return spread

    def _register(self) -> None:
        """REGISTER, again every `refresh_s` of the ACK (2 s), then look at the tracker's
        view (`TreeWatch`), as the origin does."""
        origin = self.origin
        now = self.now
        live = round(now * OPUS_RATE) if now > 0 else None  # the stream runs from 0 s
        request = Register(self.stream_id, "origin", origin.capacity, wall_ms(now), live)
        self.tracker.ask(origin, request, self._registered)

    def _registered(self, answer: TrackerResponse | None) -> None:
        now = self.now
        if not isinstance(answer, Ack):
            self.at(now + self._register_retry.next_delay(), self._register)
            return
        self._register_retry.reset()
        self.at(now + answer.refresh_s * self.rng.uniform(0.8, 1.0), self._register)
        self._look(self.watch.registered(now, self._origin_children()))

    def origin_full(self) -> None:
        """The origin refused a SUBSCRIBE for lack of slots: whoever sent that child
        thought it had room."""
        now = self.now
        if now >= self._look_at:
            self._look_at = now + LOOK_AGAIN_AFTER
            self._look(self.watch.refused(now, self._origin_children()))

    def _origin_children(self) -> set[bytes]:
        return {child.id for child in self.origin.children}

    def _look(self, look: Look | None) -> None:
        if look is not None:
            answer = functools.partial(self._looked, look)
            self.tracker.ask(self.origin, look.request, answer)

    def _looked(self, look: Look, answer: TrackerResponse | None) -> None:
        if self.watch.answered(look, answer, self.now):
            self._announce()

    def _announce(self) -> None:
        """The origin's chunks carry ANNOUNCE for `ANNOUNCE_FOR`: every lit node gets the
        next one a path's delay later; a node lit meanwhile gets one as it lights up."""
        now = self.now
        self.announce_until = now + ANNOUNCE_FOR
        stack = [(self.origin, 0.0)]
        while stack:
            node, at = stack.pop()
            for child in node.children:
                if child.lit:
                    arrival = at + node.delay + child.delay
                    self.at(now + arrival, child.announced)
                    stack.append((child, arrival))

    def _schedule_initial(self) -> None:
        spread = self._warmup()
        for listener in self.plan.listeners[: self.plan.initial]:
            at = self.rng.uniform(0.5, spread)
            self.at(at, functools.partial(self._spawn, listener, True))

    def _next_arrival(self) -> None:
        """Arrivals one after another, so the queue holds one at a time."""
        listeners = self.plan.listeners
        index = self.plan.initial + self._arrived
        if index >= len(listeners):
            return
        self._arrived += 1
        listener = listeners[index]
        self.at(self.start + listener.arrive_at, functools.partial(self._arrive, listener))

    def _arrive(self, listener: Listener) -> None:
        self._spawn(listener, False)
        self._next_arrival()

    def _spawn(self, listener: Listener, initial: bool) -> None:
        node = FlowNode(
            self,
            self.rng.randbytes(32),
            f"n{listener.index}",
            capacity=listener.capacity,
            delay=listener.delay,
            loss=listener.loss,
            initial=initial,
        )
        self.nodes[node.id] = node
        self.listeners.append(node)
        node.start(self.now)
        departure = self.plan.departure(listener)
        if departure is not None:
            go = node.leave if listener.graceful else node.crash
            self.at(self.start + departure, lambda: go(self.now))

    def _shock(self, shock: Shock) -> None:
        now = self.now
        present = [n for n in self.listeners if n.alive and n.phase is Phase.RUNNING]
        if shock.kind is ShockKind.MELT:
            victims = self.rng.sample(present, round(len(present) * shock.fraction))
        elif shock.kind is ShockKind.TRACKER_RESTART:
            victims = []
            self.tracker.restart(RESTART_DOWN)
            self._rebuild.restarted_at = now
        else:
            tops = [n for n in self.origin.children if n.alive]
            victims = tops + [
                backup
                for top in tops
                for peer in top.backups
                if (backup := self.nodes.get(peer.node)) is not None and backup.alive
            ]
        doomed = {id(node) for node in victims}
        for node in present:
            if id(node) not in doomed:
                node.lost_before_shock = node.lost
        self.media.shock_at = now
        for node in victims:
            node.crash(now)

    # -- sampling ----------------------------------------------------------------------------

    def _sample_egress(self) -> None:
        now = self.now
        self.at(now + 1.0, self._sample_egress)
        media = self.media
        streams = len(self.origin.children) + media.origin_bytes / WIRE_BYTES_PER_S
        media.origin_bytes = 0.0
        if now > self.start:
            self._samples.append(EgressSample(now - self.start, media.listening, streams))
        self._peak_audience = max(self._peak_audience, media.listening)
        state = self.tracker.tracker.streams.get(self.stream_id)
        self._rebuild.sample(now, len(state.tree) - 1 if state else 0, media.listening)

    def _sample_depth(self) -> None:
        self.at(self.now + DEPTH_EVERY, self._sample_depth)
        self._depth_max = max(self._depth_max, len(self._depths()) - 1)
        state = self.tracker.tracker.streams.get(self.stream_id)
        if state is not None:
            self._tracker_depth_max = max(self._tracker_depth_max, state.tree.snapshot().max_depth)

    def _depths(self) -> list[int]:
        """Listeners per depth along the links that carry the stream."""
        histogram = [1]
        level = [self.origin]
        while level:
            level = [child for node in level for child in node.children if child.alive]
            if level:
                histogram.append(len(level))
        return histogram

    # -- results -----------------------------------------------------------------------------

    def _results(self, end: float) -> Results:
        plan = self.plan
        results = Results(
            plan.scenario,
            "flow",
            plan.seed,
            self.options.origin_capacity,
            self.options.tracker_rate,
        )
        results.listeners = len(self.listeners)
        results.egress = self._samples
        results.depth_histogram = self._depths()
        results.depth_max_seen = max(self._depth_max, results.depth_max)
        results.tracker_depth_max = self._tracker_depth_max
        results.peak_audience = self._peak_audience
        relays = [n.capacity for n in self.listeners if n.capacity]
        results.relay_capacity = sum(relays) / len(relays) if relays else 0.0
        results.outages = self.media.outages
        self._rebuild.record(results)
        shock_at = self.media.shock_at
        for node in self.listeners:
            live = node.alive and node.phase is Phase.RUNNING
            silent = end - node.dark_since if live and node.dark_since is not None else 0.0
            if not node.initial:
                if node.first_audio_at is not None:
                    results.join_times.append(node.first_audio_at - node.started_at)
                elif live and end - node.started_at >= 5.0:
                    results.never_played += 1
                    results.join_times.append(end - node.started_at)  # at least that long
            if node.first_audio_at is not None:
                results.stalls.append(node.stall + silent)
                results.lost.append(node.lost)
            if live and node.lost_before_shock is not None and shock_at is not None:
                results.shocked += 1
                results.shock_lost.append(node.lost - node.lost_before_shock)
                if node.recovered_at is not None:
                    results.recovery.append(node.recovered_at - shock_at)
                elif node.dark_since is not None and node.dark_since >= shock_at:
                    results.unrecovered += 1
        results.tracker = self.load.peak(self.start)
        results.tracker_totals = dict(self.load.totals)
        results.problems = self._problems()
        return results

    def _problems(self) -> dict[str, int]:
        """Live listeners not on a loop-free chain of live links up to the origin."""
        found = {"cycle": 0, "cut off": 0}
        for node in self.listeners:
            if not node.alive or node.phase is not Phase.RUNNING:
                continue
            hop: FlowNode | None = node
            for _ in range(MAX_PATH + 1):
                if hop is None or not hop.alive:
                    found["cut off"] += 1
                    break
                if hop.is_origin:
                    break
                hop = hop.up
            else:
                found["cycle"] += 1
        return {kind: count for kind, count in found.items() if count}
