"""Events the sans-I/O state machines hand to the runtime (one module, as in h11)."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.media import VerifiedChunk
from protocol.messages import Peer, StreamInfo


@dataclass(frozen=True, slots=True)
class InfoReceived:
    """Child side: the parent accepted; the origin-signed codec header."""

    info: StreamInfo


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """Child side: a chunk whose origin signature checked out."""

    item: VerifiedChunk


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """Child side: the parent is alive, has forwarded up to `latest_seq`, and its own
    playback has been stalled for `stalled_ms`."""

    latest_seq: int | None
    stalled_ms: int


@dataclass(frozen=True, slots=True)
class PathReceived:
    """Child side: the parent's path from the origin (it ends with the parent)."""

    nodes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RepairUnavailable:
    """Child side: the parent does not hold these chunks."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Redirected:
    """Child side: the parent is leaving; move to `parent` (make before break)."""

    parent: Peer
    backups: tuple[Peer, ...]


@dataclass(frozen=True, slots=True)
class ParentSilent:
    """Child side: nothing arrived for the silence timeout; the parent is presumed dead."""


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    """Parent side: a child wants the stream from `from_seq` (None: the live edge)."""

    from_seq: int | None
    node: bytes
    token: bytes | None
    """The admission token the child sent in ADMIT before SUBSCRIBE, if it did."""


@dataclass(frozen=True, slots=True)
class RepairRequested:
    """Parent side: the child asks for these chunks again."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """Either side: the link is over: the peer said GOODBYE or ended the stream, or we
    closed it by a link rule (a silent child, a path that contains us)."""

    code: int
    reason: str


LinkEvent = (
    InfoReceived
    | ChunkReceived
    | HeartbeatReceived
    | PathReceived
    | RepairUnavailable
    | Redirected
    | ParentSilent
    | SubscribeRequested
    | RepairRequested
    | LinkClosed
)
