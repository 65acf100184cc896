"""Source networks: what one host or one small site controls, and rate limits per network.

Identities are free (a key pair each), addresses are not. Limits that count per source
network — an IPv4 /24 or an IPv6 /48 — bound what one attacker gets however many
identities or connections it makes, and still let a household or an office behind one
address in. Sans-I/O: callers pass the time.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

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


class NetworkBuckets:
    """A token bucket of `burst` events (JOINs, handshakes) refilled at `rate` per second,
    per network."""

    def __init__(self, rate: float, burst: int, *, max_networks: int = MAX_NETWORKS) -> None:
        if rate <= 0 or burst < 1 or max_networks < 1:
            raise ValueError("rate must be > 0, burst and max_networks >= 1")
        self.rate = rate
        self.burst = burst
        self._max = max_networks
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def wait(self, host: str, now: float) -> float:
        """Take one event from `host`'s network: 0 if it may go on, else the seconds until
        the bucket has a token again."""
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
