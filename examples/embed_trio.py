"""Embedding the tracker in a trio host service.

Run: python examples/embed_trio.py [--seconds S]
It serves a tracker on 127.0.0.1 (any port) and its Prometheus metrics over HTTP, prints
both addresses, and every second prints each stream's audience, as a host's own code
would use it. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import signal

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.metrics import serve_metrics, tracker_metrics
from meshd.tracker import Tracker, TrackerConfig, serve_tracker
from protocol import StatusReport, short_id


async def host(seconds: float) -> None:
    tracker = Tracker(TrackerConfig(refresh_s=120))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        address = await nursery.start(serve_tracker, tracker, Ed25519PrivateKey.generate())
        print(f"tracker listening on {format_address(address)}", flush=True)
        metrics = await nursery.start(serve_metrics, tracker_metrics(tracker), "127.0.0.1", 0)
        print(f"metrics on http://{format_address(metrics)}/metrics", flush=True)
        with trio.move_on_after(seconds):
            while True:
                for stream in list(tracker.streams):
                    report = tracker.status(stream, trio.current_time())
                    if isinstance(report, StatusReport):
                        print(f"stream {short_id(stream)}: {report.audience} listening")
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    print("tracker stopped", flush=True)


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: stop serving, as a host shuts down."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3600.0)
    trio.run(host, parser.parse_args().seconds)
