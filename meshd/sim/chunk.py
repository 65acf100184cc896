"""A scenario at the chunk level: every listener runs the real `NodeCore` (small rooms).

The plan is played on a `World`: the real tracker (answering at once: no queueing at
this size), the real origin core sending a chunk every 200 ms, and one `NodeHost` per
listener with its drawn delay, loss and capacity. Figures come from what the cores
themselves count and play.
"""

from __future__ import annotations

import bisect
import functools
import resource
import time
from dataclasses import dataclass, field

from meshd.node.config import NodeConfig
from meshd.sim.hosts import NodeHost
from meshd.sim.metrics import EgressSample, Rebuild, Results
from meshd.sim.population import CHUNK_SECONDS, CHUNKS_PER_S, Listener
from meshd.sim.scenarios import RESTART_DOWN, Plan, Shock, ShockKind
from meshd.sim.world import PathBroken, RoomSpec, World

WARMUP = 5.0  # the initial room joins over this many seconds
SETTLE = 10.0  # then settles this long before the scenario starts
GAP = 2 * CHUNK_SECONDS
"""Plays further apart than this are a gap in the audio (a chunk is due every 200 ms)."""


@dataclass(frozen=True)
class ChunkOptions:
    origin_capacity: int = 4
    refresh_s: int = 180
    config: NodeConfig = field(default_factory=NodeConfig)


class ChunkRun:
    def __init__(self, plan: Plan, options: ChunkOptions) -> None:
        self.plan = plan
        self.options = options
        spec = RoomSpec(
            0,
            plan.seed,
            origin_capacity=options.origin_capacity,
            config=options.config,
            refresh_s=options.refresh_s,
        )
        self.world = World(spec)
        self.start = WARMUP + SETTLE if plan.initial else 0.0
        self.hosts: list[tuple[NodeHost, bool, float]] = []
        """Every listener: its host, whether it was in the initial room, when it started."""
        self.stall_at_exit: dict[int, float] = {}
        self.shock_at: float | None = None
        self.before_shock: dict[int, int] = {}
        """Survivors of the shock: chunks lost before it, by host index."""
        self._samples: list[EgressSample] = []
        self._chunks_out = 0
        self._depth_max = 0
        self._peak_audience = 0
        self._rebuild = Rebuild()

    def run(self) -> Results:
        wall = time.perf_counter()
        world = self.world
        scheduler = world.scheduler
        end = self.start + self.plan.duration
        world.origin.start()
        for listener in self.plan.listeners[: self.plan.initial]:
            at = world.rng.uniform(0.2, WARMUP)
            scheduler.at(at, functools.partial(self._arrive, listener, True))
        for listener in self.plan.listeners[self.plan.initial :]:
            at = self.start + listener.arrive_at
            scheduler.at(at, functools.partial(self._arrive, listener, False))
        for shock in self.plan.shocks:
            scheduler.at(self.start + shock.at, functools.partial(self._shock, shock))
        scheduler.at(1.0, self._sample)
        scheduler.run_until(end)
        results = self._results(end)
        results.wall_s = time.perf_counter() - wall
        results.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results.events = scheduler.events_run
        return results

    def _arrive(self, listener: Listener, initial: bool) -> None:
        world = self.world
        node = world.add_listener(listener.capacity, listener.delay, listener.loss)
        self.hosts.append((node, initial, world.now))
        node.start()
        departure = self.plan.departure(listener)
        if departure is not None:
            go = node.leave if listener.graceful else functools.partial(self._kill, node)
            world.scheduler.at(self.start + departure, go)

    def _kill(self, node: NodeHost) -> None:
        if node.alive:
            self._freeze_stall(node)
            node.kill()

    def _freeze_stall(self, node: NodeHost) -> None:
        node.core.refresh_stats(self.world.now)
        self.stall_at_exit[id(node)] = node.core.stats.stall_ms / 1000

    def _shock(self, shock: Shock) -> None:
        world = self.world
        present = [node for node in world.live() if node.core.stats.joined_at is not None]
        if shock.kind is ShockKind.MELT:
            victims = world.rng.sample(present, round(len(present) * shock.fraction))
        elif shock.kind is ShockKind.TRACKER_RESTART:
            victims = []
            world.tracker.restart(RESTART_DOWN)
            self._rebuild.restarted_at = world.now
        else:
            tops = world.origin_children()
            backups = {peer.node for top in tops for peer in top.core.backups}
            victims = tops + [node for node in present if node.node_id in backups]
        doomed = {id(node) for node in victims}
        self.shock_at = world.now
        for node in present:
            if id(node) not in doomed:
                self.before_shock[id(node)] = node.core.stats.lost
        for node in victims:
            self._kill(node)

    def _sample(self) -> None:
        world = self.world
        now = world.now
        world.scheduler.at(now + 1.0, self._sample)
        sent = world.origin.core.stats.chunks_out
        streams = (sent - self._chunks_out) / CHUNKS_PER_S
        self._chunks_out = sent
        listening = sum(
            1 for node in world.live() if node.played_at and now - node.played_at[-1] <= 1.0
        )
        self._peak_audience = max(self._peak_audience, listening)
        state = world.tracker.tracker.streams.get(world.stream_id)
        self._rebuild.sample(now, len(state.tree) - 1 if state else 0, listening)
        if now > self.start:
            self._samples.append(EgressSample(now - self.start, listening, streams))
        if int(now) % 10 == 0:
            self._depth_max = max(self._depth_max, len(self._depths()) - 1)

    def _depths(self) -> list[int]:
        histogram = [1]
        for node in self.world.live():
            try:
                depth = len(self.world.chain(node)) - 1
            except PathBroken:
                continue
            histogram.extend([0] * (depth + 1 - len(histogram)))
            histogram[depth] += 1
        return histogram

    def _results(self, end: float) -> Results:
        plan = self.plan
        world = self.world
        results = Results(plan.scenario, "chunk", plan.seed, self.options.origin_capacity, None)
        results.listeners = len(self.hosts)
        results.egress = self._samples
        results.depth_histogram = self._depths()
        results.depth_max_seen = max(self._depth_max, results.depth_max)
        state = world.tracker.tracker.streams.get(world.stream_id)
        results.tracker_depth_max = state.tree.snapshot().max_depth if state else 0
        results.peak_audience = self._peak_audience
        self._rebuild.record(results)
        relays = [node.core.capacity for node, _, _ in self.hosts if node.core.capacity]
        results.relay_capacity = sum(relays) / len(relays) if relays else 0.0
        shock = self.shock_at
        for node, initial, started in self.hosts:
            stats = node.core.stats
            live = node.alive and node.finished is None
            gave_up = node.alive and node.finished is not None and node.finished.status != 0
            if not initial:
                if stats.join_to_audio_ms is not None:
                    results.join_times.append(stats.join_to_audio_ms / 1000)
                elif (live or gave_up) and end - started >= 5.0:
                    results.never_played += 1
                    results.join_times.append(end - started)
            if stats.first_seq is not None:
                stall = self.stall_at_exit.get(id(node))
                if stall is None:
                    node.core.refresh_stats(end)
                    stall = stats.stall_ms / 1000
                results.stalls.append(stall)
                results.lost.append(stats.lost)
                results.outages += [
                    b - a - CHUNK_SECONDS
                    for a, b in zip(node.played_at, node.played_at[1:], strict=False)
                    if b - a > GAP
                ]
            before = self.before_shock.get(id(node))
            if node.alive and before is not None and shock is not None:
                # A survivor that gave up (cut off too long) missed audio it never counted.
                results.shocked += 1
                results.shock_lost.append(max(stats.lost - before, int(gave_up)))
                self._recovery(node, shock, results)
        results.tracker = world.tracker.load.peak(self.start)
        results.tracker_totals = dict(world.tracker.load.totals)
        problems = world.problems()
        results.problems = {kind: len(found) for kind, found in problems.items()}
        return results

    def _recovery(self, node: NodeHost, shock: float, results: Results) -> None:
        """When the survivor played again after the gap the shock caused, if it had one."""
        plays = node.played_at
        first = bisect.bisect_right(plays, shock)
        if first == len(plays):
            results.unrecovered += 1
            return
        for i in range(max(first, 1), len(plays)):
            if plays[i - 1] > shock + 10 * GAP:
                return  # it kept playing: the shock did not reach it
            if plays[i] - plays[i - 1] > GAP:
                results.recovery.append(plays[i] - shock)
                return
