"""`meshd demo`: a tracker, an origin and N listeners on this machine, over real QUIC.

It shows the tree and the origin's egress while the bundled sample plays, then compares
what the origin sent with what a central server would have sent to every listener.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Awaitable, Callable
from importlib import resources

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.origin import Origin, OriginSettings
from meshd.node.output import AudioSink
from meshd.node.relay import Relay, RelaySettings
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker.tree import StreamTree
from protocol import short_id

ORIGIN_CAPACITY = 2
RELAY_CAPACITY = 3
JOIN_SPREAD = 2.0  # seconds over which the listeners arrive


def run_demo(listeners: int, duration: float, rng: random.Random) -> int:
    sample = resources.files("meshd") / "data" / "sample.opus"
    with resources.as_file(sample) as path:
        return trio.run(_demo, str(path), listeners, duration, rng)


async def _demo(sample: str, count: int, duration: float, rng: random.Random) -> int:
    tracker = Tracker(TrackerConfig())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_tracker, tracker, Ed25519PrivateKey.generate())
        origin = Origin(
            Ed25519PrivateKey.generate(),
            OriginSettings(address, sample, capacity=ORIGIN_CAPACITY),
            rng=rng,
        )
        origin_done = trio.Event()
        nursery.start_soon(_run_then_set, origin.run, origin_done)
        await origin.registered.wait()
        relays = [
            Relay(
                Ed25519PrivateKey.generate(),
                RelaySettings(address, origin.stream_id, capacity=RELAY_CAPACITY),
                AudioSink(os.devnull),
                rng=rng,
            )
            for _ in range(count)
        ]
        for relay in relays:
            nursery.start_soon(relay.run)
            await trio.sleep(JOIN_SPREAD / max(count, 1))
        nursery.start_soon(_show_live, tracker, origin, relays)
        with trio.move_on_after(max(duration - JOIN_SPREAD, 0.1)):
            await origin_done.wait()
        origin.stop()
        with trio.move_on_after(10):
            await origin_done.wait()
        nursery.cancel_scope.cancel()
    print(_summary(origin, relays))
    return 0


async def _run_then_set(run: Callable[[], Awaitable[None]], done: trio.Event) -> None:
    await run()
    done.set()


async def _show_live(tracker: Tracker, origin: Origin, relays: list[Relay]) -> None:
    """Redraw the tree and the origin's egress every second."""
    interactive = sys.stdout.isatty()
    last_bytes, started = 0, trio.current_time()
    while True:
        await trio.sleep(1.0)
        sent = origin.stats.bytes_out
        rate = sent - last_bytes
        last_bytes = sent
        state = tracker.streams.get(origin.stream_id)
        lines = [
            f"meshd demo: {len(relays)} listeners, t={trio.current_time() - started:4.1f}s, "
            f"origin egress {rate * 8 / 1000:6.1f} kbit/s "
            f"(a central server would send {_central_rate(relays) * 8 / 1000:6.1f} kbit/s)",
        ]
        if state is not None:
            lines += _render_tree(state.tree, origin.stream_id)
        if interactive:
            print("\x1b[2J\x1b[H" + "\n".join(lines), flush=True)
        else:
            print(lines[0], flush=True)


def _central_rate(relays: list[Relay]) -> float:
    """Bytes/s a central server would send: each listener's intake, summed."""
    return sum(relay.stats.bytes_in for relay in relays) / max(_elapsed(relays), 1.0)


def _elapsed(relays: list[Relay]) -> float:
    starts = [r.stats.joined_at for r in relays if r.stats.joined_at is not None]
    return trio.current_time() - min(starts) if starts else 0.0


def _render_tree(tree: StreamTree, root: bytes, limit: int = 40) -> list[str]:
    lines: list[str] = []

    def walk(node: bytes, prefix: str, last: bool) -> None:
        if len(lines) >= limit:
            return
        children = tree.children_of(node)
        label = "origin" if node == root else "listener"
        branch = "" if node == root else ("└─ " if last else "├─ ")
        lines.append(f"{prefix}{branch}{label} {short_id(node)} ({len(children)} children)")
        extension = "" if node == root else ("   " if last else "│  ")
        for index, child in enumerate(children):
            walk(child, prefix + extension, index == len(children) - 1)

    walk(root, "", True)
    return lines


def _summary(origin: Origin, relays: list[Relay]) -> str:
    sent = origin.stats.packets_played
    delivered = [relay.stats.packets_played for relay in relays]
    central = sum(relay.stats.bytes_in for relay in relays)
    egress = origin.stats.bytes_out
    complete = sum(1 for relay in relays if relay.stats.ended)
    lines = [
        "",
        "summary",
        f"  the origin sent {sent} Opus packets in {origin.stats.chunks_in} signed chunks",
        f"  listeners that got the end of the stream: {complete}/{len(relays)}",
        f"  packets delivered per listener: min {min(delivered, default=0)}, "
        f"max {max(delivered, default=0)} (each from the moment it joined)",
        f"  lost chunks: {sum(relay.stats.lost for relay in relays)}",
        f"  origin egress: {egress / 1000:.1f} kB; a central server would have sent "
        f"{central / 1000:.1f} kB ({central / max(egress, 1):.1f}x more)",
    ]
    return "\n".join(lines)
