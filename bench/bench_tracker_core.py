"""Tracker core throughput and memory: join/leave/report decisions per second at scale.

Run: .venv/bin/python bench/bench_tracker_core.py [--sizes 10000,100000,1000000]

Budget (README): >= 50,000 join decisions/s with 1,000,000 peers in process, and
<= 1 KB of tracker state per peer. Ids and addresses are made before the clock starts
(the server gets them from the decoder); the cyclic GC stays on, as in a real tracker.
Peers: 75 % relays of capacity 4, 25 % leaves (capacity 0); the origin feeds 8.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import time
import tracemalloc

from meshd.tracker.tree import NoCapacity, StreamTree

ORIGIN = b"\xff" * 32
SEED = 1


def peer_capacity(rng: random.Random) -> int:
    return 0 if rng.random() < 0.25 else 4


def make_peers(count: int, rng: random.Random) -> list[tuple[bytes, str, int]]:
    return [
        (rng.randbytes(32), f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:4433", peer_capacity(rng))
        for i in range(count)
    ]


def depth_figures(tree: StreamTree) -> str:
    """max/mean depth of the peers."""
    histogram = tree.snapshot().depth_histogram
    mean = sum(depth * count for depth, count in enumerate(histogram)) / sum(histogram)
    return f"{len(histogram) - 1}/{mean:.1f}"


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build(size: int, peers: list[tuple[bytes, str, int]]) -> tuple[StreamTree, float, float]:
    """Join `size` peers; returns the tree, the overall rate and the last tenth's rate."""
    tree = StreamTree(ORIGIN, "origin:4433", 8)
    tenth = size - size // 10
    start = time.perf_counter()
    for peer_id, address, capacity in peers[:tenth]:
        tree.join(peer_id, capacity, address, 0.0)
    middle = time.perf_counter()
    for peer_id, address, capacity in peers[tenth:size]:
        tree.join(peer_id, capacity, address, 0.0)
    end = time.perf_counter()
    return tree, size / (end - start), (size - tenth) / (end - middle)


def steady_state(
    tree: StreamTree, members: list[bytes], fresh: list[tuple[bytes, str, int]], rng: random.Random
) -> float:
    """Churn at constant size: each step one random peer leaves and a new one joins."""
    start = time.perf_counter()
    for peer_id, address, capacity in fresh:
        index = rng.randrange(len(members))
        tree.leave(members[index], 1.0)
        try:
            tree.join(peer_id, capacity, address, 1.0)
        except NoCapacity:  # the leaver may have dropped a subtree; keep the id list honest
            members[index] = members[-1]
            members.pop()
            continue
        members[index] = peer_id
    return 2 * len(fresh) / (time.perf_counter() - start)


def failures(tree: StreamTree, members: list[bytes], count: int, rng: random.Random) -> float:
    """Random relays crash; each of their children sends REJOIN (dead = the relay).

    The first report moves its sender with its subtree, the second confirms and evicts
    the relay (its other children are re-homed as orphans), later ones find the placement
    already made. Returns REJOIN decisions per second.
    """
    done = 0
    elapsed = 0.0
    while done < count:
        dead = members[rng.randrange(len(members))]
        if dead not in tree:
            continue  # left or evicted earlier
        children = tree.children_of(dead)
        start = time.perf_counter()
        for child in children:
            with contextlib.suppress(NoCapacity):  # "no room" is a decision too
                tree.report_failure(child, dead, 2.0)
        elapsed += time.perf_counter() - start
        done += len(children)
    return done / elapsed


def rebalance(tree: StreamTree, rounds: int) -> tuple[float, int]:
    """Every peer refreshes `rounds` times, 180 s apart, following each move it is told
    of (REFRESH answers ASSIGNED to rebalance, docs/spec.md §7.3). Returns REFRESH
    decisions per second and the number of moves."""
    now = 1_000.0  # past promote_after: every relay counts as stable
    refreshes = moves = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for peer in [p for p in tree if p != ORIGIN]:
            parent = tree.parent_of(peer)
            refreshes += 1
            while tree.refresh(peer, now, parent=parent) is not None:
                parent = tree.parent_of(peer)  # it moved there, and says so
                refreshes += 1
                moves += 1
        now += 180.0
    return refreshes / (time.perf_counter() - start), moves


def depth_bound(tree: StreamTree) -> int:
    """ceil(log_b N) + 2, b the mean capacity over all peers (relays and leaves)."""
    peers = [p for p in tree if p != ORIGIN]
    mean = sum(tree.capacity_of(p) for p in peers) / len(peers)
    return math.ceil(math.log(len(peers), mean)) + 2


def memory_per_peer(size: int) -> float:
    """tracemalloc'd bytes held by the tree per peer, ids and addresses included."""
    rng = random.Random(SEED)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = StreamTree(ORIGIN, "origin:4433", 8)
    for i in range(size):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:4433"
        tree.join(rng.randbytes(32), peer_capacity(rng), address, 0.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del tree
    return used / size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--churn", type=int, default=50_000, help="join+leave pairs per size")
    parser.add_argument("--reports", type=int, default=20_000, help="max REJOINs per size")
    parser.add_argument("--rounds", type=int, default=3, help="refresh rounds after churn")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"tracker core bench (seed {SEED}); decisions/s, higher is better\n")
    print(
        f"{'peers':>9} {'join/s':>9} {'join/s@end':>10} {'churn/s':>9} {'report/s':>9}"
        f" {'depth built':>11} {'churned':>8} {'rebal.':>7} {'bound':>5} {'moves':>7}"
        f" {'refresh/s':>9} {'RSS B/peer':>10}"
    )
    for size in sizes:
        rng = random.Random(SEED)
        peers = make_peers(size + args.churn, rng)
        gc.collect()
        rss_before = rss_bytes()
        tree, join_rate, join_rate_end = build(size, peers)
        rss_per_peer = (rss_bytes() - rss_before) / size
        members = [peer_id for peer_id, _, _ in peers[:size]]
        built_depth = depth_figures(tree)
        churn_rate = steady_state(tree, members, peers[size:], rng)
        churned_depth = depth_figures(tree)
        report_rate = failures(tree, members, min(args.reports, size // 10), rng)
        refresh_rate, moves = rebalance(tree, args.rounds)
        print(
            f"{size:>9,} {join_rate:>9,.0f} {join_rate_end:>10,.0f} {churn_rate:>9,.0f}"
            f" {report_rate:>9,.0f} {built_depth:>11} {churned_depth:>8}"
            f" {depth_figures(tree):>7} {depth_bound(tree):>5} {moves:>7,}"
            f" {refresh_rate:>9,.0f} {rss_per_peer:>10,.0f}"
        )
        del tree, members, peers
        gc.collect()

    traced = memory_per_peer(100_000)
    print("\njoin/s: building the tree from empty; join/s@end: its last 10 % of joins;")
    print("churn/s: leave+join decisions at constant size (each leave re-homes children);")
    print("report/s: REJOINs from the children of crashed relays (move, evict, re-home);")
    print("depth: max/mean peer depth after building, after churn (moved subtrees land")
    print("  at the shallowest free slot, usually the frontier), and after the churn and")
    print(f"  the reports, rebalanced by {args.rounds} rounds of REFRESH (stable relays move")
    print("  up, leaves down; moves: how many); bound: ceil(log_b N) + 2, b = mean capacity;")
    print("refresh/s: REFRESH decisions, rebalancing included; RSS: growth while building.")
    print(f"tracemalloc at 100,000 peers: {traced:,.0f} bytes per peer (ids, addresses incl.)")


if __name__ == "__main__":
    main()
