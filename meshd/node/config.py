"""Tunables shared by origin and relay nodes, with the defaults docs/spec.md names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeConfig:
    heartbeat_interval: float = 0.2
    """A parent says HEARTBEAT after this long without sending anything."""
    silence_timeout: float = 0.6
    """A child presumes its parent dead after this long without hearing from it."""
    stall_timeout: float = 2.0
    """A child leaves a parent that delivers nothing new to play for this long, unless the
    parent says its own playback is stalled as long (the trouble is above it)."""
    stall_grace: float = 4.0
    """How much longer a child waits on a parent that says it is stalled too."""
    first_chunk_timeout: float = 1.0
    """A child leaves a parent that gave it nothing to play this long after accepting it,
    unless the parent showed it is behind (said it is stalled, or sent old chunks): a
    live parent's backlog comes with its acceptance, and a hostile one must not cost a
    newcomer the stall timeout."""
    start_lag: float = 2.0
    """How far behind the origin's live granule (as the tracker last heard it, ASSIGNED)
    a newcomer's first chunk may be: anything older is the past, replayed."""
    child_timeout: float = 1.0
    """A parent lets a child go after hearing nothing from its connection for this long."""
    subscribe_timeout: float = 2.0
    """A parent closes a connection that has not sent a whole SUBSCRIBE by then."""
    max_unsubscribed: int = 16
    """Connections a parent holds at once that have not subscribed yet; more are refused."""
    max_unsubscribed_per_network: int = 4
    """...of which one source network (IPv4 /24, IPv6 /48) may hold this many."""
    host_keys: tuple[bytes, ...] = ()
    """Raw keys of the hosts whose admission tokens a child must present (ADMIT) before
    this node feeds it; empty: it feeds any child (docs/spec.md §6.1)."""
    buffer_seconds: float = 10.0

    """Audio kept in the ring buffer, for resuming children and repairs."""
    connect_timeout: float = 2.0
    """How long to wait for a parent to accept (handshake + STREAM_INFO); real networks
    need a few round trips, and backups are tried in parallel, so this is no fast path."""
    leave_grace: float = 5.0
    """How long a leaving or finished node waits for its children to move or finish."""
    stats_interval: float = 5.0
    """How often a node logs its stats line (and rewrites its stats file)."""
    max_child_backlog: int = 4 * 1024 * 1024
    """Bytes queued for one child's stream before it is dropped as too slow."""

    def __post_init__(self) -> None:
        if self.silence_timeout < 3 * self.heartbeat_interval - 1e-9:  # float slack
            raise ValueError("the silence timeout must be at least 3 heartbeat intervals")
        if self.child_timeout < 3 * self.heartbeat_interval - 1e-9:
            raise ValueError("the child timeout must be at least 3 heartbeat intervals")
        if self.stall_timeout <= self.silence_timeout:
            raise ValueError("the stall timeout must be longer than the silence timeout")
        if not 3 * self.heartbeat_interval < self.first_chunk_timeout <= self.stall_timeout:
            # A parent stalled when it accepted us has said so (stall notice + 1 interval).
            raise ValueError(
                "the first-chunk timeout must be longer than 3 heartbeat intervals and at"
                " most the stall timeout"
            )
        if not 0 <= self.start_lag < self.buffer_seconds:
            raise ValueError("the start lag must be less than the ring buffer holds")
        if self.buffer_seconds < 1:
            raise ValueError("the buffer must hold at least 1 s of audio")
