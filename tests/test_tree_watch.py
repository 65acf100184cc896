"""The origin's watch on the tracker's view (meshd/node/treewatch.py): it announces when,
and only when, the tracker has lost the tree, on a fake clock."""

from __future__ import annotations

from meshd.node.treewatch import ANNOUNCE_AGAIN_AFTER, KNOWN_SLACK, Look, TreeWatch
from protocol import ErrorCode, Goodbye, TreeReport
from protocol.messages import TreeNode

STREAM = b"s" * 32
A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def report(uptime_s: int, *children: bytes) -> TreeReport:
    origin = TreeNode(STREAM, None, "127.0.0.1:1", 2, len(children), 0, uptime_s)
    nodes = [TreeNode(child, STREAM, "127.0.0.1:2", 2, 0, 1, 1) for child in children]
    return TreeReport(STREAM, len(children), (origin, *nodes))


def watching(*children: bytes) -> tuple[TreeWatch, Look]:
    """Registered at 0 s and again at 100 s, feeding `children` all along."""
    watch = TreeWatch(STREAM, 2)
    assert watch.registered(0.0, set()) is None, "no look before we fed anyone"
    assert watch.registered(50.0, set(children)) is None, "nobody kept since the last look"
    look = watch.registered(100.0, set(children))
    assert look is not None
    assert look.kept == frozenset(children)
    assert look.request.max_nodes == 3
    return watch, look


def test_a_tracker_that_names_a_kept_child_did_not_lose_the_tree() -> None:
    watch, look = watching(A, B)
    assert not watch.answered(look, report(3, B, C), 100.1)


def test_a_tracker_that_learnt_the_stream_lately_and_names_none_of_ours_lost_it() -> None:
    watch, look = watching(A, B)
    assert watch.answered(look, report(3, C), 100.1)
    assert watch.registered(102.0, {A, B}) is None, "one ANNOUNCE per 30 s"
    assert watch.refused(100.0 + ANNOUNCE_AGAIN_AFTER - 1, {A, B}) is None
    again = watch.refused(100.0 + ANNOUNCE_AGAIN_AFTER + 1, {A, B})
    assert again is not None
    assert again.kept == frozenset({A, B})


def test_children_the_tracker_merely_moved_are_no_alarm() -> None:
    """It has known the stream since our first REGISTER: our children went elsewhere
    in its view (rebalancing, their own claims), which costs no REFRESH from everyone."""
    watch, look = watching(A, B)
    assert not watch.answered(look, report(int(100 - KNOWN_SLACK) + 1, C), 100.1)


def test_no_answer_is_no_alarm_and_an_older_tracker_is_not_asked_again() -> None:
    watch, look = watching(A)
    assert not watch.answered(look, None, 100.1)
    assert not watch.answered(look, Goodbye(ErrorCode.OVERLOADED, "busy"), 100.1)
    assert watch.asks_tree
    assert not watch.answered(look, Goodbye(ErrorCode.UNKNOWN_MESSAGE, "what?"), 100.2)
    assert not watch.asks_tree
    assert watch.registered(150.0, {A}) is None
    assert watch.refused(151.0, {A}) is None
