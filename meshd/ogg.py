"""Ogg Opus reading and writing, pure Python and streaming.

The origin reads an Ogg Opus file or pipe (RFC 3533 pages, RFC 7845 mapping) and cuts
it into Opus packets; every listener writes the packets it receives back out as a
standalone Ogg Opus stream a player can read. Input is untrusted: anything malformed
raises :class:`AudioError`, and no size read from the input is allocated unchecked.

The reader is sans-I/O (:class:`OggOpusParser`: ``feed(bytes)`` / ``next_packet()``) so
a trio task can read stdin in chunks; :func:`read_ogg_opus` wraps it for blocking file
objects. The writer likewise has a sans-I/O core (:class:`OggOpusMuxer`, which returns
the bytes to write) and a blocking wrapper (:class:`OggOpusWriter`).
"""

from __future__ import annotations

import random
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_TAGS_SIZE",
    "SAMPLE_RATE",
    "AudioError",
    "OggOpusMuxer",
    "OggOpusParser",
    "OggOpusWriter",
    "OpusHead",
    "OpusPacket",
    "OpusTags",
    "make_opus_tags",
    "ogg_crc32",
    "opus_packet_samples",
    "parse_opus_head",
    "parse_opus_tags",
    "read_ogg_opus",
]

SAMPLE_RATE = 48_000
"""Opus durations and Ogg Opus granule positions always count 48 kHz samples."""

MAX_PACKET_SIZE = 64 * 1024
"""Largest OpusHead or audio packet accepted; a real Opus packet is at most ~61 KB."""

MAX_TAGS_SIZE = 1024 * 1024
"""Largest OpusTags packet accepted (it may carry cover art, so it gets more room)."""

MAX_PACKET_DURATION = 5760
"""RFC 6716 §3.2.5: an Opus packet lasts at most 120 ms."""

_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, nsegs
_CRC_OFFSET = 22
_MAX_SEGMENTS = 255
_FLAG_CONTINUED = 0x01
_FLAG_BOS = 0x02
_FLAG_EOS = 0x04
_READ_CHUNK = 16 * 1024


class AudioError(ValueError):
    """The input is not a valid (or not a supported) Ogg Opus stream or Opus packet."""


# Ogg's CRC-32 is zlib's with every bit mirrored: zlib's polynomial 0xEDB88320 is
# 0x04C11DB7 reversed, and zlib shifts right where Ogg shifts left. Mirroring each input
# byte and the result turns one into the other, so the loop runs in zlib's C code.
_MIRROR = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def ogg_crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 as Ogg computes it: polynomial 0x04C11DB7, MSB first, no init or final xor."""
    # Starting zlib at 0xFFFFFFFF cancels its initial inversion; the final one is undone.
    mirrored = zlib.crc32(bytes(data).translate(_MIRROR), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(mirrored.to_bytes(4, "little").translate(_MIRROR), "big")


# Samples per frame for each TOC configuration (RFC 6716 §3.1, table 2).
_FRAME_SAMPLES = (
    (480, 960, 1920, 2880) * 3  # SILK-only: 10, 20, 40, 60 ms
    + (480, 960) * 2  # hybrid: 10, 20 ms
    + (120, 240, 480, 960) * 4  # CELT-only: 2.5, 5, 10, 20 ms
)


def opus_packet_samples(packet: bytes | bytearray) -> int:
    """Duration of an Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 §3.1).

    Only the bytes that set the duration are checked (TOC, and code 3's frame count), so
    this also works on the first stream of a multistream packet.
    """
    if not packet:
        raise AudioError("empty Opus packet")
    toc = packet[0]
    frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise AudioError("Opus packet with frame count code 3 has no frame count byte")
        frames = packet[1] & 0x3F
        if frames == 0:
            raise AudioError("Opus packet with frame count code 3 declares 0 frames")
    samples = frame * frames
    if samples > MAX_PACKET_DURATION:
        raise AudioError(f"Opus packet lasts {samples} samples, more than 120 ms")
    return samples


@dataclass(frozen=True, slots=True)
class OpusHead:
    """The parsed identification header (RFC 7845 §5.1); ``raw`` is what gets relayed."""

    version: int
    channels: int
    pre_skip: int
    input_sample_rate: int
    output_gain: int
    mapping_family: int
    stream_count: int
    coupled_count: int
    channel_mapping: bytes
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OpusTags:
    """The parsed comment header (RFC 7845 §5.2); strings are decoded leniently."""

    vendor: str
    comments: tuple[str, ...]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OpusPacket:
    """One audio packet with its duration and the Ogg granule position at its end.

    ``granule`` counts 48 kHz samples from the start of the stream, pre-skip included
    (RFC 7845 §4); differences between granules give the pacing.
    """

    data: bytes = field(repr=False)
    samples: int
    granule: int


_HEAD_FIXED = struct.Struct("<8sBBHIhB")  # magic, version, channels, pre-skip, rate, gain, family


def parse_opus_head(packet: bytes | bytearray) -> OpusHead:
    """Validate and parse an OpusHead packet."""
    raw = bytes(packet)
    if len(raw) < _HEAD_FIXED.size or not raw.startswith(b"OpusHead"):
        raise AudioError("not an OpusHead packet")
    if len(raw) > MAX_PACKET_SIZE:
        raise AudioError(f"OpusHead packet of {len(raw)} bytes is too large")
    _, version, channels, pre_skip, rate, gain, family = _HEAD_FIXED.unpack_from(raw)
    if version > 15:
        raise AudioError(f"unsupported OpusHead major version (version byte {version})")
    if channels == 0:
        raise AudioError("OpusHead declares 0 channels")
    if family == 0:
        if channels > 2:
            raise AudioError(f"channel mapping family 0 allows 1 or 2 channels, not {channels}")
        streams, coupled, mapping = 1, channels - 1, bytes(range(channels))
    elif family in (1, 2, 255):
        if family == 1 and channels > 8:
            raise AudioError(f"channel mapping family 1 allows 1 to 8 channels, not {channels}")
        table_end = _HEAD_FIXED.size + 2 + channels
        if len(raw) < table_end:
            raise AudioError("OpusHead channel mapping table is truncated")
        streams, coupled = raw[_HEAD_FIXED.size], raw[_HEAD_FIXED.size + 1]
        mapping = raw[_HEAD_FIXED.size + 2 : table_end]
        if streams == 0 or coupled > streams or streams + coupled > 255:
            raise AudioError(f"OpusHead has an invalid stream count ({streams}, {coupled})")
        if any(m != 255 and m >= streams + coupled for m in mapping):
            raise AudioError("OpusHead channel mapping refers to a missing stream")
    else:
        raise AudioError(f"unsupported channel mapping family {family}")
    return OpusHead(
        version=version,
        channels=channels,
        pre_skip=pre_skip,
        input_sample_rate=rate,
        output_gain=gain,
        mapping_family=family,
        stream_count=streams,
        coupled_count=coupled,
        channel_mapping=mapping,
        raw=raw,
    )


def parse_opus_tags(packet: bytes | bytearray) -> OpusTags:
    """Validate and parse an OpusTags packet; every length is checked against the packet."""
    raw = bytes(packet)
    if not raw.startswith(b"OpusTags"):
        raise AudioError("second packet is not OpusTags")
    if len(raw) > MAX_TAGS_SIZE:
        raise AudioError(f"OpusTags packet of {len(raw)} bytes is too large")
    pos = 8

    def take(n: int) -> bytes:
        nonlocal pos
        if n > len(raw) - pos:
            raise AudioError("OpusTags packet is truncated")
        pos += n
        return raw[pos - n : pos]

    def take_string() -> str:
        (length,) = struct.unpack("<I", take(4))
        return take(length).decode("utf-8", errors="replace")

    vendor = take_string()
    (count,) = struct.unpack("<I", take(4))
    if count > (len(raw) - pos) // 4:  # each comment needs at least its length field
        raise AudioError(f"OpusTags declares {count} comments, more than fit in the packet")
    comments = tuple(take_string() for _ in range(count))
    return OpusTags(vendor=vendor, comments=comments, raw=raw)


def make_opus_tags(vendor: str = "meshd", comments: Sequence[str] = ()) -> bytes:
    """Build an OpusTags packet, for writers that have none to pass through."""

    def string(text: str) -> bytes:
        encoded = text.encode()
        return struct.pack("<I", len(encoded)) + encoded

    return b"".join(
        [b"OpusTags", string(vendor), struct.pack("<I", len(comments))]
        + [string(comment) for comment in comments]
    )


class OggOpusParser:
    """Incremental Ogg Opus demuxer: push bytes in, pull audio packets out.

    Call :meth:`feed` with each chunk read, then :meth:`next_packet` until it returns
    ``None``; feed ``b""`` at end of input. Only the first Opus logical stream is read:
    pages of other multiplexed streams are checked and skipped, and reading stops at the
    stream's EOS page (later chained links are ignored). Memory stays bounded if the
    caller drains packets before feeding more: one page, one partial packet and the
    packets of one page. Errors are sticky: once one is raised, every call raises it.
    """

    def __init__(self) -> None:
        self.head: OpusHead | None = None
        self.tags: OpusTags | None = None
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf
        self._offset = 0  # stream offset of _buf[_pos], for error messages
        self._eof = False
        self._done = False
        self._error: AudioError | None = None
        self._ready: deque[OpusPacket] = deque()
        self._bos_phase = True
        self._bos_serials: set[int] = set()
        self._serial: int | None = None
        self._next_seq = 0
        self._partial: bytearray | None = None
        self._granule = 0  # end granule of the last audio packet

    @property
    def done(self) -> bool:
        """True once no more packets will come: EOS page reached or input ended."""
        return self._done and not self._ready

    @property
    def buffered(self) -> int:
        """Bytes held (unparsed input, partial packet, queued packets), to check bounds."""
        partial = len(self._partial) if self._partial is not None else 0
        return len(self._buf) - self._pos + partial + sum(len(p.data) for p in self._ready)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; ``b""`` means end of input. Data after the EOS page is ignored."""
        if self._error is not None:
            raise self._error
        if self._eof:
            if data:
                raise ValueError("feed() after end of input")
            return
        if not data:
            self._eof = True
        elif not self._done:
            self._buf += data

    def next_packet(self) -> OpusPacket | None:
        """The next audio packet, or ``None`` if more input is needed (or :attr:`done`)."""
        if self._error is not None:
            raise self._error
        try:
            while not self._ready and not self._done:
                if not self._parse_page():
                    if self._eof:
                        self._finish()
                    break
        except AudioError as exc:
            self._error = exc
            raise
        return self._ready.popleft() if self._ready else None

    def _fail(self, message: str) -> AudioError:
        return AudioError(f"{message} (page at byte {self._offset})")

    def _parse_page(self) -> bool:
        """Parse one page if it is all buffered; False if more input is needed."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if buf[pos : pos + 4] != b"OggS"[: min(avail, 4)]:
            raise self._fail("bad Ogg capture pattern: not an Ogg stream or corrupt data")
        if avail < _HEADER.size:
            return False
        _, version, flags, granule, serial, seq, crc, nsegs = _HEADER.unpack_from(buf, pos)
        if version != 0:
            raise self._fail(f"unsupported Ogg version {version}")
        if flags & ~(_FLAG_CONTINUED | _FLAG_BOS | _FLAG_EOS):
            raise self._fail(f"unknown Ogg header flags 0x{flags:02x}")
        body_start = pos + _HEADER.size + nsegs
        if len(buf) < body_start:
            return False
        lacing = bytes(buf[pos + _HEADER.size : body_start])
        end = body_start + sum(lacing)
        if len(buf) < end:
            return False
        page = bytes(buf[pos:end])
        computed = ogg_crc32(page[:_CRC_OFFSET] + b"\0\0\0\0" + page[_CRC_OFFSET + 4 :])
        if computed != crc:
            raise self._fail(f"Ogg page CRC mismatch (stored {crc:08x}, computed {computed:08x})")
        self._handle_page(flags, granule, serial, seq, lacing, page[body_start - pos :])
        self._offset += end - pos
        self._pos = end
        if self._done:
            buf.clear()  # nothing after the EOS page is read
        if end * 2 >= len(buf):  # amortized: the copy is never larger than what was consumed
            del buf[:end]
            self._pos = 0
        return True

    def _handle_page(
        self, flags: int, granule: int, serial: int, seq: int, lacing: bytes, body: bytes
    ) -> None:
        if flags & _FLAG_BOS:
            if not self._bos_phase:
                raise self._fail("a new logical stream begins mid-stream")
            if serial in self._bos_serials:
                raise self._fail(f"two streams share serial number {serial:08x}")
            self._bos_serials.add(serial)
            if self._serial is None and body.startswith(b"OpusHead"):
                self._serial, self._next_seq = serial, seq
        elif self._bos_phase:
            self._bos_phase = False
            if self._serial is None:
                raise self._fail("no Opus stream: no beginning-of-stream page holds an OpusHead")
        if serial != self._serial:
            return  # another multiplexed stream (or one we passed over)
        if seq != self._next_seq:
            raise self._fail(f"page sequence {seq} where {self._next_seq} was expected")
        self._next_seq = (seq + 1) & 0xFFFFFFFF
        if bool(flags & _FLAG_CONTINUED) != (self._partial is not None):
            raise self._fail("page continuation flag does not match the previous page")
        audio = self._split_packets(lacing, body)
        if audio:
            self._queue_audio(audio, granule, bool(flags & _FLAG_EOS))
        if flags & _FLAG_EOS:
            if self._partial is not None:
                raise self._fail("end-of-stream page ends inside a packet")
            if self.tags is None:
                raise self._fail("stream ended before its Opus headers")
            self._done = True

    def _split_packets(self, lacing: bytes, body: bytes) -> list[tuple[bytes, int]]:
        """Reassemble packets from the lacing values; returns the audio ones completed."""
        audio: list[tuple[bytes, int]] = []
        current = self._partial if self._partial is not None else bytearray()
        pos = 0
        for lace in lacing:
            limit = (
                MAX_TAGS_SIZE if self.head is not None and self.tags is None else MAX_PACKET_SIZE
            )
            if len(current) + lace > limit:
                raise self._fail(f"packet larger than {limit} bytes")
            current += body[pos : pos + lace]
            pos += lace
            if lace < 255:
                data = bytes(current)
                current = bytearray()
                if self.head is None:
                    self.head = parse_opus_head(data)
                elif self.tags is None:
                    self.tags = parse_opus_tags(data)
                else:
                    audio.append((data, opus_packet_samples(data)))
        if lacing:
            self._partial = current if lacing[-1] == 255 else None
        return audio

    def _queue_audio(self, audio: list[tuple[bytes, int]], granule: int, eos: bool) -> None:
        """Give each packet its end granule, checked against the page's granule position.

        A page's granule is the end of its last completed packet. A forward jump (a gap
        in the source, or a stream that starts late) is accepted; going backwards is an
        error except on the last page, where it trims the end (RFC 7845 §4.5).
        """
        previous = self._granule
        total = sum(samples for _, samples in audio)
        if granule == -1:
            base, cap = previous, None
        elif granule < -1:
            raise self._fail(f"negative granule position {granule}")
        else:
            base, cap = granule - total, granule
            if base < previous:
                if not eos or granule < previous:
                    raise self._fail(
                        f"granule position {granule} is less than the {previous + total} "
                        "samples that end on this page"
                    )
                base = previous
        end = base
        for data, samples in audio:
            end += samples
            self._ready.append(OpusPacket(data, samples, end if cap is None else min(end, cap)))
        self._granule = self._ready[-1].granule

    def _finish(self) -> None:
        """End of input without an EOS page: fine at a page boundary after the headers."""
        leftover = len(self._buf) - self._pos
        if leftover:
            raise self._fail(f"input ends inside an Ogg page ({leftover} bytes left)")
        if self._serial is None:
            raise self._fail("no Opus stream in the input")
        if self.tags is None:
            raise self._fail("input ended before the Opus headers were complete")
        if self._partial is not None:
            raise self._fail("input ends inside a packet")
        self._done = True


def _iter_packets(
    parser: OggOpusParser, read: Callable[[int], bytes], first: list[OpusPacket]
) -> Iterator[OpusPacket]:
    yield from first
    while True:
        packet = parser.next_packet()
        if packet is not None:
            yield packet
        elif parser.done:
            return
        else:
            parser.feed(read(_READ_CHUNK))


def read_ogg_opus(fileobj: BinaryIO) -> tuple[OpusHead, Iterator[OpusPacket]]:
    """Read the headers of an Ogg Opus file or pipe, then iterate its audio packets.

    Reads incrementally (``read1`` when available, so a pipe yields pages as they come)
    and stops at the EOS page. Raises :class:`AudioError` for bad input, from this call
    or from the iterator.
    """
    parser = OggOpusParser()
    read: Callable[[int], bytes] = getattr(fileobj, "read1", fileobj.read)
    first: list[OpusPacket] = []
    while parser.tags is None:
        packet = parser.next_packet()
        if packet is not None:
            first.append(packet)
        else:
            parser.feed(read(_READ_CHUNK))
    assert parser.head is not None  # set before tags
    return parser.head, _iter_packets(parser, read, first)


class OggOpusMuxer:
    """Sans-I/O Ogg Opus encoder: each call returns the pages to write, in order.

    Granule positions either count samples from this muxer's first packet, or, when
    `encode_packets` is given the source's granule position, carry the source's own: a
    listener's file then has the origin's timing, its end trim included (RFC 7845 §4.5),
    and one that joined mid-stream starts at the granule it joined at (§4.3 allows a
    non-zero start). The head's pre-skip is kept as is (§4.2: the decoder discards that
    many samples at the start, which also hides its warm-up when joining mid-stream).
    """

    def __init__(self, head: bytes, tags: bytes | None = None, serial: int | None = None):
        parse_opus_head(head)
        if tags is None:
            tags = make_opus_tags()
        else:
            parse_opus_tags(tags)
        self.serial = random.getrandbits(32) if serial is None else serial
        if not 0 <= self.serial <= 0xFFFFFFFF:
            raise ValueError("Ogg serial number must fit in 32 bits")
        self.granule = 0
        self._seq = 0
        self._ended = False
        self._audio = False
        self.headers = self._paginate([(head, 0)], bos=True) + self._paginate([(tags, 0)])
        """The OpusHead page (BOS, alone) and the OpusTags page(s): write these first."""

    def encode_packets(
        self, packets: Sequence[bytes], granule: int | None = None, *, last: bool = False
    ) -> bytes:
        """Pages holding these audio packets (as few as fit 255 segments each).

        `granule` is the source's granule position at the end of the last packet: the
        first call starts the stream there, a jump forward (audio that never came, before
        these packets) is kept, and a position short of the packets' end trims the end,
        which only the stream's `last` page may do (it gets the EOS flag; `end` then adds
        nothing)."""
        if self._ended:
            raise ValueError("encode_packets() after end()")
        timed = []
        for packet in packets:
            if len(packet) > MAX_PACKET_SIZE:
                raise AudioError(f"Opus packet of {len(packet)} bytes is too large")
            timed.append((packet, opus_packet_samples(packet)))
        if granule is not None:
            start = granule - sum(samples for _, samples in timed)
            if not self._audio or start > self.granule:  # the start, or audio that never came
                self.granule = max(0, start)
        self._audio = self._audio or bool(timed)
        pages = self._paginate(timed, end=granule, eos=last)
        self._ended = last
        return pages

    def end(self) -> bytes:
        """The final, empty page with the EOS flag; b"" if already ended."""
        if self._ended:
            return b""
        self._ended = True
        return self._page(_FLAG_EOS, self.granule, [], b"")

    def _paginate(
        self,
        packets: Sequence[tuple[bytes, int]],
        bos: bool = False,
        end: int | None = None,
        eos: bool = False,
    ) -> bytes:
        """Pages for `packets`; with `end`, the last packet ends at that granule and none
        before it ends later; with `eos`, the last page ends the stream."""
        pages: list[bytes] = []
        flags = _FLAG_BOS if bos else 0
        lacing: list[int] = []
        body = bytearray()
        granule = -1  # no packet ends on the page (yet)
        for index, (packet, samples) in enumerate(packets):
            laces = [255] * (len(packet) // 255) + [len(packet) % 255]
            for i, lace in enumerate(laces):
                if len(lacing) == _MAX_SEGMENTS:
                    pages.append(self._page(flags, granule, lacing, body))
                    flags = _FLAG_CONTINUED if i > 0 else 0
                    lacing, body, granule = [], bytearray(), -1
                lacing.append(lace)
                body += packet[i * 255 : i * 255 + lace]
            self.granule += samples
            if end is not None:
                self.granule = end if index == len(packets) - 1 else min(self.granule, end)
            granule = self.granule
        if lacing:
            pages.append(self._page(flags | (_FLAG_EOS if eos else 0), granule, lacing, body))
        return b"".join(pages)

    def _page(self, flags: int, granule: int, lacing: list[int], body: bytes | bytearray) -> bytes:
        header = _HEADER.pack(b"OggS", 0, flags, granule, self.serial, self._seq, 0, len(lacing))
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        page = bytearray(header)
        page += bytes(lacing)
        page += body
        struct.pack_into("<I", page, _CRC_OFFSET, ogg_crc32(page))
        return bytes(page)


class OggOpusWriter:
    """Writes an Ogg Opus stream to a blocking binary file object, flushing each write.

    Flushing after every call lets a player reading our stdout start and keep playing
    promptly. :meth:`close` ends the stream but leaves ``out`` open (it may be stdout).
    """

    def __init__(
        self, out: BinaryIO, head: bytes, tags: bytes | None = None, serial: int | None = None
    ) -> None:
        self._out = out
        self._muxer = OggOpusMuxer(head, tags, serial)
        self._write(self._muxer.headers)

    @property
    def granule(self) -> int:
        """Samples written so far (the granule position of the last page)."""
        return self._muxer.granule

    def write_packets(self, packets: Sequence[bytes]) -> None:
        """Write these packets on one or more pages and flush."""
        self._write(self._muxer.encode_packets(packets))

    def close(self) -> None:
        """Write the EOS page and flush; later calls do nothing."""
        self._write(self._muxer.end())

    def _write(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._out.flush()
