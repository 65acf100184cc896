"""Media at the flow level: a listener plays while its path to the origin is intact.

No chunk is simulated. A node is *lit* while every link up to the origin is attached
and every node on the way is alive; the moment a link breaks, the whole subtree below
it goes dark together, and it lights up again together when its top attaches to a lit
parent. A dark spell is a gap: it costs silence, and no chunk as long as it is shorter
than the ring buffer, because the new parent resends everything from the node's next
sequence number (docs/spec.md §6.4); a longer spell loses the excess. The rule
lit(n) => lit(parent(n)) holds at all times, so a whole subtree changes in one walk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshd.sim.population import CHUNKS_PER_S, WIRE_BYTES_PER_S

if TYPE_CHECKING:
    from meshd.sim.flow.node import FlowNode
    from meshd.sim.flow.room import FlowRoom


class Media:
    def __init__(self, room: FlowRoom, ring_seconds: float) -> None:
        self.room = room
        self.ring = ring_seconds
        self.listening = 0
        """Listeners lit right now."""
        self.origin_bytes = 0.0
        """Resent backlog the origin sent since the last egress sample."""
        self.outages: list[float] = []
        self.shock_at: float | None = None

    def light(self, root: FlowNode, now: float) -> None:
        """`root` attached to a lit parent: it and its subtree play again."""
        if root.up is not None and root.up.is_origin:
            # The origin resends from the child's next sequence number (one chunk for a
            # newcomer, which subscribes at the live edge).
            backlog = 0.0 if root.dark_since is None else min(now - root.dark_since, self.ring)
            self.origin_bytes += max(backlog * WIRE_BYTES_PER_S, WIRE_BYTES_PER_S / CHUNKS_PER_S)
        stack = [root]
        while stack:
            node = stack.pop()
            if node.lit or not node.alive:
                continue
            node.lit = True
            node.delivered = True
            self.listening += 1
            if now < self.room.announce_until:
                node.announced()
            if node.first_audio_at is None:
                node.first_audio_at = now
            elif node.dark_since is not None:
                self._ended(node, now - node.dark_since, now)
            node.dark_since = None
            stack.extend(node.children)

    def darken(self, root: FlowNode, now: float) -> None:
        """The stream stops reaching `root` and its subtree now. Each node whose parent
        still runs waits for it (the parent says it is stalled too) until the stall
        rules let it leave."""
        stack = [root]
        while stack:
            node = stack.pop()
            if not node.lit:
                continue  # dark already, and so is everything below it
            node.lit = False
            self.listening -= 1
            node.dark_since = node.progress_at = now
            node.watch_stall(now)
            stack.extend(node.children)

    def departed(self, node: FlowNode, now: float) -> None:
        """The node stops (crash or leave): an ongoing gap counts as silence."""
        if node.lit:
            node.lit = False
            self.listening -= 1
        elif node.dark_since is not None:
            node.stall += now - node.dark_since
            node.dark_since = None

    def _ended(self, node: FlowNode, gap: float, now: float) -> None:
        node.stall += gap
        node.lost += round(max(0.0, gap - self.ring) * CHUNKS_PER_S)
        self.outages.append(gap)
        shock = self.shock_at
        if shock is not None and node.recovered_at is None and now - gap >= shock:
            node.recovered_at = now
