"""Codec and media-signing figures: messages/s and the signature overhead at 32 kbps.

Run: .venv/bin/python bench/bench_codec.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    ChunkSigner,
    Heartbeat,
    Join,
    Message,
    MessageReader,
    StreamVerifier,
    decode_message,
    encode_message,
    encode_unsigned,
    frame,
    key_id,
    sign_message,
)

PACKET_32K = b"\xfc" + b"\x5a" * 79  # 20 ms at 32 kbps
PACKET_64K = b"\xfc" + b"\x5a" * 159


def rate(action: Callable[[], object], seconds: float = 1.0) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(200):
            action()
        count += 200
    return count / elapsed


def round_trip(msg: Message) -> Callable[[], object]:
    """Encode `msg` and decode it again, once per call."""
    return lambda: decode_message(encode_message(msg))


def main() -> None:
    origin = Ed25519PrivateKey.generate()
    signer = ChunkSigner(origin)
    chunk = signer.sign([PACKET_32K] * 10, 9600)
    node = Ed25519PrivateKey.generate()
    join = sign_message(Join(signer.stream_id, key_id(node), 4, "127.0.0.1:7000", None, 0), node)
    print("message sizes (bytes):")
    sig_bytes = len(chunk.raw) - len(encode_unsigned(chunk.chunk))
    print(f"  CHUNK, 10 x 80-byte packets (200 ms at 32 kbps): {len(chunk.raw)}")
    print(f"  JOIN: {len(encode_message(join))}   HEARTBEAT: {len(encode_message(Heartbeat(1)))}")
    payload = 10 * len(PACKET_32K)
    print("signature overhead at 32 kbps (5 chunks/s):")
    print(
        f"  signature {sig_bytes} B/chunk = {sig_bytes * 5} B/s = "
        f"{sig_bytes * 5 / 4000:.2%} of 4000 B/s; whole chunk header "
        f"{len(chunk.raw) - payload} B/chunk = {(len(chunk.raw) - payload) * 5 / 4000:.2%}"
    )
    print("codec throughput (encode + decode, messages/s):")
    messages: list[tuple[str, Message]] = [
        ("CHUNK", chunk.chunk),
        ("JOIN", join),
        ("HEARTBEAT", Heartbeat(12345)),
    ]
    for name, msg in messages:
        print(f"  {name:<10} {rate(round_trip(msg)):>12,.0f}")
    reader = MessageReader()
    framed = frame(chunk.chunk) * 100

    def read_frames() -> None:
        reader.receive_data(framed)
        while reader.next_message() is not None:
            pass

    print(f"  framed CHUNK stream parse: {rate(read_frames) * 100:,.0f} messages/s")
    verifier = StreamVerifier(signer.stream_id)
    print("media signing (chunks/s, one core):")
    print(f"  sign   {rate(lambda: signer.sign([PACKET_64K] * 6, 5760)):>10,.0f}")
    print(f"  verify {rate(lambda: verifier.verify_datagram(chunk.raw)):>10,.0f}")


if __name__ == "__main__":
    main()
