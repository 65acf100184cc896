"""Every meshd message as a frozen dataclass; docs/spec.md §5 is the catalogue.

Field order is wire order: a message travels as the msgpack array `[type, *fields]`.
Signed messages end with a `sig` field that is empty (b"") until signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Peer:
    """A node the receiver may connect to: its id (pinned in the QUIC handshake) and address."""

    node: bytes
    address: str


# -- parent <-> child link -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Child -> parent, first message on a link: send me `stream` from `from_seq` (None: live)."""

    TYPE: ClassVar[int] = 0x01
    stream: bytes
    from_seq: int | None
    node: bytes


@dataclass(frozen=True, slots=True)
class Admit:
    """Child -> parent, just before SUBSCRIBE when the child holds an admission token: the
    encoded TOKEN (§5.4), which a parent that knows the host keys checks (ADMIT)."""

    TYPE: ClassVar[int] = 0x0A
    token: bytes


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """Parent -> child, accepts a SUBSCRIBE: the codec header, signed by the origin."""

    TYPE: ClassVar[int] = 0x02
    codec: str
    head: bytes
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive Opus packets with one origin signature over all of them."""

    TYPE: ClassVar[int] = 0x03
    FLAG_END: ClassVar[int] = 0x01
    FLAG_ANNOUNCE: ClassVar[int] = 0x02
    """The origin asks every node to REFRESH soon: the tracker lost its view of the tree."""
    seq: int
    granule: int
    flags: int
    packets: tuple[bytes, ...]
    sig: bytes = b""

    @property
    def is_end(self) -> bool:
        return bool(self.flags & Chunk.FLAG_END)

    @property
    def announces(self) -> bool:
        return bool(self.flags & Chunk.FLAG_ANNOUNCE)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Parent -> child when nothing else was sent for a while: I am alive, my newest is ...,
    and my own playback has been stalled for `stalled_ms` (0: it is not)."""

    TYPE: ClassVar[int] = 0x04
    latest_seq: int | None
    stalled_ms: int = 0


@dataclass(frozen=True, slots=True)
class Repair:
    """Child -> parent: resend these chunks (on the control stream)."""

    TYPE: ClassVar[int] = 0x05
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Missing:
    """Parent -> child: I do not have these chunks (any more)."""

    TYPE: ClassVar[int] = 0x06
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Redirect:
    """Parent -> child during a graceful leave: move to `parent` (then say GOODBYE to me)."""

    TYPE: ClassVar[int] = 0x07
    parent: Peer
    backups: tuple[Peer, ...]


@dataclass(frozen=True, slots=True)
class PathUpdate:
    """Parent -> child (PATH): the node ids from the origin down to the parent, sent on
    accepting and whenever they change; a child refuses a path that contains itself."""

    TYPE: ClassVar[int] = 0x09
    nodes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either side, last message on a channel: why it ends (ErrorCode) and a readable reason."""

    TYPE: ClassVar[int] = 0x08
    code: int
    reason: str


# -- node -> tracker requests (all signed) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """Origin -> tracker: I serve `stream` at `address`; signed with the stream key."""

    TYPE: ClassVar[int] = 0x10
    stream: bytes
    address: str
    capacity: int
    time_ms: int
    live_granule: int | None = None
    """The granule position of the newest chunk the origin sent (None before the first)."""
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Join:
    """Node -> tracker: give me a parent for `stream`; signed with the node key."""

    TYPE: ClassVar[int] = 0x11
    stream: bytes
    node: bytes
    capacity: int
    address: str
    token: bytes | None
    time_ms: int
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Rejoin:
    """Node -> tracker: my parent `dead` failed; I am now under `attached` (or need a parent)."""

    TYPE: ClassVar[int] = 0x12
    stream: bytes
    node: bytes
    dead: bytes
    attached: bytes | None
    capacity: int
    address: str
    token: bytes | None
    time_ms: int
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Leave:
    """Node -> tracker: I am leaving gracefully; where do my children go?"""

    TYPE: ClassVar[int] = 0x13
    stream: bytes
    node: bytes
    time_ms: int
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Refresh:
    """Node -> tracker, every `refresh_s`: I am alive under `parent` (soft state)."""

    TYPE: ClassVar[int] = 0x14
    stream: bytes
    node: bytes
    parent: bytes | None
    capacity: int
    address: str
    time_ms: int
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Anyone -> tracker: a snapshot of a stream's tree."""

    TYPE: ClassVar[int] = 0x15
    stream: bytes


@dataclass(frozen=True, slots=True)
class TreeRequest:
    """Anyone -> tracker (TREE): the top of a stream's tree, at most `max_nodes` nodes."""

    TYPE: ClassVar[int] = 0x16
    stream: bytes
    max_nodes: int


@dataclass(frozen=True, slots=True)
class ChildGone:
    """Parent -> tracker: I let `child` go for silence (CHILD_TIMEOUT): its slot is free.
    `node` is the parent (the stream id for the origin), who signs it."""

    TYPE: ClassVar[int] = 0x17
    stream: bytes
    node: bytes
    child: bytes
    time_ms: int
    sig: bytes = b""


# -- tracker -> node responses ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assigned:
    """Answer to JOIN/REJOIN: connect to `parent`; fall back to `backups` without asking."""

    TYPE: ClassVar[int] = 0x18
    parent: Peer
    backups: tuple[Peer, ...]
    depth: int
    refresh_s: int
    live_granule: int | None = None
    """The origin's `live_granule` from its last REGISTER: a newcomer starts no further
    behind it than the start lag (docs/spec.md §6.3)."""


@dataclass(frozen=True, slots=True)
class Move:
    """One child of a leaving node and its new place."""

    child: bytes
    parent: Peer
    backups: tuple[Peer, ...]


@dataclass(frozen=True, slots=True)
class Moved:
    """Answer to LEAVE: redirect each child as listed, then go."""

    TYPE: ClassVar[int] = 0x19
    moves: tuple[Move, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to REGISTER/REFRESH/CHILD_GONE: accepted; refresh again within `refresh_s`."""

    TYPE: ClassVar[int] = 0x1A
    refresh_s: int


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """The tracker is overloaded: try again after `delay_ms` plus jitter."""

    TYPE: ClassVar[int] = 0x1B
    delay_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Answer to STATUS: the tree's shape and the tracker's recent activity for one stream."""

    TYPE: ClassVar[int] = 0x1C
    stream: bytes
    audience: int
    origin_children: int
    origin_capacity: int
    depth_histogram: tuple[int, ...]
    joins_per_s: float
    rejoins_per_s: float
    total_joins: int
    total_rejoins: int
    total_leaves: int
    total_failures: int
    total_shed: int


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One node of a TREE_REPORT, as the tracker sees it (the origin: `parent` None)."""

    node: bytes
    parent: bytes | None
    address: str
    capacity: int
    children: int
    depth: int
    uptime_s: int
    """Seconds since the tracker first placed it (the origin: since it registered)."""


@dataclass(frozen=True, slots=True)
class TreeReport:
    """Answer to TREE: `nodes` from the origin down, breadth first (a parent always comes
    before its children); fewer than `audience` + 1 means the deeper ones were left out."""

    TYPE: ClassVar[int] = 0x1D
    stream: bytes
    audience: int
    nodes: tuple[TreeNode, ...]


# -- admission token (carried inside JOIN/REJOIN as bytes) -------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """Host-signed admission: `node` may join `stream` until `expires_ms` (Unix ms)."""

    TYPE: ClassVar[int] = 0x20
    stream: bytes
    node: bytes
    expires_ms: int
    sig: bytes = b""


Message = (
    Subscribe
    | Admit
    | StreamInfo
    | Chunk
    | Heartbeat
    | Repair
    | Missing
    | Redirect
    | PathUpdate
    | Goodbye
    | Register
    | Join
    | Rejoin
    | Leave
    | Refresh
    | StatusRequest
    | TreeRequest
    | ChildGone
    | Assigned
    | Moved
    | Ack
    | RetryAfter
    | StatusReport
    | TreeReport
    | Token
)
SignedMessage = StreamInfo | Chunk | Register | Join | Rejoin | Leave | Refresh | ChildGone | Token
TrackerRequest = (
    Register | Join | Rejoin | Leave | Refresh | StatusRequest | TreeRequest | ChildGone
)
TrackerResponse = Assigned | Moved | Ack | RetryAfter | StatusReport | TreeReport | Goodbye
