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
    """Child side: the parent is alive and has forwarded up to `latest_seq`."""

    latest_seq: int | None


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


@dataclass(frozen=True, slots=True)
class RepairRequested:
    """Parent side: the child asks for these chunks again."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """Either side: the peer said GOODBYE or ended the stream."""

    code: int
    reason: str


LinkEvent = (
    InfoReceived
    | ChunkReceived
    | HeartbeatReceived
    | RepairUnavailable
    | Redirected
    | ParentSilent
    | SubscribeRequested
    | RepairRequested
    | LinkClosed
)
