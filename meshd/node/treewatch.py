"""The origin's watch on the tracker's view of its tree (docs/spec.md §7.2), sans-I/O.

A restarted tracker knows only the origin until the nodes REFRESH, minutes later by
default: meanwhile it could seat newcomers only under the origin, which is full, and
under each other. After each REGISTER, and when it refuses a SUBSCRIBE for lack of
slots, the origin asks TREE for its own children in the tracker's view. If the tracker
names none of those the origin kept feeding since its previous look, and says it learnt
the stream since the origin's first REGISTER, it lost the tree: the origin's next chunks
carry ANNOUNCE, and every node REFRESHes within seconds. The origin's driver and both
levels of `meshd sim` run this code.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import ErrorCode, Goodbye, TreeReport, TreeRequest
from protocol.limits import MAX_TREE_NODES
from protocol.messages import TrackerResponse

ANNOUNCE_AGAIN_AFTER = 30.0
"""At most one ANNOUNCE this often: each costs the tracker a REFRESH from every node."""
LOOK_AGAIN_AFTER = 2.0  # refused SUBSCRIBEs ask the tracker's view at most this often
KNOWN_SLACK = 2.0
"""A tracker whose TREE says it has known the stream for at least our time since our
first REGISTER, less this (its count is in whole seconds), did not lose it."""


@dataclass(frozen=True)
class Look:
    """A TREE request to send, and the children it looks for."""

    request: TreeRequest
    kept: frozenset[bytes]


class TreeWatch:
    def __init__(self, stream_id: bytes, capacity: int) -> None:
        self.stream_id = stream_id
        self.capacity = capacity
        self.asks_tree = True
        """False once the tracker answered TREE with UNKNOWN_MESSAGE (it is older)."""
        self._kept: frozenset[bytes] = frozenset()
        """Our children at the last look after a REGISTER."""
        self._registered_at: float | None = None  # when our first REGISTER was accepted
        self._announced_at: float | None = None

    def registered(self, now: float, children: set[bytes]) -> Look | None:
        """A REGISTER was accepted while we fed `children`: the look to take, if any."""
        if self._registered_at is None:
            self._registered_at = now
        kept = self._kept & children
        self._kept = frozenset(children)
        return self._look(kept, now)

    def refused(self, now: float, children: set[bytes]) -> Look | None:
        """We refused a SUBSCRIBE for lack of slots (whoever sent that child thought we
        had room): the look to take, if any. The caller keeps to `LOOK_AGAIN_AFTER`."""
        return self._look(self._kept & children, now)

    def answered(self, look: Look, answer: TrackerResponse | None, now: float) -> bool:
        """The tracker's answer to `look`; True: it lost the tree, so ANNOUNCE now."""
        if isinstance(answer, Goodbye) and answer.code == ErrorCode.UNKNOWN_MESSAGE:
            self.asks_tree = False  # a restart of this tracker goes unnoticed
            return False
        if not isinstance(answer, TreeReport) or self._announced_lately(now):
            return False  # no answer: the next REGISTER looks again
        if any(node.parent == self.stream_id and node.node in look.kept for node in answer.nodes):
            return False
        assert self._registered_at is not None
        ours = now - self._registered_at
        top = answer.nodes[0] if answer.nodes else None
        if top is not None and top.node == self.stream_id and top.uptime_s >= ours - KNOWN_SLACK:
            return False  # it has known the stream all along: it only moved our children
        self._announced_at = now
        return True

    def _look(self, kept: frozenset[bytes], now: float) -> Look | None:
        if not self.asks_tree or not kept or self._announced_lately(now):
            return None
        request = TreeRequest(self.stream_id, min(1 + self.capacity, MAX_TREE_NODES))
        return Look(request, kept)

    def _announced_lately(self, now: float) -> bool:
        last = self._announced_at
        return last is not None and now - last < ANNOUNCE_AGAIN_AFTER
