"""The metrics endpoint answers Prometheus scrapes, and only those, from inside trio."""

from __future__ import annotations

import pytest
import trio

from meshd.errors import BindError
from meshd.metrics import serve_metrics, tracker_metrics
from meshd.tracker.service import Tracker, TrackerConfig


async def fetch(address: tuple[str, int], request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        response = b""
        while data := await stream.receive_some():
            response += data
    return response


async def test_scrapes_get_the_text_format_and_anything_else_a_short_answer() -> None:
    registry = tracker_metrics(Tracker(TrackerConfig()))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_metrics, registry, "127.0.0.1", 0)
            ok = await fetch(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await fetch(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            missing = await fetch(address, b"GET /nope HTTP/1.1\r\n\r\n")
            post = await fetch(address, b"POST /metrics HTTP/1.1\r\n\r\n")
            with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{address[1]}"):
                await serve_metrics(registry, "127.0.0.1", address[1])
            nursery.cancel_scope.cancel()
    assert ok.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=")
    assert b"\r\n\r\n" in ok and b"\nmeshd_tracker_streams 0.0\n" in ok
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404") and post.startswith(b"HTTP/1.1 405")
