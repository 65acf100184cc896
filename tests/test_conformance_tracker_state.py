"""The conformance cases about a tracker's state over time (§7.2 soft state, §7.3
suspects, probes, rebalancing, the per-network JOIN limit): the reference passes them,
and trackers broken the way each case is about fail them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import parse_address
from meshd.conformance.report import Report, Verdict
from meshd.conformance.runner import check_tracker
from meshd.quic import QuicEndpoint
from meshd.tracker import server
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker.tree import PeerRef, StreamTree
from tests.procs import cluster

PEER_TTL = 2.0
JOIN_BURST = 20
TIMED = ["7.2-peer-ttl-expiry", "7.2-stream-expiry", "7.2-ended-stream-forgotten"]


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`meshd tracker` with a short peer_ttl and a small JOIN burst, open to everyone."""
    with cluster(tmp_path_factory.mktemp("state")) as procs:
        _, address = procs.tracker(
            "--peer-ttl", str(PEER_TTL), "--join-burst", str(JOIN_BURST),
            "--joins-per-network", "10",
        )  # fmt: skip
        yield parse_address(address)


def _verdicts(report: Report) -> dict[str, Verdict]:
    return {r.id: r.verdict for r in report.results}


async def test_the_reference_expires_soft_state_and_limits_joins(
    short_lived: tuple[str, int],
) -> None:
    report = await check_tracker(
        short_lived,
        peer_ttl=PEER_TTL,
        join_burst=JOIN_BURST,
        only=[*TIMED, "7.3-join-rate-limit"],
        reply_wait=1.0,
    )
    assert set(_verdicts(report).values()) == {Verdict.PASS}, report.format(verbose=True)


@asynccontextmanager
async def tracker_in_process(config: TrackerConfig | None = None) -> AsyncIterator[tuple[str, int]]:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                serve_tracker, Tracker(config), Ed25519PrivateKey.generate()
            )
            yield address
            nursery.cancel_scope.cancel()


def _tree_defaults(monkeypatch: pytest.MonkeyPatch, **defaults: float) -> None:
    """Every StreamTree the tracker makes from now on gets these settings."""
    keywords = StreamTree.__init__.__kwdefaults__
    assert keywords is not None
    for name, value in defaults.items():
        monkeypatch.setitem(keywords, name, value)


async def test_rebalancing_passes_with_a_short_promote_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference's promote_after (60 s) has no option: here it is 0.5 s."""
    _tree_defaults(monkeypatch, promote_after=0.5)
    async with tracker_in_process() as address:
        report = await check_tracker(address, promote_after=0.5, only=["7.3-rebalance"])
    assert _verdicts(report) == {
        "7.3-rebalance-leaf": Verdict.PASS,
        "7.3-rebalance-relay": Verdict.PASS,
    }, report.format(verbose=True)


async def test_a_tracker_that_removes_on_one_report_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _tree_defaults(monkeypatch, report_quorum=1)
    async with tracker_in_process() as address:
        report = await check_tracker(
            address, only=["7.3-suspect-not-offered", "7.3-second-reporter-removes"]
        )
    assert _verdicts(report) == {
        "7.3-suspect-not-offered": Verdict.FAIL,
        "7.3-second-reporter-removes": Verdict.PASS,
    }, report.format(verbose=True)
    assert "TREE does not list S" in report.by_id("7.3-suspect-not-offered").got


async def test_a_tracker_whose_probe_is_not_pinned_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unpinned(
        tracker: Tracker, endpoint: QuicEndpoint, stream_id: bytes, ref: PeerRef
    ) -> None:
        alive = False
        with trio.move_on_after(server.PROBE_TIMEOUT):
            try:
                async with endpoint.connect(parse_address(ref.address)):
                    alive = True
            except trio.BrokenResourceError:
                pass
        tracker.probed(stream_id, ref.peer_id, alive, trio.current_time())

    monkeypatch.setattr(server, "_probe", unpinned)
    async with tracker_in_process() as address:
        report = await check_tracker(address, only=["7.3-probe-pinned"], reply_wait=1.0)
    assert _verdicts(report) == {"7.3-probe-pinned": Verdict.FAIL}, report.format(verbose=True)


async def test_a_tracker_that_never_expires_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tracker, "expire", lambda self, now: None)
    async with tracker_in_process(TrackerConfig(peer_ttl=1.0)) as address:
        report = await check_tracker(address, peer_ttl=1.0, only=TIMED, reply_wait=1.0)
    assert set(_verdicts(report).values()) == {Verdict.FAIL}, report.format(verbose=True)


async def test_a_tracker_without_a_join_limit_is_non_strict() -> None:
    """RETRY_AFTER per network is a SHOULD: its absence is non-strict, not a failure."""
    async with tracker_in_process(TrackerConfig(joins_per_network_s=0)) as address:
        report = await check_tracker(address, join_burst=10, only=["7.3-join-rate-limit"])
    assert report.ok
    result = report.by_id("7.3-join-rate-limit")
    assert result.verdict is Verdict.NON_STRICT, report.format(verbose=True)
    assert result.got == "all 60 JOINs ASSIGNED"
