"""Ogg Opus I/O cost: what reading at the origin and writing at each listener take.

Run: .venv/bin/python bench/bench_ogg.py  (prints figures; not a timed test)
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from meshd.ogg import OggOpusParser, OggOpusWriter, read_ogg_opus

SAMPLE = (Path(__file__).parent.parent / "meshd" / "data" / "sample.opus").read_bytes()


def main() -> None:
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        head, packets = read_ogg_opus(io.BytesIO(SAMPLE))
        audio = list(packets)
    elapsed = time.perf_counter() - start
    seconds = audio[-1].granule / 48000 * rounds
    print(
        f"read:  {len(SAMPLE) * rounds / elapsed / 1e6:6.2f} MB/s, "
        f"{elapsed / seconds * 100:.3f}% of a core per stream"
    )

    start = time.perf_counter()
    for _ in range(rounds):
        parser = OggOpusParser()
        for pos in range(0, len(SAMPLE), 512):
            parser.feed(SAMPLE[pos : pos + 512])
            while parser.next_packet() is not None:
                pass
    elapsed = time.perf_counter() - start
    print(f"parse in 512-byte chunks: {elapsed / seconds * 100:.3f}% of a core per stream")

    start = time.perf_counter()
    for _ in range(rounds):
        writer = OggOpusWriter(io.BytesIO(), head.raw)
        for packet in audio:  # one page per 20 ms packet, as a listener writes
            writer.write_packets([packet.data])
        writer.close()
    elapsed = time.perf_counter() - start
    print(
        f"write: {elapsed / (len(audio) * rounds) * 1e6:6.1f} us per packet, "
        f"{elapsed / seconds * 100:.3f}% of a core per stream"
    )


if __name__ == "__main__":
    main()
