"""Embedding the tracker in a trio host service.

Run: python examples/embed_trio.py [--seconds S]
It serves a tracker on 127.0.0.1 (any port), prints the address, and every second
prints each stream's audience, as a host's own code would use it.
"""

from __future__ import annotations

import argparse

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.tracker import Tracker, TrackerConfig, serve_tracker
from protocol import StatusReport, short_id


async def host(seconds: float) -> None:
    tracker = Tracker(TrackerConfig(refresh_s=120))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_tracker, tracker, Ed25519PrivateKey.generate())
        print(f"tracker listening on {format_address(address)}", flush=True)
        with trio.move_on_after(seconds):
            while True:
                for stream in list(tracker.streams):
                    report = tracker.status(stream, trio.current_time())
                    if isinstance(report, StatusReport):
                        print(f"stream {short_id(stream)}: {report.audience} listening")
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    print("tracker stopped", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3600.0)
    trio.run(host, parser.parse_args().seconds)
