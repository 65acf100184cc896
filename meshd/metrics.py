"""Prometheus metrics: the tracker's and a node's figures, served over HTTP from trio.

The collectors read the live state when scraped, so the cores keep no extra counters.
Serve them with `serve_metrics` (a small HTTP server inside the trio run, so a scrape
never races the event loop), or register a collector in a host's own registry:

    host, port = await nursery.start(serve_metrics, tracker_metrics(tracker), "0.0.0.0", 9464)

Collectors read trio-owned state: call `collect()` from the trio thread (as
`serve_metrics` does), not from a thread-based exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from meshd.addresses import format_address
from meshd.errors import BindError
from meshd.node.stats import NodeStats
from meshd.tracker.service import Tracker
from protocol import key_to_text

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


class TrackerCollector:
    """Audience, joins, rejoins, leaves, failures, sheds, depth and origin load, per stream."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def collect(self) -> Iterator[Metric]:
        labels = ["stream"]
        audience = GaugeMetricFamily("meshd_tracker_audience", "Nodes in the tree", labels=labels)
        depth = GaugeMetricFamily("meshd_tracker_depth", "Depth of the deepest node", labels=labels)
        at_depth = GaugeMetricFamily(
            "meshd_tracker_nodes_at_depth", "Nodes at each depth", labels=["stream", "depth"]
        )
        children = GaugeMetricFamily(
            "meshd_tracker_origin_children", "Children the origin feeds", labels=labels
        )
        capacity = GaugeMetricFamily(
            "meshd_tracker_origin_capacity", "Children the origin may feed", labels=labels
        )
        counters = {
            name: CounterMetricFamily(f"meshd_tracker_{name}", text, labels=labels)
            for name, text in (
                ("joins", "Nodes that joined"),
                ("rejoins", "Rejoins after a parent failed"),
                ("leaves", "Graceful leaves"),
                ("failures", "Nodes removed as failed"),
            )
        }
        for stream_id, state in self.tracker.streams.items():
            stream = key_to_text(stream_id)
            snapshot = state.tree.snapshot()
            audience.add_metric([stream], snapshot.audience)
            depth.add_metric([stream], snapshot.max_depth)
            for level, count in enumerate(snapshot.depth_histogram):
                at_depth.add_metric([stream, str(level)], count)
            children.add_metric([stream], snapshot.origin_children)
            capacity.add_metric([stream], snapshot.origin_capacity)
            counters["joins"].add_metric([stream], state.total_joins)
            counters["rejoins"].add_metric([stream], state.total_rejoins)
            counters["leaves"].add_metric([stream], state.total_leaves)
            counters["failures"].add_metric([stream], state.total_failures)
        yield GaugeMetricFamily("meshd_tracker_streams", "Live streams", len(self.tracker.streams))
        yield CounterMetricFamily(
            "meshd_tracker_shed", "Requests shed with RETRY_AFTER", self.tracker.total_shed
        )
        yield from (audience, depth, at_depth, children, capacity, *counters.values())


class NodeCollector:
    """A node's traffic, playback, failovers, stall, parent round trip and children."""

    def __init__(
        self,
        stats: NodeStats,
        parent_rtt: Callable[[], float | None] = lambda: None,
        update: Callable[[], None] = lambda: None,
    ) -> None:
        self.stats = stats
        self.parent_rtt = parent_rtt
        self.update = update
        """Brings the time-dependent figures (the stall) up to date before a scrape."""

    def collect(self) -> Iterator[Metric]:
        self.update()
        stats = self.stats
        info = GaugeMetricFamily(
            "meshd_node_info", "The node's role, id and stream", labels=["role", "node", "stream"]
        )
        info.add_metric([stats.role, stats.node, stats.stream], 1)
        yield info
        for name, text, value in (
            ("bytes_received", "Chunk bytes received from parents", stats.bytes_in),
            ("bytes_sent", "Chunk bytes sent to children", stats.bytes_out),
            ("chunks_played", "Chunks played, in order", _chunks_played(stats)),
            ("chunks_lost", "Chunks skipped because no parent could supply them", stats.lost),
            ("packets_played", "Opus packets played", stats.packets_played),
            ("repairs_requested", "Chunks asked for again", stats.repairs_requested),
            ("failovers", "Switches forced by a failed parent", stats.failovers),
            ("parent_switches", "Parent changes of any kind", stats.parent_switches),
        ):
            yield CounterMetricFamily(f"meshd_node_{name}", text, value)
        yield GaugeMetricFamily(
            "meshd_node_stall_seconds",
            "Longest time playback fell behind real time so far",
            stats.stall_ms / 1000,
        )
        yield GaugeMetricFamily("meshd_node_children", "Children fed", stats.children)
        if stats.depth is not None:
            yield GaugeMetricFamily("meshd_node_depth", "Hops from the origin", stats.depth)
        rtt = self.parent_rtt()
        if rtt is not None:
            yield GaugeMetricFamily(
                "meshd_node_parent_rtt_seconds", "Smoothed QUIC round trip to the parent", rtt
            )


def _chunks_played(stats: NodeStats) -> int:
    if stats.role == "origin":
        return stats.chunks_in  # the origin plays what it sends
    if stats.first_seq is None or stats.last_seq is None:
        return 0
    return stats.last_seq - stats.first_seq + 1 - stats.lost


def tracker_metrics(tracker: Tracker) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TrackerCollector(tracker))
    return registry


def node_metrics(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry


async def serve_metrics(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer `GET /metrics` in the Prometheus text format at host:port until cancelled;
    `task_status.started()` reports the bound (host, port) (port 0 picks one)."""
    address = format_address((host, port))
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise BindError(address, exc) from None
    bound = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, partial(_answer, registry), listeners)
        task_status.started((bound[0], bound[1]))


async def _answer(registry: CollectorRegistry, stream: trio.SocketStream) -> None:
    """One HTTP/1.0-style exchange: read the request head, answer, close."""
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                data = await stream.receive_some(4096)
                if not data or len(head) + len(data) > MAX_REQUEST_HEAD:
                    return
                head += data
            await stream.send_all(_response(registry, head))
    except (trio.BrokenResourceError, OSError) as exc:
        logger.debug("metrics client went away: %s", exc)
    finally:
        await stream.aclose()


def _response(registry: CollectorRegistry, head: bytes) -> bytes:
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
    elif path in (b"/metrics", b"/"):
        status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    else:
        status, content_type, body = "404 Not Found", "text/plain", b"try /metrics\n"
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if method == b"HEAD" else header + body
