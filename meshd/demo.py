"""`meshd demo`: a tracker, an origin and N listeners on this machine, over real QUIC.

It shows the tree and the origin's egress while the bundled sample plays (full screen on
a terminal, with the room's log lines in a file it names), then compares what the origin
sent with what a central server would have sent to every listener. Ctrl-C ends the
stream early and still sums it up; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import TextIO

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.errors import NodeError
from meshd.logs import configure_logging
from meshd.node.origin import Origin, OriginSettings
from meshd.node.output import AudioSink
from meshd.node.relay import Relay, RelaySettings
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.view import render_tree
from protocol import TreeReport

logger = logging.getLogger(__name__)

ORIGIN_CAPACITY = 2
RELAY_CAPACITY = 3
JOIN_SPREAD = 2.0  # seconds over which the listeners arrive
REDRAW = 1.0  # seconds between two frames of the live view
PLAIN_EVERY = 5  # frames between two progress lines when the output is not a terminal
HEADER_LINES = 4
FINAL_TREE_LINES = 30


def run_demo(
    listeners: int,
    duration: float,
    rng: random.Random,
    log_path: Path | None = None,
    log_format: str = "text",
) -> int:
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="meshd-demo-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    sample = resources.files("meshd") / "data" / "sample.opus"
    with log_path.open("w") as log_file, resources.as_file(sample) as path:
        configure_logging(logging.getLogger().level, log_format, log_file)
        room = Demo(str(path), listeners, duration, rng, log_path)
        with Screen(sys.stdout) as screen:
            trio.run(room.run, screen)
        print("\n".join(room.last_frame[:FINAL_TREE_LINES] + room.summary()), flush=True)
    return 0


class Screen:
    """A full-screen live view on a terminal (the alternate screen, restored on exit,
    Ctrl-C included); elsewhere, a progress line every few frames."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self._frames = 0

    def __enter__(self) -> Screen:
        if self.live:
            self.out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live:
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()

    def show(self, lines: list[str]) -> None:
        if self.live:
            rows = shutil.get_terminal_size().lines
            visible = lines if len(lines) < rows else [*lines[: rows - 2], "…"]
            self.out.write("\x1b[H\x1b[2J" + "\n".join(visible))
            self.out.flush()
        elif self._frames % PLAIN_EVERY == 0:
            print(lines[0], file=self.out, flush=True)
        self._frames += 1


class Demo:
    def __init__(
        self, sample: str, count: int, duration: float, rng: random.Random, log_path: Path
    ) -> None:
        self.sample = sample
        self.count = count
        self.duration = duration
        self.rng = rng
        self.log_path = log_path
        self.tracker = Tracker(TrackerConfig())
        self.origin: Origin | None = None
        self.relays: list[Relay] = []
        self.last_frame: list[str] = []
        self.stopped_early = False
        self._started = 0.0
        self._last_bytes = 0

    async def run(self, screen: Screen) -> None:
        self._started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_signal, nursery.cancel_scope)
            address = await nursery.start(serve_tracker, self.tracker, Ed25519PrivateKey.generate())
            origin = Origin(
                Ed25519PrivateKey.generate(),
                OriginSettings(address, self.sample, capacity=ORIGIN_CAPACITY),
                rng=self.rng,
            )
            self.origin = origin
            origin_done = trio.Event()
            nursery.start_soon(_run_then_set, origin.run, origin_done)
            await origin.registered.wait()
            nursery.start_soon(self._show_live, screen)
            finished = []
            for _ in range(self.count):
                if self.stopped_early:
                    break
                relay = Relay(
                    Ed25519PrivateKey.generate(),
                    RelaySettings(address, origin.stream_id, capacity=RELAY_CAPACITY),
                    AudioSink(os.devnull),
                    rng=self.rng,
                )
                self.relays.append(relay)
                finished.append(trio.Event())
                nursery.start_soon(_run_relay, relay, finished[-1])
                await trio.sleep(JOIN_SPREAD / max(self.count, 1))
            with trio.move_on_after(max(self.duration - JOIN_SPREAD, 0.1)):
                await origin_done.wait()
            origin.stop()
            with trio.move_on_after(10):
                await origin_done.wait()
                for done in finished:
                    await done.wait()
            self._draw(screen)
            nursery.cancel_scope.cancel()

    async def _on_signal(self, scope: trio.CancelScope) -> None:
        """First Ctrl-C: end the stream now (the listeners finish it); a second: stop."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.stopped_early or self.origin is None:
                    scope.cancel()
                    return
                logger.info("Ctrl-C: ending the stream early")
                self.stopped_early = True
                self.origin.stop()

    async def _show_live(self, screen: Screen) -> None:
        while True:
            await trio.sleep(REDRAW)
            self._draw(screen)

    def _draw(self, screen: Screen) -> None:
        assert self.origin is not None
        now = trio.current_time()
        sent = self.origin.stats.bytes_out
        rate, self._last_bytes = sent - self._last_bytes, sent
        central = _central_rate(self.relays)
        header = [
            f"meshd demo: {len(self.relays)} listeners on this machine, "
            f"t={now - self._started:4.1f}s, origin egress {rate * 8 / 1000:5.1f} kbit/s "
            f"(a central server would send {central * 8 / 1000:5.1f} kbit/s)",
            f"logs: {self.log_path}",
            "Ctrl-C ends the stream early" if not self.stopped_early else "ending early…",
            "",
        ]
        report = self.tracker.tree_report(self.origin.stream_id, now)
        if isinstance(report, TreeReport):
            rows = shutil.get_terminal_size().lines - HEADER_LINES
            self.last_frame = header + render_tree(report, max(rows, FINAL_TREE_LINES))
        else:  # the stream is over: the tracker forgot its tree; keep the last one drawn
            self.last_frame = header + self.last_frame[HEADER_LINES:]
        screen.show(self.last_frame)

    def summary(self) -> list[str]:
        assert self.origin is not None
        origin, relays = self.origin, self.relays
        delivered = [relay.stats.packets_played for relay in relays]
        central = sum(relay.stats.bytes_in for relay in relays)
        egress = origin.stats.bytes_out
        complete = sum(1 for relay in relays if relay.stats.ended)
        return [
            "",
            "summary" + (" (ended early with Ctrl-C)" if self.stopped_early else ""),
            f"  the origin sent {origin.stats.packets_played} Opus packets in "
            f"{origin.stats.chunks_in} signed chunks",
            f"  listeners that got the end of the stream: {complete}/{len(relays)}",
            f"  packets delivered per listener: min {min(delivered, default=0)}, "
            f"max {max(delivered, default=0)} (each from the moment it joined)",
            f"  lost chunks: {sum(relay.stats.lost for relay in relays)}",
            f"  origin egress: {egress / 1000:.1f} kB; a central server would have sent "
            f"{central / 1000:.1f} kB ({central / max(egress, 1):.1f}x more)",
            f"  the room's log: {self.log_path}",
        ]


async def _run_then_set(run: Callable[[], Awaitable[None]], done: trio.Event) -> None:
    await run()
    done.set()


async def _run_relay(relay: Relay, done: trio.Event) -> None:
    """A listener that gives up says why in the log; the room goes on."""
    try:
        await relay.run()
    except NodeError as exc:
        logger.warning("a listener gave up: %s", exc)
    finally:
        done.set()


def _central_rate(relays: list[Relay]) -> float:
    """Bytes/s a central server would send: each listener's intake, summed."""
    return sum(relay.stats.bytes_in for relay in relays) / max(_elapsed(relays), 1.0)


def _elapsed(relays: list[Relay]) -> float:
    starts = [r.stats.joined_at for r in relays if r.stats.joined_at is not None]
    return trio.current_time() - min(starts) if starts else 0.0
