"""Per-network limits (meshd/networks.py, meshd/tracker/limits.py): fake clock, and QUIC."""

from __future__ import annotations

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.networks import NetworkBuckets, network_of
from meshd.tracker.limits import NetworkCensus
from meshd.tracker.service import TrackerConfig
from protocol import Join, key_id, sign_message
from tests.test_tracker_server import STREAM, now_ms, room


def test_networks_are_ipv4_slash_24_and_ipv6_slash_48() -> None:
    assert network_of("192.0.2.77") == network_of("192.0.2.1") == "192.0.2.0/24"
    assert network_of("192.0.3.1") != network_of("192.0.2.1")
    assert network_of("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert network_of("::ffff:192.0.2.9") == "192.0.2.0/24"  # an IPv4 client on a v6 socket
    assert network_of("not an address") == ""


def test_a_burst_then_a_steady_rate_per_network() -> None:
    limiter = NetworkBuckets(rate=2.0, burst=3)
    assert [limiter.wait("192.0.2.1", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait("192.0.2.200", 0.0) == pytest.approx(0.5)  # same /24: empty
    assert limiter.wait("198.51.100.1", 0.0) == 0.0  # another network has its own bucket
    assert limiter.wait("192.0.2.1", 0.25) == pytest.approx(0.25)  # half a token back
    assert limiter.wait("192.0.2.1", 10.0) == 0.0  # refilled (to the burst, no more)
    assert [limiter.wait("192.0.2.1", 10.0) for _ in range(3)][-1] > 0


def test_memory_is_bounded_whatever_the_number_of_networks() -> None:
    limiter = NetworkBuckets(rate=1.0, burst=1, max_networks=100)
    for i in range(10_000):
        limiter.wait(f"10.{i // 256 % 256}.{i % 256}.1", 0.0)
    assert len(limiter) == 100


async def test_a_flood_of_identities_from_one_network_is_told_to_retry_later() -> None:
    """The trial's 10,000-identity JOIN flood from one address was all accepted: now the
    network's burst is, and the rest are answered RETRY_AFTER."""
    config = TrackerConfig(refresh_s=60, join_burst_per_network=3, joins_per_network_s=0.01)
    async with room(config) as r:
        await r.register(capacity=8)
        for _ in range(3):
            await r.join(Ed25519PrivateKey.generate())
        key = Ed25519PrivateKey.generate()
        request = sign_message(Join(STREAM, key_id(key), 2, "127.0.0.1:10", None, now_ms()), key)
        with pytest.raises(trio.TooSlowError):  # the client honours RETRY_AFTER (100 s here)
            await r.ask(request, give_up_after=1.0)
        assert r.tracker.streams[STREAM].tree.snapshot().audience == 3


def test_a_network_counts_its_live_identities_only() -> None:
    census = NetworkCensus()
    census.add(b"a", "192.0.2.0/24")
    census.add(b"b", "192.0.2.0/24")
    census.add(b"a", "198.51.100.0/24")  # a node counts for the network it came from
    census.add(b"c", "")  # no network known: not counted
    assert census.members("192.0.2.0/24", {b"a", b"b"}) == {b"a", b"b"}
    assert census.members("192.0.2.0/24", {b"b"}) == {b"b"}  # a left the tree
    census.prune(set())
    assert len(census) == 0


async def test_high_capacity_identities_from_one_network_get_few_slots_and_no_more_places() -> None:
    """The trial's attack over QUIC: identities from one address declare 1,024. Each
    counts as the ceiling at most, the network's capacity is capped, each may hold only
    the initial 2 children (here) until children vouch, and past the identity limit the
    network is told to retry later."""
    config = TrackerConfig(
        refresh_s=60, identities_per_network=4, capacity_per_network=20, initial_capacity=2
    )
    async with room(config) as r:
        await r.register(capacity=8)
        keys = [Ed25519PrivateKey.generate() for _ in range(4)]
        for key in keys:
            await r.join(key, capacity=1024)
        tree = r.tracker.streams[STREAM].tree
        ids = [key_id(key) for key in keys]
        assert [tree.declared_of(node) for node in ids] == [16, 4, 0, 0]
        assert all(tree.capacity_of(node) <= 2 for node in ids)
        key = Ed25519PrivateKey.generate()
        request = sign_message(Join(STREAM, key_id(key), 1024, "127.0.0.1:10", None, now_ms()), key)
        with pytest.raises(trio.TooSlowError):  # RETRY_AFTER 10 s: the client waits
            await r.ask(request, give_up_after=1.0)
        assert tree.snapshot().audience == 4
