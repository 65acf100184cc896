"""The tracker's tree core: placement, repair, soft state, and its invariants under churn."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshd.tracker.tree import (
    Assignment,
    InvalidRequest,
    NoCapacity,
    StreamTree,
    TreeError,
    TreeErrorCode,
    UnknownParent,
    UnknownPeer,
)

ORIGIN = b"\x00" * 32
TTL = 600.0


def pid(i: int) -> bytes:
    return i.to_bytes(32, "big")


def addr(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250}:4433"


def make_tree(
    origin_capacity: int = 2,
    *,
    peer_ttl: float = TTL,
    report_quorum: int = 2,
    report_window: float = 60.0,
    rebuilding_until: float = 0.0,
) -> StreamTree:
    return StreamTree(
        ORIGIN,
        "origin:4433",
        origin_capacity,
        peer_ttl=peer_ttl,
        report_quorum=report_quorum,
        report_window=report_window,
        rebuilding_until=rebuilding_until,
    )


def build(tree: StreamTree, edges: dict[int, tuple[int, int]], now: float = 0.0) -> None:
    """Insert peer i under edges[i] = (parent, capacity) (0: the origin), in order, as
    if the tracker had placed it there (the shape JOINs would need many more peers for).

    Uses the refresh re-insertion path, which puts a peer exactly where it says it is,
    then forgets (white box) that the peer put itself there: a claimed placement's
    failure reports count for nothing (see test_a_child_placed_by_its_own_claim_is_no_witness).
    """
    for i, (parent, capacity) in edges.items():
        parent_id = ORIGIN if parent == 0 else pid(parent)
        tree.refresh(pid(i), now, parent=parent_id, capacity=capacity, address=addr(i))
        tree._peers[pid(i)].claimed = False


def join_all(tree: StreamTree, ids: Iterable[int], capacity: int, now: float = 0.0) -> None:
    for i in ids:
        tree.join(pid(i), capacity, addr(i), now)


# ------------------------------------------------------------- independent checks


def walk(tree: StreamTree) -> dict[bytes, int]:
    """Depth of every peer reachable from the origin, found by walking children lists."""
    depths = {ORIGIN: 0}
    frontier = [ORIGIN]
    while frontier:
        node = frontier.pop()
        for child in tree.children_of(node):
            assert child not in depths, "a peer is reached twice: cycle or duplicate"
            assert tree.parent_of(child) == node, "child and parent links disagree"
            depths[child] = depths[node] + 1
            frontier.append(child)
    return depths


def subtree(tree: StreamTree, root: bytes) -> set[bytes]:
    found = {root}
    frontier = [root]
    while frontier:
        for child in tree.children_of(frontier.pop()):
            found.add(child)
            frontier.append(child)
    return found


def has_room(tree: StreamTree, peer: bytes) -> bool:
    """A slot the tracker may offer: children moved away hold theirs until they confirm
    (white box: the count `check_invariants` checks against the children's side)."""
    return len(tree.children_of(peer)) + tree._peers[peer].held < tree.capacity_of(peer)


def held_slots(tree: StreamTree) -> Counter[bytes]:
    """Per peer, the slots held for children moved away, counted from the children."""
    return Counter(old for peer in tree if (old := tree.moving_from(peer)) is not None)


def depth_bound(audience: int, k: int) -> int:
    """ceil(log_k N) + 2, the depth a uniform-capacity tree must stay within."""
    return math.ceil(math.log(max(audience, 1), k) - 1e-9) + 2


def check_invariants(tree: StreamTree, uniform_k: int | None = None) -> None:
    depths = walk(tree)
    assert set(depths) == set(tree), "every peer reaches the origin, and only peers do"
    assert tree.parent_of(ORIGIN) is None
    histogram: dict[int, int] = {}
    free = 0
    held = held_slots(tree)
    for peer, depth in depths.items():
        assert tree.depth_of(peer) == depth
        children = tree.children_of(peer)
        assert len(children) <= tree.capacity_of(peer), "capacity exceeded"
        moving_from = tree.moving_from(peer)
        if moving_from is not None:
            assert tree.is_orphaned(peer), "a slot is held only for a move not yet confirmed"
            assert moving_from != tree.parent_of(peer)
        assert tree._peers[peer].held == held[peer]
        free += tree.capacity_of(peer) - len(children) - held[peer]
        histogram[depth] = histogram.get(depth, 0) + 1
    snap = tree.snapshot()
    assert snap.audience == len(depths) - 1
    assert snap.max_depth == max(depths.values())
    assert snap.depth_histogram == tuple(histogram.get(d, 0) for d in range(snap.max_depth + 1))
    assert snap.origin_children == len(tree.children_of(ORIGIN)) <= tree.capacity_of(ORIGIN)
    assert snap.free_slots == free
    assert snap.orphans == sum(tree.is_orphaned(p) for p in tree)
    check_buckets(tree, depths)
    if uniform_k is not None:
        assert snap.max_depth <= depth_bound(snap.audience, uniform_k)


def check_buckets(tree: StreamTree, depths: dict[bytes, int]) -> None:
    """White box: the free-slot buckets hold exactly the peers with room, at their depth."""
    indexed = {}
    for depth, bucket in enumerate(tree._free):
        for position, node in enumerate(bucket):
            assert node.pos == position and node.slot_depth == depth
            indexed[node.ref.peer_id] = depth
    assert indexed == {p: d for p, d in depths.items() if has_room(tree, p)}


def check_rebalanced(tree: StreamTree, peer: bytes, depth: int, got: Assignment) -> None:
    """A REFRESH answered with a move: a relay went 2+ levels up, a leaf 2+ levels down."""
    assert got.parent.peer_id == tree.parent_of(peer) and tree.is_orphaned(peer)
    if tree.capacity_of(peer) > 0:
        assert got.depth <= depth - 2, "a relay is only moved up, and by 2 levels or more"
    else:
        assert got.depth >= depth + 2, "a leaf is only moved down, and by 2 levels or more"


def suspected(tree: StreamTree) -> set[bytes]:
    """White box: peers never offered as parents: those with pending failure reports, and
    those reported yet alive (unproven)."""
    return {node.ref.peer_id for node in [*tree._reports, *tree._unproven]}


def eligible_parents(
    tree: StreamTree, mover: bytes, banned: bytes | None = None, *, offered: bool = False
) -> set[bytes]:
    """Where `mover` may attach; `offered`: where the tracker itself would place it
    (a node may claim a suspect parent, but the tracker never offers one)."""
    excluded = subtree(tree, mover) | (suspected(tree) if offered else set())
    if banned is not None and banned in tree:
        excluded |= subtree(tree, banned)
    return {p for p in tree if has_room(tree, p) and p not in excluded}


def check_assignment(
    tree: StreamTree,
    peer: bytes,
    got: Assignment,
    wanted: int = 2,
    shunned: Iterable[bytes] = (),
) -> None:
    """`shunned`: the peers `peer` named dead lately, never its backups."""
    parent = tree.parent_of(peer)
    assert parent is not None
    assert got.parent.peer_id == parent
    assert got.depth == tree.depth_of(peer)
    own = subtree(tree, peer)
    excluded = own | suspected(tree) | {parent} | set(shunned)
    eligible = {p for p in tree if has_room(tree, p) and p not in excluded}
    ids = [b.peer_id for b in got.backups]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= eligible, "backup is the peer, its parent, in its subtree, or full"
    assert len(ids) == min(wanted, len(eligible))
    if parent != ORIGIN:
        outside = eligible - subtree(tree, parent)
        assert len([p for p in ids if p in outside]) == min(len(ids), len(outside))


def below_a_guess(tree: StreamTree, peer: bytes) -> bool:
    """The peer, or a node above it, is placed tentatively."""
    node: bytes | None = peer
    while node is not None and node != ORIGIN:
        if tree.is_orphaned(node):
            return True
        node = tree.parent_of(node)
    return False


def expected_depth(tree: StreamTree, capacity: int) -> int | None:
    """Depth a newcomer must get: below the shallowest (relay) or deepest (leaf) room
    (suspects, reported dead, are not offered; nodes below a tentative link only when
    nobody else has room; a leaf never gets the last free slot)."""
    offered = [p for p in tree if has_room(tree, p) and p not in suspected(tree)]
    confirmed = [p for p in offered if not below_a_guess(tree, p)]
    depths = [tree.depth_of(p) for p in confirmed or offered]
    if not depths or (capacity == 0 and tree.snapshot().free_slots <= 1):
        return None
    return (min(depths) if capacity > 0 else max(depths)) + 1


# -------------------------------------------------------------------- unit tests


def test_error_codes_are_distinct() -> None:
    errors = [NoCapacity, UnknownPeer, UnknownParent, InvalidRequest]
    assert all(issubclass(e, TreeError) for e in errors)
    assert {e.code for e in errors} == set(TreeErrorCode)


def test_relays_fill_level_by_level_and_leaves_go_deepest() -> None:
    tree = make_tree(origin_capacity=2)
    join_all(tree, range(1, 3), capacity=2)
    assert tree.children_of(ORIGIN) == (pid(1), pid(2))
    leaf = tree.join(pid(10), 0, "", 0.0)
    assert leaf.depth == 2  # deepest free slot, not the origin (full anyway)
    relay = tree.join(pid(3), 2, addr(3), 0.0)
    assert relay.depth == 2
    deep_leaf = tree.join(pid(11), 0, "", 0.0)
    assert deep_leaf.depth == 3 and deep_leaf.parent.peer_id == pid(3)
    check_invariants(tree)


def test_leaves_leave_shallow_slots_to_relays() -> None:
    tree = make_tree(origin_capacity=3)
    tree.join(pid(1), 2, addr(1), 0.0)
    tree.join(pid(2), 0, "", 0.0)  # deepest free slot: under 1, not the origin
    assert tree.parent_of(pid(2)) == pid(1)
    assert tree.join(pid(3), 2, addr(3), 0.0).parent.peer_id == ORIGIN


def test_join_raises_no_capacity_when_full() -> None:
    tree = make_tree(origin_capacity=0)
    with pytest.raises(NoCapacity) as info:
        tree.join(pid(1), 3, addr(1), 0.0)
    assert info.value.code == TreeErrorCode.NO_CAPACITY
    assert pid(1) not in tree
    check_invariants(tree)


def test_a_leaf_never_takes_the_last_free_slot() -> None:
    tree = make_tree(origin_capacity=2)
    tree.join(pid(1), 0, "", 0.0)
    with pytest.raises(NoCapacity):
        tree.join(pid(2), 0, "", 0.0)  # the tree would be closed for good
    tree.join(pid(3), 2, addr(3), 0.0)  # a relay still gets in, and opens two slots
    tree.join(pid(2), 0, "", 0.0)
    assert tree.snapshot().free_slots == 1
    check_invariants(tree)


def test_join_rejects_bad_requests() -> None:
    tree = make_tree()
    with pytest.raises(InvalidRequest):
        tree.join(pid(1), -1, addr(1), 0.0)
    with pytest.raises(InvalidRequest):
        tree.join(ORIGIN, 2, "x:1", 0.0)
    with pytest.raises(InvalidRequest):
        make_tree(report_quorum=0)


def test_rejoin_is_idempotent_and_updates_the_peer() -> None:
    tree = make_tree(origin_capacity=1)
    join_all(tree, range(1, 3), capacity=1)  # a chain: origin - 1 - 2
    first = tree.join(pid(1), 1, addr(1), 1.0)
    again = tree.join(pid(1), 1, "new:1", 2.0)
    assert again.parent == first.parent and len(tree) == 3
    assert tree.children_of(ORIGIN) == (pid(1),) and tree.children_of(pid(1)) == (pid(2),)
    assert tree.assignment_of(pid(2)).parent.address == "new:1"


def test_capacity_cut_re_homes_the_excess_children_as_orphans() -> None:
    tree = make_tree(origin_capacity=1)
    join_all(tree, range(1, 5), capacity=3)  # 1 under origin, 2-4 under 1
    tree.join(pid(2), 3, addr(2), 1.0)
    tree.refresh(pid(1), 1.0, capacity=1)
    assert len(tree.children_of(pid(1))) == 1
    moved = [p for p in (pid(3), pid(4)) if tree.parent_of(p) != pid(1)]
    assert len(moved) == 2 and all(tree.is_orphaned(p) for p in moved)
    check_invariants(tree)


def test_backups_prefer_peers_outside_the_parents_subtree() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 2: (0, 1), 5: (2, 2), 3: (1, 2), 4: (1, 2)})
    got = tree.join(pid(6), 2, addr(6), 0.0)
    assert got.parent.peer_id == pid(1)  # the only free slot at depth 1
    # 3 and 4 are as shallow as 5 but share the parent's fate: 5 comes first.
    assert [b.peer_id for b in got.backups] == [pid(5), pid(4)]
    check_assignment(tree, pid(6), got)


def test_backups_never_inside_own_subtree() -> None:
    tree = make_tree(origin_capacity=1)
    join_all(tree, range(1, 4), capacity=1)  # a chain 1 - 2 - 3
    got = tree.assignment_of(pid(2))
    assert got.backups == ()  # only 3 has room, and it is below 2
    tree.refresh(ORIGIN, 0.0, capacity=2)
    backups = tree.assignment_of(pid(2)).backups
    assert [b.peer_id for b in backups] == [ORIGIN]


def test_single_report_moves_reporter_but_does_not_evict() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2), 4: (1, 2)})
    got = tree.report_failure(pid(3), pid(1), 10.0)
    assert pid(1) in tree and tree.parent_of(pid(4)) == pid(1)
    assert got.parent.peer_id == pid(2)
    check_assignment(tree, pid(3), got)
    assert tree.suspects(10.0) == [pid(1)]
    # The same liar again makes no quorum (and it is not 1's child any more).
    tree.report_failure(pid(3), pid(1), 11.0)
    assert pid(1) in tree
    check_invariants(tree)


@pytest.mark.parametrize("how", ["refresh-unknown", "refresh-known", "rejoin-attached"])
def test_a_child_placed_by_its_own_claim_is_no_witness(how: str) -> None:
    """Anyone can claim a free slot (a REFRESH naming a parent, a REJOIN's `attached`):
    two identities that put themselves under a healthy relay the tracker never offered
    them cannot report it away. Their reports get it probed; found alive, it keeps its
    children, its vouches and its place in the offers. Children the tracker placed
    there still count."""
    tree = earned_tree(origin_capacity=3)
    for i in (8, 9):  # where the reporters go
        tree.join(pid(i), 4, addr(i), 0.0, net(i))
    tree.join(pid(1), 8, addr(1), 0.0, net(1))
    honest = [pid(i) for i in (2, 3)]
    for i in (2, 3):
        assert tree.join(pid(i), 0, "", 0.0, net(i)).parent.peer_id == pid(1)
    liars = [pid(i) for i in (5, 6)]
    if how != "refresh-unknown":
        for liar in liars:  # while 1 is full: it is offered to neither
            got = tree.join(liar, 0, "", 1.0, EVIL)
            assert pid(1) not in (got.parent.peer_id, *(b.peer_id for b in got.backups))
    for child in honest:
        tree.refresh(child, VOUCH, parent=pid(1))  # they vouch: 1 earns 4 slots
    assert tree.capacity_of(pid(1)) == 4
    for liar in liars:
        if how == "refresh-unknown":
            tree.refresh(liar, VOUCH, parent=pid(1), capacity=0, address="", network=EVIL)
        elif how == "refresh-known":
            tree.refresh(liar, VOUCH, parent=pid(1))
        else:
            tree.report_failure(liar, pid(77), VOUCH, attached_to=pid(1))  # a parent long gone
        assert tree.parent_of(liar) == pid(1)
    for liar in liars:
        tree.report_failure(liar, pid(1), VOUCH + 1)
    assert pid(1) in tree and tree.suspects(VOUCH + 1) == [pid(1)]
    assert tree.capacity_of(pid(1)) == 4  # no vouch lost
    tree.probe_result(pid(1), True, VOUCH + 2)
    assert not tree.is_unproven(pid(1))
    assert set(tree.children_of(pid(1))) == set(honest)
    # The children the tracker placed are witnesses: two of them evict it.
    for child in honest:
        tree.report_failure(child, pid(1), VOUCH + 3)
    assert pid(1) not in tree
    check_invariants(tree)


def test_a_failover_to_an_offered_backup_is_the_trackers_placement() -> None:
    """A node that fails over to a backup of its last ASSIGNED and says so (REJOIN
    `attached`) is where the tracker sent it: its report counts. One that moves to a
    parent it was never offered is not (white box: `claimed`)."""
    tree = make_tree(origin_capacity=3)
    for i in (1, 2):
        tree.join(pid(i), 4, addr(i), 0.0, net(i))
    got = tree.join(pid(5), 0, "", 0.0, net(5))
    backup = got.backups[0].peer_id
    tree.report_failure(pid(5), got.parent.peer_id, 1.0, attached_to=backup)
    assert tree.parent_of(pid(5)) == backup and not tree._peers[pid(5)].claimed
    tree.join(pid(3), 4, addr(3), 1.5, net(3))  # after its last ASSIGNED
    tree.refresh(pid(5), 2.0, parent=pid(3))
    assert tree.parent_of(pid(5)) == pid(3) and tree._peers[pid(5)].claimed
    check_invariants(tree)


def test_children_of_one_network_are_one_witness() -> None:
    """An attacker's identities placed under a relay by JOINs, all from one source
    network, are one witness however many report it; a child of another network makes
    the second."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 4, addr(9), 0.0, net(9))
    tree.join(pid(1), 8, addr(1), 0.0, net(1))
    for i in (2, 5, 6, 7):
        network = net(i) if i == 2 else EVIL
        assert tree.join(pid(i), 0, "", 0.0, network).parent.peer_id == pid(1)
    for i in (5, 6, 7):
        tree.report_failure(pid(i), pid(1), 1.0)
    assert pid(1) in tree
    tree.report_failure(pid(2), pid(1), 1.5)
    assert pid(1) not in tree
    check_invariants(tree)


def test_one_network_is_a_quorum_against_a_relay_it_alone_listens_to() -> None:
    """When every child from outside a relay's network is of one network, one report
    from it is a quorum: a relay holding the origin's slot for a room behind one NAT
    would otherwise starve it for good. Costs an attacker nothing it could not do by
    leaving: the relay fed only its identities."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 4, addr(9), 0.0, net(9))
    tree.join(pid(1), 8, addr(1), 0.0, EVIL)
    for i in (2, 3):
        assert tree.join(pid(i), 0, "", 0.0, net(100)).parent.peer_id == pid(1)
    tree.report_failure(pid(2), pid(1), 1.0)
    assert pid(1) not in tree
    check_invariants(tree)


def test_reports_from_one_network_add_up_against_a_relay_its_listeners_come_to_in_turn() -> None:
    """A room behind one NAT: its listeners are one witness. A silent relay under the
    origin that they come to one after another (the second by failing over to it as an
    offered backup) is removed once two of them reported it, as two listeners of any
    networks would: those who have been under it are two identities of one network."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 4, addr(9), 0.0, net(9))
    tree.join(pid(1), 8, addr(1), 0.0, EVIL)
    for i in (2, 3):
        got = tree.join(pid(i), 0, "", 0.0, net(100))
        assert got.parent.peer_id == pid(1) and got.backups[0].peer_id == pid(9)
    tree.refresh(pid(3), 0.5, parent=pid(9))  # it moved to its backup meanwhile
    tree.report_failure(pid(2), pid(1), 1.0)
    tree.probe_result(pid(1), True, 1.5)  # it answers handshakes
    assert pid(1) in tree and tree.is_unproven(pid(1))
    tree.report_failure(pid(3), pid(77), 2.0, attached_to=pid(1))  # back to an offered slot
    assert tree.parent_of(pid(3)) == pid(1)
    tree.report_failure(pid(3), pid(1), 3.0)
    assert pid(1) not in tree
    check_invariants(tree)


def test_an_evicted_relays_child_goes_under_a_suspect_rather_than_out_of_the_view() -> None:
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 2), 2: (1, 1), 3: (1, 1), 4: (2, 2), 5: (4, 0)})
    tree.report_failure(pid(5), pid(4), 1.0)  # 4 is a suspect now; 5 moves under 3
    assert tree.parent_of(pid(5)) == pid(3) and pid(4) in tree.suspects(1.0)
    assert tree.child_gone(ORIGIN, pid(1), 2.0) == [pid(1)]  # the origin's word suffices
    # 2 took the origin's slot; 3 fits only below the suspect, and its subtree with it.
    assert tree.parent_of(pid(2)) == ORIGIN
    assert tree.parent_of(pid(3)) == pid(4) and tree.is_orphaned(pid(3))
    assert pid(5) in tree
    check_invariants(tree)


def test_second_distinct_reporter_evicts_and_orphans_the_rest() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 2: (0, 3), 3: (1, 1), 4: (1, 1), 5: (1, 1), 6: (2, 1), 9: (3, 1)})
    tree.report_failure(pid(3), pid(1), 5.0)
    assert tree.parent_of(pid(3)) == pid(2) and tree.parent_of(pid(9)) == pid(3)
    tree.report_failure(pid(4), pid(1), 6.0)
    assert pid(1) not in tree
    # Both placements are the tracker's guesses until the peers say they are there.
    assert tree.is_orphaned(pid(5)) and tree.is_orphaned(pid(4))
    assert tree.parent_of(pid(4)) == ORIGIN  # the vacated slot, the shallowest
    assert tree.depth_of(pid(5)) == 2
    check_invariants(tree)
    # The orphan learns its placement when it reports the (already evicted) parent,
    # and confirms it once it streams from there.
    placed_under = tree.parent_of(pid(5))
    got = tree.report_failure(pid(5), pid(1), 7.0)
    assert got.parent.peer_id == placed_under and tree.is_orphaned(pid(5))
    assert tree.refresh(pid(5), 7.5, parent=placed_under) is None
    assert not tree.is_orphaned(pid(5))
    assert tree.suspects(7.0) == []


def test_a_claim_of_the_real_parent_beats_a_guess() -> None:
    """The tracker sent 4 (a guess) to the last slot of 2; 3 really streams from 2 (it
    switched there itself): the guess gives way, into the slot 3 leaves."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 1), 5: (1, 1), 3: (1, 1), 4: (5, 1)})
    tree.report_failure(pid(4), pid(5), 1.0)  # 5 is dead: 4 is told to go to 2 ...
    assert tree.parent_of(pid(4)) == pid(2) and tree.is_orphaned(pid(4))
    assert tree.refresh(pid(3), 2.0, parent=pid(2)) is None  # ... but 3 got there first
    assert tree.parent_of(pid(3)) == pid(2) and not tree.is_orphaned(pid(3))
    assert tree.parent_of(pid(4)) == pid(1) and tree.is_orphaned(pid(4))
    check_invariants(tree)


def test_a_claim_that_looks_like_a_cycle_breaks_the_guessed_link() -> None:
    """In our view 3 is under 2 (a guess) and 2 under 1; really 2 streams from 3."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 1), 6: (0, 1), 2: (1, 1), 3: (6, 1)})
    tree.report_failure(pid(3), pid(6), 1.0)  # 6 is dead: 3 is told to go under 2
    assert tree.parent_of(pid(3)) == pid(2) and tree.is_orphaned(pid(3))
    assert tree.refresh(pid(2), 2.0, parent=pid(3)) is None
    assert tree.parent_of(pid(2)) == pid(3) and tree.parent_of(pid(3)) == pid(1)
    check_invariants(tree)


def test_a_claim_against_confirmed_placements_is_answered_with_the_view() -> None:
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 1), 2: (1, 1)})
    answer = tree.refresh(pid(1), 1.0, parent=pid(2))  # a cycle through confirmed links
    assert answer is not None and answer.parent.peer_id == ORIGIN
    assert tree.parent_of(pid(1)) == ORIGIN
    check_invariants(tree)


def test_a_suspect_found_alive_is_unproven_and_its_report_still_counts() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 5: (0, 3), 2: (1, 2), 3: (1, 2)})
    tree.report_failure(pid(2), pid(1), 1.0)
    tree.join(pid(1), 3, addr(1), 2.0)  # it speaks for itself
    assert tree.suspects(2.0) == [], "no more probes: it answered"
    assert tree.is_unproven(pid(1)), "alive, but a child said it does not deliver"
    tree.report_failure(pid(3), pid(1), 3.0)
    assert pid(1) not in tree, "a silent relay answers probes too; the origin never fails"
    check_invariants(tree)


def test_a_relay_found_alive_below_another_is_removed_once_its_excuse_runs_out() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 5: (0, 3), 6: (1, 3), 2: (6, 2), 3: (6, 2)})
    tree.report_failure(pid(2), pid(6), 1.0)
    tree.refresh(pid(6), 1.5)  # it speaks for itself
    tree.report_failure(pid(3), pid(6), 2.0)
    assert pid(6) in tree and tree.is_convicted(pid(6)), "its parent may have failed"
    assert tree.expire(6.0) == [] and pid(6) in tree
    assert tree.expire(7.0) == [pid(6)]
    check_invariants(tree)


def test_a_convicted_relay_whose_own_parent_failed_is_excused() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 5: (0, 3), 6: (1, 3), 2: (6, 2), 3: (6, 2)})
    tree.report_failure(pid(2), pid(6), 1.0)
    assert tree.probe_result(pid(6), True, 1.5) == []
    tree.report_failure(pid(3), pid(6), 2.0)
    assert tree.is_convicted(pid(6))
    tree.report_failure(pid(6), pid(1), 3.0)  # it was starved: its own parent failed
    assert tree.is_excused(pid(6), 3.0) and not tree.is_convicted(pid(6))
    assert tree.expire(30.0) == [] and pid(6) in tree
    check_invariants(tree)


def relay_7_below_6_below_1() -> StreamTree:
    """origin <- 1 <- 6 <- 7 <- 2, 3 (and 5 under the origin): 7's children can report
    it, and 6's REJOIN naming 1 is a failover two levels above it."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 5: (0, 3), 6: (1, 3), 7: (6, 3), 2: (7, 2), 3: (7, 2)})
    return tree


def test_a_relay_found_alive_below_a_failover_is_excused() -> None:
    tree = relay_7_below_6_below_1()
    tree.report_failure(pid(2), pid(7), 1.0)
    assert tree.probe_result(pid(7), True, 1.5) == []
    tree.report_failure(pid(6), pid(1), 2.0)  # two levels above 7: it starved with 6
    assert tree.is_excused(pid(7), 3.0)
    tree.report_failure(pid(3), pid(7), 3.0)
    assert not tree.is_convicted(pid(7))
    assert tree.expire(30.0) == [] and pid(7) in tree
    check_invariants(tree)


def test_a_relay_not_found_alive_below_a_failover_is_removed_by_a_quorum() -> None:
    """It may have died with the rest (a melt): a probe would only be slower."""
    tree = relay_7_below_6_below_1()
    tree.report_failure(pid(6), pid(1), 1.0)
    tree.report_failure(pid(2), pid(7), 2.0)
    tree.report_failure(pid(3), pid(7), 2.5)
    assert pid(7) not in tree
    check_invariants(tree)


def test_a_failure_further_up_lifts_a_conviction() -> None:
    tree = relay_7_below_6_below_1()
    tree.report_failure(pid(2), pid(7), 1.0)
    assert tree.probe_result(pid(7), True, 1.5) == []
    tree.report_failure(pid(3), pid(7), 2.0)
    assert tree.is_convicted(pid(7))
    tree.report_failure(pid(6), pid(1), 3.0)  # 7 starved because 6 did
    assert tree.expire(4.0) == [] and not tree.is_convicted(pid(7))
    assert tree.expire(30.0) == [] and pid(7) in tree
    check_invariants(tree)


def test_the_report_against_a_suspect_found_alive_leaves_the_window() -> None:
    tree = make_tree(origin_capacity=2, report_window=30.0)
    build(tree, {1: (0, 3), 5: (0, 3), 2: (1, 2), 3: (1, 2)})
    tree.report_failure(pid(2), pid(1), 1.0)
    assert tree.probe_result(pid(1), True, 2.0) == []
    tree.suspects(40.0)  # the host's periodic call prunes what left the window
    tree.refresh(pid(3), 40.0, parent=pid(1))
    tree.report_failure(pid(3), pid(1), 41.0)
    assert pid(1) in tree and tree.suspects(41.0) == [pid(1)]


def test_reports_outside_the_window_do_not_combine() -> None:
    tree = make_tree(origin_capacity=2, report_window=30.0)
    build(tree, {1: (0, 3), 5: (0, 3), 2: (1, 2), 3: (1, 2)})
    tree.report_failure(pid(2), pid(1), 100.0)
    tree.report_failure(pid(3), pid(1), 200.0)
    assert pid(1) in tree
    assert tree.suspects(200.0) == [pid(1)]
    assert tree.suspects(300.0) == []


def test_report_against_expired_soft_state_evicts_at_once() -> None:
    tree = make_tree(origin_capacity=1, peer_ttl=TTL)
    tree.join(pid(1), 2, addr(1), 0.0)
    tree.join(pid(2), 2, addr(2), TTL)
    tree.report_failure(pid(2), pid(1), TTL + 1.0)
    assert pid(1) not in tree and tree.parent_of(pid(2)) == ORIGIN


def test_report_keeps_a_valid_backup_and_refuses_bad_ones() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2), 4: (1, 2), 5: (2, 2), 8: (4, 2)})
    got = tree.report_failure(pid(3), pid(1), 1.0, attached_to=pid(5))
    assert got.parent.peer_id == pid(5)
    got = tree.report_failure(pid(4), pid(1), 2.0, attached_to=pid(8))  # its own child
    assert got.parent.peer_id not in subtree(tree, pid(4))
    assert pid(1) not in tree
    check_assignment(tree, pid(4), got)
    check_invariants(tree)


def test_report_refuses_an_attachment_below_the_dead_node() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2), 4: (1, 2)})
    got = tree.report_failure(pid(3), pid(1), 1.0, attached_to=pid(4))
    assert got.parent.peer_id == pid(2)


def test_report_errors() -> None:
    tree = make_tree()
    tree.join(pid(1), 2, addr(1), 0.0)
    with pytest.raises(InvalidRequest):
        tree.report_failure(pid(1), pid(1), 0.0)
    with pytest.raises(UnknownPeer):
        tree.report_failure(pid(9), pid(1), 0.0)
    with pytest.raises(InvalidRequest):
        tree.report_failure(ORIGIN, pid(1), 0.0)


def test_report_from_unknown_peer_with_capacity_is_placed() -> None:
    tree = make_tree(origin_capacity=2)
    join_all(tree, range(1, 3), capacity=2)
    got = tree.report_failure(pid(9), pid(7), 0.0, attached_to=pid(2), capacity=1, address="a:1")
    assert got.parent.peer_id == pid(2) and tree.capacity_of(pid(9)) == 1
    check_invariants(tree)


def test_report_against_origin_moves_without_evicting() -> None:
    tree = make_tree(origin_capacity=2)
    join_all(tree, range(1, 3), capacity=2)
    got = tree.report_failure(pid(1), ORIGIN, 0.0)
    assert got.parent.peer_id == pid(2) and ORIGIN in tree
    assert tree.suspects(0.0) == []


def test_a_node_is_not_sent_back_to_a_parent_it_named_dead() -> None:
    """Relays whose parent just failed are excused: a child's report against one only
    gets it probed, and found alive it is offered again. Not to the child that left
    it, while another has room: a relay that answers probes and feeds nobody would get
    it back on every REJOIN (two silent relays under the origin kept an honest listener
    bouncing between them for 6 s: bench_attacks.py --attack no-audio-relays-x5
    --spread-networks). Here the child confirms each new parent, then leaves it."""
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 4), 2: (1, 3), 3: (1, 3), 4: (1, 3), 5: (1, 3), 6: (2, 1)})
    tree.report_failure(pid(2), pid(1), 1.0)
    tree.report_failure(pid(3), pid(1), 1.0)
    assert pid(1) not in tree  # 2, 3, 4 and 5 are excused: their parent failed
    for relay in (4, 5):
        tree.refresh(pid(relay), 1.5)  # alive: no longer doubted
    left: list[bytes] = []
    for t in (2.0, 3.0, 4.0):
        parent = tree.parent_of(pid(6))
        assert parent is not None
        left.append(parent)
        got = tree.report_failure(pid(6), parent, t)
        assert tree.probe_result(parent, True, t + 0.5) == []
        assert not tree.is_unproven(parent)  # alive, and offered to others again
        assert got.parent.peer_id not in left
        assert not {b.peer_id for b in got.backups} & set(left)
        assert tree.refresh(pid(6), t + 0.6, parent=got.parent.peer_id) is None  # it got there
    # Only those it named dead have room now: it goes back to one rather than nowhere.
    last = got.parent.peer_id
    got = tree.report_failure(pid(6), last, 5.0)
    assert got.parent.peer_id in left and got.backups == ()
    # 30 s later it may be offered any of them.
    tree.probe_result(last, True, 5.5)
    got = tree.join(pid(6), 1, addr(6), 36.0)
    check_assignment(tree, pid(6), got)
    assert len(got.backups) == 2
    check_invariants(tree)


def test_a_placement_the_node_never_confirmed_is_offered_again() -> None:
    """A REJOIN naming the tracker's choice that did not take it is a refusal: after a
    mass failure that choice is often dark for a moment and lit seconds later, so the
    node may be sent back to it (shunning those cost `meshd sim melt --level flow
    --listeners 1000 --seed 13` 8 chunks)."""
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 4), 2: (1, 3), 3: (1, 3), 4: (1, 3), 5: (4, 3), 6: (2, 1)})
    tree.report_failure(pid(2), pid(1), 1.0)
    tree.report_failure(pid(3), pid(1), 1.0)
    tree.refresh(pid(4), 1.5)
    tree.refresh(pid(5), 1.5)
    first = tree.report_failure(pid(6), pid(2), 2.0).parent.peer_id  # it left 2
    tree.probe_result(pid(2), True, 2.1)
    second = tree.report_failure(pid(6), first, 2.3).parent.peer_id  # `first` refused it
    tree.probe_result(first, True, 2.4)
    assert {first, second} == {pid(3), pid(4)}
    got = tree.report_failure(pid(6), second, 2.6)  # so did `second`
    assert got.parent.peer_id == first  # not 2, which it left, nor 5, deeper down
    check_assignment(tree, pid(6), got, shunned=[pid(2)])


def test_probe_results() -> None:
    tree = make_tree(origin_capacity=1)
    join_all(tree, range(1, 2), capacity=2)
    join_all(tree, range(2, 4), capacity=2)
    tree.join(pid(4), 0, "", 0.0)
    parent_of_4 = tree.parent_of(pid(4))
    assert parent_of_4 is not None
    tree.report_failure(pid(4), parent_of_4, 1.0)
    assert tree.suspects(1.0) == [parent_of_4]
    assert tree.probe_result(parent_of_4, True, 2.0) == []
    assert tree.suspects(2.0) == [] and parent_of_4 in tree
    assert tree.is_unproven(parent_of_4)  # alive, yet its child said it did not deliver
    assert tree.probe_result(pid(2), False, 3.0) == []  # not a suspect: a stale probe
    assert pid(2) in tree
    tree.report_failure(pid(4), parent_of_4, 4.0)
    tree.refresh(parent_of_4, 4.5)  # it speaks for itself meanwhile: no longer a suspect
    assert tree.probe_result(parent_of_4, False, 5.0) == [] and parent_of_4 in tree
    tree.suspects(66.0)  # 3 (unproven since 2.0) may take children again
    tree.report_failure(pid(2), pid(1), 66.0)
    assert tree.probe_result(pid(1), False, 67.0) == [pid(1)]
    assert pid(1) not in tree
    assert tree.probe_result(pid(1), False, 67.0) == []
    with pytest.raises(InvalidRequest):
        tree.probe_result(ORIGIN, False, 3.0)
    check_invariants(tree)


def test_an_unproven_relay_gets_no_new_children_until_a_child_vouches_or_time_passes() -> None:
    """A wedged relay answers the probe, yet its children left it for not delivering:
    newcomers go elsewhere until a child says it streams from it, or `report_window`."""
    tree = make_tree(origin_capacity=2, report_window=30.0)
    build(tree, {1: (0, 3), 5: (0, 3), 2: (1, 3), 3: (1, 3)})
    tree.report_failure(pid(2), pid(1), 1.0)  # 2 left 1: moved under 5
    assert tree.parent_of(pid(2)) == pid(5)
    tree.probe_result(pid(1), True, 2.0)
    assert tree.is_unproven(pid(1))
    assert tree.join(pid(4), 2, addr(4), 3.0).parent.peer_id == pid(5)
    tree.suspects(33.0)  # the host's probe round prunes the doubt once its window passed
    assert not tree.is_unproven(pid(1))
    tree.report_failure(pid(3), pid(1), 40.0)  # a lie, or a moment's trouble
    tree.probe_result(pid(1), True, 41.0)
    assert tree.is_unproven(pid(1)) and tree.parent_of(pid(3)) != pid(1)
    assert tree.refresh(pid(3), 42.0, parent=pid(1)) is None  # it streams from 1 after all
    assert not tree.is_unproven(pid(1)) and tree.parent_of(pid(3)) == pid(1)
    check_invariants(tree)


def test_a_parent_frees_the_slot_of_a_childless_child_it_let_go_at_once() -> None:
    """A dead leaf has no child to report it: its parent's CHILD_GONE is all there is."""
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 2), 2: (1, 0), 3: (1, 0)})
    assert tree.snapshot().free_slots == 0
    assert tree.child_gone(pid(1), pid(2), 5.0) == [pid(2)]
    assert pid(2) not in tree and has_room(tree, pid(1))
    assert tree.join(pid(4), 1, addr(4), 6.0).parent.peer_id == pid(1)
    check_invariants(tree)


def test_a_parent_only_gets_a_child_with_children_probed() -> None:
    """One parent's word does not evict a relay, nor mark it unproven: it is a suspect
    (offered to nobody) until the probe says; a failed probe evicts it."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2), 4: (3, 0)})
    assert tree.child_gone(pid(1), pid(3), 1.0) == []
    assert pid(3) in tree and tree.suspects(1.0) == [pid(3)]
    assert tree.join(pid(5), 2, addr(5), 1.5).parent.peer_id != pid(3)
    assert tree.probe_result(pid(3), True, 2.0) == []
    assert not tree.is_unproven(pid(3)) and tree.suspects(2.0) == []
    # A lying parent and one lying child of 3 are still no quorum.
    tree.child_gone(pid(1), pid(3), 10.0)
    tree.report_failure(pid(4), pid(3), 10.5)
    assert pid(3) in tree and tree.parent_of(pid(4)) != pid(3)
    assert tree.probe_result(pid(3), False, 11.0) == [pid(3)]
    assert pid(3) not in tree
    check_invariants(tree)


def test_the_origins_word_evicts_a_relay_at_once() -> None:
    """The origin is trusted (docs/security.md): a child it let go is cut off from the
    stream, so the tracker re-homes its subtree at once instead of probing it for
    seconds while the origin's slot stays taken (in a melt where every child of the
    origin died, the whole audience waited for those probes)."""
    tree = make_tree(origin_capacity=1)
    build(tree, {1: (0, 2), 2: (1, 1), 3: (1, 0)})
    assert tree.child_gone(ORIGIN, pid(1), 1.0) == [pid(1)]
    assert tree.parent_of(pid(2)) == ORIGIN and tree.is_orphaned(pid(2))
    check_invariants(tree)


def test_child_gone_from_anyone_but_the_parent_in_the_view_changes_nothing() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 0), 4: (2, 0)})
    tree.report_failure(pid(3), pid(1), 1.0)  # 3 moved to 2 (1 is a suspect)
    assert tree.parent_of(pid(3)) == pid(2)
    assert tree.child_gone(pid(1), pid(3), 2.0) == []  # 1 let it go late: it moved
    assert tree.child_gone(pid(2), pid(1), 2.0) == []  # 1 is not 2's child
    assert tree.child_gone(pid(9), pid(4), 2.0) == []  # an unknown reporter
    assert tree.child_gone(pid(2), pid(9), 2.0) == []  # an unknown child
    assert tree.child_gone(pid(1), ORIGIN, 2.0) == []
    assert all(p in tree for p in map(pid, range(1, 5)))
    assert tree.parent_of(pid(4)) == pid(2) and tree.parent_of(pid(3)) == pid(2)
    # Each request was the sender's own: 1 spoke for itself, so it is no suspect now.
    assert pid(1) not in tree.suspects(2.0)
    check_invariants(tree)


def test_leave_moves_children_outside_their_subtrees_first() -> None:
    tree = make_tree(origin_capacity=2)
    join_all(tree, range(1, 3), capacity=2)
    join_all(tree, range(3, 7), capacity=2)  # 3,4 under 1; 5,6 under 2
    join_all(tree, range(7, 11), capacity=2)  # under 3,4,5,6 in some order
    children = tree.children_of(pid(1))
    moves = tree.leave(pid(1), 5.0)
    assert set(moves) == set(children) and pid(1) not in tree
    for child, got in moves.items():
        check_assignment(tree, child, got)
        assert got.parent.peer_id not in subtree(tree, child)
    # The vacated origin slot went to a child only because nothing else was free that high.
    check_invariants(tree)


def test_leave_avoids_the_leavers_parent_when_it_can() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (2, 2)})
    moves = tree.leave(pid(2), 1.0)
    # The vacated origin slot is shallower, but the origin still feeds 2 meanwhile.
    assert moves[pid(3)].parent.peer_id == pid(1)
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 1), 4: (1, 0), 2: (0, 1), 3: (2, 0)})
    assert tree.leave(pid(2), 1.0)[pid(3)].parent.peer_id == ORIGIN  # nowhere else
    check_invariants(tree)


def test_leave_errors() -> None:
    tree = make_tree()
    with pytest.raises(InvalidRequest):
        tree.leave(ORIGIN, 0.0)
    with pytest.raises(UnknownPeer):
        tree.leave(pid(1), 0.0)


def test_refresh_rebuilds_the_view_after_a_restart() -> None:
    tree = make_tree(origin_capacity=1)
    with pytest.raises(UnknownParent):
        tree.refresh(pid(2), 0.0, parent=pid(1), capacity=1, address=addr(2))
    tree.refresh(pid(1), 0.0, parent=ORIGIN, capacity=1, address=addr(1))
    tree.refresh(pid(2), 0.0, parent=pid(1), capacity=1, address=addr(2))
    assert tree.parent_of(pid(2)) == pid(1) and tree.depth_of(pid(2)) == 2
    with pytest.raises(UnknownPeer) as info:  # 1 is full in our view
        tree.refresh(pid(3), 0.0, parent=pid(1), capacity=0, address="")
    assert info.value.code == TreeErrorCode.UNKNOWN_PEER
    with pytest.raises(UnknownPeer):
        tree.refresh(pid(3), 0.0)
    check_invariants(tree)


def test_after_a_restart_a_refresh_takes_back_the_slot_of_a_newcomer_it_refused() -> None:
    # A restarted tracker knows only the origin until its old children REFRESH: two
    # newcomers JOIN into the origin's slots, the origin (full) refuses them, and they
    # REJOIN. The old children's REFRESHes are facts and win; the newcomers move below
    # them, as guesses, and the same goes one level down.
    tree = make_tree(origin_capacity=2, rebuilding_until=TTL)
    tree.join(pid(5), 2, addr(5), 0.0)
    tree.join(pid(6), 2, addr(6), 0.0)
    assert tree.children_of(ORIGIN) == (pid(5), pid(6))
    with pytest.raises(UnknownPeer):  # not refused yet: a newcomer streams from there
        tree.refresh(pid(1), 0.1, parent=ORIGIN, capacity=2, address=addr(1))
    for newcomer in (pid(5), pid(6)):  # refused: moved below each other, or left there
        with contextlib.suppress(NoCapacity):
            tree.report_failure(newcomer, ORIGIN, 0.2)
    tree.refresh(pid(1), 1.0, parent=ORIGIN, capacity=2, address=addr(1))
    tree.refresh(pid(2), 1.0, parent=ORIGIN, capacity=2, address=addr(2))
    assert set(tree.children_of(ORIGIN)) == {pid(1), pid(2)}
    below_old = subtree(tree, pid(1)) | subtree(tree, pid(2))
    assert {pid(5), pid(6)} <= below_old
    for newcomer in (pid(5), pid(6)):  # they are refused again there, and say so
        with contextlib.suppress(NoCapacity):
            tree.report_failure(newcomer, tree.parent_of(newcomer) or ORIGIN, 1.5)
    for child, parent in ((3, 1), (4, 1), (7, 2), (8, 2)):
        tree.refresh(pid(child), 2.0, parent=pid(parent), capacity=2, address=addr(child))
        assert tree.parent_of(pid(child)) == pid(parent)
    assert all(tree.depth_of(newcomer) >= 3 for newcomer in (pid(5), pid(6)))
    check_invariants(tree)


def test_a_refresh_takes_a_slot_only_from_a_child_not_streaming_there_in_a_rebuild() -> None:
    tree = make_tree(origin_capacity=1, rebuilding_until=TTL)
    tree.join(pid(5), 1, addr(5), 0.0)
    tree.refresh(pid(5), 1.0, parent=ORIGIN)  # it streams from there: a fact
    with pytest.raises(UnknownPeer):
        tree.refresh(pid(1), 2.0, parent=ORIGIN, capacity=2, address=addr(1))
    assert tree.children_of(ORIGIN) == (pid(5),)
    # A leaf's claim cannot take the slot when the child would have nowhere to go.
    for rebuilding_until in (TTL, 0.0):
        tree = make_tree(origin_capacity=1, rebuilding_until=rebuilding_until)
        tree.join(pid(5), 1, addr(5), 0.0)
        again = tree.report_failure(pid(5), ORIGIN, 0.5)
        assert again.parent.peer_id == ORIGIN, "nowhere else: it may try there again"
        with pytest.raises(UnknownPeer):
            tree.refresh(pid(1), 2.0, parent=ORIGIN, capacity=0, address="")
        assert tree.children_of(ORIGIN) == (pid(5),)
        if not rebuilding_until:  # a tree we built ourselves: our view stands
            with pytest.raises(UnknownPeer):
                tree.refresh(pid(1), 2.0, parent=ORIGIN, capacity=1, address=addr(1))
            continue
        tree.refresh(pid(1), 2.0, parent=ORIGIN, capacity=1, address=addr(1))
        assert tree.children_of(ORIGIN) == (pid(1),) and tree.parent_of(pid(5)) == pid(1)
        check_invariants(tree)


def test_in_a_rebuild_a_refresh_waits_for_its_parent_and_comes_in_with_it() -> None:
    # The ANNOUNCE sends parents first, but a busy tracker answers out of order: the
    # grandchild and the child come before the parent, and are taken when it comes.
    tree = make_tree(origin_capacity=2, rebuilding_until=TTL)
    tree.refresh(pid(3), 1.0, parent=pid(2), capacity=0, address="", network="n3")
    tree.refresh(pid(2), 1.1, parent=pid(1), capacity=2, address=addr(2), network="n2")
    assert pid(2) not in tree and pid(3) not in tree
    assert tree.waiting_from("n3") == 1, "a waiting node counts against its network"
    assert tree.refresh(pid(1), 1.2, parent=ORIGIN, capacity=2, address=addr(1)) is None
    assert tree.parent_of(pid(3)) == pid(2) and tree.parent_of(pid(2)) == pid(1)
    assert tree.depth_of(pid(3)) == 3
    assert sorted(tree.take_adopted()) == [(pid(2), "n2"), (pid(3), "n3")]
    assert tree.take_adopted() == [] and tree.waiting_from("n3") == 0
    check_invariants(tree)


def test_a_waiting_refresh_is_dropped_when_its_node_came_in_or_the_rebuild_ended() -> None:
    tree = make_tree(origin_capacity=2, rebuilding_until=100.0)
    tree.refresh(pid(2), 1.0, parent=pid(1), capacity=2, address=addr(2))
    tree.join(pid(2), 2, addr(2), 2.0)  # it came in by itself meanwhile
    tree.refresh(pid(3), 3.0, parent=pid(1), capacity=2, address=addr(3))
    tree.expire(100.0)  # the rebuild is over: parents that never came are not waited for
    tree.refresh(pid(1), 101.0, parent=ORIGIN, capacity=2, address=addr(1))
    assert tree.parent_of(pid(2)) == ORIGIN, "placed by its JOIN, not moved"
    assert pid(3) not in tree and tree.take_adopted() == []
    with pytest.raises(UnknownParent):  # outside a rebuild: refused, as always
        tree.refresh(pid(4), 102.0, parent=pid(9), capacity=2, address=addr(4))
    check_invariants(tree)


def test_in_a_rebuild_refused_newcomers_do_not_evict_a_relay_whose_children_are_late() -> None:
    # The restarted tracker knows the relay (its REFRESH) but not yet its children: it
    # seats two newcomers there, the relay (full) refuses them, and they say so.
    for rebuilding_until in (TTL, 0.0):
        tree = make_tree(origin_capacity=1, rebuilding_until=rebuilding_until)
        tree.join(pid(1), 2, addr(1), 0.0)
        for newcomer in (5, 6):
            tree.join(pid(newcomer), 2, addr(newcomer), 1.0, network=f"n{newcomer}")
            assert tree.parent_of(pid(newcomer)) == pid(1)
        for newcomer in (5, 6):
            with contextlib.suppress(NoCapacity):
                tree.report_failure(pid(newcomer), pid(1), 2.0)
        if rebuilding_until:
            assert pid(1) in tree, "only probed: its children are on their way"
            assert pid(1) in tree.suspects(2.0)
        else:
            assert pid(1) not in tree, "a tree we built ourselves: two witnesses evict"
        check_invariants(tree)


def test_a_relay_with_room_only_in_its_own_subtree_trades_slots_with_a_leaf() -> None:
    # A growing tree's free slots are all at its frontier, here below 6. When 3 is
    # removed, 4 takes its slot, and 5 has nowhere to go but its own subtree: dropping
    # it lost those slots too, and nobody could be placed any more (a launch locked
    # out). A leaf elsewhere takes a slot below 6 instead, and 5 takes the leaf's.
    tree = make_tree(origin_capacity=2)
    edges = {1: (0, 1), 2: (0, 1), 10: (1, 0), 3: (2, 2), 4: (3, 2), 5: (3, 1), 6: (5, 2)}
    build(tree, edges | {11: (4, 0), 12: (4, 0)})
    for i in (1, 2, 4, 5, 6, 10, 11, 12):  # all but 3 keep refreshing
        tree.refresh(pid(i), TTL - 1, capacity=tree.capacity_of(pid(i)))
    assert tree.expire(TTL + 1) == [pid(3)]
    assert tree.parent_of(pid(4)) == pid(2)
    assert tree.parent_of(pid(5)) in (pid(1), pid(4)), "in a slot a leaf had"
    moved = [pid(i) for i in (10, 11, 12) if tree.parent_of(pid(i)) == pid(6)]
    assert len(moved) == 1 and tree.is_orphaned(moved[0]), "a guess until it says so"
    assert len(tree) == 1 + 8, "only 3 is gone"
    check_invariants(tree)


def test_a_reporter_with_nowhere_else_to_go_is_told_back_not_refused() -> None:
    # A launch's first seconds: the tree is small and full, and the one slot the view
    # counted as taken at the origin was the relay's own (its parent could not take it
    # yet). Answered "no slot" at each REJOIN, it kept that slot in the view, dark, and
    # every newcomer was seated below it: 911 of 1,000 listeners never played.
    tree = make_tree(origin_capacity=1)
    tree.join(pid(1), 2, addr(1), 0.0)
    got = tree.report_failure(pid(1), ORIGIN, 1.0)
    assert got.parent.peer_id == ORIGIN and tree.is_orphaned(pid(1)), "a guess: it may try"
    tree.join(pid(2), 2, addr(2), 1.5)
    assert tree.parent_of(pid(2)) == pid(1)
    assert tree.refresh(pid(1), 2.0, parent=ORIGIN) is None
    assert not tree.is_orphaned(pid(1)), "taken this time: a fact again"
    check_invariants(tree)


@pytest.mark.parametrize("released_by", ["its REFRESH there", "its old parent's CHILD_GONE"])
def test_a_slot_stays_taken_until_the_child_moved_away_confirms(released_by: str) -> None:
    # Leaf 1 is moved down (make before break) and streams from the origin until it has
    # moved. Offering its slot meanwhile sent newcomers to a full parent, which refused
    # them: at 20,000 listeners the playing tree filled while the view showed room, and
    # every later newcomer went below relays that never got the stream (a launch lockout).
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 0), 2: (0, 1), 3: (2, 1), 4: (3, 2)})
    moved = tree.refresh(pid(1), 1.0, parent=ORIGIN)
    assert moved is not None and moved.parent.peer_id == pid(4)
    assert tree.moving_from(pid(1)) == ORIGIN
    assert tree.join(pid(5), 2, addr(5), 2.0).parent.peer_id == pid(4), "not the held slot"
    check_invariants(tree)
    if released_by == "its REFRESH there":
        assert tree.refresh(pid(1), 3.0, parent=pid(4)) is None
    else:
        assert tree.child_gone(ORIGIN, pid(1), 3.0) == []
    assert tree.moving_from(pid(1)) is None
    assert tree.join(pid(6), 2, addr(6), 4.0).parent.peer_id == ORIGIN
    check_invariants(tree)


def test_refresh_follows_the_peer_only_to_valid_parents() -> None:
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2)})
    tree.refresh(pid(1), 1.0, parent=pid(3))
    assert tree.parent_of(pid(1)) == ORIGIN, "a cycle is refused"
    tree.refresh(pid(3), 1.0, parent=pid(9))
    assert tree.parent_of(pid(3)) == pid(1), "an unknown parent is ignored"
    tree.refresh(pid(3), 1.0, parent=pid(2))
    assert tree.parent_of(pid(3)) == pid(2) and tree.depth_of(pid(3)) == 2
    tree.refresh(pid(1), 1.0, parent=pid(3))
    assert tree.parent_of(pid(1)) == pid(3) and tree.depth_of(pid(1)) == 3
    with pytest.raises(InvalidRequest):
        tree.refresh(ORIGIN, 1.0, parent=pid(1))
    check_invariants(tree)


def test_expire_removes_only_silent_peers() -> None:
    tree = make_tree(origin_capacity=2, peer_ttl=100.0)
    build(tree, {1: (0, 2), 2: (0, 2), 3: (1, 2), 4: (2, 2)}, now=0.0)
    tree.refresh(pid(1), 50.0)
    tree.refresh(pid(4), 50.0)
    assert tree.expire(100.0) == []
    assert sorted(tree.expire(100.5)) == [pid(2), pid(3)]
    assert tree.is_orphaned(pid(4)) and tree.parent_of(pid(4)) in (ORIGIN, pid(1))
    assert sorted(tree.expire(150.5)) == [pid(1), pid(4)]
    assert list(tree) == [ORIGIN]
    check_invariants(tree)


def test_expire_does_not_scan_when_nothing_is_due() -> None:
    tree = make_tree(origin_capacity=1001, peer_ttl=100.0)
    join_all(tree, range(1, 1001), capacity=0, now=0.0)
    for i in range(1, 1001):
        tree.refresh(pid(i), 10.0)
    queued = len(tree._expiry)
    assert tree.expire(100.0) == []
    assert len(tree._expiry) == queued, "nothing was due, nothing was touched"
    assert tree.expire(105.0) == []  # the refreshed entries are skipped, not expired
    assert len(tree._expiry) == 1000


def test_depth_stays_logarithmic_for_uniform_capacity() -> None:
    for k in (2, 3, 4):
        tree = make_tree(origin_capacity=k)
        join_all(tree, range(1, 3001), capacity=k)
        assert tree.snapshot().max_depth == math.ceil(math.log(3000 * (k - 1) / k + 1, k))
        check_invariants(tree, uniform_k=k)


def test_snapshot_counts() -> None:
    tree = make_tree(origin_capacity=2)
    join_all(tree, range(1, 4), capacity=2)
    tree.join(pid(4), 0, "", 0.0)  # deepest: under 3
    snap = tree.snapshot()
    assert snap.audience == 4 and snap.origin_children == 2 and snap.origin_capacity == 2
    assert snap.depth_histogram == (1, 2, 1, 1) and snap.max_depth == 3
    assert snap.free_slots == 4 * 2 - 4
    assert snap.orphans == 0 and snap.suspects == 0


# ------------------------------------------------------------- earned capacity

CEILING = 16
INITIAL = 2
VOUCH = 5.0
EVIL = "192.0.2.0/24"


def earned_tree(origin_capacity: int = 4, *, earned: bool = True) -> StreamTree:
    return StreamTree(
        ORIGIN,
        "origin:4433",
        origin_capacity,
        peer_ttl=TTL,
        max_capacity=CEILING,
        initial_capacity=INITIAL if earned else None,
        vouch_after=VOUCH,
    )


def net(i: int) -> str:
    return f"10.{i}.0.0/24"


def test_a_declaration_above_the_ceiling_counts_as_the_ceiling() -> None:
    tree = earned_tree()
    tree.join(pid(1), 1024, addr(1), 0.0, net(1))
    assert tree.declared_of(pid(1)) == CEILING and tree.capacity_of(pid(1)) == INITIAL
    tree.refresh(pid(1), 1.0, capacity=3)
    assert tree.declared_of(pid(1)) == 3
    tree.refresh(ORIGIN, 1.0, capacity=1000)
    assert tree.capacity_of(ORIGIN) == 1000, "the origin is trusted"
    check_invariants(tree)


def relay_with_four_children() -> StreamTree:
    """Relay 1 (declared 1,024) under the origin; 2, 3, 5 vouched for it, 4 (from its
    own network) did not: it holds 4 children of 6 usable slots."""
    tree = earned_tree(origin_capacity=1)
    tree.join(pid(1), 1024, addr(1), 0.0, net(1))
    join_all(tree, [2, 3], capacity=2)
    assert tree.children_of(pid(1)) == (pid(2), pid(3))
    assert tree.refresh(pid(2), VOUCH - 1, parent=pid(1)) is None
    assert tree.capacity_of(pid(1)) == INITIAL, "too early to vouch"
    tree.refresh(pid(2), VOUCH, parent=pid(1))
    tree.refresh(pid(2), VOUCH + 1, parent=pid(1))  # once per placement
    assert tree.capacity_of(pid(1)) == INITIAL  # max(2, 2 x 1 vouch)
    tree.refresh(pid(3), VOUCH, parent=pid(1))
    assert tree.capacity_of(pid(1)) == 4  # 2 x 2 vouches
    tree.join(pid(4), 2, addr(4), VOUCH, net(1))
    tree.join(pid(5), 2, addr(5), VOUCH, net(5))
    assert tree.children_of(pid(1)) == (pid(2), pid(3), pid(4), pid(5))
    tree.refresh(pid(4), 2 * VOUCH, parent=pid(1))  # one network cannot vouch for itself
    tree.refresh(pid(5), 2 * VOUCH, parent=pid(1))
    assert tree.capacity_of(pid(1)) == 6  # 2 x 3 vouches
    check_invariants(tree)
    return tree


def test_a_relay_earns_slots_as_its_children_vouch() -> None:
    relay_with_four_children()


def test_a_report_costs_a_relay_what_it_earned() -> None:
    tree = relay_with_four_children()
    tree.report_failure(pid(5), pid(1), 20.0)  # 5 says 1 delivers nothing
    assert tree.capacity_of(pid(1)) == INITIAL and pid(1) in tree
    kept = tree.children_of(pid(1))
    assert len(kept) == INITIAL and pid(5) not in kept
    moved = {pid(2), pid(3), pid(4)} - set(kept)
    assert moved and all(tree.is_orphaned(p) for p in moved)  # re-homed: ours to tell
    check_invariants(tree)
    tree.probe_result(pid(1), True, 21.0)  # alive: unproven, and back to the start
    for child in kept:
        tree.refresh(child, 24.0, parent=pid(1))
    assert tree.capacity_of(pid(1)) == INITIAL, "the kept children vouch only after a while"
    for child in kept:
        tree.refresh(child, 20.0 + VOUCH, parent=pid(1))
    assert tree.capacity_of(pid(1)) == (4 if pid(4) not in kept else 2)
    check_invariants(tree)


@pytest.mark.parametrize("earned", [True, False])
def test_a_few_high_capacity_identities_cannot_take_the_top(earned: bool) -> None:
    """The trial's attack: a few fresh identities declare 1,024, join first and deliver
    nothing. With earned capacity they hold 2 honest children each, until those report
    them; then they get no more. Taking declarations on trust, they held everyone."""
    tree = earned_tree(origin_capacity=4, earned=earned)
    attackers = [pid(100 + i) for i in range(3)]
    for i, attacker in enumerate(attackers):
        tree.join(attacker, 1024, addr(100 + i), 0.0, EVIL)
    # Sybils from the attackers' network, under them, vouch for them: it counts for nothing.
    for i in range(3):
        sybil = pid(200 + i)
        tree.refresh(sybil, 0.0, parent=attackers[i], capacity=0, address="", network=EVIL)
        tree.refresh(sybil, VOUCH, parent=attackers[i])
    honest = list(range(1, 41))
    for i in honest:
        tree.join(pid(i), 2, addr(i), VOUCH, net(i))
    starved = [i for i in honest if tree.parent_of(pid(i)) in attackers]
    if not earned:
        assert len(starved) > 0.9 * len(honest)  # all but the origin's last slot's few
        return
    assert all(tree.capacity_of(a) == INITIAL for a in attackers)
    assert len(starved) == len(attackers)  # one each, beside its sybil
    for i in starved:  # they stall, report the attacker and move
        tree.report_failure(pid(i), tree.parent_of(pid(i)) or b"", VOUCH + 3)
    # Its only other child is of its own network: one report is a quorum.
    assert not any(attacker in tree for attacker in attackers)
    sybils = [pid(200 + i) for i in range(3)]
    assert all(tree.is_unproven(sybil) for sybil in sybils)
    for sybil in sybils:
        tree.probe_result(sybil, True, VOUCH + 4)  # it answers handshakes
        assert tree.is_unproven(sybil)
    for i in range(41, 81):
        tree.join(pid(i), 2, addr(i), VOUCH + 5, net(i))
    hostile = {*attackers, *sybils}
    for i in range(1, 81):
        assert tree.parent_of(pid(i)) not in hostile, "an attacker got new children"
    check_invariants(tree)


@pytest.mark.parametrize("own_network", [True, False], ids=["sybils", "other-listeners"])
def test_one_report_evicts_a_relay_whose_other_children_are_of_its_own_network(
    own_network: bool,
) -> None:
    """An attacker under the origin hangs its sybils below itself: the one honest child
    it starves could never make a quorum of two. Children of the relay's own network
    prove nothing by their silence, so that child's report is enough, and it gets the
    slot the attacker leaves, before the sybils (which declare more), and they are
    offered to nobody. Other listeners' silence still counts: then one report is not."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 2, addr(9), 0.0, net(9))  # where the reporter can go
    tree.join(pid(1), 8, addr(1), 0.0, EVIL)
    assert tree.join(pid(5), 2, addr(5), 0.0, net(5)).parent.peer_id == pid(1)
    for i in (2, 3, 4):
        network = EVIL if own_network else net(i)
        tree.refresh(pid(i), 0.0, parent=pid(1), capacity=8, address=addr(i), network=network)
    got = tree.report_failure(pid(5), pid(1), 1.0)
    assert (pid(1) in tree) is not own_network
    if own_network:
        assert got.parent.peer_id == ORIGIN
        assert all(tree.is_unproven(pid(i)) for i in (2, 3, 4))
    check_invariants(tree)


def test_a_removed_relays_child_of_its_own_network_is_not_excused_by_the_removal() -> None:
    """The children of a removed relay are excused (they starved with it), but one of
    the relay's own network may be its sybil, as silent: it is excused only by its own
    REJOIN, as an honest relay that lost its parent sends. Excused by the removal, two
    sybils under the origin kept honest listeners bouncing between them for 5 s, then
    5 s more once the other was removed (bench_attacks.py --attack no-audio-relays-x5
    --spread-networks: first audio p50 6.6 s)."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 2, addr(9), 0.0, net(9))
    tree.join(pid(1), 8, addr(1), 0.0, EVIL)
    tree.join(pid(2), 8, addr(2), 0.0, EVIL)  # its sybil, under it
    offered = [tree.join(pid(i), 2, addr(i), 0.0, net(i)).backups for i in (5, 6, 7)]
    assert pid(2) in [backup.peer_id for backup in offered[0]]  # 5's backup
    for i in (6, 7):
        tree.report_failure(pid(i), pid(1), 1.0, attached_to=pid(9))
    assert pid(1) not in tree and tree.is_unproven(pid(2))
    tree.report_failure(pid(5), pid(1), 1.5, attached_to=pid(2))  # failed over to it
    tree.refresh(pid(2), 1.6, parent=ORIGIN)  # it confirms the origin's slot
    assert tree.join(pid(8), 2, addr(8), 1.7, net(8)).parent.peer_id == pid(2)
    tree.report_failure(pid(5), pid(2), 2.5)
    tree.report_failure(pid(8), pid(2), 2.5)
    assert pid(2) not in tree
    check_invariants(tree)


def test_a_report_from_the_relays_own_network_needs_the_quorum() -> None:
    """Honest listeners behind one /24 feed each other: one of them reporting its parent
    is no sybil-free witness, and one report from it alone evicts nobody. Each child of
    the relay's own network is a witness of its own (its sybils could only evict it)."""
    tree = make_tree(origin_capacity=2)
    tree.join(pid(9), 2, addr(9), 0.0, net(9))
    tree.join(pid(1), 8, addr(1), 0.0, EVIL)
    for i in (2, 3):
        assert tree.join(pid(i), 0, "", 0.0, EVIL).parent.peer_id == pid(1)
    tree.report_failure(pid(2), pid(1), 1.0)
    assert pid(1) in tree
    tree.report_failure(pid(3), pid(1), 1.5)
    assert pid(1) not in tree
    check_invariants(tree)


# ------------------------------------------------------------- stateful testing


class TreeMachine(RuleBasedStateMachine):
    """Random churn against a model of reality: which peers are alive or crashed.

    Alive peers refresh on every tick, crashed ones fall silent; children of crashed
    peers report them, some children lie about healthy parents.
    """

    uniform_k: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tree = StreamTree(ORIGIN, "origin:4433", self.uniform_k or 3, peer_ttl=TTL)
        self.now = 0.0
        self.next_id = 1
        self.crashed: dict[bytes, float] = {}  # peer -> when it fell silent
        # Our model of the quorum: first-hand reports count for 60 s, even against a peer
        # that spoke for itself since (being alive proves no delivery).
        self.reports: dict[bytes, dict[bytes, float]] = {}
        self.gone: list[bytes] = []
        # The confirmed parents each peer named dead in its REJOINs, newest first.
        self.named_dead: dict[bytes, list[tuple[bytes, float]]] = {}

    def rejoin_naming(self, peer: bytes, dead: bytes) -> None:
        """Model of the shun: the last 4 confirmed parents it named dead, for 30 s."""
        named = [(p, t) for p, t in self.named_dead.get(peer, []) if p != dead]
        self.named_dead[peer] = [(dead, self.now), *named][:4]

    def shunned(self, peer: bytes) -> set[bytes]:
        return {p for p, t in self.named_dead.get(peer, []) if self.now - t < 30.0}

    def live(self) -> list[bytes]:
        """Peers in the tracker's view that are really alive (not the origin)."""
        return sorted(p for p in self.tree if p != ORIGIN and p not in self.crashed)

    def draw_live(self, data: st.DataObject) -> bytes | None:
        live = self.live()
        return data.draw(st.sampled_from(live)) if live else None

    @invariant()
    def structure_holds(self) -> None:
        check_invariants(self.tree, self.uniform_k)

    @invariant()
    def excused_reports_dropped(self) -> None:
        """Keeps the model in step: a peer excused by the rule just run (its parent
        failed) has its reports dropped, as the tree does."""
        for peer in self.tree:
            if peer != ORIGIN and self.tree.is_excused(peer, self.now):
                self.reports.pop(peer, None)

    @rule(capacities=st.lists(st.integers(0, 4), min_size=1, max_size=6))
    def join(self, capacities: list[int]) -> None:
        for capacity in capacities:
            self.join_one(self.uniform_k or capacity)
        event(f"audience >= {len(self.tree) // 20 * 20}")

    def join_one(self, capacity: int) -> None:
        peer = pid(self.next_id)
        self.next_id += 1
        want = expected_depth(self.tree, capacity)
        try:
            got = self.tree.join(peer, capacity, addr(self.next_id), self.now)
        except NoCapacity:
            event("join: no capacity")
            assert want is None
            return
        assert got.depth == want, "placement rule: shallowest (relay) or deepest (leaf)"
        check_assignment(self.tree, peer, got)

    @rule(data=st.data())
    def rejoin(self, data: st.DataObject) -> None:
        peer = self.draw_live(data)
        if peer is None:
            return
        before = self.tree.parent_of(peer)
        size = len(self.tree)
        got = self.tree.join(peer, self.tree.capacity_of(peer), addr(1), self.now)
        assert got.parent.peer_id == before and len(self.tree) == size
        check_assignment(self.tree, peer, got, shunned=self.shunned(peer))

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data(), wanted=st.integers(0, 4))
    def change_capacity(self, data: st.DataObject, wanted: int) -> None:
        peer = self.draw_live(data)
        if peer is not None:
            self.tree.refresh(peer, self.now, capacity=wanted)
            assert self.tree.declared_of(peer) == wanted

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        peer = self.draw_live(data)
        if peer is None:
            return
        children = set(self.tree.children_of(peer))
        moves = self.tree.leave(peer, self.now)
        event(f"leave: moved {min(len(moves), 2)}+ children")
        assert peer not in self.tree and set(moves) <= children
        for child in children - set(moves):
            assert child not in self.tree, "a child that was not moved was dropped"
        for child, got in moves.items():
            check_assignment(self.tree, child, got, shunned=self.shunned(child))

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        relays = [p for p in self.live() if len(self.tree.children_of(p)) >= 2]
        peer = data.draw(st.sampled_from(relays)) if relays else self.draw_live(data)
        if peer is not None:
            self.tree.refresh(peer, self.now)  # its last words: the model knows last_seen
            self.crashed[peer] = self.now

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data(), use_backup=st.booleans())
    def report_crash(self, data: st.DataObject, use_backup: bool) -> None:
        victims = [p for p in self.live() if self.tree.parent_of(p) in self.crashed]
        if not victims:
            return
        reporter = data.draw(st.sampled_from(victims))
        dead = self.tree.parent_of(reporter)
        assert dead is not None
        backup = data.draw(st.sampled_from(sorted(self.tree))) if use_backup else None
        # A reporter we only told to go there never streamed from it: a refusal, no report.
        refused = self.tree.is_orphaned(reporter)
        claimed = self.claimed(reporter)
        backup_ok = backup in eligible_parents(self.tree, reporter, None if refused else dead)
        room_outside = bool(eligible_parents(self.tree, reporter, dead, offered=True) - {dead})
        # A parent whose own parent failed lately is excused: the report only doubts it.
        if not refused and not claimed and not self.tree.is_excused(dead, self.now):
            self.reports.setdefault(dead, {})[reporter] = self.now
        self.reports.pop(reporter, None)  # its own parent failed: it was starved too
        confirmed = self.witnesses(dead) >= 2
        expired = self.now - self.crashed[dead] > TTL
        if not refused:
            self.rejoin_naming(reporter, dead)
        try:
            got = self.tree.report_failure(reporter, dead, self.now, attached_to=backup)
        except NoCapacity:
            event("report: no capacity")
            assert reporter not in self.tree or not eligible_parents(
                self.tree, reporter, None, offered=True
            ) - {dead}
            self.check_verdict(dead, confirmed, expired)
            return
        self.check_verdict(dead, confirmed, expired)
        confirmed = confirmed or expired
        event("report: evicted" if confirmed else "report: suspected")
        if not confirmed and not refused and room_outside:
            # (With no room elsewhere it may stay below `dead`: it may yet be alive.)
            assert reporter not in subtree(self.tree, dead)
        if backup_ok and not confirmed:
            assert got.parent.peer_id == backup
        # Where it streams from is a fact; anywhere else is where we just told it to go.
        assert self.tree.is_orphaned(reporter) == (got.parent.peer_id != backup)
        check_assignment(self.tree, reporter, got, shunned=self.shunned(reporter))

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def lying_report(self, data: st.DataObject) -> None:
        liars = [
            p
            for p in self.live()
            if self.tree.parent_of(p) not in (ORIGIN, None)
            and self.tree.parent_of(p) not in self.crashed
            and not self.witnesses(self.tree.parent_of(p))
        ]
        if not liars:
            return
        liar = data.draw(st.sampled_from(liars))
        victim = self.tree.parent_of(liar)
        assert victim is not None
        refused = self.tree.is_orphaned(liar)  # never streamed from it: no report
        claimed = self.claimed(liar)
        if not refused and not claimed and not self.tree.is_excused(victim, self.now):
            self.reports.setdefault(victim, {})[liar] = self.now
        self.reports.pop(liar, None)
        unshielded = not claimed and self.one_witness_is_a_quorum(victim, liar)
        if not refused:
            self.rejoin_naming(liar, victim)
        try:
            self.tree.report_failure(liar, victim, self.now)
        except NoCapacity:  # (the parent that refused it is no place either)
            eligible = eligible_parents(self.tree, liar, None if refused else victim, offered=True)
            assert not eligible - {victim}
        event("lie")
        if victim not in self.tree:
            assert unshielded, "one lying child evicted a healthy relay"
            event("lie: evicted a relay whose other children are one witness")
            return
        # A report, or a refusal (it gets the parent probed): a suspect either way.
        assert victim in self.tree.suspects(self.now)

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        suspects = self.tree.suspects(self.now)
        if not suspects:
            return
        suspect = data.draw(st.sampled_from(suspects))
        alive = suspect not in self.crashed
        self.tree.probe_result(suspect, alive, self.now)
        event("probe")
        assert (suspect in self.tree) == alive
        assert suspect not in self.tree.suspects(self.now)

    @precondition(lambda self: self.uniform_k is None)
    @rule()
    def orphans_confirm(self) -> None:
        """Peers placed by the tracker move there and say so (REFRESH naming it); the
        answer may place them once more (rebalancing), until it is just ACK."""
        for peer in self.live():
            while self.tree.is_orphaned(peer):
                event("placement confirmed")
                before = self.tree.parent_of(peer)
                depth = self.tree.depth_of(peer)
                answer = self.tree.refresh(peer, self.now, parent=before)
                if answer is None:
                    assert self.tree.parent_of(peer) == before
                    assert not self.tree.is_orphaned(peer)
                else:
                    check_rebalanced(self.tree, peer, depth, answer)

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def refresh_with_parent(self, data: st.DataObject) -> None:
        peer = self.draw_live(data)
        if peer is None:
            return
        claimed = data.draw(st.sampled_from(sorted(self.tree)))
        before = self.tree.parent_of(peer)
        valid = claimed == before or claimed in eligible_parents(self.tree, peer)
        guessed_in_the_way = any(self.tree.is_orphaned(p) for p in self.tree)
        if valid:
            depth_there = self.tree.depth_of(claimed) + 1
        answer = self.tree.refresh(peer, self.now, parent=claimed)
        after = self.tree.parent_of(peer)
        if answer is None:  # the claim stands (or was already our view)
            assert after == claimed and not self.tree.is_orphaned(peer)
            return
        check_assignment(self.tree, peer, answer, shunned=self.shunned(peer))
        if valid:  # taken, then moved on: rebalancing
            event("refresh: rebalanced")
            check_rebalanced(self.tree, peer, depth_there, answer)
        else:  # refused (our view stands), or a guess gave way and it was moved on
            assert after == before or (guessed_in_the_way and self.tree.is_orphaned(peer))

    def check_verdict(self, dead: bytes, confirmed: bool, expired: bool) -> None:
        """A quorum evicts at once, unless the suspect was found alive since the first
        report: then it is convicted, and `expire` removes it later unless excused."""
        if expired:
            assert dead not in self.tree
        elif confirmed:
            assert dead not in self.tree or self.tree.is_convicted(dead)
        else:
            assert dead in self.tree

    def one_witness_is_a_quorum(self, relay: bytes, reporter: bytes) -> bool:
        """Whether the reporter's report alone is a quorum against the relay: here every
        peer is a network of its own, so never."""
        return False

    def claimed(self, peer: bytes) -> bool:
        """Whether the peer is under its parent by its own claim (REJOIN `attached`), so
        that its reports count for nothing. White box: which moves the tracker makes
        along the way (re-homing, rebalancing) is the tree's business, not the model's."""
        return self.tree._peers[peer].claimed

    def witnesses(self, peer: bytes | None) -> int:
        """First-hand reports against `peer` that count towards its quorum now."""
        reports = self.reports.get(peer, {}) if peer is not None else {}
        return sum(1 for when in reports.values() if when >= self.now - 60.0)

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def child_gone(self, data: st.DataObject) -> None:
        """A live parent lets a crashed child go (CHILD_GONE): a childless one is gone at
        once, as is any the origin names (it is trusted); one with children is only a
        suspect (its children or a probe confirm it)."""
        pairs = [
            (parent, child)
            for child in sorted(self.crashed)
            if child in self.tree
            and (parent := self.tree.parent_of(child)) is not None
            and parent not in self.crashed
        ]
        if not pairs:
            return
        parent, child = data.draw(st.sampled_from(pairs))
        had_children = bool(self.tree.children_of(child)) and parent != ORIGIN
        removed = self.tree.child_gone(parent, child, self.now)
        event("child gone: suspected" if had_children else "child gone: removed")
        if had_children:
            assert removed == [] and child in self.tree.suspects(self.now)
        else:
            assert removed[0] == child and child not in self.tree

    @precondition(lambda self: self.uniform_k is None)
    @rule(data=st.data())
    def lying_child_gone(self, data: st.DataObject) -> None:
        """A live node (not the origin: it is trusted) says a live peer it feeds, or
        does not feed, is gone."""
        reporter = self.draw_live(data)
        child = self.draw_live(data)
        if reporter is None or child is None:
            return
        ours = self.tree.parent_of(child) == reporter
        had_children = bool(self.tree.children_of(child))
        view = {p: self.tree.parent_of(p) for p in self.tree}
        self.tree.child_gone(reporter, child, self.now)
        if ours and not had_children:
            event("lying child gone: a leaf dropped from the view")
            assert child not in self.tree  # it comes back when it next asks, unreported
            self.reports.pop(child, None)
            return
        assert child in self.tree, "one lying parent evicted a healthy relay"
        assert {p: self.tree.parent_of(p) for p in self.tree} == view
        if ours:
            event("lying child gone: a relay probed")
            assert child in self.tree.suspects(self.now)

    @rule(seconds=st.sampled_from([1.0, 30.0, 200.0, 700.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        for peer in self.live():
            self.tree.refresh(peer, self.now)
        removed = self.tree.expire(self.now)
        if removed:
            event("tick: expired")
        self.gone += [p for p in removed if p in self.crashed]
        assert not set(removed) & set(self.tree)
        for peer, since in self.crashed.items():
            if self.now - since > TTL:
                assert peer not in self.tree, "silent past the TTL but still there"


class UniformTreeMachine(TreeMachine):
    """Uniform capacity k: growth (joins, rejoins, refreshes) keeps depth <= log_k N + 2.

    Churn is left out on purpose: no placement can keep that bound when peers leave
    (leaves that depart can strand a deep chain); only re-placing peers that asked for
    nothing could.
    """

    uniform_k = 3


class ChurnMachine(RuleBasedStateMachine):
    """Uniform capacity k under churn (joins, leaves, crashes and their reports): REFRESH
    rebalances, so after every peer has refreshed a few times (a few refresh periods
    without churn) the depth is back within ceil(log_k N) + 2."""

    k = 3

    def __init__(self) -> None:
        super().__init__()
        self.tree = StreamTree(ORIGIN, "origin:4433", self.k, peer_ttl=TTL, promote_after=60.0)
        self.now = 0.0
        self.next_id = 1

    def peers(self) -> list[bytes]:
        return sorted(p for p in self.tree if p != ORIGIN)

    @rule(count=st.integers(1, 40))
    def join(self, count: int) -> None:
        for _ in range(count):
            self.tree.join(pid(self.next_id), self.k, addr(self.next_id), self.now)
            self.next_id += 1

    @rule(data=st.data(), count=st.integers(1, 10))
    def leave(self, data: st.DataObject, count: int) -> None:
        for _ in range(count):
            peers = self.peers()
            if peers:
                self.tree.leave(data.draw(st.sampled_from(peers)), self.now)

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        peers = self.peers()
        if not peers:
            return
        dead = data.draw(st.sampled_from(peers))
        for child in self.tree.children_of(dead):
            with contextlib.suppress(NoCapacity):
                self.tree.report_failure(child, dead, self.now)
        if dead in self.tree:
            self.tree.probe_result(dead, False, self.now)

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def structure_holds(self) -> None:
        check_invariants(self.tree)

    def teardown(self) -> None:
        """Quiet for a while: everyone refreshes (following every move it is told of)
        round after round; the depth must come back within the bound."""
        self.now += 61.0
        for _ in range(6):
            for peer in sorted(self.peers(), key=self.tree.depth_of):
                parent = self.tree.parent_of(peer)
                while self.tree.refresh(peer, self.now, parent=parent) is not None:
                    parent = self.tree.parent_of(peer)  # it moved there: it confirms
            self.now += 180.0
        check_invariants(self.tree)
        snap = self.tree.snapshot()
        assert snap.max_depth <= depth_bound(snap.audience, self.k), snap


class EarnedTreeMachine(TreeMachine):
    """The same churn with capacity earned (a ceiling of 16, 2 initial slots): every
    node's slots are what its children's vouches earned, within what it declared, and
    no node ever holds more children than that. Children vouch; an attacker's network
    joins identities declaring 1,024 whose vouches for each other count for nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = earned_tree(3)
        self.evil: set[bytes] = set()

    @invariant()
    def slots_are_earned(self) -> None:
        for node in self.tree._peers.values():  # white box: `earned` counts the vouches
            if node is not self.tree._origin:
                earned = min(node.declared, max(INITIAL, 2 * node.earned))
                assert len(node.children) <= node.capacity == earned <= CEILING

    @rule(data=st.data())
    def vouch(self, data: st.DataObject) -> None:
        peer = self.draw_live(data)
        parent = None if peer is None else self.tree.parent_of(peer)
        if peer is None or parent is None:
            return
        before = self.tree.capacity_of(parent)
        self.tree.refresh(peer, self.now, parent=parent)
        if parent in self.tree:
            assert self.tree.capacity_of(parent) >= before

    @rule(data=st.data())
    def report_crash(self, data: st.DataObject, use_backup: bool = False) -> None:
        """A report also re-homes the reported relay's unearned children, which the
        quorum model of `TreeMachine` does not follow: here only the structure and the
        reporter's new placement are checked."""
        victims = [p for p in self.live() if self.tree.parent_of(p) in self.crashed]
        if not victims:
            return
        reporter = data.draw(st.sampled_from(victims))
        dead = self.tree.parent_of(reporter)
        assert dead is not None
        refused = self.tree.is_orphaned(reporter)  # never streamed from it: no report
        claimed = self.claimed(reporter)
        if not refused:
            self.rejoin_naming(reporter, dead)
        with contextlib.suppress(NoCapacity):
            got = self.tree.report_failure(reporter, dead, self.now)
            check_assignment(self.tree, reporter, got, shunned=self.shunned(reporter))
        if dead in self.tree and not refused and not claimed:
            assert self.tree.capacity_of(dead) == min(INITIAL, self.tree.declared_of(dead))

    def one_witness_is_a_quorum(self, relay: bytes, reporter: bytes) -> bool:
        """Honest peers are networks of their own, the attacker's are one network. Those
        who have been under the relay (its children from other networks, its reporters
        in the window, the reporter too) are one witness: the attacker's network, or one
        honest listener. Then one report from another network than the relay's is a
        quorum if they are several identities or the relay has children of its own."""

        def witness(peer: bytes) -> bytes:
            return EVIL.encode() if peer in self.evil else peer

        evil = relay in self.evil
        if evil and reporter in self.evil:
            return False  # its own network: one witness of two
        children = self.tree.children_of(relay)
        sybils = evil and any(c in self.evil for c in children)
        recent = {r for r, when in self.reports.get(relay, {}).items() if when >= self.now - 60}
        population = {p for p in (*children, *recent, reporter) if not (evil and p in self.evil)}
        witnesses = {witness(p) for p in population}
        return len(witnesses) == 1 and (len(population) > 1 or sybils)

    @rule(count=st.integers(1, 3))
    def attack(self, count: int) -> None:
        for _ in range(count):
            peer = pid(self.next_id)
            self.next_id += 1
            with contextlib.suppress(NoCapacity):
                self.tree.join(peer, 1024, addr(self.next_id), self.now, EVIL)
                self.evil.add(peer)
                assert self.tree.capacity_of(peer) <= INITIAL

    @rule()
    def sybils_vouch(self) -> None:
        for peer in sorted(self.evil.intersection(self.live())):  # the crashed say nothing
            parent = self.tree.parent_of(peer)
            if parent in self.evil:
                before = self.tree.capacity_of(parent)
                self.tree.refresh(peer, self.now, parent=parent)
                event("sybil vouch")
                assert self.tree.capacity_of(parent) == before, "a network vouched for itself"


TreeMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
EarnedTreeMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
UniformTreeMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ChurnMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_tree_machine = TreeMachine.TestCase
test_depth_stays_bounded_under_churn = ChurnMachine.TestCase
test_uniform_tree_machine = UniformTreeMachine.TestCase
test_earned_tree_machine = EarnedTreeMachine.TestCase


def test_an_evicted_relays_silent_children_are_probed_and_offered_last() -> None:
    """The melt: a relay dies with its parent. Evicting the parent re-homes it under a
    live node it never reaches, so nobody would ever report it; it is probed instead,
    and what hangs below a guess is offered only when no confirmed slot is left."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 2: (0, 3), 3: (1, 1), 4: (1, 1), 5: (1, 2), 6: (2, 1)})
    tree.report_failure(pid(3), pid(1), 5.0)
    tree.report_failure(pid(4), pid(1), 6.0)
    assert pid(1) not in tree
    assert tree.is_orphaned(pid(5)) and tree.is_orphaned(pid(4))
    # 4 just spoke (its report evicted 1); 5 has not said a word since its parent died.
    assert tree.suspects(6.0) == [pid(5)]
    tree.probe_result(pid(5), True, 6.5)  # alive after all, yet not where we put it
    assert tree.is_orphaned(pid(5)) and tree.depth_of(pid(5)) == 1
    got = tree.join(pid(7), 1, addr(7), 7.0)
    assert got.parent.peer_id not in (pid(4), pid(5))  # confirmed slots first
    assert not tree.is_orphaned(got.parent.peer_id)
    check_invariants(tree)
    assert tree.refresh(pid(5), 7.5, parent=ORIGIN) is None  # it confirms
    assert tree.join(pid(8), 1, addr(8), 8.0).parent.peer_id == pid(5)
    check_invariants(tree)


def test_a_rejoin_from_an_unknown_peer_is_placed_tentatively() -> None:
    """Like any REJOIN answered with another parent than its `attached`: naming that
    parent later (it never took the peer) is a refusal, not a failure report that would
    leave a live relay unproven for a minute."""
    tree = make_tree(origin_capacity=2)
    build(tree, {1: (0, 3), 2: (0, 3)})
    got = tree.report_failure(pid(5), pid(9), 1.0, capacity=1, address=addr(5))
    assert tree.is_orphaned(pid(5))
    tree.report_failure(pid(5), got.parent.peer_id, 1.5)
    assert not tree.is_unproven(got.parent.peer_id)
    check_invariants(tree)


def guessed_into_an_origin_slot() -> StreamTree:
    """Relay 1 expires at 31 s; its child 2 is re-homed under the origin, a guess, and
    answers the probe at 32 s. 3 holds the origin's other slot."""
    tree = make_tree(origin_capacity=2, peer_ttl=30.0)
    build(tree, {1: (0, 2), 2: (1, 2), 3: (0, 2)})
    tree.refresh(pid(2), 20.0, parent=pid(1))
    tree.refresh(pid(3), 20.0, parent=ORIGIN)
    assert tree.expire(31.0) == [pid(1)]
    assert tree.parent_of(pid(2)) == ORIGIN and tree.is_orphaned(pid(2))
    tree.probe_result(pid(2), True, 32.0)
    return tree


def test_a_guess_in_an_origin_slot_that_nobody_confirms_moves_out_of_it() -> None:
    """2 never asks: it streams from elsewhere. After 10 s the guess leaves the origin's
    slot for another one, so the origin's slot is offered again."""
    tree = guessed_into_an_origin_slot()
    tree.expire(40.0)
    assert tree.parent_of(pid(2)) == ORIGIN  # it may still be on its way
    tree.expire(41.0)
    assert tree.parent_of(pid(2)) == pid(3) and tree.is_orphaned(pid(2))
    assert tree.join(pid(4), 2, addr(4), 41.0).parent.peer_id == ORIGIN
    check_invariants(tree)


def test_a_guess_told_the_origin_again_by_its_rejoin_keeps_the_slot_a_while() -> None:
    """2 asks just before its 10 s run out, and is told the origin again: it is on its
    way there, so the wait starts anew."""
    tree = guessed_into_an_origin_slot()
    assert tree.report_failure(pid(2), pid(1), 40.9).parent.peer_id == ORIGIN
    tree.expire(41.0)
    assert tree.parent_of(pid(2)) == ORIGIN
    tree.refresh(pid(3), 45.0, parent=ORIGIN)
    tree.expire(51.0)
    assert tree.parent_of(pid(2)) == pid(3) and tree.is_orphaned(pid(2))
    check_invariants(tree)


def test_a_confirmed_orphan_keeps_its_origin_slot() -> None:
    tree = guessed_into_an_origin_slot()
    assert tree.refresh(pid(2), 33.0, parent=ORIGIN) is None  # it followed, and says so
    tree.expire(50.0)
    assert tree.parent_of(pid(2)) == ORIGIN and not tree.is_orphaned(pid(2))
    check_invariants(tree)
