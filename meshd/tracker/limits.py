"""Per-network JOIN limits: one source cannot fill the tree with fresh identities.

Identities are free (a key pair each), addresses are not. A token bucket per source
network — an IPv4 /24 or an IPv6 /48, what one host or one small site controls — lets a
burst of JOINs through (a household or an office starting together), then a steady rate;
beyond that the tracker answers RETRY_AFTER (docs/spec.md §7.4). Sans-I/O: the caller
passes the time.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Container

MAX_NETWORKS = 65_536  # buckets kept; the least recently used network is forgotten first


def network_of(host: str) -> str:
    """The source network a host address belongs to ("" for one that does not parse)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class JoinLimiter:
    """A token bucket of `burst` JOINs refilled at `rate` per second, per network."""

    def __init__(self, rate: float, burst: int, *, max_networks: int = MAX_NETWORKS) -> None:
        if rate <= 0 or burst < 1 or max_networks < 1:
            raise ValueError("rate must be > 0, burst and max_networks >= 1")
        self.rate = rate
        self.burst = burst
        self._max = max_networks
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def wait(self, host: str, now: float) -> float:
        """Take a JOIN from `host`'s network: 0 if it may go on, else the seconds until
        the bucket has a token again (answer RETRY_AFTER)."""
        network = network_of(host)
        tokens, at = self._buckets.pop(network, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[network] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


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
