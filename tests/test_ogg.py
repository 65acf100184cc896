"""Ogg Opus reader/writer: fixtures, round trips, malformed input and fuzzing."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.ogg import (
    MAX_PACKET_SIZE,
    MAX_TAGS_SIZE,
    AudioError,
    OggOpusMuxer,
    OggOpusParser,
    OggOpusWriter,
    OpusPacket,
    make_opus_tags,
    ogg_crc32,
    opus_packet_samples,
    parse_opus_head,
    parse_opus_tags,
    read_ogg_opus,
)

DATA = Path(__file__).parent / "data"
TONE = (DATA / "tone.opus").read_bytes()
MULTIPLEXED = (DATA / "multiplexed.ogg").read_bytes()
SAMPLE = (Path(__file__).parent.parent / "meshd" / "data" / "sample.opus").read_bytes()
MAX_PAGE = 27 + 255 + 255 * 255

# --- helpers: an independent page encoder and splitter ------------------------------


def make_page(
    body: bytes,
    lacing: list[int],
    *,
    flags: int = 0,
    granule: int = 0,
    serial: int = 1,
    seq: int = 0,
) -> bytes:
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, seq, 0, len(lacing))
    page = bytearray(header + bytes(lacing) + body)
    struct.pack_into("<I", page, 22, ogg_crc32(page))
    return bytes(page)


def laces(size: int) -> list[int]:
    return [255] * (size // 255) + [size % 255]


def split_pages(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        nsegs = data[pos + 26]
        end = pos + 27 + nsegs + sum(data[pos + 27 : pos + 27 + nsegs])
        pages.append(data[pos:end])
        pos = end
    return pages


def page_fields(page: bytes) -> tuple[int, int, int, int, int]:
    """flags, granule, serial, seq, segment count"""
    _, _, flags, granule, serial, seq, _, nsegs = struct.unpack_from("<4sBBqIIIB", page)
    return flags, granule, serial, seq, nsegs


def fix_crc(page: bytes) -> bytes:
    fixed = bytearray(page)
    fixed[22:26] = b"\0\0\0\0"
    struct.pack_into("<I", fixed, 22, ogg_crc32(fixed))
    return bytes(fixed)


HEAD = parse_opus_head(split_pages(TONE)[0][28:]).raw  # mono, pre-skip 312
TAGS = make_opus_tags()
AUDIO = b"\xfc" + b"\x55" * 40  # TOC: CELT 20 ms, code 0


def opus_stream(*audio_pages: bytes, serial: int = 1) -> bytes:
    """Header pages for `serial` followed by the given (already numbered) pages."""
    return (
        make_page(HEAD, [len(HEAD)], flags=0x02, serial=serial, seq=0)
        + make_page(TAGS, [len(TAGS)], serial=serial, seq=1)
        + b"".join(audio_pages)
    )


def parse_all(data: bytes, chunks: list[int] | None = None) -> list[OpusPacket]:
    """Feed `data` in chunks of the given sizes (cycled; all at once if None)."""
    parser = OggOpusParser()
    packets: list[OpusPacket] = []
    sizes = iter(chunks * (len(data) + 1) if chunks else [len(data)])
    pos = 0
    while pos < len(data):
        size = max(1, next(sizes))
        parser.feed(data[pos : pos + size])
        pos += size
        while (packet := parser.next_packet()) is not None:
            packets.append(packet)
        assert parser.buffered <= MAX_PAGE + size + MAX_TAGS_SIZE
    parser.feed(b"")
    while (packet := parser.next_packet()) is not None:
        packets.append(packet)
    assert parser.done
    return packets


def read_all(data: bytes) -> list[OpusPacket]:
    _, packets = read_ogg_opus(io.BytesIO(data))
    return list(packets)


def outcome(parse: Callable[[bytes], list[OpusPacket]], data: bytes) -> tuple[str, object]:
    """('ok', packets) or ('error', message); anything but AudioError fails the test."""
    try:
        return "ok", parse(data)
    except AudioError as exc:
        return "error", str(exc)


# --- CRC and Opus packet durations -----------------------------------------------------


def test_crc_matches_reference_check_value() -> None:
    # CRC-32/POSIX uses the same polynomial and bit order, with a final xor.
    assert ogg_crc32(b"123456789") ^ 0xFFFFFFFF == 0x765E7680
    assert ogg_crc32(b"") == 0


def _bitwise_ogg_crc(data: bytes) -> int:
    """The CRC as the Ogg spec (RFC 3533) describes it, one bit at a time."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


@given(st.binary(max_size=300))
def test_crc_matches_the_bitwise_definition(data: bytes) -> None:
    assert ogg_crc32(data) == _bitwise_ogg_crc(data)
    assert ogg_crc32(bytearray(data)) == ogg_crc32(memoryview(data)) == ogg_crc32(data)


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([0 << 3]), 480),  # SILK NB 10 ms
        (bytes([3 << 3]), 2880),  # SILK NB 60 ms
        (bytes([9 << 3]), 960),  # SILK WB 20 ms
        (bytes([12 << 3]), 480),  # hybrid SWB 10 ms
        (bytes([15 << 3]), 960),  # hybrid FB 20 ms
        (bytes([16 << 3]), 120),  # CELT NB 2.5 ms
        (bytes([31 << 3]), 960),  # CELT FB 20 ms
        (bytes([31 << 3 | 1, 0]), 1920),  # code 1: two equal frames
        (bytes([31 << 3 | 2, 0]), 1920),  # code 2: two frames
        (bytes([3 << 3 | 1, 0]), 5760),  # 2 x 60 ms = 120 ms, the maximum
        (bytes([31 << 3 | 3, 3]), 2880),  # code 3: 3 frames
        (bytes([31 << 3 | 3, 0xC6]), 5760),  # code 3 with VBR and padding bits, 6 frames
        (bytes([16 << 3 | 3, 48]), 5760),  # 48 x 2.5 ms
    ],
)
def test_opus_packet_samples(packet: bytes, samples: int) -> None:
    assert opus_packet_samples(packet) == samples


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"", "empty"),
        (bytes([31 << 3 | 3]), "no frame count"),
        (bytes([31 << 3 | 3, 0]), "0 frames"),
        (bytes([31 << 3 | 3, 7]), "120 ms"),
        (bytes([3 << 3 | 3, 3]), "120 ms"),
        (bytes([16 << 3 | 3, 49]), "120 ms"),
    ],
)
def test_opus_packet_samples_rejects_malformed(packet: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        opus_packet_samples(packet)


# --- OpusHead / OpusTags -----------------------------------------------------------------


def head_bytes(
    channels: int = 1, family: int = 0, *, version: int = 1, table: bytes = b""
) -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", version, channels, 312, 44100, -256, family) + table


def test_parse_opus_head_family_0() -> None:
    head = parse_opus_head(head_bytes(2))
    assert (head.version, head.channels, head.pre_skip) == (1, 2, 312)
    assert (head.input_sample_rate, head.output_gain, head.mapping_family) == (44100, -256, 0)
    assert (head.stream_count, head.coupled_count, head.channel_mapping) == (1, 1, b"\0\1")
    assert head.raw == head_bytes(2)


def test_parse_opus_head_family_1_surround() -> None:
    raw = head_bytes(6, 1, table=bytes([4, 2, 0, 4, 1, 2, 3, 5]))
    head = parse_opus_head(raw)
    assert (head.stream_count, head.coupled_count) == (4, 2)
    assert head.channel_mapping == bytes([0, 4, 1, 2, 3, 5])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"OpusHea", "not an OpusHead"),
        (b"OpusTags" + bytes(11), "not an OpusHead"),
        (head_bytes()[:-1], "not an OpusHead"),
        (head_bytes(version=16), "version"),
        (head_bytes(0), "0 channels"),
        (head_bytes(3), "family 0"),
        (head_bytes(9, 1, table=bytes([9, 0, *range(9)])), "family 1"),
        (head_bytes(2, 1, table=bytes([1, 1, 0])), "truncated"),
        (head_bytes(2, 1, table=bytes([0, 0, 0, 0])), "stream count"),
        (head_bytes(2, 1, table=bytes([1, 2, 0, 1])), "stream count"),
        (head_bytes(2, 1, table=bytes([1, 0, 0, 1])), "missing stream"),
        (head_bytes(2, 3, table=bytes([1, 1, 0, 1])), "family 3"),
        (head_bytes() + bytes(MAX_PACKET_SIZE), "too large"),
    ],
)
def test_parse_opus_head_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        parse_opus_head(raw)


def test_opus_tags_round_trip() -> None:
    tags = parse_opus_tags(make_opus_tags("vendor é", ["TITLE=meshd", "ARTIST=us"]))
    assert tags.vendor == "vendor é"
    assert tags.comments == ("TITLE=meshd", "ARTIST=us")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"OpusHead" + bytes(8), "not OpusTags"),
        (b"OpusTags\x05\0\0\0abc", "truncated"),
        (b"OpusTags\0\0\0\0", "truncated"),
        (b"OpusTags\0\0\0\0\xff\xff\xff\xff", "comments"),
        (b"OpusTags\0\0\0\0\x01\0\0\0\xff\xff\xff\xff", "truncated"),
        (b"OpusTags" + bytes(MAX_TAGS_SIZE), "too large"),
    ],
)
def test_parse_opus_tags_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        parse_opus_tags(raw)


# --- reading the fixtures --------------------------------------------------------------


def test_tone_fixture() -> None:
    head, iterator = read_ogg_opus(io.BytesIO(TONE))
    packets = list(iterator)
    assert (head.channels, head.pre_skip, head.input_sample_rate, head.mapping_family) == (
        1,
        312,
        48000,
        0,
    )
    assert len(packets) == 301
    assert all(p.samples == 960 for p in packets)
    assert [p.granule for p in packets[:-1]] == [960 * (i + 1) for i in range(300)]
    # The last page's granule trims the end: 6 s of audio plus the pre-skip.
    assert packets[-1].granule == 6 * 48000 + 312 == page_fields(split_pages(TONE)[-1])[1]
    bitrate = sum(len(p.data) for p in packets) * 8 / 6
    assert 28_000 < bitrate < 36_000


def test_bundled_sample() -> None:
    head, iterator = read_ogg_opus(io.BytesIO(SAMPLE))
    packets = list(iterator)
    seconds = (packets[-1].granule - head.pre_skip) / 48000
    assert 20 <= seconds <= 30
    assert head.channels == 1
    assert len(SAMPLE) < 150_000
    granules = [p.granule for p in packets]
    assert granules == sorted(granules)


def test_multiplexed_file_reads_the_opus_stream_only() -> None:
    # A Vorbis stream comes first; its pages are checked and skipped.
    assert {page_fields(p)[2] for p in split_pages(MULTIPLEXED)} == {0, 1}
    head, iterator = read_ogg_opus(io.BytesIO(MULTIPLEXED))
    packets = list(iterator)
    assert head.channels == 1
    assert len(packets) == 101
    assert packets[-1].granule == 2 * 48000 + 312


def test_incremental_parse_matches_sync_for_any_chunking() -> None:
    expected = read_all(TONE)
    for chunks in ([1], [7, 300, 2], [4096], [len(TONE)]):
        assert parse_all(TONE, chunks) == expected


class TrickleReader(io.RawIOBase):
    """A pipe-like reader that returns at most 100 bytes per call and counts them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self.data[self.consumed : self.consumed + min(100, len(buffer))]
        buffer[: len(chunk)] = chunk
        self.consumed += len(chunk)
        return len(chunk)


def test_reader_reads_incrementally_from_a_pipe() -> None:
    pipe = TrickleReader(TONE)
    head, iterator = read_ogg_opus(pipe)  # type: ignore[arg-type]
    assert head.pre_skip == 312
    assert pipe.consumed < 1000  # just the header pages, not the file
    first = next(iterator)
    assert first.granule == 960
    assert pipe.consumed < len(TONE) // 2
    assert len(list(iterator)) == 300
    assert pipe.consumed == len(TONE)


def test_parser_buffer_stays_bounded() -> None:
    parser = OggOpusParser()
    chunk = 16_384
    for pos in range(0, len(SAMPLE), chunk):
        parser.feed(SAMPLE[pos : pos + chunk])
        while parser.next_packet() is not None:
            assert parser.buffered <= chunk + MAX_PAGE
        assert parser.buffered <= chunk + MAX_PAGE
    parser.feed(b"")
    assert parser.next_packet() is None
    assert parser.done
    assert parser.buffered == 0


# --- malformed input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no Opus stream"),
        (b"RIFF....WAVEfmt ", "capture pattern"),
        (b"Og", "inside an Ogg page"),
        (TONE[:20], "inside an Ogg page"),
        (TONE[:60], "inside an Ogg page"),
        (TONE[: len(TONE) - 1], "inside an Ogg page"),
        (TONE[:4] + b"\x01" + TONE[5:], "version"),
        (TONE[:5] + b"\x0a" + TONE[6:], "flags"),
        (TONE[:40] + bytes([TONE[40] ^ 0x10]) + TONE[41:], "CRC"),
        (b"".join(split_pages(MULTIPLEXED)[:1] + split_pages(MULTIPLEXED)[2:3]), "no Opus"),
        (b"".join(split_pages(TONE)[:1]), "before the Opus headers"),
        (b"".join(p for i, p in enumerate(split_pages(TONE)) if i != 3), "sequence"),
    ],
)
def test_bad_input_raises_audio_error(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        read_all(data)
    with pytest.raises(AudioError, match=message):
        parse_all(data, [3])


def test_stream_cut_at_a_page_boundary_is_fine() -> None:
    pages = split_pages(TONE)
    packets = read_all(b"".join(pages[:4]))
    assert packets == read_all(TONE)[: len(packets)]
    assert len(packets) > 50


def test_reading_stops_at_eos() -> None:
    # Chained links and trailing junk after our EOS page are not read.
    assert read_all(TONE + TONE) == read_all(TONE)
    assert read_all(TONE + b"junk") == read_all(TONE)


def test_errors_are_sticky_and_feed_after_eof_is_refused() -> None:
    parser = OggOpusParser()
    parser.feed(b"nonsense")
    with pytest.raises(AudioError, match="capture"):
        parser.next_packet()
    with pytest.raises(AudioError, match="capture"):
        parser.next_packet()
    with pytest.raises(AudioError, match="capture"):
        parser.feed(TONE)
    parser = OggOpusParser()
    parser.feed(b"")
    parser.feed(b"")  # repeating end of input is harmless
    with pytest.raises(ValueError, match="after end of input"):
        parser.feed(b"x")


def test_structural_errors() -> None:
    audio = make_page(AUDIO, [len(AUDIO)], granule=960, seq=2)
    cases = {
        "begins mid-stream": opus_stream(audio, make_page(HEAD, [len(HEAD)], flags=2, serial=9)),
        "share serial": make_page(HEAD, [19], flags=2) + opus_stream(audio),
        "continuation flag": opus_stream(make_page(AUDIO, [41], flags=1, granule=960, seq=2)),
        "continuation flag ": opus_stream(
            make_page(AUDIO.ljust(255, b"\0"), [255], granule=-1, seq=2),
            make_page(AUDIO, [41], granule=960, seq=3),
        ),
        "less than": opus_stream(audio, make_page(AUDIO, [41], granule=900, seq=3)),
        "negative granule": opus_stream(make_page(AUDIO, [41], granule=-5, seq=2)),
        "ends inside a packet": opus_stream(
            make_page(AUDIO.ljust(255, b"\0"), [255], flags=4, granule=-1, seq=2)
        ),
        "ended before": make_page(HEAD, [len(HEAD)], flags=6),
        "empty Opus packet": opus_stream(make_page(b"", [0], granule=0, seq=2)),
        "input ends inside a packet": opus_stream(
            make_page(AUDIO.ljust(255, b"\0"), [255], granule=-1, seq=2)
        ),
        "not OpusTags": make_page(HEAD * 2, [len(HEAD)] * 2, flags=2),
    }
    for message, data in cases.items():
        with pytest.raises(AudioError, match=message.strip()):
            read_all(data)


def test_granule_gaps_and_missing_granules_are_accepted() -> None:
    data = opus_stream(
        make_page(AUDIO * 2, [41, 41], granule=48000 + 1920, seq=2),  # starts 1 s in
        make_page(AUDIO, [41], granule=-1, seq=3),  # no granule: count on
        make_page(AUDIO, [41], granule=96000, seq=4),  # a gap in the source
    )
    assert [p.granule for p in read_all(data)] == [48960, 49920, 50880, 96000]


def oversized_stream(packet_index: int, limit: int) -> Iterator[bytes]:
    """A stream whose `packet_index`-th packet (0 head, 1 tags, 2 audio) never ends."""
    yield make_page(HEAD, [len(HEAD)], flags=2, seq=0)
    seq = 1
    if packet_index == 2:
        yield make_page(TAGS, [len(TAGS)], seq=seq)
        seq += 1
    body = b"OpusTags" + bytes(255 * 255 - 8) if packet_index == 1 else bytes(255 * 255)
    yield make_page(body, [255] * 255, seq=seq, granule=-1)
    for _ in range(limit // len(body) + 2):
        seq += 1
        yield make_page(bytes(255 * 255), [255] * 255, flags=1, seq=seq, granule=-1)


@pytest.mark.parametrize(("packet_index", "limit"), [(1, MAX_TAGS_SIZE), (2, MAX_PACKET_SIZE)])
def test_oversized_packets_are_refused_with_bounded_memory(packet_index: int, limit: int) -> None:
    parser = OggOpusParser()
    with pytest.raises(AudioError, match=f"larger than {limit}"):
        for page in oversized_stream(packet_index, limit):
            parser.feed(page)
            assert parser.next_packet() is None
            assert parser.buffered <= limit + MAX_PAGE


# --- writing -----------------------------------------------------------------------------


def test_writer_round_trip_from_mid_stream() -> None:
    source = read_all(TONE)[100:]
    out = io.BytesIO()
    writer = OggOpusWriter(out, HEAD, serial=0x1234)
    batches = [source[i : i + n] for i, n in zip(range(0, 200, 20), [1, 3, 16] * 10, strict=False)]
    for batch in batches:
        writer.write_packets([p.data for p in batch])
    writer.close()
    writer.close()  # idempotent
    written = [p for batch in batches for p in batch]

    parser_out = read_all(out.getvalue())
    assert [p.data for p in parser_out] == [p.data for p in written]
    assert [p.granule for p in parser_out] == [960 * (i + 1) for i in range(len(written))]
    assert writer.granule == 960 * len(written)

    pages = split_pages(out.getvalue())
    assert all(fix_crc(p) == p for p in pages)
    assert page_fields(pages[0]) == (0x02, 0, 0x1234, 0, 1)
    assert pages[0][28:] == HEAD
    assert parse_opus_tags(pages[1][28:]).vendor == "meshd"
    assert page_fields(pages[-1]) == (0x04, writer.granule, 0x1234, len(pages) - 1, 0)
    assert [page_fields(p)[3] for p in pages] == list(range(len(pages)))
    assert len(pages) == 2 + len(batches) + 1  # one page per write, flushed at once


def test_writer_splits_large_packets_and_many_packets_across_pages() -> None:
    big = bytes([31 << 3]) + bytes(range(256)) * 100  # 25,601 bytes: 101 segments
    exact = bytes([31 << 3]) + bytes(254)  # 255 bytes: lacing 255, 0
    small = [bytes([31 << 3, i % 256]) for i in range(300)]
    largest = bytes([31 << 3]) + bytes(MAX_PACKET_SIZE - 1)  # 257 segments
    packets = [big, exact, big, big, *small, exact]
    out = io.BytesIO()
    writer = OggOpusWriter(out, HEAD, tags=make_opus_tags("x", ["A=b"]))
    writer.write_packets(packets)
    writer.write_packets([largest])  # starts a page it cannot end on
    writer.close()
    packets.append(largest)
    pages = split_pages(out.getvalue())
    assert all(page_fields(p)[4] <= 255 for p in pages)
    assert any(page_fields(p)[0] & 0x01 for p in pages)  # a packet continues
    assert any(page_fields(p)[1] == -1 for p in pages)  # a page where nothing ends
    parser = OggOpusParser()
    parser.feed(out.getvalue())
    parser.feed(b"")
    read: list[OpusPacket] = []
    while (packet := parser.next_packet()) is not None:
        read.append(packet)
    assert [p.data for p in read] == packets
    assert [p.granule for p in read] == [960 * (i + 1) for i in range(len(packets))]
    assert parser.tags is not None
    assert parser.tags.comments == ("A=b",)


class FlushLog(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.unflushed = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.unflushed += len(data)
        return super().write(data)

    def flush(self) -> None:
        self.unflushed = 0


def test_writer_flushes_every_write() -> None:
    out = FlushLog()
    writer = OggOpusWriter(out, HEAD)
    assert out.unflushed == 0
    assert out.getvalue()
    writer.write_packets([AUDIO])
    assert out.unflushed == 0
    writer.close()
    assert out.unflushed == 0


def test_writer_rejects_bad_input() -> None:
    with pytest.raises(AudioError):
        OggOpusWriter(io.BytesIO(), b"OpusHead")
    with pytest.raises(AudioError):
        OggOpusWriter(io.BytesIO(), HEAD, tags=b"OpusTags")
    with pytest.raises(ValueError, match="32 bits"):
        OggOpusMuxer(HEAD, serial=1 << 32)
    writer = OggOpusWriter(io.BytesIO(), HEAD)
    with pytest.raises(AudioError, match="empty"):
        writer.write_packets([b""])
    with pytest.raises(AudioError, match="too large"):
        writer.write_packets([AUDIO + bytes(MAX_PACKET_SIZE)])
    writer.close()
    with pytest.raises(ValueError, match="after end"):
        writer.write_packets([AUDIO])


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_writer_output_decodes_cleanly_with_ffmpeg(tmp_path: Path) -> None:
    path = tmp_path / "out.opus"
    source = read_all(TONE)[50:]  # a listener that joined 1 s in
    with path.open("wb") as out:
        writer = OggOpusWriter(out, HEAD)
        for i in range(0, len(source), 5):
            writer.write_packets([p.data for p in source[i : i + 5]])
        writer.close()
    decode = subprocess.run(
        ["ffmpeg", "-v", "warning", "-xerror", "-i", str(path), "-f", "s16le", "-"],
        capture_output=True,
        check=True,
    )
    assert decode.stderr == b""
    decoded_samples = len(decode.stdout) // 2
    assert abs(decoded_samples - (len(source) * 960 - 312)) <= 960


# --- fuzzing -----------------------------------------------------------------------------


def small_stream() -> bytes:
    """Three short audio pages and an EOS page: small enough to fuzz quickly."""
    muxer = OggOpusMuxer(HEAD, serial=5)
    packets = [p.data for p in read_all(TONE)[:12]]
    batches = [muxer.encode_packets(packets[i : i + 4]) for i in range(0, 12, 4)]
    return muxer.headers + b"".join(batches) + muxer.end()


SMALL_VALID = small_stream()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_robust(data: bytes, chunks: list[int]) -> None:
    """Both APIs raise only AudioError, agree, and don't depend on the chunking."""
    whole = outcome(read_all, data)
    assert outcome(lambda d: parse_all(d, chunks), data) == whole
    assert outcome(lambda d: parse_all(d, None), data) == whole


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(1, 600), min_size=1, max_size=5))
def test_fuzz_random_bytes(data: bytes, chunks: list[int]) -> None:
    check_robust(data, chunks)


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 600), min_size=1, max_size=5))
def test_fuzz_random_bytes_after_an_ogg_prefix(data: bytes, chunks: list[int]) -> None:
    check_robust(b"OggS\0" + data, chunks)
    check_robust(TONE[:200] + data, chunks)


sources = st.sampled_from([SMALL_VALID, TONE, MULTIPLEXED])


@FUZZ
@given(sources, st.data(), st.lists(st.integers(1, 4096), min_size=1, max_size=3))
def test_fuzz_bit_flips(source: bytes, data: st.DataObject, chunks: list[int]) -> None:
    mutated = bytearray(source)
    for position in data.draw(st.lists(st.integers(0, len(source) * 8 - 1), max_size=4)):
        mutated[position // 8] ^= 1 << (position % 8)
    check_robust(bytes(mutated), chunks)


@FUZZ
@given(sources, st.data(), st.lists(st.integers(1, 4096), min_size=1, max_size=3))
def test_fuzz_truncation_and_splices(source: bytes, data: st.DataObject, chunks: list[int]) -> None:
    a = data.draw(st.integers(0, len(source)))
    b = data.draw(st.integers(0, len(source)))
    c = data.draw(st.integers(0, len(source)))
    insert = data.draw(st.binary(max_size=64))
    check_robust(source[:a], chunks)
    check_robust(source[:a] + insert + source[b:], chunks)
    check_robust(source[:a] + source[b:c] + source[a:], chunks)


@FUZZ
@given(st.data(), st.lists(st.integers(1, 4096), min_size=1, max_size=3))
def test_fuzz_mutations_behind_valid_crcs(data: st.DataObject, chunks: list[int]) -> None:
    """Mutate page headers, lacing and bodies, then fix the CRC so the parser looks deeper."""
    pages = split_pages(SMALL_VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(pages) - 1))
        page = bytearray(pages[index])
        offset = data.draw(st.integers(4, len(page) - 1).filter(lambda i: not 22 <= i < 26))
        page[offset] = data.draw(st.integers(0, 255))
        pages[index] = fix_crc(bytes(page))
    if data.draw(st.booleans()):
        i, j = data.draw(st.integers(0, len(pages) - 1)), data.draw(st.integers(0, len(pages) - 1))
        pages[i], pages[j] = pages[j], pages[i]
    check_robust(b"".join(pages), chunks)


def test_muxer_carries_the_source_granules_and_its_end_trim() -> None:
    """A listener's file keeps the origin's timing: the first page starts where the
    source's packets did, a jump (audio that never came) stays, and the last page's
    granule trims the end (RFC 7845 §4.5), here the tone's 648 samples."""
    source = read_all(TONE)
    assert source[-1].granule == 960 * len(source) - 648  # the fixture has an end trim
    muxer = OggOpusMuxer(HEAD, serial=7)
    batches = [source[10:20], source[20:30], source[40:-1], source[-1:]]
    data = muxer.headers
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        data += muxer.encode_packets([p.data for p in batch], batch[-1].granule, last=last)
    assert muxer.end() == b""  # the last page already ended the stream
    written = [p for batch in batches for p in batch]
    parsed = read_all(data)
    assert [p.data for p in parsed] == [p.data for p in written]
    assert [p.granule for p in parsed] == [p.granule for p in written]
    pages = split_pages(data)
    assert page_fields(pages[-1])[0] == 0x04 and page_fields(pages[-1])[1] == source[-1].granule
    with pytest.raises(ValueError, match="after end"):
        muxer.encode_packets([source[0].data])
