"""Every size limit in docs/spec.md §8, in one place."""

MAX_MESSAGE_SIZE = 65_536  # one encoded message, on a stream or in a datagram
MAX_STRING_BYTES = 256  # reasons, codec names
MAX_ADDRESS_BYTES = 128  # "host:port"
MAX_HEAD_SIZE = 1_024  # codec header (OpusHead with a channel mapping table fits easily)
MAX_TOKEN_SIZE = 512
MAX_PACKET_SIZE = 4_000  # one Opus packet (RFC 6716 allows at most 3,832 bytes per 120 ms)
MAX_CHUNK_PACKETS = 128
MAX_CHUNK_PAYLOAD = 16_384  # sum of a chunk's packet sizes
MAX_SEQS_PER_MESSAGE = 64  # REPAIR / MISSING
MAX_BACKUPS = 8
MAX_MOVES = 1_024
MAX_CAPACITY = 1_024  # declared children per node
MAX_DEPTH_HISTOGRAM = 256
MAX_TREE_NODES = 256  # per TREE_REPORT: 256 of the largest records fit one message
MAX_PATH = 64  # node ids in a PATH, the origin included: the deepest a node may be
MAX_STALLED_MS = 2**32 - 1
MAX_UINT64 = 2**64 - 1
REPAIR_BURST_BYTES = 65_536  # a child's repairs may exceed the live bytes it got by this
