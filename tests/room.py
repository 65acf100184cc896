"""An in-process room for tests: tracker, origin and relays in one trio run, real QUIC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.node.config import NodeConfig
from meshd.node.origin import Origin, OriginSettings
from meshd.node.output import AudioSink
from meshd.node.relay import Relay, RelaySettings
from meshd.ogg import read_ogg_opus
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig

DATA = Path(__file__).parent / "data"
TONE = DATA / "tone.opus"
SAMPLE = Path(__file__).parents[1] / "meshd" / "data" / "sample.opus"  # 24 s
FAST = NodeConfig(heartbeat_interval=0.1, silence_timeout=0.5, stats_interval=1.0)


def packets_of(path: Path) -> list[bytes]:
    with path.open("rb") as file:
        return [packet.data for packet in read_ogg_opus(file)[1]]


def assert_gap_free_tail(output: Path, source: list[bytes]) -> None:
    """The output is a valid Ogg Opus stream whose packets are the source's last ones."""
    got = packets_of(output)
    assert got, f"{output} holds no audio"
    assert got == source[-len(got) :], f"{output}: not a gap-free run ending at the end"


@dataclass
class Room:
    tracker: Tracker
    address: tuple[str, int]
    origin: Origin
    nursery: trio.Nursery
    tmp: Path
    relays: list[Relay] = field(default_factory=list)
    finished: dict[Relay, trio.Event] = field(default_factory=dict)

    async def add(
        self, capacity: int = 3, relay_class: type[Relay] = Relay, config: NodeConfig = FAST
    ) -> Relay:
        output = AudioSink(str(self.tmp / f"listener{len(self.relays)}.opus"))
        settings = RelaySettings(self.address, self.origin.stream_id, capacity=capacity)
        relay = relay_class(Ed25519PrivateKey.generate(), settings, output, config)
        self.relays.append(relay)
        self.finished[relay] = trio.Event()
        await self.nursery.start(self._run, relay)
        return relay

    async def _run(self, relay: Relay, task_status: trio.TaskStatus[None]) -> None:
        await relay.run(task_status=task_status)
        self.finished[relay].set()

    async def wait_all_receiving(self) -> None:
        for relay in self.relays:
            await relay.playing.wait()

    async def wait_all_ended(self, relays: list[Relay] | None = None) -> None:
        """Until these relays played the END chunk and exited (their output complete)."""
        for relay in relays or self.relays:
            await self.finished[relay].wait()
            assert relay.stats.ended


@asynccontextmanager
async def open_room(
    tmp: Path, origin_capacity: int = 3, *, source: Path = TONE, refresh_s: int = 5
) -> AsyncIterator[Room]:
    tracker = Tracker(TrackerConfig(refresh_s=refresh_s))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_tracker, tracker, Ed25519PrivateKey.generate())
        origin = Origin(
            Ed25519PrivateKey.generate(),
            OriginSettings(address, str(source), capacity=origin_capacity),
            FAST,
        )
        await nursery.start(origin.run)
        await origin.registered.wait()
        yield Room(tracker, address, origin, nursery, tmp)
        nursery.cancel_scope.cancel()
