"""Per-stream census of source networks: one source cannot fill a stream with identities.

The tracker counts the live identities each source network (`meshd.networks.network_of`)
has in a stream, and the capacity they declared (docs/spec.md §7.3).
"""

from __future__ import annotations

from collections.abc import Container


class NetworkCensus:
    """The live identities of each source network in one stream.

    A node counts for the network it came in from (JOIN, or a re-insertion) until it
    leaves the tree; `alive` (the tree) tells who is still there, and the departed are
    dropped lazily, when their network is looked at or by `prune`.
    """

    def __init__(self) -> None:
        self._members: dict[str, set[bytes]] = {}
        self._network: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._network)

    def network_of(self, node: bytes) -> str:
        return self._network.get(node, "")

    def add(self, node: bytes, network: str) -> None:
        """Count `node` for `network`, unless it already counts for one."""
        if network and node not in self._network:
            self._network[node] = network
            self._members.setdefault(network, set()).add(node)

    def members(self, network: str, alive: Container[bytes]) -> set[bytes]:
        """The identities `network` has in the stream now."""
        members = self._members.get(network, set())
        for node in [node for node in members if node not in alive]:
            members.discard(node)
            del self._network[node]
        if not members:
            self._members.pop(network, None)
        return members

    def prune(self, alive: Container[bytes]) -> None:
        """Forget every identity no longer in the stream."""
        for network in list(self._members):
            self.members(network, alive)
