"""Virtual listeners: who they are, drawn from a seed.

Every listener has a one-way delay to the network core (the RTT between two listeners
is twice the sum of theirs), a packet loss rate, an upload capacity, whether it accepts
connections at all (NAT, phones), how long it stays and whether it leaves with Ctrl-C
(LEAVE) or vanishes. Both simulation levels draw from here, so a seed names the same
audience at either level.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

STREAM_KBPS = 32
CHUNK_SECONDS = 0.2
CHUNK_BYTES = 10 * 80 + 28 + 66
"""One chunk on the wire at 32 kbps (docs/spec.md §6.9): ten 80-byte Opus packets, the
header (seq, granule, flags, lengths) and the signature."""
WIRE_BYTES_PER_S = CHUNK_BYTES / CHUNK_SECONDS
CHUNKS_PER_S = round(1 / CHUNK_SECONDS)

MAX_CHILDREN = 4  # `meshd listen --max-children`'s default
UPLOAD_SHARE = 0.25
"""The part of its upload a relay gives the stream's children (the rest is its own)."""


@dataclass(frozen=True)
class Audience:
    """The distributions listeners are drawn from."""

    delay_ms: tuple[float, float] = (20.0, 0.6)
    """One-way delay to the core: lognormal (median ms, sigma), clipped to 2..200 ms."""
    loss: tuple[float, float] = (0.003, 1.0)
    """Packet loss: lognormal (median, sigma), at most 10 %."""
    upload_kbps: tuple[float, float] = (1000.0, 1.2)
    reachable: float = 0.42
    """The share that accepts connections; with the upload spread, ~40 % can relay."""
    session_s: tuple[float, float] = (1200.0, 1.2)
    """Session length: lognormal (median s, sigma), a heavy tail of long stays."""
    graceful: float = 0.5
    """The share that leaves with LEAVE; the rest vanish (crash, lid shut, lost signal)."""


@dataclass(frozen=True, slots=True)
class Listener:
    index: int
    delay: float
    """One-way delay to the network core, in seconds."""
    loss: float
    upload_kbps: float
    reachable: bool
    capacity: int
    """Children it will feed: 0 if unreachable, else what its upload share carries."""
    arrive_at: float
    session: float
    """How long it would stay; it leaves at `arrive_at + session` if the run lasts."""
    graceful: bool

    @property
    def depart_at(self) -> float:
        return self.arrive_at + self.session


def capacity_for(upload_kbps: float, reachable: bool) -> int:
    if not reachable:
        return 0
    wire_kbps = WIRE_BYTES_PER_S * 8 / 1000
    return min(MAX_CHILDREN, int(upload_kbps * UPLOAD_SHARE / wire_kbps))


def draw(
    rng: random.Random,
    index: int,
    arrive_at: float,
    audience: Audience,
    *,
    session: float | None = None,
) -> Listener:
    """One listener; `session` overrides the drawn session length."""
    median_ms, sigma = audience.delay_ms
    delay = min(200.0, max(2.0, rng.lognormvariate(math.log(median_ms), sigma))) / 1000
    loss = min(0.1, rng.lognormvariate(math.log(audience.loss[0]), audience.loss[1]))
    upload = rng.lognormvariate(math.log(audience.upload_kbps[0]), audience.upload_kbps[1])
    reachable = rng.random() < audience.reachable
    drawn = rng.lognormvariate(math.log(audience.session_s[0]), audience.session_s[1])
    return Listener(
        index=index,
        delay=delay,
        loss=loss,
        upload_kbps=upload,
        reachable=reachable,
        capacity=capacity_for(upload, reachable),
        arrive_at=arrive_at,
        session=drawn if session is None else session,
        graceful=rng.random() < audience.graceful,
    )
