"""Entry points: run the cases of one target and get a `Report` back."""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address
from meshd.conformance.child import CASES as CHILD_CASES
from meshd.conformance.child import ChildTarget
from meshd.conformance.parent import CASES as PARENT_CASES
from meshd.conformance.parent import ParentTarget
from meshd.conformance.report import Report
from meshd.conformance.suite import run_cases
from meshd.conformance.tracker import CASES as TRACKER_CASES
from meshd.conformance.tracker import TrackerTarget
from meshd.quic import open_quic_endpoint
from protocol import key_to_text


async def check_tracker(
    address: tuple[str, int],
    *,
    tracker_id: bytes | None = None,
    host_key: Ed25519PrivateKey | None = None,
    peer_ttl: float | None = None,
    join_burst: int = 100,
    promote_after: float | None = None,
    only: Collection[str] = (),
    reply_wait: float = 3.0,
    close_wait: float = 1.0,
    concurrency: int = 8,
) -> Report:
    """Run the tracker cases (those whose id starts with one of `only`, if given);
    `reply_wait` is how long to wait for any answer. `peer_ttl`, `join_burst` and
    `promote_after` are the tracker's settings, for the cases that depend on them."""
    name = f"tracker {format_address(address)}"
    if tracker_id is not None:
        name += f" ({key_to_text(tracker_id)})"
    async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
        target = TrackerTarget(
            endpoint,
            address,
            tracker_id,
            reply_wait,
            close_wait,
            host_key,
            peer_ttl=peer_ttl,
            join_burst=join_burst,
            promote_after=promote_after,
        )
        # The soft-state cases wait up to twice peer_ttl; the rebalancing one promote_after.
        waits = 2 * (peer_ttl or 0) + (promote_after or 0)
        return await run_cases(
            name,
            TRACKER_CASES.select(only),
            target,
            case_timeout=10 * reply_wait + waits,
            concurrency=concurrency,
        )


async def check_parent(
    address: tuple[str, int],
    *,
    parent_id: bytes,
    stream: bytes,
    only: Collection[str] = (),
    reply_wait: float = 3.0,
    close_wait: float = 1.0,
    child_timeout: float = 1.0,
    concurrency: int = 1,
    host_key: Ed25519PrivateKey | None = None,
) -> Report:
    """Run the parent cases; `concurrency` > 1 needs that many free child slots, and a
    parent that feeds only admitted children needs `host_key` (the suite is admitted)."""
    name = f"parent {format_address(address)} ({key_to_text(parent_id)})"
    async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
        target = ParentTarget(
            endpoint, address, parent_id, reply_wait, close_wait, stream, child_timeout, host_key
        )
        return await run_cases(
            name,
            PARENT_CASES.select(only),
            target,
            case_timeout=10 * reply_wait,
            concurrency=concurrency,
        )


async def check_child(
    command: Sequence[str],
    *,
    only: Collection[str] = (),
    reply_wait: float = 3.0,
    close_wait: float = 1.0,
    silence_timeout: float = 0.6,
    stall_timeout: float = 2.0,
    concurrency: int = 1,
) -> Report:
    """Run the child cases, each against a node started from `command` (an argv
    template, see `meshd.conformance.stage.PLACEHOLDERS`)."""
    with tempfile.TemporaryDirectory(prefix="meshd-conformance-") as workdir:
        target = ChildTarget(
            command,
            Path(workdir),
            reply_wait,
            close_wait,
            silence_timeout=silence_timeout,
            stall_timeout=stall_timeout,
        )
        return await run_cases(
            f"child: {' '.join(command)}",
            CHILD_CASES.select(only),
            target,
            case_timeout=target.start_timeout + 10 * reply_wait,
            concurrency=concurrency,
        )
