"""Running the tracker beside an asyncio host: trio in its own thread.

Run: python examples/embed_asyncio.py [--seconds S]
meshd is trio-only; an asyncio service runs `trio.run` in a thread and talks to it
through trio's thread-safe `trio.from_thread` calls (here: reading the status, stopping).
Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.tracker import Tracker, TrackerConfig, serve_tracker


class TrackerThread:
    """The tracker's trio loop in a daemon thread, with a thread-safe way to reach it."""

    def __init__(self) -> None:
        self.tracker = Tracker(TrackerConfig())
        self.ready = threading.Event()
        self.address: tuple[str, int] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self.address = await nursery.start(
                serve_tracker, self.tracker, Ed25519PrivateKey.generate()
            )
            self.ready.set()

    def start(self) -> None:
        self._thread.start()
        self.ready.wait(10)

    def audience(self) -> int:
        """Called from any non-trio thread: runs inside the tracker's trio loop."""

        def count() -> int:
            return sum(len(state.tree) - 1 for state in self.tracker.streams.values())

        return trio.from_thread.run_sync(count, trio_token=self._token)

    def stop(self) -> None:
        assert self._scope is not None
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


async def asyncio_host(seconds: float) -> None:
    tracker = TrackerThread()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # a host shuts down cleanly on both
        loop.add_signal_handler(signum, stop.set)
    await loop.run_in_executor(None, tracker.start)
    assert tracker.address is not None
    print(f"tracker listening on {format_address(tracker.address)}", flush=True)
    deadline = loop.time() + seconds
    while loop.time() < deadline and not stop.is_set():
        audience = await loop.run_in_executor(None, tracker.audience)
        print(f"audience: {audience}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(1.0, max(deadline - loop.time(), 0)))
    await loop.run_in_executor(None, tracker.stop)
    print("tracker stopped", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3600.0)
    asyncio.run(asyncio_host(parser.parse_args().seconds))
