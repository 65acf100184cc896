"""Issue 11's attacks against real `meshd` processes: the defended invariants hold.

Each test starts a tracker and an origin (and, where the honest audience is what is
judged, a few `meshd listen`), runs one attacker from tests/attackers.py on its own
loopback network (127.66.0.1), and checks what docs/security.md promises, never a
timing. bench/bench_attacks.py runs every attack, the undefended ones too, and prints
the measured table that docs/security.md carries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import meshd
from meshd.quic import open_quic_endpoint
from protocol import Assigned, Peer, key_from_text
from tests import attackers as hostile
from tests.attack_room import AttackRoom, wait_output
from tests.procs import cluster

SAMPLE = Path(meshd.__file__).parent / "data" / "sample.opus"  # 24 s
TONE = Path(__file__).parent / "data" / "tone12.opus"  # 12 s


def run_in_room(
    tmp_path: Path,
    audio: Path,
    body: Callable[[AttackRoom], Awaitable[None]],
    origin_capacity: int = 2,
    *,
    admission: bool = False,
) -> None:
    with cluster(tmp_path) as procs:
        room = AttackRoom(procs, audio, admission=admission)

        async def main() -> None:
            await room.open(origin_capacity)
            async with trio.open_nursery() as nursery:
                room.nursery = nursery
                await body(room)
                nursery.cancel_scope.cancel()

        trio.run(main)


def six_honest_listeners_under_a_hostile_relay(
    tmp_path: Path, mode: str, honest_after: float = 0.0
) -> None:
    """A hostile relay of `mode` joins first with capacity 1024; `honest_after` s later 6
    honest listeners join (1 identity in 7 hostile). Every honest listener plays every
    chunk from its first to the end, and one at least was placed under the relay."""
    take = hostile.Take()

    async def body(room: AttackRoom) -> None:
        await room.nursery.start(
            lambda task_status: hostile.hostile_relays(
                room.tracker_address, room.stream_id, take, mode=mode, count=1,
                task_status=task_status,
            )
        )  # fmt: skip
        await trio.sleep(honest_after)
        await room.add_listeners(6)
        honest = await room.finish(within=60)
        assert honest.intact == honest.started, honest.problems
        assert take.children_served >= 1, "no honest listener was placed under the relay"

    run_in_room(tmp_path, SAMPLE, body)


@pytest.mark.timeout(120)
def test_a_relay_that_sends_no_audio_loses_its_children_and_they_lose_no_chunk(
    tmp_path: Path,
) -> None:
    """The relay sends STREAM_INFO, PATH and HEARTBEATs but no audio: those placed under
    it leave (PARENT_STALLED) and lose nothing. (bench/bench_attacks.py runs the relays
    that send every other chunk, another stream's chunks or MISSING, and more hostile
    identities, which this defence does not cover.)"""
    six_honest_listeners_under_a_hostile_relay(tmp_path, "silent")


@pytest.mark.timeout(120)
def test_a_relay_replaying_old_chunks_cannot_start_newcomers_in_the_past(tmp_path: Path) -> None:
    """The relay keeps the stream's first 10 s and replays them to the honest listeners,
    who join 12 s later. A newcomer used to play them, stall once the replay repeated,
    and find the chunks after them gone from every ring. Now it plays nothing further
    behind the origin's live granule (ASSIGNED) than the start lag."""
    six_honest_listeners_under_a_hostile_relay(tmp_path, "old", honest_after=12.0)


@pytest.mark.timeout(120)
def test_identities_planted_under_relays_by_refresh_cannot_report_them_away(
    tmp_path: Path,
) -> None:
    """Fresh identities put themselves under the honest relays by REFRESH (a free slot
    in the tracker's view is all it takes), two under each, then both report it dead.
    They are no witnesses: no relay leaves the tracker's view (all those planted under
    did on the old tracker), and the honest listeners play every chunk."""
    take = hostile.Take()

    async def body(room: AttackRoom) -> None:
        await room.add_listeners(6)
        assert await room.wait_playing(), "the listeners did not start playing"
        await hostile.false_reports(room.tracker_address, room.stream_id, take)
        honest = await room.finish(within=60)
        assert honest.intact == honest.started, honest.problems

    run_in_room(tmp_path, SAMPLE, body)
    assert take.relays_targeted >= 1, take
    assert take.relays_evicted == 0, take


@pytest.mark.timeout(120)
def test_nobody_the_host_did_not_admit_pulls_from_a_relay(tmp_path: Path) -> None:
    """A token-protected stream whose parents know the host key: a node with no token
    that subscribes straight to a relay (no JOIN) is refused TOKEN_REQUIRED and gets no
    byte of audio, while the admitted listeners play every chunk."""
    take = hostile.Take()

    async def body(room: AttackRoom) -> None:
        await room.add_listeners(4)
        assert await room.wait_playing(), "the admitted listeners did not start playing"
        relay = room.listeners[0]
        address = await wait_output(relay, r"serving children on (\S+)")
        node = room.cluster.stats(relay.name)["node"]
        parent = Peer(key_from_text(node), address)
        await hostile.unauthenticated_pull(parent, room.stream_id, take, seconds=5.0)
        honest = await room.finish(within=60)
        assert honest.intact == honest.started, honest.problems

    run_in_room(tmp_path, SAMPLE, body, origin_capacity=4, admission=True)
    assert take.closed_by_target == {"TOKEN_REQUIRED": 1}, take
    assert take.bytes_pulled == 0, take


@pytest.mark.timeout(60)
def test_a_repair_leech_gets_no_more_than_its_live_bytes_plus_a_burst(tmp_path: Path) -> None:
    """A child that asks 60 times a second for the last 64 chunks again is answered
    MISSING beyond its budget; one that asks for chunks never announced is closed
    BAD_REPAIR."""
    leech, future = hostile.Take(), hostile.Take()

    async def body(room: AttackRoom) -> None:
        address, stream = room.tracker_address, room.stream_id
        with trio.move_on_after(6.0):
            await hostile.repair_leech(address, stream, leech, rate=60)
        with trio.move_on_after(4.0):
            await hostile.repair_leech(address, stream, future, future=True)
        assert room.origin is not None and room.origin.running

    # Capacity 4: the tracker keeps an origin's last free slot for a relay, not a leaf.
    run_in_room(tmp_path, TONE, body, origin_capacity=4)
    assert leech.live_bytes > 0, leech
    assert leech.missing_answers > 0, f"the leech was never refused: {leech}"
    chunk_slack = 16_384  # one chunk may be in flight past the budget check
    assert leech.repair_bytes <= leech.live_bytes + 65_536 + chunk_slack, leech
    assert future.closed_by_target == {"BAD_REPAIR": 1}, future


@pytest.mark.timeout(60)
def test_slowloris_connections_are_closed_and_only_a_few_wait(tmp_path: Path) -> None:
    """40 connections to the origin from one network that each send 1 byte of a frame:
    beyond 4 at a time they are refused OVERLOADED at once (or wait to be let in, their
    Initials dropped past the network's handshake rate), the rest closed CHILD_TIMEOUT
    after 2 s; none is held."""
    take = hostile.Take()

    async def body(room: AttackRoom) -> None:
        origin = await room.origin_address()
        with trio.move_on_after(15.0):  # each is closed within 2 s of its byte
            await hostile.slowloris(origin, take, count=40, reopen=False)

    run_in_room(tmp_path, TONE, body)
    assert take.connections_opened == 40, take
    assert take.held_now == 0, f"connections still held after 15 s: {take}"
    assert take.closed_by_target.get("OVERLOADED", 0) >= 1, take
    assert take.closed_by_target.get("CHILD_TIMEOUT", 0) >= 1, take
    assert sum(take.closed_by_target.values()) == 40, take


@pytest.mark.timeout(60)
def test_the_tracker_keeps_answering_through_a_join_flood_from_one_network(
    tmp_path: Path,
) -> None:
    """600 fresh identities JOIN from one network: past the burst they are told
    RETRY_AFTER, the tracker keeps answering STATUS, and a JOIN from another network
    is still placed."""
    take = hostile.Take()
    honest: list[object] = []
    flood_seconds: list[float] = []

    async def flood(address: tuple[str, int], stream: bytes) -> None:
        began = trio.current_time()
        await hostile.join_flood(address, stream, take, count=600)
        flood_seconds.append(trio.current_time() - began)

    async def body(room: AttackRoom) -> None:
        address, stream = room.tracker_address, room.stream_id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, address, stream)
            await trio.sleep(1.0)
            answer = await hostile.status(address, stream, within=5.0)
            assert answer is not None, "no STATUS answer during the flood"
            key = Ed25519PrivateKey.generate()
            async with open_quic_endpoint(key, "127.0.0.1") as endpoint:
                honest.extend(
                    await hostile.ask(endpoint, address, [hostile.join_request(key, stream, 0, "")])
                )
        assert await hostile.status(address, stream, within=5.0) is not None

    run_in_room(tmp_path, TONE, body, origin_capacity=1024)
    assert isinstance(honest[0], Assigned), honest
    assert take.retry_after > 0, take
    # The defaults: a burst of 100, then 20 a second (1 s of slack for the clocks).
    assert take.identities_accepted <= 100 + 20 * (flood_seconds[0] + 1), (flood_seconds, take)
    assert take.identities_accepted + take.retry_after >= 500, f"mostly unanswered: {take}"
