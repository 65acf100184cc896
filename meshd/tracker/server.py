"""The tracker over QUIC: `serve_tracker` answers node requests on a UDP port.

Every request arrives on a short-lived connection (no per-listener connection is kept).
`TrackerFront` (meshd.tracker.front) does the handshakes and the checks; `Tracker.decide`
owns every stream's tree. With ``workers=0`` both run in this process; with ``workers=N``
N processes share the port and run fronts, and this process only decides
(`meshd.tracker.workers`).
"""

from __future__ import annotations

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import parse_address
from meshd.logs import log_as
from meshd.quic import QuicEndpoint, open_quic_endpoint
from meshd.tracker.front import TrackerFront, endpoint_config
from meshd.tracker.service import Tracker
from meshd.tracker.tree import PeerRef
from meshd.tracker.workers import serve_workers
from protocol import key_id, short_id
from protocol.messages import TrackerRequest, TrackerResponse

EXPIRY_INTERVAL = 1.0  # also when a convicted relay leaves: soon after its excuse ran out
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0


async def maintain(tracker: Tracker, endpoint: QuicEndpoint) -> None:
    """The tracker's own work: expiring soft state, and probing nodes reported dead
    (a handshake pinned to their key) so a lying child cannot evict a healthy relay."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expire_loop, tracker)
        nursery.start_soon(_probe_loop, tracker, endpoint)


async def _expire_loop(tracker: Tracker) -> None:
    while True:
        await trio.sleep(EXPIRY_INTERVAL)
        tracker.expire(trio.current_time())


async def _probe_loop(tracker: Tracker, endpoint: QuicEndpoint) -> None:
    while True:
        await trio.sleep(PROBE_INTERVAL)
        async with trio.open_nursery() as nursery:
            for stream_id, ref in tracker.suspects(trio.current_time()):
                nursery.start_soon(_probe, tracker, endpoint, stream_id, ref)


async def _probe(tracker: Tracker, endpoint: QuicEndpoint, stream_id: bytes, ref: PeerRef) -> None:
    alive = False
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            address = parse_address(ref.address)
            async with endpoint.connect(address, expected_peer_key=ref.peer_id):
                alive = True
        except (ValueError, OSError, trio.BrokenResourceError):
            alive = False
    tracker.probed(stream_id, ref.peer_id, alive, trio.current_time())


async def serve_tracker(
    tracker: Tracker,
    key: Ed25519PrivateKey,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `tracker` on a QUIC endpoint at host:port until cancelled.

    `task_status.started()` reports the bound (host, port), so a host can use port 0:

        tracker = Tracker(TrackerConfig(refresh_s=120))
        host, port = await nursery.start(serve_tracker, tracker, key, "0.0.0.0", 4433)

    With `workers=N` (N >= 1), N worker processes share the port (SO_REUSEPORT) and do
    the handshakes and checks, while this process keeps `tracker` and makes every
    decision (so `tracker.status(...)` works here as before). docs/deployment.md says
    how many a host needs.
    """
    log_as("tracker", short_id(key_id(key)))
    if workers < 0:
        raise ValueError("workers must be 0 (serve in this process) or more")
    now = trio.current_time
    if workers == 0:
        async with (
            open_quic_endpoint(key, host, port, config=endpoint_config(tracker.config)) as endpoint,
            trio.open_nursery() as nursery,
        ):

            async def decide(request: TrackerRequest, network: str) -> TrackerResponse:
                return tracker.decide(request, now(), network)

            front = TrackerFront(tracker.config, endpoint, decide, lambda: tracker.shed(now()))
            nursery.start_soon(maintain, tracker, endpoint)
            await nursery.start(front.serve)
            task_status.started(endpoint.address)
        return
    # The probes' own endpoint: the port itself belongs to the workers.
    async with (
        open_quic_endpoint(key, host, 0) as prober,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(maintain, tracker, prober)
        address = await nursery.start(serve_workers, tracker, key, host, port, workers)
        task_status.started(address)
