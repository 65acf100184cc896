"""meshd's wire protocol, sans-I/O: messages, codec, framing, media signing, state machines.

No sockets, no trio, no clock reads: time is passed in as `now`. docs/spec.md is the
contract this package implements.
"""

from protocol.codec import decode_message, encode_message, encode_unsigned
from protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.framing import MessageReader, frame, frame_bytes
from protocol.identity import key_from_text, key_id, key_to_text, short_id
from protocol.link import ChildLink, LinkState, ParentLink
from protocol.media import ChunkRing, ChunkSigner, ReorderBuffer, StreamVerifier, VerifiedChunk
from protocol.messages import (
    Ack,
    Assigned,
    Chunk,
    Goodbye,
    Heartbeat,
    Join,
    Leave,
    Message,
    Missing,
    Move,
    Moved,
    PathUpdate,
    Peer,
    Redirect,
    Refresh,
    Register,
    Rejoin,
    Repair,
    RetryAfter,
    StatusReport,
    StatusRequest,
    StreamInfo,
    Subscribe,
    Token,
    TreeNode,
    TreeReport,
    TreeRequest,
)
from protocol.signing import sign_message, verify_message
from protocol.tokens import check_token, issue_token
from protocol.tracker import ExchangeState, TrackerChannel, TrackerExchange

__all__ = [
    "Ack",
    "Assigned",
    "ChildLink",
    "Chunk",
    "ChunkRing",
    "ChunkSigner",
    "ErrorCode",
    "ExchangeState",
    "Goodbye",
    "Heartbeat",
    "Join",
    "Leave",
    "LinkState",
    "LocalProtocolError",
    "Message",
    "MessageReader",
    "Missing",
    "Move",
    "Moved",
    "ParentLink",
    "PathUpdate",
    "Peer",
    "ProtocolError",
    "Redirect",
    "Refresh",
    "Register",
    "Rejoin",
    "RemoteProtocolError",
    "ReorderBuffer",
    "Repair",
    "RetryAfter",
    "StatusReport",
    "StatusRequest",
    "StreamInfo",
    "StreamVerifier",
    "Subscribe",
    "Token",
    "TrackerChannel",
    "TrackerExchange",
    "TreeNode",
    "TreeReport",
    "TreeRequest",
    "VerifiedChunk",
    "check_token",
    "decode_message",
    "encode_message",
    "encode_unsigned",
    "frame",
    "frame_bytes",
    "issue_token",
    "key_from_text",
    "key_id",
    "key_to_text",
    "short_id",
    "sign_message",
    "verify_message",
]
