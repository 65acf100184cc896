"""The relay/listener over real QUIC: the trio driver of a sans-I/O `NodeCore`.

The core decides (which parent, failover, repairs, when to end); this module performs
its actions: connections to parents (`ParentConnection`), tracker requests, the audio
output, children (`Fanout`), and one timer task. Every input is followed by `_pump`,
which carries out what the core asked for, so a chunk that arrives is forwarded to the
children and played before the next one is read.
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
from meshd.errors import NodeError
from meshd.logs import log_as
from meshd.node.config import NodeConfig
from meshd.node.core import (
    AskTracker,
    CloseLink,
    Connect,
    Finished,
    NodeCore,
    Play,
    StartOutput,
)
from meshd.node.fanout import Fanout, node_endpoint
from meshd.node.output import AudioSink
from meshd.node.report import StatsReporter
from meshd.node.stats import ChunkTrace
from meshd.node.timer import CoreTimer
from meshd.node.upstream import ParentConnection
from meshd.quic import QuicEndpoint, open_quic_endpoint
from meshd.tracker_client import (
    WARN_AFTER,
    TrackerConnections,
    TrackerRefused,
    ask_tracker,
    now_ms,
)
from protocol import Goodbye, key_id, short_id, sign_message
from protocol.messages import TrackerResponse

logger = logging.getLogger(__name__)

STARVED = 0.1  # a timer this late means our event loop, not the parent, was stuck


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
        self.node_id = key_id(key)
        self.settings = settings
        self.config = config or NodeConfig()
        self.output = output
        if output is not None:
            output.on_broken = self.leave
        self.trace = trace
        self.core = NodeCore(
            self.node_id,
            settings.stream,
            capacity=settings.capacity,
            config=self.config,
            rng=rng or random.Random(),
            join_timeout=settings.join_timeout,
            token=settings.token,
            tracker_name=format_address(settings.tracker),
        )
        if trace is not None:
            self.core.on_arrival = trace.record
        self.stats = self.core.stats
        self.reporter = StatsReporter(
            self.stats, self.config.stats_interval, stats_file, self.refresh_stats
        )
        self.fanout = Fanout(self.core.children, self._pump, self._child_closed)
        self.playing = trio.Event()
        """Set once the first chunk has been played."""
        self._parents: dict[int, ParentConnection] = {}
        self._endpoint: QuicEndpoint | None = None
        self._nursery: trio.Nursery | None = None
        self._timer = CoreTimer(self.core.get_timer)
        self._no_parents = trio.Event()
        self._done = trio.Event()
        self._finished: Finished | None = None
        self._tracker_connections = TrackerConnections()
        """A node asks the tracker in bursts while joining or failing over: one handshake."""

    def parent_rtt(self) -> float | None:
        """The round-trip time to the parent we stream from, in seconds, once measured."""
        current = self.core.current
        parent = None if current is None else self._parents.get(current.id)
        return None if parent is None else parent.rtt

    def leave(self) -> None:
        """Start a graceful leave (SIGINT/SIGTERM): children are moved first."""
        self.core.leave(trio.current_time())
        self._pump()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, play and relay until the stream ends or `leave()` is called; raises
        NodeError if the node gives up."""
        log_as(self.stats.role, short_id(self.node_id))
        host, port = self.settings.listen
        async with trio.open_nursery() as outer:
            if self.output is not None:
                outer.start_soon(self.output.run)
            try:
                async with open_quic_endpoint(
                    self.key, host, port, config=node_endpoint(self.settings.capacity)
                ) as endpoint:
                    self._endpoint = endpoint
                    self.core.address = self.settings.advertise or format_address(endpoint.address)
                    if self.settings.capacity > 0:
                        logger.info(
                            "serving children on %s (advertised as %s)",
                            format_address(endpoint.address),
                            self.core.address,
                        )
                    await self._run_node(endpoint, task_status)
            finally:
                if self.output is not None:
                    self.output.close()
        self.reporter.report()
        if self.trace is not None:
            self.trace.close()
        assert self._finished is not None
        if self._finished.status != 0:
            raise NodeError(self._finished.message, self._finished.status)
        logger.info("%s", self._finished.message)

    def _child_closed(self, child: int) -> None:
        self.core.child_closed(child, trio.current_time())

    def refresh_stats(self) -> None:
        """Bring the time-dependent figures (the stall) up to date."""
        self.core.refresh_stats(trio.current_time())

    async def _run_node(self, endpoint: QuicEndpoint, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.settings.capacity > 0:
                await nursery.start(endpoint.serve, self.fanout.handle_connection)
            nursery.start_soon(self.reporter.run)
            self.core.start(trio.current_time())
            self._pump()
            nursery.start_soon(self._run_timer)
            task_status.started()
            await self._done.wait()
            # Let the last GOODBYEs go out before the connections are cancelled.
            with trio.move_on_after(1.0):
                await self._no_parents.wait()
            nursery.cancel_scope.cancel()

    async def _run_timer(self) -> None:
        """One task for every deadline of the core (`_pump` rearms it)."""
        while True:
            deadline = await self._timer.wait()
            now = trio.current_time()
            if deadline is not None and now - deadline > STARVED:
                # We woke far too late: our own process was starved of CPU, and what the
                # parent sent may still be unread. Read it before blaming the parent.
                await trio.sleep(STARVED)
                now = trio.current_time()
            if deadline is not None and now >= deadline:
                self.core.handle_timer(now)
                self._pump()

    def _pump(self) -> None:
        """Carry out what the core asked for, then send what it queued."""
        core = self.core
        while (action := core.next_action()) is not None:
            if isinstance(action, Play):
                if self.output is not None and self.output.started:
                    self.output.write(action.item.chunk)
                self.playing.set()
            elif isinstance(action, Connect):
                self._connect(action)
            elif isinstance(action, CloseLink):
                parent = self._parents.get(action.link)
                if parent is not None:
                    parent.close(action.code, action.reason, action.data)
            elif isinstance(action, AskTracker):
                assert self._nursery is not None
                self._nursery.start_soon(self._ask_tracker, action)
            elif isinstance(action, StartOutput):
                if self.output is not None:
                    self.output.start(action.head)
            elif isinstance(action, Finished):
                self._finished = action
                self._done.set()
        for link in core.take_dirty_links():
            parent = self._parents.get(link)
            if parent is not None:
                parent.wake()
        self.fanout.flush()
        self._timer.rearm()

    def _connect(self, action: Connect) -> None:
        assert self._nursery is not None and self._endpoint is not None
        parent = ParentConnection(self.core, action.link, action.peer, self._pump)
        self._parents[action.link] = parent
        self._no_parents = trio.Event()
        self._nursery.start_soon(self._run_parent, parent, self._endpoint)

    async def _run_parent(self, parent: ParentConnection, endpoint: QuicEndpoint) -> None:
        try:
            await parent.run(endpoint)
        finally:
            del self._parents[parent.link]
            if not self._parents:
                self._no_parents.set()

    async def _ask_tracker(self, action: AskTracker) -> None:
        assert self._endpoint is not None
        request = sign_message(dataclasses.replace(action.request, time_ms=now_ms()), self.key)
        answer: TrackerResponse | None
        try:
            answer = await ask_tracker(
                self._endpoint,
                self.settings.tracker,
                request,
                rng=self.core.rng,
                give_up_after=min(60.0, self.settings.join_timeout),
                tracker_key=self.settings.tracker_key,
                connections=self._tracker_connections,
                warn_after=WARN_AFTER,
            )
        except TrackerRefused as exc:
            answer = Goodbye(exc.code, exc.reason)
        except trio.TooSlowError:
            answer = None
        self.core.tracker_answered(action.ticket, answer, trio.current_time())
        self._pump()
